"""Nyström attention (Xiong et al., "Nyströmformer", AAAI 2021).

    softmax(Q Kᵀ/√d) V  ≈  softmax(Q K̃ᵀ/√d) · pinv(softmax(Q̃ K̃ᵀ/√d)) · softmax(Q̃ Kᵀ/√d) V

Q̃, K̃ are m landmarks: means of consecutive segments of the sequence (padded to a multiple of m),
taken over real tokens only. A segment holding no real token gives no landmark: it is masked out of
every kernel, which is the same as running with the non-empty landmarks alone. The pseudo-inverse
is the paper's iteration, started per example and head from Z0 = Aᵀ / (‖A‖₁ ‖A‖∞).

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


def iterative_pinv(a: torch.Tensor, iterations: int) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of each (m, m) matrix in `a` (..., m, m) by the iteration of the
    Nyströmformer paper:  Z <- Z/4 (13 I - AZ (15 I - AZ (7 I - AZ))),  Z0 = Aᵀ / (‖A‖₁ ‖A‖∞),
    where both norms are taken per matrix (an example never sees its batch mates)."""
    *batch, m, _ = a.shape
    abs_a = a.abs()
    scale = abs_a.sum(-2).amax(-1) * abs_a.sum(-1).amax(-1)  # (...,) max column sum x max row sum
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
    x: torch.Tensor, key_padding_mask: torch.Tensor | None, num_segments: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Means of `num_segments` consecutive segments of x (B, H, L, Dh) over real tokens.

    L is padded to a multiple of num_segments. Returns the landmarks (B, H, m, Dh) and a (B, m) bool
    mask (True = the segment holds a real token), or None when every segment is full and unmasked."""
    B, H, L, D = x.shape
    m = num_segments
    seg = -(-L // m)  # tokens per segment after padding
    pad = m * seg - L
    if key_padding_mask is None and pad == 0:
        return x.reshape(B, H, m, seg, D).mean(-2), None  # (B, H, m, Dh)
    real = torch.ones(B, L, dtype=torch.bool, device=x.device) if key_padding_mask is None else key_padding_mask
    if key_padding_mask is not None:
        x = x.masked_fill(~real[:, None, :, None], 0.0)  # padded tokens carry nothing, whatever their value
    x = F.pad(x, (0, 0, 0, pad))  # (B, H, m*seg, Dh)
    counts = F.pad(real, (0, pad)).reshape(B, m, seg).sum(-1)  # (B, m) real tokens per segment
    sums = x.reshape(B, H, m, seg, D).sum(-2)  # (B, H, m, Dh)
    means = sums / counts.clamp_min(1)[:, None, :, None].to(x.dtype)
    return means, counts > 0


def nystrom_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_landmarks: int,
    pinv_iterations: int | None = 6,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Nyström approximation of softmax attention, scale 1/sqrt(Dh), no conv skip.

    q, k, v: (B, H, L, Dh); key_padding_mask: (B, L) bool, True = real token. Returns (B, H, L, Dh) in
    q's dtype. `num_landmarks` >= L uses every token as a landmark (exact up to the pseudo-inverse);
    `pinv_iterations=None` uses the exact torch.linalg.pinv. The middle kernel and its pseudo-inverse
    are computed in at least fp32, with autocast off."""
    B, H, L, D = q.shape
    m = min(num_landmarks, L)
    scale = 1.0 / math.sqrt(D)
    q_land, land_mask = segment_means(q, key_padding_mask, m)  # (B, H, m, Dh), (B, m) | None
    k_land, _ = segment_means(k, key_padding_mask, m)
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
            kernel2_inv = iterative_pinv(kernel2, pinv_iterations)
        w = torch.matmul(kernel2_inv, kernel3_v.to(acc))  # (B, H, m, Dh)

    # softmax(Q K̃ᵀ/√d) W: every query over the non-empty landmarks
    return F.scaled_dot_product_attention(q, k_land, w.to(v.dtype), attn_mask=land_attn_mask).to(q.dtype)


def depthwise_seq_conv(v: torch.Tensor, weight: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Same-padded convolution of v (B, H, L, Dh) along L with one odd-length filter per head,
    weight (H, K), shared by the head's Dh channels (a depthwise Conv2d with a (K, 1) kernel).

    Computed as banded block-Toeplitz matrix products: each block of `block` outputs is a
    (block, block + K - 1) band matrix times a window of V. Several times faster on CPU than a
    grouped (K x 1) conv2d, forward and backward, for about 1.5x V's memory."""
    B, H, L, D = v.shape
    K = weight.shape[-1]
    nb = -(-L // block)  # number of output blocks
    width = block + K - 1
    idx = (torch.arange(block, device=v.device)[:, None] + torch.arange(K, device=v.device)).expand(H, block, K)
    band = v.new_zeros(H, block, width).scatter(2, idx, weight[:, None, :].expand(H, block, K))  # (H, P, P+K-1)
    vp = F.pad(v, (0, 0, K // 2, K // 2 + nb * block - L))  # (B, H, nb*P + K - 1, Dh)
    win = vp.unfold(2, width, block)  # (B, H, nb, Dh, P+K-1), a view
    win = win.permute(1, 0, 2, 3, 4).reshape(H, B * nb * D, width)  # (H, B*nb*Dh, P+K-1)
    out = torch.bmm(win, band.transpose(1, 2))  # (H, B*nb*Dh, P)
    out = out.view(H, B, nb, D, block).permute(1, 0, 2, 4, 3).reshape(B, H, nb * block, D)
    return out[:, :, :L]  # (B, H, L, Dh)


class NystromAttention(AttentionBackend):
    """Nyström attention with the paper's depthwise convolution skip on V.

    forward(q, k, v, key_padding_mask) -> (B, H, L, Dh); mask (B, L) bool, True = real token.
    Options: num_landmarks (m), pinv_iterations (None = exact pinv), conv_kernel (odd; 0 = no skip).
    The skip is one (conv_kernel x 1) filter per head, shared over the head's Dh channels, applied to
    V with padded rows zeroed.
    """

    name = "nystrom"
    mixed_precision: ClassVar[str] = (
        "the landmark kernel softmax(Q̃K̃ᵀ) and its pseudo-inverse run in fp32 (fp64 for fp64 inputs) "
        "with autocast off; the two outer kernels follow the autocast dtype"
    )

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        max_len: int | None = None,
        num_landmarks: int = 64,
        pinv_iterations: int | None = 6,
        conv_kernel: int = 35,
    ) -> None:
        super().__init__(num_heads, head_dim, max_len)
        if num_landmarks < 1:
            raise AttentionConfigError(f"nystrom: num_landmarks must be >= 1, got {num_landmarks}")
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
        out = nystrom_attention(q, k, v, self.num_landmarks, self.pinv_iterations, key_padding_mask)
        if self.conv_weight is not None:
            if key_padding_mask is not None:
                v = v.masked_fill(~key_padding_mask[:, None, :, None], 0.0)  # (B, H, L, Dh)
            out = out + depthwise_seq_conv(v, self.conv_weight.to(v.dtype))  # (B, H, L, Dh)
        return out
