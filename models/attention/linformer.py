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
projection (in the copy that lays them out for the GEMM; with E = F keys and values share one GEMM).
The k projected keys are attended with the fused `scaled_dot_product_attention`.
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
    return _ProjectLength.apply(proj, None, x)[0]


def _flat(xs: tuple[torch.Tensor, ...], per_head: bool, mask: torch.Tensor | None) -> torch.Tensor:
    """Tensors (B, H, L, Dh) laid side by side for one GEMM, padded rows (mask (B, L) False) zeroed in
    the same copy: (H, L, n*B*Dh) for a per-head projection, else (L, n*B*H*Dh)."""
    B, H, L, D = xs[0].shape
    if per_head:
        flat = xs[0].new_empty(H, L, len(xs), B, D)
        parts = [flat[:, :, i] for i in range(len(xs))]  # each (H, L, B, Dh)
        src = [x.permute(1, 2, 0, 3) for x in xs]
    else:
        flat = xs[0].new_empty(L, len(xs), B, H, D)
        parts = [flat[:, i] for i in range(len(xs))]  # each (L, B, H, Dh)
        src = [x.permute(2, 0, 1, 3) for x in xs]
    for part, x in zip(parts, src):
        part.copy_(x)
    if mask is not None:  # padded rows carry nothing, whatever their value
        flat.masked_fill_(~(mask.t()[None, :, None, :, None] if per_head else mask.t()[:, None, :, None, None]), 0.0)
    return flat.view(H, L, -1) if per_head else flat.view(L, -1)


class _ProjectLength(torch.autograd.Function):
    """proj applied along the length of each of xs (B, H, L, Dh), padded rows zeroed first, as one GEMM
    (one per head); backward writes each input's gradient straight into (B, L, H, Dh) memory, the
    layout of the q/k/v projections, so nothing downstream copies it again."""

    @staticmethod
    def forward(ctx, proj: torch.Tensor, mask: torch.Tensor | None,  # type: ignore[override]
                *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B, H, L, D = xs[0].shape
        per_head = proj.dim() == 3
        flat = _flat(xs, per_head, mask)  # (H, L, n*B*Dh) or (L, n*B*H*Dh)
        out = torch.matmul(proj, flat)  # (H, k, n*B*Dh) or (k, n*B*H*Dh)
        ctx.save_for_backward(proj, flat, mask)
        ctx.per_head, ctx.shape = per_head, (B, H, L, D)
        k = proj.shape[-2]
        if per_head:
            outs = out.view(H, k, len(xs), B, D).permute(2, 3, 0, 1, 4)  # (n, B, H, k, Dh)
        else:
            outs = out.view(k, len(xs), B, H, D).permute(1, 2, 3, 0, 4)  # (n, B, H, k, Dh)
        return tuple(outs.unbind(0))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        proj, flat, mask = ctx.saved_tensors
        B, H, L, D = ctx.shape
        n, k = len(grads), proj.shape[-2]
        if ctx.per_head:
            g = proj.new_empty(H, k, n, B, D)
            for i, gi in enumerate(grads):
                g[:, :, i].copy_(gi.permute(1, 2, 0, 3))
            g = g.view(H, k, -1)  # (H, k, n*B*Dh)
        else:
            g = proj.new_empty(k, n, B, H, D)
            for i, gi in enumerate(grads):
                g[:, i].copy_(gi.permute(2, 0, 1, 3))
            g = g.view(k, -1)  # (k, n*B*H*Dh)
        grad_proj = torch.matmul(g, flat.transpose(-1, -2)) if ctx.needs_input_grad[0] else None
        grad_xs = [None] * n
        if any(ctx.needs_input_grad[2:]):
            gflat = torch.matmul(proj.transpose(-1, -2), g)  # (H, L, n*B*Dh) or (L, n*B*H*Dh)
            if ctx.per_head:
                src = gflat.view(H, L, n, B, D).permute(2, 3, 1, 0, 4)  # (n, B, L, H, Dh)
            else:
                src = gflat.view(L, n, B, H, D).permute(1, 2, 0, 3, 4)  # (n, B, L, H, Dh)
            keep = None if mask is None else mask[:, :, None, None]  # (B, L, 1, 1)
            for i in range(n):
                if not ctx.needs_input_grad[2 + i]:
                    continue
                gx = flat.new_empty(B, L, H, D).copy_(src[i])
                if keep is not None:
                    gx.masked_fill_(~keep, 0.0)
                grad_xs[i] = gx.transpose(1, 2)  # (B, H, L, Dh)
        return (grad_proj, None, *grad_xs)


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
        proj_k = self.proj_k if L == self.max_len else self.proj_k[..., :L]  # the first L columns
        if self.proj_v is None:  # E = F: keys and values side by side in one GEMM
            k_proj, v_proj = _ProjectLength.apply(proj_k.to(k.dtype), key_padding_mask, k, v)  # (B, H, k, Dh)
        else:
            proj_v = self.proj_v if L == self.max_len else self.proj_v[..., :L]
            (k_proj,) = _ProjectLength.apply(proj_k.to(k.dtype), key_padding_mask, k)
            (v_proj,) = _ProjectLength.apply(proj_v.to(v.dtype), key_padding_mask, v)
        return F.scaled_dot_product_attention(q, k_proj, v_proj)

    def extra_repr(self) -> str:
        return f"proj_dim={self.proj_dim}, max_len={self.max_len}, sharing={self.sharing}"
