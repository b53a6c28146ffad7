"""Hand-written autograd functions behind Nyström attention (models/attention/nystrom.py).

Each computes the same function as the plain ops it replaces (outputs and gradients equal to fp32
rounding):
  * the depthwise convolution skip on V (banded block-Toeplitz GEMMs over window views of one padded
    copy), summed with the attention output as it is written; it works in the (B, L, H, Dh) memory
    order of the multi-head wrapper's views and of the fused attention kernels' outputs and gradients,
    so no full-size transposing copy is made and autograd sums V's gradients in place;
  * the pseudo-inverse iteration, with a backward of eight batched GEMMs per iteration instead of
    autograd's graph of the iteration.
"""
from __future__ import annotations

import torch


def _band_index(H: int, block: int, K: int, device: torch.device) -> torch.Tensor:
    """(H, block, K) column indices of the band: row p, tap t sits at column p + t."""
    return (torch.arange(block, device=device)[:, None] + torch.arange(K, device=device)).expand(H, block, K)


def _band(weight: torch.Tensor, block: int) -> torch.Tensor:
    """(H, K) filters -> (H, block, block + K - 1) band matrices: row p holds the filter at columns p..p+K-1."""
    H, K = weight.shape
    idx = _band_index(H, block, K, weight.device)
    return weight.new_zeros(H, block, block + K - 1).scatter_(2, idx, weight[:, None, :].expand(H, block, K))


def _seq_buffer(x: torch.Tensor, kernel: int, block: int, mask: torch.Tensor | None) -> torch.Tensor:
    """x (B, H, L, Dh) -> (B, R, H, Dh), R = ceil(L/block)·block + kernel - 1: x's rows at kernel//2..,
    zero rows around them and at padded tokens (mask (B, L), True = real). For x laid out (B, L, H, Dh)
    (the multi-head wrapper's views, the attention output) the copy keeps the memory order."""
    B, H, L, D = x.shape
    c = kernel // 2
    buf = x.new_empty(B, -(-L // block) * block + kernel - 1, H, D)
    buf[:, :c].zero_()
    buf[:, c + L:].zero_()
    rows = buf[:, c:c + L]  # (B, L, H, Dh)
    if mask is None:
        rows.copy_(x.transpose(1, 2))
    else:  # copy and zero padded tokens in one pass: a product by the mask (where has no vectorised CPU kernel)
        torch.mul(x.transpose(1, 2), mask[:, :, None, None], out=rows)
    return buf


def _seq_windows(buf: torch.Tensor, b: int, h: int, width: int, block: int, offset: int = 0) -> torch.Tensor:
    """Overlapping views (nb, width, Dh) of example b, head h of buf (B, R, H, Dh): window i starts at row
    offset + i*block."""
    B, R, H, D = buf.shape
    nb = (R - offset - width) // block + 1
    return buf.as_strided((nb, width, D), (block * H * D, H * D, 1), buf.storage_offset() + ((b * R + offset) * H + h) * D)


def _conv_rows(buf: torch.Tensor, band: torch.Tensor, block: int, L: int, dst: torch.Tensor,
               add: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> None:
    """dst (B, H, L, Dh) = every window of buf (B, R, H, Dh) times its head's band (H, block, width)
    [+ add (B, H, L, Dh)] [zero at padded tokens, mask (B, L) True = real]: one batched GEMM per example
    and head into a small buffer reused across examples, then one pass per example into dst's own
    layout (no full-size transposing copy)."""
    B, R, H, D = buf.shape
    width = band.shape[-1]
    nb = (R - width) // block + 1
    tmp = buf.new_empty(H, nb, block, D)
    rows = tmp.view(H, nb * block, D)[:, :L]  # (H, L, Dh)
    for b in range(B):
        for h in range(H):  # the band is shared by the windows (stride 0), not copied
            torch.bmm(band[h].expand(nb, -1, -1), _seq_windows(buf, b, h, width, block), out=tmp[h])
        if add is not None:
            torch.add(add[b], rows, out=dst[b])
        elif mask is not None:
            torch.mul(rows, mask[b, None, :, None], out=dst[b])
        else:
            dst[b].copy_(rows)


def _blhd_empty(like: torch.Tensor, B: int, H: int, L: int, D: int) -> torch.Tensor:
    """An uninitialised (B, H, L, Dh) tensor laid out (B, L, H, Dh) in memory, the layout of the fused
    attention kernels' outputs and gradients; not a view, so autograd may sum into it in place."""
    return like.new_empty_strided((B, H, L, D), (L * H * D, D, H * D, 1))


class _DepthwiseSeqConv(torch.autograd.Function):
    """[x +] same-padded depthwise convolution of v along L, one filter per head; see depthwise_seq_conv."""

    @staticmethod
    def forward(ctx, x: torch.Tensor | None, v: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                mask: torch.Tensor | None, block: int) -> torch.Tensor:
        B, H, L, D = v.shape
        buf = _seq_buffer(v, weight.shape[-1], block, mask)  # (B, R, H, Dh)
        out = _blhd_empty(v, B, H, L, D) if x is None else torch.empty_like(x)
        _conv_rows(buf, _band(weight, block), block, L, out, x)
        ctx.save_for_backward(buf, weight, mask)
        ctx.block = block
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        buf, weight, mask = ctx.saved_tensors
        block, K = ctx.block, weight.shape[-1]
        B, H, L, D = grad.shape
        gbuf = _seq_buffer(grad, K, block, None)  # (B, R, H, Dh)
        grad_v = grad_w = None
        if ctx.needs_input_grad[1]:  # the transposed convolution: the same one with the filters reversed
            grad_v = _blhd_empty(grad, B, H, L, D)
            _conv_rows(gbuf, _band(weight.flip(-1), block), block, L, grad_v, mask=mask)  # zero at padding
        if ctx.needs_input_grad[2]:  # d band = sum over windows of grad block x window^T; filter tap t = diagonal t
            width = block + K - 1
            nb = (buf.shape[1] - width) // block + 1
            gband = buf.new_zeros(H, block, width)
            tmp = buf.new_empty(nb, block, width)
            for b in range(B):
                for h in range(H):
                    g = _seq_windows(gbuf, b, h, block, block, K // 2)[:nb]  # (nb, block, Dh): grad rows
                    torch.bmm(g, _seq_windows(buf, b, h, width, block).transpose(1, 2), out=tmp)
                    gband[h] += tmp.sum(0)
            grad_w = gband.gather(2, _band_index(H, block, K, buf.device)).sum(1)  # (H, K)
        return grad if ctx.needs_input_grad[0] else None, grad_v, grad_w, None, None


def depthwise_seq_conv(v: torch.Tensor, weight: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                       block: int = 16) -> torch.Tensor:
    """Same-padded convolution of v (B, H, L, Dh) along L with one odd-length filter per head,
    weight (H, K), shared by the head's Dh channels (a depthwise Conv2d with a (K, 1) kernel); padded
    tokens (key_padding_mask (B, L) False) count as zeros (their values are multiplied by 0, so a finite
    value there changes nothing; a NaN or inf would, as in the fused attention kernels). Returns
    (B, H, L, Dh) in (B, L, H, Dh) memory.

    Computed as banded block-Toeplitz matrix products: V is copied once into a (B, L + K - 1, H, Dh)
    buffer with zero rows around it (its own memory order when V is laid out (B, L, H, Dh)); each block
    of `block` output rows is a (block, block + K - 1) band matrix times an overlapping window of that
    buffer, a strided view (no window is copied), so one batched GEMM per example and head does the
    convolution, and backward is the same with the filters reversed plus one batched GEMM per example
    and head for the filter gradient. V's gradient comes back in (B, L, H, Dh) memory. torch.compile
    runs it as it is (a graph break, as before this layout; conv2d, which it would trace, is an order of
    magnitude slower on a CPU)."""
    return _DepthwiseSeqConv.apply(None, v, weight, key_padding_mask, block)


def conv_skip_add(x: torch.Tensor, v: torch.Tensor, weight: torch.Tensor,
                  key_padding_mask: torch.Tensor | None = None, block: int = 16) -> torch.Tensor:
    """x + depthwise_seq_conv(v, weight, key_padding_mask, block), x (B, H, L, Dh): the sum is written
    once, in x's layout, by the convolution itself; x's gradient passes through."""
    return _DepthwiseSeqConv.apply(x, v, weight, key_padding_mask, block)


def _pinv_step(a: torch.Tensor, z: torch.Tensor, eye: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One iteration Z' = Z/4 (13I - AZ(15I - AZ(7I - AZ))) on (N, m, m) batches: (Z', AZ, T1, T2, T3), the
    intermediates being what the hand-written backward needs."""
    az = torch.bmm(a, z)
    t1 = torch.add(-az, eye, alpha=7.0)  # 7I - AZ
    t2 = torch.baddbmm(eye, az, t1, beta=15.0, alpha=-1.0)  # 15I - AZ(7I - AZ)
    t3 = torch.baddbmm(eye, az, t2, beta=13.0, alpha=-1.0)  # 13I - AZ(...)
    return torch.baddbmm(eye, z, t3, beta=0.0, alpha=0.25), az, t1, t2, t3  # Z/4 (...)


class _PinvIterations(torch.autograd.Function):
    """Z <- Z/4 (13 I - AZ (15 I - AZ (7 I - AZ))) from Z0, `iterations` times, on (N, m, m) batches;
    see pinv_iterations."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, z: torch.Tensor, eye: torch.Tensor,  # type: ignore[override]
                iterations: int) -> torch.Tensor:
        saved = []
        for _ in range(iterations):
            z_next, *step = _pinv_step(a, z, eye)
            saved += [z, *step]
            z = z_next
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
        z = _pinv_step(a, z, eye)[0]
    return z
