"""Linformer attention (Wang et al., "Linformer: Self-Attention with Linear Complexity", 2020).

    out = softmax(Q (E K)ᵀ / √Dh) (F V)        E, F: (k, max_len) learned length projections

Sharing modes (the Linformer paper's §4), option `sharing`:
  none       E and F per layer and per head: (H, k, max_len) each
  headwise   E and F per layer, shared by its heads: (k, max_len) each (our default)
  kv         one (k, max_len) matrix per layer for keys and values (E = F), shared by the heads
  layerwise  one (H, k, max_len) matrix for keys and values, shared by every layer of the model: what the
             Nyströmformer authors' LRA code ran (the Linformer paper's layerwise also shares it across
             heads; theirs kept one per head, and so do we, so parameter counts match theirs)
Layerwise sharing goes through the encoder's `tie_to` hook: later layers take layer 0's parameter, so it
belongs to one model instance (the authors' class attribute was shared by every model in the process).
A sequence of L <= max_len tokens uses the first L columns; padded keys and values are zeroed before
projection. The k projected keys are attended with the fused `scaled_dot_product_attention`.
"""
from __future__ import annotations

from typing import ClassVar

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.attention.base import AttentionBackend, AttentionConfigError

SHARING = ("none", "headwise", "kv", "layerwise")


def project_length(proj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """proj (k, L) or per head (H, k, L) applied along the length of x (B, H, L, Dh) -> (B, H, k, Dh)."""
    B, H, L, D = x.shape
    if proj.dim() == 2:  # one GEMM for every head
        flat = x.permute(2, 0, 1, 3).reshape(L, B * H * D)  # (L, B*H*Dh)
        out = torch.matmul(proj, flat)  # (k, B*H*Dh)
        return out.view(-1, B, H, D).permute(1, 2, 0, 3)  # (B, H, k, Dh)
    flat = x.permute(1, 2, 0, 3).reshape(H, L, B * D)  # (H, L, B*Dh)
    out = torch.bmm(proj, flat)  # (H, k, B*Dh)
    return out.view(H, -1, B, D).permute(2, 0, 1, 3)  # (B, H, k, Dh)


class LinformerAttention(AttentionBackend):
    """Linformer with learned length projections, shared as `sharing` says.

    forward(q, k, v, key_padding_mask) -> (B, H, L, Dh); mask (B, L) bool, True = real token.
    Needs max_len at build time; check_length rejects L > max_len. `init_std` None starts the projections
    Xavier-normal (std sqrt(2 / (max_len + k))); a float starts them N(0, init_std) (the authors: 0.02).
    """

    name = "linformer"
    approximates_softmax: ClassVar[bool] = True  # a low-rank estimate through learned projections
    needs_max_len = True

    def __init__(self, num_heads: int, head_dim: int, max_len: int | None = None, proj_dim: int = 256,
                 sharing: str = "headwise", init_std: float | None = None) -> None:
        super().__init__(num_heads, head_dim, max_len)
        self.require_at_least("proj_dim", proj_dim, 1)
        if sharing not in SHARING:
            raise AttentionConfigError(f"linformer: sharing must be one of {', '.join(SHARING)}, got '{sharing}'")
        if init_std is not None and not init_std > 0:
            raise AttentionConfigError(f"linformer: init_std must be > 0 or null (Xavier), got {init_std}")
        assert max_len is not None  # the base class raised otherwise
        self.proj_dim, self.sharing = proj_dim, sharing
        std = math.sqrt(2.0 / (max_len + proj_dim)) if init_std is None else init_std
        shape = (num_heads, proj_dim, max_len) if sharing in ("none", "layerwise") else (proj_dim, max_len)
        self.proj_k = nn.Parameter(torch.randn(shape) * std)  # E
        self.proj_v = nn.Parameter(torch.randn(shape) * std) if sharing in ("none", "headwise") else None  # F

    def tie_to(self, first: AttentionBackend) -> None:
        """Encoder hook: with `layerwise` sharing, use layer 0's projection (one parameter per model)."""
        if self.sharing != "layerwise":
            return
        if not isinstance(first, LinformerAttention) or first.sharing != "layerwise" \
                or first.proj_k.shape != self.proj_k.shape:
            raise AttentionConfigError("linformer: layerwise sharing needs every layer to be a layerwise "
                                       "Linformer of the same size")
        self.proj_k = first.proj_k

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
        proj_v = self.proj_k if self.proj_v is None else self.proj_v
        k_proj = project_length(self.proj_k[..., :L].to(k.dtype), k)  # (B, H, k, Dh)
        v_proj = project_length(proj_v[..., :L].to(v.dtype), v)  # (B, H, k, Dh)
        return F.scaled_dot_product_attention(q, k_proj, v_proj)

    def extra_repr(self) -> str:
        return f"proj_dim={self.proj_dim}, max_len={self.max_len}, sharing={self.sharing}"
