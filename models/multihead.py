"""Multi-head wrapper shared by every backend: fused QKV projection, head split, output projection."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.attention import build_attention


class MultiHeadAttention(nn.Module):
    """(B, L, dim) -> (B, L, dim). `attention` names a backend in ATTENTION_BACKENDS; extra keyword
    arguments go to that backend. `out_dropout` drops the output projection's activations; a backend's
    own dropout has another name (softmax: `attn_dropout`), so the two never collide."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention: str,
        head_dim: int | None = None,
        max_len: int | None = None,
        out_dropout: float = 0.0,
        **attention_kwargs: Any,
    ) -> None:
        super().__init__()
        head_dim = head_dim or dim // num_heads
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner)
        self.out = nn.Linear(inner, dim)
        self.attn = build_attention(
            attention, num_heads=num_heads, head_dim=head_dim, max_len=max_len, **attention_kwargs
        )
        self.drop = nn.Dropout(out_dropout)

    def check_length(self, length: int) -> None:
        """Raise AttentionConfigError if the backend cannot take `length` tokens (call at build time)."""
        self.attn.check_length(length)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, dim); key_padding_mask: (B, L) bool, True = real token. Returns (B, L, dim)."""
        B, L, _ = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, Dh)
        out = self.attn(q, k, v, key_padding_mask)  # (B, H, L, Dh)
        out = out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)
        return self.drop(self.out(out))
