"""Nyström attention (Xiong et al., "Nyströmformer", AAAI 2021).

    softmax(Q Kᵀ/√d) V  ≈  softmax(Q K̃ᵀ/√d) · pinv(softmax(Q̃ K̃ᵀ/√d)) · softmax(Q̃ Kᵀ/√d) V

Q̃, K̃ are m landmarks: means of consecutive segments of the sequence, taken over real tokens only.
`segments` says where the segments are cut:
  padded  m equal segments of the padded length (padded up to a multiple of m), as the authors' code:
          a short example in a long padded batch gets few non-empty landmarks, and its outputs change
          with the padded length (task.max_len);
  real    m segments of each example's own real tokens (token r of n goes to segment ⌊r·m/n⌋): every
          example with n >= m tokens gets m landmarks, whatever the padding.
A segment holding no real token gives no landmark: it is masked out of every kernel, which is the same as
running with the non-empty landmarks alone. (`pad_in_landmarks=True` is the authors' defect, as a switch:
padded positions count as zeros in the means and empty segments stay as zero landmarks.) The
pseudo-inverse is the paper's iteration from Z0 = Aᵀ / (‖A‖₁ ‖A‖∞), the norms per example and head
(`pinv_init="batch"`: one maximum over the whole batch, the authors' code, which couples batch mates).

The two outer kernels are computed by the fused `scaled_dot_product_attention` (their rows are
softmaxes), so no (L, m) matrix is kept for backward and nothing is L x L:
    W = pinv(A) · SDPA(Q̃, K, V)  (B, H, m, Dh);   out = SDPA(Q, K̃, W)  (B, H, L, Dh).
"""
from __future__ import annotations

import functools
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.attention.base import AttentionBackend, AttentionConfigError


@functools.lru_cache(maxsize=32)
def _identity(m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached (m, m) identity; never written to."""
    return torch.eye(m, dtype=dtype, device=device)


PINV_INITS = ("per_example", "batch")
SEGMENTS = ("padded", "real")


def iterative_pinv(a: torch.Tensor, iterations: int, init: str = "per_example") -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of each (m, m) matrix in `a` (..., m, m) by the iteration of the
    Nyströmformer paper:  Z <- Z/4 (13 I - AZ (15 I - AZ (7 I - AZ))),  Z0 = Aᵀ / (‖A‖₁ ‖A‖∞).
    init "per_example": both norms per matrix (an example never sees its batch mates); "batch": one
    maximum over every matrix in `a` (the authors' code; their row sums are all 1, so ‖A‖∞ = 1)."""
    *batch, m, _ = a.shape
    abs_a = a.abs()
    scale = abs_a.sum(-2).amax(-1) * abs_a.sum(-1).amax(-1)  # (...,) max column sum x max row sum
    if init == "batch":
        scale = scale.amax().expand_as(scale)
    elif init != "per_example":
        raise AttentionConfigError(f"nystrom: pinv_init must be one of {', '.join(PINV_INITS)}, got '{init}'")
    a3 = a.reshape(-1, m, m)  # (N, m, m)
    z = a3.transpose(1, 2) / scale.reshape(-1, 1, 1)
    eye = _identity(m, a.dtype, a.device)
    for _ in range(iterations):
        az = torch.bmm(a3, z)
        t = torch.add(-az, eye, alpha=7.0)  # 7I - AZ
        t = torch.baddbmm(eye, az, t, beta=15.0, alpha=-1.0)  # 15I - AZ(7I - AZ)
        t = torch.baddbmm(eye, az, t, beta=13.0, alpha=-1.0)  # 13I - AZ(...)
        z = torch.baddbmm(eye, z, t, beta=0.0, alpha=0.25)  # Z/4 (...)
    return z.reshape(*batch, m, m)


def segment_means(
    x: torch.Tensor, key_padding_mask: torch.Tensor | None, num_segments: int, pad_in_means: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Means of `num_segments` consecutive segments of the padded length of x (B, H, L, Dh).

    L is padded to a multiple of num_segments. Returns the landmarks (B, H, m, Dh) and a (B, m) bool
    mask (True = the segment holds a real token), or None when every segment is full and unmasked.
    Means are over real tokens; `pad_in_means` (the authors' code) divides by the segment length instead
    (padded positions count as zeros) and returns no mask (empty segments stay as zero landmarks)."""
    B, H, L, D = x.shape
    m = num_segments
    seg = -(-L // m)  # tokens per segment after padding
    pad = m * seg - L
    if key_padding_mask is None and pad == 0:  # a sum and a divide: backward expands the gradient once
        return x.reshape(B, H, m, seg, D).sum(-2) / seg, None  # (B, H, m, Dh)
    real = torch.ones(B, L, dtype=torch.bool, device=x.device) if key_padding_mask is None else key_padding_mask
    if key_padding_mask is not None:
        x = x.masked_fill(~real[:, None, :, None], 0.0)  # padded tokens carry nothing, whatever their value
    if pad:
        x = F.pad(x, (0, 0, 0, pad))  # (B, H, m*seg, Dh)
    sums = x.reshape(B, H, m, seg, D).sum(-2)  # (B, H, m, Dh)
    if pad_in_means:
        return sums / seg, None
    counts = F.pad(real, (0, pad)).reshape(B, m, seg).sum(-1)  # (B, m) real tokens per segment
    means = sums / counts.clamp_min(1)[:, None, :, None].to(x.dtype)
    return means, counts > 0


def real_segment_weights(key_padding_mask: torch.Tensor, num_segments: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, m, L) averaging weights of `num_segments` segments of each example's real tokens: the r-th of
    n real tokens (mask (B, L), True = real) belongs to segment ⌊r·m/n⌋; each non-empty row sums to 1,
    an empty segment's row (n < m) is all zero."""
    B, L = key_padding_mask.shape
    m = num_segments
    real = key_padding_mask
    rank = real.long().cumsum(-1) - 1  # (B, L): r for the r-th real token
    n = real.sum(-1, keepdim=True).clamp_min(1)  # (B, 1)
    seg = torch.where(real, rank * m // n, m)  # (B, L): padded tokens go to a dropped segment m
    onehot = torch.zeros(B, m + 1, L, dtype=dtype, device=real.device).scatter_(1, seg[:, None, :], 1.0)[:, :m]
    return onehot / onehot.sum(-1, keepdim=True).clamp_min(1.0)  # (B, m, L)


def landmarks(
    q: torch.Tensor, k: torch.Tensor, key_padding_mask: torch.Tensor | None, m: int, segments: str = "padded",
    pad_in_landmarks: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(Q̃, K̃, mask): landmarks (B, H, m, Dh) of q and k cut as `segments` says, and the (B, m) mask of
    non-empty landmarks (None: all non-empty or all kept)."""
    if segments == "padded":
        q_land, land_mask = segment_means(q, key_padding_mask, m, pad_in_landmarks)
        k_land, _ = segment_means(k, key_padding_mask, m, pad_in_landmarks)
        return q_land, k_land, land_mask
    if segments != "real":
        raise AttentionConfigError(f"nystrom: segments must be one of {', '.join(SEGMENTS)}, got '{segments}'")
    B, H, L, D = q.shape
    real = torch.ones(B, L, dtype=torch.bool, device=q.device) if key_padding_mask is None else key_padding_mask
    w = real_segment_weights(real, m, q.dtype)  # (B, m, L)
    land_mask = w.sum(-1) > 0  # (B, m): fewer real tokens than landmarks leaves segments empty
    pad = ~real[:, None, :, None]  # (B, 1, L, 1)
    q_land = torch.matmul(w[:, None], q.masked_fill(pad, 0.0))  # (B, H, m, Dh)
    k_land = torch.matmul(w[:, None], k.masked_fill(pad, 0.0))  # (B, H, m, Dh)
    return q_land, k_land, None if bool(land_mask.all()) else land_mask


def nonempty_landmarks(key_padding_mask: torch.Tensor | None, B: int, L: int, num_landmarks: int,
                       segments: str = "padded") -> torch.Tensor:
    """(B,) number of landmarks holding at least one real token, as `nystrom_attention` cuts them."""
    m = min(num_landmarks, L)
    if key_padding_mask is None:  # no padding; segments of the padded length may still be empty
        key_padding_mask = torch.ones(B, L, dtype=torch.bool)
    n = key_padding_mask.sum(-1)  # (B,)
    if segments == "real":
        return n.clamp_max(m)
    seg = -(-L // m)
    counts = F.pad(key_padding_mask, (0, m * seg - L)).reshape(B, m, seg).sum(-1)  # (B, m)
    return (counts > 0).sum(-1)


def nystrom_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_landmarks: int,
    pinv_iterations: int | None = 6,
    key_padding_mask: torch.Tensor | None = None,
    segments: str = "padded",
    pinv_init: str = "per_example",
    pad_in_landmarks: bool = False,
) -> torch.Tensor:
    """Nyström approximation of softmax attention, scale 1/sqrt(Dh), no conv skip.

    q, k, v: (B, H, L, Dh); key_padding_mask: (B, L) bool, True = real token. Returns (B, H, L, Dh) in
    q's dtype. `num_landmarks` >= L uses every token as a landmark (exact up to the pseudo-inverse);
    `pinv_iterations=None` uses the exact torch.linalg.pinv. The middle kernel and its pseudo-inverse
    are computed in at least fp32, with autocast off. segments / pinv_init / pad_in_landmarks: see the
    module docstring."""
    B, H, L, D = q.shape
    m = min(num_landmarks, L)
    scale = 1.0 / math.sqrt(D)
    q_land, k_land, land_mask = landmarks(q, k, key_padding_mask, m, segments, pad_in_landmarks)
    key_mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # (B, 1, 1, L)
    land_attn_mask = None if land_mask is None else land_mask[:, None, None, :]  # (B, 1, 1, m)

    # softmax(Q̃ Kᵀ/√d) V: m landmark queries over the real keys
    kernel3_v = F.scaled_dot_product_attention(q_land, k, v, attn_mask=key_mask)  # (B, H, m, Dh)

    acc = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(device_type=q.device.type, enabled=False):
        ql, kl = q_land.to(acc), k_land.to(acc)
        logits = torch.matmul(ql, kl.transpose(-1, -2)).mul_(scale)  # (B, H, m, m)
        if land_attn_mask is not None:
            logits = logits.masked_fill(~land_attn_mask, float("-inf"))
        kernel2 = logits.softmax(-1)
        if land_attn_mask is not None:  # an empty landmark's row becomes the identity row
            eye = _identity(m, acc, q.device)
            kernel2 = torch.where(land_mask[:, None, :, None], kernel2, eye)
        if pinv_iterations is None:
            kernel2_inv = torch.linalg.pinv(kernel2)
        else:
            kernel2_inv = iterative_pinv(kernel2, pinv_iterations, pinv_init)
        w = torch.matmul(kernel2_inv, kernel3_v.to(acc))  # (B, H, m, Dh)

    # softmax(Q K̃ᵀ/√d) W: every query over the non-empty landmarks
    return F.scaled_dot_product_attention(q, k_land, w.to(v.dtype), attn_mask=land_attn_mask).to(q.dtype)


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


class _DepthwiseSeqConv(torch.autograd.Function):
    """Same-padded depthwise convolution along L, one filter per head; see depthwise_seq_conv."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None,  # type: ignore[override]
                block: int) -> torch.Tensor:
        L, K = v.shape[2], weight.shape[-1]
        buf = _padded_rows(v, K, block, mask)  # (H, R, B, Dh)
        out = _band_matmul(buf, _band(weight, block), block)  # (H, nb*block, B, Dh)
        ctx.save_for_backward(buf, weight, mask)
        ctx.block, ctx.length = block, L
        return out[:, :L].permute(2, 0, 1, 3)  # (B, H, L, Dh)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        buf, weight, mask = ctx.saved_tensors
        block, L, K = ctx.block, ctx.length, weight.shape[-1]
        gbuf = _padded_rows(grad, K, block, None)  # (H, R, B, Dh)
        grad_v = grad_w = None
        if ctx.needs_input_grad[0]:  # the transposed convolution: the same one with the filters reversed
            grad_v = _band_matmul(gbuf, _band(weight.flip(-1), block), block)[:, :L]  # (H, L, B, Dh)
            if mask is not None:
                grad_v.masked_fill_(~mask.t()[None, :, :, None], 0.0)
            grad_v = grad_v.permute(2, 0, 1, 3)  # (B, H, L, Dh)
        if ctx.needs_input_grad[1]:  # d band = sum over windows of grad block x window^T; filter tap t = diagonal t
            width = block + K - 1
            win = _windows(buf, width, block)  # (H, nb, width, B*Dh)
            g = _windows(gbuf, block, block, K // 2)[:, : win.shape[1]]  # (H, nb, block, B*Dh): grad rows
            gband = torch.stack([torch.bmm(g[h], win[h].transpose(1, 2)).sum(0) for h in range(buf.shape[0])])
            idx = (torch.arange(block, device=buf.device)[:, None] + torch.arange(K, device=buf.device))
            grad_w = gband.gather(2, idx.expand(buf.shape[0], block, K)).sum(1)  # (H, K)
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


class NystromAttention(AttentionBackend):
    """Nyström attention with the paper's depthwise convolution skip on V.

    forward(q, k, v, key_padding_mask) -> (B, H, L, Dh); mask (B, L) bool, True = real token.
    Options: num_landmarks (m), pinv_iterations (None = exact pinv), conv_kernel (odd; 0 = no skip),
    segments (padded | real), pinv_init (per_example | batch), pad_in_landmarks (the authors' defect).
    The skip is one (conv_kernel x 1) filter per head, shared over the head's Dh channels, applied to
    V with padded rows zeroed. `attention_stats()` reports the mean number of non-empty landmarks per
    example over the last evaluation pass (the forwards since the last `eval()`).
    """

    name = "nystrom"
    mixed_precision: ClassVar[str] = (
        "the landmark kernel softmax(Q̃K̃ᵀ) and its pseudo-inverse run in fp32 (fp64 for fp64 inputs) "
        "with autocast off; the two outer kernels follow the autocast dtype"
    )
    approximates_softmax: ClassVar[bool] = True
    approx_fixed_options: ClassVar[dict[str, object]] = {"conv_kernel": 0}  # the skip on V is an addition, not the estimate

    @classmethod
    def exact_options(cls, length: int) -> dict[str, object]:
        """Exact at `length` tokens: a landmark per token and the exact pseudo-inverse."""
        return {"num_landmarks": length, "pinv_iterations": None}

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        max_len: int | None = None,
        num_landmarks: int = 64,
        pinv_iterations: int | None = 6,
        conv_kernel: int = 35,
        segments: str = "padded",
        pinv_init: str = "per_example",
        pad_in_landmarks: bool = False,
    ) -> None:
        super().__init__(num_heads, head_dim, max_len)
        if segments not in SEGMENTS:
            raise AttentionConfigError(f"nystrom: segments must be one of {', '.join(SEGMENTS)}, got '{segments}'")
        if pinv_init not in PINV_INITS:
            raise AttentionConfigError(f"nystrom: pinv_init must be one of {', '.join(PINV_INITS)}, got '{pinv_init}'")
        if pad_in_landmarks and segments != "padded":
            raise AttentionConfigError("nystrom: pad_in_landmarks=true needs segments=padded (segments of real "
                                       "tokens hold no padding)")
        self.segments, self.pinv_init, self.pad_in_landmarks = segments, pinv_init, bool(pad_in_landmarks)
        self._landmark_sum, self._landmark_examples = 0.0, 0
        self.require_at_least("num_landmarks", num_landmarks, 1)
        if pinv_iterations is not None and pinv_iterations < 1:
            raise AttentionConfigError(f"nystrom: pinv_iterations must be >= 1 or null (exact), got {pinv_iterations}")
        if conv_kernel < 0 or (conv_kernel > 0 and conv_kernel % 2 == 0):
            raise AttentionConfigError(f"nystrom: conv_kernel must be 0 (off) or odd, got {conv_kernel}")
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.conv_kernel = conv_kernel
        self.conv_weight = None
        if conv_kernel:  # one filter per head; the init of nn.Conv2d(H, H, (K, 1), groups=H)
            bound = 1.0 / math.sqrt(conv_kernel)
            self.conv_weight = nn.Parameter(torch.empty(num_heads, conv_kernel).uniform_(-bound, bound))

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not self.training:
            B, _, L, _ = q.shape
            counts = nonempty_landmarks(key_padding_mask, B, L, self.num_landmarks, self.segments)
            self._landmark_sum += float(counts.sum())
            self._landmark_examples += B
        out = nystrom_attention(q, k, v, self.num_landmarks, self.pinv_iterations, key_padding_mask,
                                self.segments, self.pinv_init, self.pad_in_landmarks)
        if self.conv_weight is not None:  # padded rows of V count as zeros
            out = out + depthwise_seq_conv(v, self.conv_weight.to(v.dtype), key_padding_mask)  # (B, H, L, Dh)
        return out

    def train(self, mode: bool = True) -> NystromAttention:
        if not mode:  # a new evaluation pass starts: its landmark statistics start from zero
            self._landmark_sum, self._landmark_examples = 0.0, 0
        return super().train(mode)

    def attention_stats(self) -> dict[str, float]:
        """{"nonempty_landmarks": mean number of landmarks holding a real token per example} over the last
        evaluation pass; empty before any evaluation forward."""
        if not self._landmark_examples:
            return {}
        return {"nonempty_landmarks": self._landmark_sum / self._landmark_examples}

    def extra_repr(self) -> str:
        return (f"num_landmarks={self.num_landmarks}, pinv_iterations={self.pinv_iterations}, "
                f"conv_kernel={self.conv_kernel}, segments={self.segments}, pinv_init={self.pinv_init}"
                + (", pad_in_landmarks=True" if self.pad_in_landmarks else ""))
