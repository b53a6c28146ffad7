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

from models.attention._nystrom_kernels import conv_skip_add, depthwise_seq_conv, pinv_iterations
from models.attention.base import AttentionBackend, AttentionConfigError

__all__ = ["NystromAttention", "depthwise_seq_conv", "iterative_pinv", "nystrom_attention"]  # depthwise_seq_conv: re-exported


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
    z = pinv_iterations(a3, z, _identity(m, a.dtype, a.device), iterations)  # (N, m, m)
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
    if pad == 0 and key_padding_mask is not None:  # one weighted sum per segment, no masked copy of x
        real = key_padding_mask.reshape(B, m, seg).to(x.dtype)  # (B, m, seg)
        counts = real.sum(-1, keepdim=True)  # (B, m, 1) real tokens per segment
        weights = real / (seg if pad_in_means else counts.clamp_min(1))  # zero at padded tokens
        return _weighted_segment_sums(x, weights), None if pad_in_means else counts[..., 0] > 0
    if pad == 0 and x.transpose(1, 2).is_contiguous():  # (B, L, H, Dh) memory: read every head at once
        return _weighted_segment_sums(x, x.new_full((1, m, seg), 1.0 / seg)), None
    if key_padding_mask is None and pad == 0:  # a sum and a divide: backward expands the gradient once
        return x.reshape(B, H, m, seg, D).sum(-2) / seg, None  # (B, H, m, Dh)
    real = torch.ones(B, L, dtype=torch.bool, device=x.device) if key_padding_mask is None else key_padding_mask
    if key_padding_mask is not None:
        x = x.masked_fill(~real[:, None, :, None], 0.0)  # padded tokens carry nothing, whatever their value
    x = F.pad(x, (0, 0, 0, pad))  # (B, H, m*seg, Dh)
    sums = x.reshape(B, H, m, seg, D).sum(-2)  # (B, H, m, Dh)
    if pad_in_means:
        return sums / seg, None
    counts = F.pad(real, (0, pad)).reshape(B, m, seg).sum(-1)  # (B, m) real tokens per segment
    means = sums / counts.clamp_min(1)[:, None, :, None].to(x.dtype)
    return means, counts > 0


def _weighted_segment_sums(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_s weights[b, j, s] · x[b, h, j·seg + s] for x (B, H, m·seg, Dh), weights (B or 1, m, seg): one
    batched product per segment, so x is read once, no masked copy of it is made, and backward writes
    x's gradient in one pass in x's own memory order. x laid out (B, L, H, Dh) (the multi-head
    wrapper's views) is taken as (B, m, seg, H·Dh), every head at once. A padded token's weight is 0,
    so a finite value there contributes nothing (a NaN or inf would, as in the fused attention
    kernels' products). Returns (B, H, m, Dh)."""
    B, H, L, D = x.shape
    _, m, seg = weights.shape
    w = weights.unsqueeze(-2)  # (B|1, m, 1, seg)
    if x.transpose(1, 2).is_contiguous():  # (B, L, H, Dh) memory: segments are (seg, H·Dh) blocks
        out = torch.matmul(w.expand(B, m, 1, seg), x.transpose(1, 2).reshape(B, m, seg, H * D))  # (B, m, 1, H·Dh)
        return out.view(B, m, H, D).transpose(1, 2)
    out = torch.matmul(w.expand(B, m, 1, seg)[:, None], x.reshape(B, H, m, seg, D))  # (B, H, m, 1, Dh)
    return out.squeeze(-2)


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
            out = conv_skip_add(out, v, self.conv_weight.to(v.dtype), key_padding_mask)  # (B, H, L, Dh)
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
