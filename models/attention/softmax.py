"""Exact softmax attention through PyTorch's fused scaled_dot_product_attention (no L x L tensor on
the memory-efficient and flash paths)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.attention.base import AttentionBackend


class SoftmaxAttention(AttentionBackend):
    """softmax(Q Kᵀ / √Dh) V over the real keys. q, k, v, out: (B, H, L, Dh); mask (B, L) bool,
    True = real token. `attn_dropout` drops attention probabilities in training."""

    name = "softmax"

    def __init__(
        self, num_heads: int, head_dim: int, max_len: int | None = None, attn_dropout: float = 0.0
    ) -> None:
        super().__init__(num_heads, head_dim, max_len)
        self.attn_dropout = attn_dropout

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        attn_mask = None
        if key_padding_mask is not None:
            attn_mask = key_padding_mask[:, None, None, :]  # (B, 1, 1, L) True = attend
        p = self.attn_dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
