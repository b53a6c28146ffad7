"""Linformer attention (Wang et al., "Linformer: Self-Attention with Linear Complexity", 2020).

    out = softmax(Q (E K)ᵀ / √Dh) (F V)        E, F: (k, max_len) learned length projections

E and F belong to each layer (nn.Parameters of the instance, shared by its heads): two layers, or two
models, never share them. A sequence of L <= max_len tokens uses the first L columns; padded keys
and values are zeroed before projection. The k projected keys are then attended with the fused
`scaled_dot_product_attention`, so the (L, k) matrix is not kept for backward.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.attention.base import AttentionBackend, AttentionConfigError


def project_length(proj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """proj (k, L) applied along the length of x (B, H, L, Dh) -> (B, H, k, Dh), as one GEMM."""
    B, H, L, D = x.shape
    flat = x.permute(2, 0, 1, 3).reshape(L, B * H * D)  # (L, B*H*Dh)
    out = torch.matmul(proj, flat)  # (k, B*H*Dh)
    return out.view(-1, B, H, D).permute(1, 2, 0, 3)  # (B, H, k, Dh)


class LinformerAttention(AttentionBackend):
    """Linformer with per-layer projections E (keys) and F (values), each (proj_dim, max_len).

    forward(q, k, v, key_padding_mask) -> (B, H, L, Dh); mask (B, L) bool, True = real token.
    Needs max_len at build time; check_length rejects L > max_len. E and F start Xavier-normal
    (std sqrt(2 / (max_len + k))), so a projected key has about the scale of one token's key.
    """

    name = "linformer"
    needs_max_len = True

    def __init__(
        self, num_heads: int, head_dim: int, max_len: int | None = None, proj_dim: int = 256
    ) -> None:
        super().__init__(num_heads, head_dim, max_len)
        if proj_dim < 1:
            raise AttentionConfigError(f"linformer: proj_dim must be >= 1, got {proj_dim}")
        assert max_len is not None  # the base class raised otherwise
        self.proj_dim = proj_dim
        std = math.sqrt(2.0 / (max_len + proj_dim))
        self.proj_k = nn.Parameter(torch.randn(proj_dim, max_len) * std)  # E
        self.proj_v = nn.Parameter(torch.randn(proj_dim, max_len) * std)  # F

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        L = k.shape[-2]
        self.check_length(L)
        if key_padding_mask is not None:
            pad = ~key_padding_mask[:, None, :, None]  # (B, 1, L, 1)
            k, v = k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)
        k_proj = project_length(self.proj_k[:, :L].to(k.dtype), k)  # (B, H, k, Dh)
        v_proj = project_length(self.proj_v[:, :L].to(v.dtype), v)  # (B, H, k, Dh)
        return F.scaled_dot_product_attention(q, k_proj, v_proj)

    def extra_repr(self) -> str:
        return f"proj_dim={self.proj_dim}, max_len={self.max_len}"
