"""Linear Transformer attention (Katharopoulos et al., "Transformers are RNNs: Fast Autoregressive
Transformers with Linear Attention", ICML 2020), the non-causal (encoder) form.

    φ(x) = elu(x) + 1
    out_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ  /  φ(q_i)ᵀ Σ_j φ(k_j)          (j over real keys only)

Padded keys get φ(k_j) = 0, so they leave both sums. Both sums are one (Dh, Dh+1) matrix per example
and head (a column of ones appended to V carries the normaliser): memory is linear in L.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from models.attention.base import AttentionBackend


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = elu(x) + 1 > 0, elementwise."""
    return F.elu(x) + 1.0


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """q, k, v: (B, H, L, Dh); mask (B, L) bool, True = real token. Returns (B, H, L, Dh) in q's dtype.

    Features, sums and the normalisation run in at least fp32 with autocast off. A row with no real
    key at all (an all-padding example) gets output 0 instead of 0/0."""
    B, H, L, D = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(device_type=q.device.type, enabled=False):
        qf = elu_feature_map(q.to(acc))  # (B, H, L, Dh)
        kf = elu_feature_map(k.to(acc))  # (B, H, L, Dh)
        if key_padding_mask is not None:
            kf = kf * key_padding_mask[:, None, :, None].to(acc)  # padded keys: φ = 0
        v1 = torch.cat([v.to(acc), v.new_ones(B, H, L, 1, dtype=acc)], -1)  # (B, H, L, Dh+1)
        kv = kf.transpose(-1, -2) @ v1  # (B, H, Dh, Dh+1): Σ_j φ(k_j) [v_j, 1]ᵀ
        o1 = qf @ kv  # (B, H, L, Dh+1)
        den = o1[..., D:].clamp_min(torch.finfo(acc).tiny)  # (B, H, L, 1): φ(q_i)ᵀ Σ_j φ(k_j)
        out = o1[..., :D] / den
    return out.to(q.dtype)


class LinearAttention(AttentionBackend):
    """Linear attention with the elu+1 feature map; no options, no parameters.

    forward(q, k, v, key_padding_mask) -> (B, H, L, Dh); mask (B, L) bool, True = real token.
    Any length; time and memory linear in L.
    """

    name = "linear"
    approximates_softmax: ClassVar[bool] = False  # the elu+1 kernel replaces exp: another function, not an estimate
    mixed_precision: ClassVar[str] = "feature maps, key-value sums and the normalisation run in fp32 with autocast off"

    def __init__(self, num_heads: int, head_dim: int, max_len: int | None = None) -> None:
        super().__init__(num_heads, head_dim, max_len)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return linear_attention(q, k, v, key_padding_mask)
