"""Performer attention: FAVOR+ (Choromanski et al., "Rethinking Attention with Performers", ICLR 2021).

    out_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / φ(q_i)ᵀ Σ_j φ(k_j)       (j over real keys only)

softmax kernel: φ(x) = exp(ω x − |x|²/2) / √m with x = q / Dh^¼ (so ω·q ω·k estimates exp(q·k/√Dh)),
ω the rows of a positive orthogonal random projection (m, Dh). relu kernel: φ(x) = relu(ω x) + ε.
Cost is linear in L; nothing is L x L.

What the Nyströmformer authors' LRA runs computed (shared/LRA_FACTS.md §5): softmax features (their
"relu" setting was ignored by the library), logits scaled by 1/Dh instead of 1/√Dh (`logit_scale="1/Dh"`:
q and k are divided by Dh^¼ once more), and padded keys zeroed but kept in the normaliser
(`pad_in_normaliser=True`, a defect: a padded key adds φ(0) to every query's denominator). Their library
also added ε = 1e-4 to every softmax feature after its own stabilisers (`feature_eps`, computed as
performer-pytorch 1.1.4 does: queries stabilised by their row maximum, keys by one maximum per example
and head; the ε makes those choices matter, so they are reproduced).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from models.attention.base import AttentionBackend, AttentionConfigError

RELU_EPS = 1e-3  # keeps relu-feature normalisers positive (the Performer paper's generalized-kernel epsilon)
KERNELS = ("softmax", "relu")
LOGIT_SCALES = ("1/sqrt(Dh)", "1/Dh")
BLOCK_ROWS = 512  # rows of an (N*L, m) map handled at once on one thread (512 x 256 fp32 = 512 KiB, in cache)


def orthogonal_features(
    num_features: int, head_dim: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(num_features, head_dim) Gaussian rows made orthogonal in blocks of head_dim (QR), each row
    rescaled to the norm of an independent Gaussian vector, so rows stay marginally N(0, I)."""
    blocks = []
    for _ in range(-(-num_features // head_dim)):
        g = torch.randn(head_dim, head_dim, generator=generator)
        q, r = torch.linalg.qr(g)  # columns orthonormal
        q = q * torch.sign(torch.diagonal(r))  # fix the signs so that q is Haar-distributed (unbiased)
        blocks.append(q.T)
    w = torch.cat(blocks)[:num_features]  # (m, Dh) unit rows
    norms = torch.randn(num_features, head_dim, generator=generator).norm(dim=1)
    return w * norms[:, None]


def softmax_features(x2: torch.Tensor, w: torch.Tensor, groups: int, is_query: bool, half_scale: float,
                     pad_rows: torch.Tensor | None = None, eps: float = 0.0,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """e = exp(ω·x − |x|²/2 − stab) (N*L, m) of rows x2 (N*L, Dh); the softmax feature is e + eps, the ε
    being added in _FavorSoftmax's small sums, never on this tensor. w (m, Dh) is the projection times the
    data scale c, so ω·x = x2 @ wᵀ and |x|²/2 = half_scale * |x2|² (half_scale = c²/2). Padded keys
    (pad_rows (N*L, 1) True) get e = 0. out: an (N*L, m) tensor to write e into (else a new one).

    The stabilisers are constants (no gradient): queries subtract their row max of ω·x, keys one max per
    example-and-head group over its real keys. eps = 0: all but ω·x cancels between numerator and
    normaliser, so queries leave out |x|²/2 and the keys' max includes it (robust to large |k|). eps > 0
    (performer-pytorch 1.1.4, whose choices then change the result): both maxima are of ω·x alone.
    A GEMM, a max and two in-place passes per block of rows; no autograd (see _FavorSoftmax)."""
    NL, m = x2.shape[0], w.shape[0]
    L = NL // groups
    e = x2.new_empty(NL, m) if out is None else out  # (N*L, m)
    half = None if is_query and not eps else x2.square().sum(-1, keepdim=True).mul_(half_scale)  # (N*L, 1)
    # block by block, so that the max and the exp passes run in cache; keys by whole examples (one max each)
    rows = _rows_per_block(groups, L, x2.device)
    for n0, n1, l0, l1 in _blocks(groups, L, rows if is_query else max(rows, L)):
        r0, r1 = n0 * L + l0, (n1 - 1) * L + l1  # the block's rows of (N*L, ·)
        z = torch.mm(x2[r0:r1], w.T, out=e[r0:r1])  # (rows, m): ω·x
        row_max = z.amax(-1, keepdim=True)  # (rows, 1)
        if is_query:
            z.sub_(row_max if half is None else row_max.add_(half[r0:r1])).exp_()
            continue
        key_max = row_max if eps else row_max.sub_(half[r0:r1])  # (rows, 1): each key's own maximum
        if pad_rows is not None:
            key_max.masked_fill_(pad_rows[r0:r1], float("-inf"))
        stab = key_max.view(n1 - n0, -1).amax(-1, keepdim=True)  # (n, 1): one per example and head
        bias = half[r0:r1].view(n1 - n0, -1).add(stab).view(-1, 1)  # (rows, 1)
        if pad_rows is not None:
            bias.masked_fill_(pad_rows[r0:r1], float("inf"))  # exp(−inf) = 0 for padded keys
        z.sub_(bias).exp_()
    return e


class FeatureMaps:
    """Free (N*L, m) feature maps of one module, reused from one training step to the next: the allocator
    hands a fresh map of this size back to the OS when freed and the next one pays a page fault per 4 KiB
    page on first touch (about a sixth of the preset's layer time). A forward takes maps (or allocates),
    its backward gives them back when done, with its own d/dz buffer. Should a kept graph (retain_graph)
    have its maps reused by a later forward, autograd's in-place check fails that graph's next backward
    instead of going wrong."""

    def __init__(self, keep: int = 3) -> None:
        self.keep, self.free = keep, []  # free: at most `keep` maps, the latest given back

    def take(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        for i, t in enumerate(self.free):
            if t.shape == shape and t.dtype == like.dtype and t.device == like.device:
                return self.free.pop(i)
        return like.new_empty(shape)

    def give(self, *maps: torch.Tensor) -> None:
        for t in maps:
            if not t.is_inference() and all(t.data_ptr() != f.data_ptr() for f in self.free):
                self.free.append(t)
        del self.free[: max(0, len(self.free) - self.keep)]

    def __deepcopy__(self, memo: dict) -> FeatureMaps:
        return FeatureMaps(self.keep)  # a copy starts empty: the maps are scratch memory, not state

    def __getstate__(self) -> dict:
        return {"keep": self.keep, "free": []}


def _rows_per_block(N: int, L: int, device: torch.device) -> int:
    """BLOCK_ROWS on a CPU with one thread; else one block of all N*L rows: with more threads, many small
    parallel regions make them wait on each other (several times slower on a shared 2-core machine), and
    an accelerator wants few large kernels."""
    return BLOCK_ROWS if device.type == "cpu" and torch.get_num_threads() == 1 else N * L


def _blocks(N: int, L: int, rows: int) -> Iterator[tuple[int, int, int, int]]:
    """(n0, n1, l0, l1) blocks of at most `rows` rows of an (N, L) grid: within one example, or whole
    examples when L < rows."""
    if L >= rows:
        for n in range(N):
            for l0 in range(0, L, rows):
                yield n, n + 1, l0, min(L, l0 + rows)
    else:
        for n0 in range(0, N, rows // L):
            yield n0, min(N, n0 + rows // L), 0, L


class _FavorSoftmax(torch.autograd.Function):
    """out = φ(q)ᵀ S / φ(q)ᵀ z, S = Σ_j φ(k_j) v_jᵀ, z = Σ_j φ(k_j) (j over real keys), φ = e + ε with e
    from softmax_features. The ε is carried by small (N, Dh+1)-sized sums, so the only (N*L, m) tensors
    are the two e maps (saved for the backward); d/dz is formed one block of rows at a time in one buffer."""

    @staticmethod
    def forward(ctx, q2, k2, v, w, pad_rows, eps, half_scale, maps):  # q2, k2: (N*L, Dh); v: (N, L, Dh); w: (m, Dh)
        N, L, D = v.shape
        bq, bk = (None, None) if maps is None else (maps.take((N * L, w.shape[0]), q2) for _ in range(2))
        eq = softmax_features(q2, w, N, True, half_scale, None, eps, bq).view(N, L, -1)  # (N, L, m)
        ek = softmax_features(k2, w, N, False, half_scale, pad_rows, eps, bk).view(N, L, -1)  # (N, L, m)
        real = v.new_ones(N, L, 1) if pad_rows is None else (~pad_rows).to(v.dtype).view(N, L, 1)  # (N, L, 1)
        v1 = torch.cat([v * real, real], -1)  # (N, L, Dh+1): 0 on padded keys; the last column sums z
        s_t = torch.bmm(v1.transpose(1, 2), ek)  # (N, Dh+1, m)
        if eps:
            s_t += eps * v1.sum(1)[..., None]  # ε·Σ_j (v_j, 1) in every feature column
        o1 = torch.bmm(eq, s_t.transpose(1, 2))  # (N, L, Dh+1)
        if eps:
            o1 += eps * s_t.sum(-1)[:, None, :]  # the queries' ε
        den = o1[..., D:].clamp_min(torch.finfo(o1.dtype).tiny)  # (N, L, 1)
        out = o1[..., :D] / den  # (N, L, Dh)
        ctx.eps, ctx.half_scale, ctx.maps = eps, half_scale, maps
        ctx.save_for_backward(q2, k2, w, v1, eq, ek, s_t, den, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out):  # g_out: (N, L, Dh)
        q2, k2, w, v1, eq, ek, s_t, den, out = ctx.saved_tensors
        eps, c2 = ctx.eps, 2 * ctx.half_scale  # d(|x|²/2)/dx2 = c2 * x2
        N, L, D = out.shape
        m = w.shape[0]
        w1 = torch.cat([w, w.new_ones(m, 1)], -1)  # (m, Dh+1): the last column sums a row over m
        g_o1 = torch.cat([g_out, -(g_out * out).sum(-1, keepdim=True)], -1).div_(den)  # (N, L, Dh+1)
        g_s_t = torch.zeros_like(s_t)  # (N, Dh+1, m)
        g_aq = torch.empty_like(out)  # (N, L, Dh): g_z @ w for the queries
        g_ak = out.new_empty(N, L, D + 1)  # (N, L, Dh+1)
        g_v = torch.empty_like(out)  # (N, L, Dh)
        rows = _rows_per_block(N, L, out.device)
        size = (min(N * L, rows) * m,)
        buf = out.new_empty(size) if ctx.maps is None else ctx.maps.take(size, out)  # d/dz of one block
        # d/dz of the features, e ⊙ (g_φ), block by block so that it stays in cache (one thread)
        for n0, n1, l0, l1 in _blocks(N, L, rows):
            e, g = eq[n0:n1, l0:l1], g_o1[n0:n1, l0:l1]  # (n, l, m), (n, l, Dh+1)
            g_s_t[n0:n1].baddbmm_(g.transpose(1, 2), e)
            g_z = torch.bmm(g, s_t[n0:n1], out=buf[: e.numel()].view(e.shape)).mul_(e)  # de/dz = e
            torch.mm(g_z.view(-1, m), w, out=g_aq[n0:n1, l0:l1].view(-1, D))
        if eps:
            g_s_t += eps * g_o1.sum(1)[..., None]  # the queries' ε
        for n0, n1, l0, l1 in _blocks(N, L, rows):
            e, v_b = ek[n0:n1, l0:l1], v1[n0:n1, l0:l1]  # (n, l, m), (n, l, Dh+1)
            torch.bmm(e, g_s_t[n0:n1, :D].transpose(1, 2), out=g_v[n0:n1, l0:l1])
            g_z = torch.bmm(v_b, g_s_t[n0:n1], out=buf[: e.numel()].view(e.shape)).mul_(e)  # 0 on padded keys
            torch.mm(g_z.view(-1, m), w1, out=g_ak[n0:n1, l0:l1].view(-1, D + 1))
        if eps:
            g_v += eps * g_s_t[:, :D].sum(-1)[:, None, :] * v1[..., D:]  # the keys' ε, real keys only
        g_q = g_aq.view(N * L, D)  # (N*L, Dh)
        if eps:  # the queries' |x|²/2 no longer cancels. Its factor, Σ_m of g_z's row, is g_o1·(o1 − ε Σ_m s_t)
            # = −ε g_o1·Σ_m s_t, as g_o1·o1 = 0 (the output is invariant to scaling o1)
            row_sum = (g_o1 * s_t.sum(-1)[:, None, :]).sum(-1, keepdim=True).mul_(-eps)  # (N, L, 1)
            g_q = g_q.addcmul_(q2, row_sum.view(N * L, 1), value=-c2)
        g_ak = g_ak.view(N * L, D + 1)  # (N*L, Dh+1)
        g_k = torch.addcmul(g_ak[:, :D], k2, g_ak[:, D:], value=-c2)  # (N*L, Dh)
        if ctx.maps is not None:
            ctx.maps.give(eq.view(N * L, -1), ek.view(N * L, -1), buf)
        return g_q, g_k, g_v, None, None, None, None, None


def performer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    kernel: str = "softmax",
    key_padding_mask: torch.Tensor | None = None,
    logit_scale: str = "1/sqrt(Dh)",
    pad_in_normaliser: bool = False,
    feature_eps: float = 0.0,
    feature_maps: FeatureMaps | None = None,
) -> torch.Tensor:
    """FAVOR+ attention. q, k, v: (B, H, L, Dh); projection: (m, Dh); mask (B, L) bool, True = real.
    Returns (B, H, L, Dh) in q's dtype; features and sums run in at least fp32 with autocast off.
    logit_scale "1/Dh", pad_in_normaliser=True and feature_eps=1e-4 give the authors' computation
    (module docstring). feature_maps: scratch maps reused between calls (softmax kernel; see FeatureMaps)."""
    if kernel not in KERNELS:
        raise AttentionConfigError(f"performer: kernel must be one of {KERNELS}, got '{kernel}'")
    if logit_scale not in LOGIT_SCALES:
        raise AttentionConfigError(f"performer: logit_scale must be one of {LOGIT_SCALES}, got '{logit_scale}'")
    B, H, L, D = q.shape
    # the features see x = c·q and c·k: c = Dh^-¼ makes ω·x estimate q·k/√Dh; 1/Dh divides by Dh^¼ once more
    c = D**-0.5 if logit_scale == "1/Dh" else D**-0.25
    pad_rows = None
    if key_padding_mask is not None and pad_in_normaliser:  # zeroed keys still count: φ(0) != 0
        pad = ~key_padding_mask[:, None, :, None]  # (B, 1, L, 1)
        k, v = k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)
    elif key_padding_mask is not None:
        pad_rows = (~key_padding_mask)[:, None, :].expand(B, H, L).reshape(-1, 1)  # (B*H*L, 1)
    acc = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(device_type=q.device.type, enabled=False):
        w = projection.to(acc) * c  # (m, Dh): folds the data scale c into the projection, ω·x = q2 @ wᵀ
        q2, k2 = q.to(acc).reshape(B * H * L, D), k.to(acc).reshape(B * H * L, D)  # (B*H*L, Dh)
        v3 = v.to(acc).reshape(B * H, L, D)  # (B*H, L, Dh)
        if kernel == "softmax":
            out = _FavorSoftmax.apply(q2, k2, v3, w, pad_rows, float(feature_eps), c * c / 2,
                                      feature_maps)  # (B*H, L, Dh)
        else:
            qf = (torch.relu(q2 @ w.T) + RELU_EPS).view(B * H, L, -1)  # (B*H, L, m)
            kf = torch.relu(k2 @ w.T) + RELU_EPS  # (B*H*L, m)
            if pad_rows is not None:
                kf = kf.masked_fill(pad_rows, 0.0)
            kv = torch.bmm(kf.view(B * H, L, -1).transpose(1, 2), v3)  # (B*H, m, Dh)
            den = torch.bmm(qf, kf.view(B * H, L, -1).sum(1)[..., None])  # (B*H, L, 1)
            out = torch.bmm(qf, kv) / den
    return out.view(B, H, L, D).to(q.dtype)


class PerformerAttention(AttentionBackend):
    """FAVOR+ with positive orthogonal random features, one projection shared by the heads.

    forward(q, k, v, key_padding_mask) -> (B, H, L, Dh); mask (B, L) bool, True = real token.
    Options: num_features (m), kernel ('softmax' | 'relu'), redraw (new features at every training
    forward, from torch's global RNG), feature_seed (draw the initial features from a private
    generator with this seed; None = torch's global RNG, which the run seeds), logit_scale
    ('1/sqrt(Dh)' | '1/Dh'), pad_in_normaliser (the authors' defect), feature_eps (added to every softmax
    feature; the authors' library: 1e-4). The features live in the `projection` buffer, so a checkpoint
    restores them.
    """

    name = "performer"
    approximates_softmax: ClassVar[bool] = True  # kernel: softmax (the default); kernel: relu is another function
    mixed_precision: ClassVar[str] = "random features, sums and the normalisation run in fp32 with autocast off"

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        max_len: int | None = None,
        num_features: int = 256,
        kernel: str = "softmax",
        redraw: bool = False,
        feature_seed: int | None = None,
        logit_scale: str = "1/sqrt(Dh)",
        pad_in_normaliser: bool = False,
        feature_eps: float = 0.0,
    ) -> None:
        super().__init__(num_heads, head_dim, max_len)
        if kernel not in KERNELS:
            raise AttentionConfigError(f"performer: kernel must be one of {KERNELS}, got '{kernel}'")
        if logit_scale not in LOGIT_SCALES:
            raise AttentionConfigError(f"performer: logit_scale must be one of {LOGIT_SCALES}, got '{logit_scale}'")
        if feature_eps < 0 or (feature_eps and kernel != "softmax"):
            raise AttentionConfigError(f"performer: feature_eps must be >= 0 and applies to the softmax kernel only "
                                       f"(the relu kernel has its own ε), got {feature_eps} with kernel '{kernel}'")
        self.logit_scale, self.pad_in_normaliser, self.feature_eps = logit_scale, bool(pad_in_normaliser), feature_eps
        self.require_at_least("num_features", num_features, 1)
        self.num_features, self.kernel, self.redraw = num_features, kernel, redraw
        gen = None if feature_seed is None else torch.Generator().manual_seed(feature_seed)
        self.register_buffer("projection", orthogonal_features(num_features, head_dim, gen))  # (m, Dh)
        self.feature_maps = FeatureMaps()  # scratch memory reused between training steps, not state

    def train(self, mode: bool = True) -> PerformerAttention:
        if not mode:
            self.feature_maps.free.clear()  # evaluation needs no maps kept for the next training step
        return super().train(mode)

    @torch.no_grad()
    def redraw_features(self) -> None:
        """Replace the projection by a fresh draw from torch's global RNG."""
        new = orthogonal_features(self.num_features, self.head_dim)
        self.projection.copy_(new.to(self.projection.device, self.projection.dtype))

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.redraw and self.training:
            self.redraw_features()
        return performer_attention(q, k, v, self.projection, self.kernel, key_padding_mask, self.logit_scale,
                                   self.pad_in_normaliser, self.feature_eps, self.feature_maps)

    def extra_repr(self) -> str:
        return (f"num_features={self.num_features}, kernel={self.kernel}, redraw={self.redraw}, "
                f"logit_scale={self.logit_scale}, pad_in_normaliser={self.pad_in_normaliser}, "
                f"feature_eps={self.feature_eps}")
