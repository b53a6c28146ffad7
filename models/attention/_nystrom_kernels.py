"""Hand-written autograd functions behind Nyström attention (models/attention/nystrom.py).

Each computes the same function as the plain ops it replaces (outputs and gradients equal to fp32
rounding):
  * the depthwise convolution skip on V (banded block-Toeplitz GEMMs over window views of one padded
    copy);
  * the pseudo-inverse iteration, with a backward of eight batched GEMMs per iteration instead of
    autograd's graph of the iteration.
"""
from __future__ import annotations

import torch


def _band(weight: torch.Tensor, block: int) -> torch.Tensor:
    """(H, K) filters -> (H, block, block + K - 1) band matrices: row p holds the filter at columns p..p+K-1."""
    H, K = weight.shape
    idx = (torch.arange(block, device=weight.device)[:, None] + torch.arange(K, device=weight.device)).expand(H, block, K)
    return weight.new_zeros(H, block, block + K - 1).scatter_(2, idx, weight[:, None, :].expand(H, block, K))


def _padded_rows(x: torch.Tensor, kernel: int, block: int, mask: torch.Tensor | None) -> torch.Tensor:
    """x (B, H, L, Dh) -> (H, R, B, Dh), R = ceil(L/block)·block + kernel - 1: x's rows at kernel//2..,
    zero rows around them and at padded tokens (mask (B, L), True = real)."""
    B, H, L, D = x.shape
    c = kernel // 2
    buf = x.new_empty(H, -(-L // block) * block + kernel - 1, B, D)
    buf[:, :c].zero_()
    buf[:, c + L:].zero_()
    rows = buf[:, c:c + L]  # (H, L, B, Dh)
    rows.copy_(x.permute(1, 2, 0, 3))
    if mask is not None:
        rows.masked_fill_(~mask.t()[None, :, :, None], 0.0)
    return buf


def _windows(buf: torch.Tensor, width: int, block: int, offset: int = 0) -> torch.Tensor:
    """Overlapping views (H, nb, width, B*Dh) of buf (H, R, B, Dh): window i starts at row offset + i*block."""
    H, R, B, D = buf.shape
    nb = (R - offset - width) // block + 1
    return buf.as_strided((H, nb, width, B * D), (R * B * D, block * B * D, B * D, 1), buf.storage_offset() + offset * B * D)


def _band_matmul(buf: torch.Tensor, band: torch.Tensor, block: int) -> torch.Tensor:
    """Every window of buf (H, R, B, Dh) times its head's band (H, block, width) -> (H, nb*block, B, Dh)."""
    H, R, B, D = buf.shape
    win = _windows(buf, band.shape[-1], block)  # (H, nb, width, B*Dh), a view
    nb = win.shape[1]
    out = buf.new_empty(H, nb, block, B * D)
    for h in range(H):  # the band is shared by the head's windows (stride 0), not copied
        torch.bmm(band[h].expand(nb, -1, -1), win[h], out=out[h])
    return out.view(H, nb * block, B, D)


def _conv_forward(v: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None,
                  block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(padded copy of v (H, R, B, Dh), convolution (H, L, B, Dh), a view)."""
    buf = _padded_rows(v, weight.shape[-1], block, mask)
    return buf, _band_matmul(buf, _band(weight, block), block)[:, : v.shape[2]]


def _conv_backward(grad: torch.Tensor, buf: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None,
                   block: int, need_v: bool, need_w: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the convolution: V's (B, H, L, Dh) (a permuted view, zero at padded tokens) and the
    filters' (H, K), from grad (B, H, L, Dh) and the forward's padded copy buf (H, R, B, Dh)."""
    B, H, L, D = grad.shape
    K = weight.shape[-1]
    gbuf = _padded_rows(grad, K, block, None)  # (H, R, B, Dh)
    grad_v = grad_w = None
    if need_v:  # the transposed convolution: the same one with the filters reversed
        grad_v = _band_matmul(gbuf, _band(weight.flip(-1), block), block)[:, :L]  # (H, L, B, Dh)
        if mask is not None:
            grad_v.masked_fill_(~mask.t()[None, :, :, None], 0.0)
        grad_v = grad_v.permute(2, 0, 1, 3)  # (B, H, L, Dh)
    if need_w:  # d band = sum over windows of grad block x window^T; filter tap t = diagonal t
        width = block + K - 1
        win = _windows(buf, width, block)  # (H, nb, width, B*Dh)
        g = _windows(gbuf, block, block, K // 2)[:, : win.shape[1]]  # (H, nb, block, B*Dh): grad rows
        gband = torch.stack([torch.bmm(g[h], win[h].transpose(1, 2)).sum(0) for h in range(H)])
        idx = (torch.arange(block, device=buf.device)[:, None] + torch.arange(K, device=buf.device))
        grad_w = gband.gather(2, idx.expand(H, block, K)).sum(1)  # (H, K)
    return grad_v, grad_w


class _DepthwiseSeqConv(torch.autograd.Function):
    """Same-padded depthwise convolution along L, one filter per head; see depthwise_seq_conv."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None,  # type: ignore[override]
                block: int) -> torch.Tensor:
        buf, out = _conv_forward(v, weight, mask, block)  # (H, L, B, Dh)
        ctx.save_for_backward(buf, weight, mask)
        ctx.block = block
        return out.permute(2, 0, 1, 3)  # (B, H, L, Dh)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        buf, weight, mask = ctx.saved_tensors
        grad_v, grad_w = _conv_backward(grad, buf, weight, mask, ctx.block, *ctx.needs_input_grad[:2])
        return grad_v, grad_w, None, None


def depthwise_seq_conv(v: torch.Tensor, weight: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                       block: int = 16) -> torch.Tensor:
    """Same-padded convolution of v (B, H, L, Dh) along L with one odd-length filter per head,
    weight (H, K), shared by the head's Dh channels (a depthwise Conv2d with a (K, 1) kernel); padded
    tokens (key_padding_mask (B, L) False) count as zeros. Returns (B, H, L, Dh), a permuted view.

    Computed as banded block-Toeplitz matrix products: V is copied once into a (H, L + K - 1, B, Dh)
    buffer with zero rows around it; each block of `block` output rows is a (block, block + K - 1)
    band matrix times an overlapping window of that buffer, a strided view (no window is copied), so one
    batched GEMM per head does the whole convolution, and backward is the same with the filters
    reversed plus one batched GEMM for the filter gradient."""
    return _DepthwiseSeqConv.apply(v, weight, key_padding_mask, block)


class _PinvIterations(torch.autograd.Function):
    """Z <- Z/4 (13 I - AZ (15 I - AZ (7 I - AZ))) from Z0, `iterations` times, on (N, m, m) batches;
    see pinv_iterations."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, z: torch.Tensor, eye: torch.Tensor,  # type: ignore[override]
                iterations: int) -> torch.Tensor:
        saved = []
        for _ in range(iterations):
            az = torch.bmm(a, z)
            t1 = torch.add(-az, eye, alpha=7.0)  # 7I - AZ
            t2 = torch.baddbmm(eye, az, t1, beta=15.0, alpha=-1.0)  # 15I - AZ(7I - AZ)
            t3 = torch.baddbmm(eye, az, t2, beta=13.0, alpha=-1.0)  # 13I - AZ(...)
            saved += [z, az, t1, t2, t3]
            z = torch.baddbmm(eye, z, t3, beta=0.0, alpha=0.25)  # Z/4 (...)
        ctx.save_for_backward(a, *saved)
        ctx.iterations = iterations
        return z

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # One step, P = AZ:  T1 = 7I - P,  T2 = 15I - P T1,  T3 = 13I - P T2,  Z' = Z T3 / 4.  With
        # n3 = Zᵀ dZ', n2 = Pᵀ n3, n1 = Pᵀ n2 (dT3 = n3/4, dT2 = -n2/4, dT1 = n1/4):
        #   dP = (-n3 T2ᵀ + n2 T1ᵀ - n1)/4,  dA += dP Zᵀ,  dZ = dZ' T3ᵀ/4 + Aᵀ dP.
        a, *saved = ctx.saved_tensors
        grad_a = None
        for i in reversed(range(ctx.iterations)):
            z, az, t1, t2, t3 = saved[5 * i: 5 * i + 5]
            n3 = torch.bmm(z.mT, grad)
            n2 = torch.bmm(az.mT, n3)
            n1 = torch.bmm(az.mT, n2)
            d_az = torch.baddbmm(n1, n3, t2.mT, beta=-0.25, alpha=-0.25).baddbmm_(n2, t1.mT, alpha=0.25)
            grad_a = torch.bmm(d_az, z.mT) if grad_a is None else grad_a.baddbmm_(d_az, z.mT)
            grad = torch.bmm(a.mT, d_az).baddbmm_(grad, t3.mT, alpha=0.25)
        return grad_a, grad, None, None


def pinv_iterations(a: torch.Tensor, z0: torch.Tensor, eye: torch.Tensor, iterations: int) -> torch.Tensor:
    """The Nyströmformer pseudo-inverse iteration Z <- Z/4 (13 I - AZ (15 I - AZ (7 I - AZ))) from z0,
    a and z0 (N, m, m), eye the (m, m) identity. Its gradients are the iteration's (not the exact
    pseudo-inverse's), from one hand-written backward of eight batched GEMMs per iteration instead of
    autograd's graph of ~20 nodes per iteration. Plain ops under torch.compile."""
    if not torch.compiler.is_compiling():
        return _PinvIterations.apply(a, z0, eye, iterations)
    z = z0
    for _ in range(iterations):
        az = torch.bmm(a, z)
        t = torch.add(-az, eye, alpha=7.0)
        t = torch.baddbmm(eye, az, t, beta=15.0, alpha=-1.0)
        t = torch.baddbmm(eye, az, t, beta=13.0, alpha=-1.0)
        z = torch.baddbmm(eye, z, t, beta=0.0, alpha=0.25)
    return z
