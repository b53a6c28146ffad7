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

Inside the model the keys and values are never formed at length L. The projections along the length and
the key/value projections of the multi-head wrapper are both linear, so they commute:
    E (X Wₖᵀ + 1 bₖᵀ) = (E X) Wₖᵀ + (E 1) bₖᵀ
and the wrapper hands the layer's input X (B, L, dim) to `forward_from_input`, which projects X along
the length once for keys and values of every head ((H k, L) @ (L, dim) per example: the same GEMM size as
projecting K and V of one head each, with the (L, dim) @ (dim, 2 H Dh) key/value projection, its
backward and the head-split copies gone), then maps the k rows to keys and values. Padded rows of X are
zeroed and E 1 sums E's columns at real tokens only, so this is the function `forward` computes.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.attention.base import AttentionBackend, AttentionConfigError

SHARING = ("none", "headwise", "kv", "layerwise")


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
        proj_k = self.proj_k[..., :L].to(k.dtype)  # the first L columns: (k, L) or (H, k, L)
        proj_v = proj_k if self.proj_v is None else self.proj_v[..., :L].to(v.dtype)
        if key_padding_mask is not None:  # padded keys and values carry nothing, whatever their value
            pad = ~key_padding_mask[:, None, :, None]  # (B, 1, L, 1)
            k, v = k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)
        k_proj = torch.matmul(proj_k, k)  # (k, L) or (H, k, L) @ (B, H, L, Dh) -> (B, H, k, Dh)
        v_proj = torch.matmul(proj_v, v)
        return F.scaled_dot_product_attention(q, k_proj, v_proj)

    def forward_from_input(
        self,
        q: torch.Tensor,
        x: torch.Tensor,
        kv_weight: torch.Tensor,
        kv_bias: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`forward(q, k, v, mask)` with k, v = the wrapper's key and value projections of x, computed
        without forming them at length L (see the module docstring).

        q (B, H, L, Dh); x (B, L, dim), the layer's input; kv_weight (2, H*Dh, dim) and kv_bias (2, H*Dh),
        the key and value rows of the wrapper's fused projection (heads in order, Dh rows each)."""
        B, L, dim = x.shape
        H, Dh = self.num_heads, self.head_dim
        self.check_length(L)
        projs = [self.proj_k[..., :L]] + ([] if self.proj_v is None else [self.proj_v[..., :L]])
        rows = torch.cat(projs) if len(projs) > 1 else projs[0]
        rows = rows.to(x.dtype).reshape(-1, L)  # (R, L): every row of E (and F)
        if key_padding_mask is None:
            ones = rows.sum(-1).expand(B, -1)  # (B, R): E 1
        else:  # padded rows of x carry nothing, whatever their value; E 1 sums real columns only
            x = x.masked_fill(~key_padding_mask[:, :, None], 0.0)
            ones = torch.matmul(key_padding_mask.to(x.dtype), rows.t())  # (B, R)
        lead = (B, len(projs), -1, self.proj_dim)  # rows per projection: H heads of k, or k shared by heads
        xp = torch.matmul(rows, x).view(*lead, dim)  # (R, L) @ (B, L, dim) -> (B, n, H or 1, k, dim)
        ones = ones.reshape(*lead, 1)  # (B, n, H or 1, k, 1)
        w = kv_weight.view(2, H, Dh, dim).transpose(-1, -2)  # (2, H, dim, Dh)
        b = kv_bias.view(2, H, 1, Dh)
        if self.proj_v is None:  # E = F: keys and values of every head from the same k rows
            kv = torch.matmul(xp[:, 0], torch.cat([w[0], w[1]], -1)) + ones[:, 0] * torch.cat([b[0], b[1]], -1)
            k_proj, v_proj = kv.split(Dh, -1)  # (B, H, k, Dh) each
        else:
            k_proj = torch.matmul(xp[:, 0], w[0]) + ones[:, 0] * b[0]  # (B, H, k, Dh)
            v_proj = torch.matmul(xp[:, 1], w[1]) + ones[:, 1] * b[1]
        return F.scaled_dot_product_attention(q, k_proj, v_proj)

    def extra_repr(self) -> str:
        return f"proj_dim={self.proj_dim}, max_len={self.max_len}, sharing={self.sharing}"
