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


def _flat(xs: tuple[torch.Tensor, ...], h: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Head h of tensors (B, H, L, Dh) laid side by side for one GEMM, (L, n*B*Dh), with padded rows
    (mask (B, L) False) zeroed. One buffer per head keeps each allocation small (large ones are fresh
    pages from the OS every step)."""
    B, H, L, D = xs[0].shape
    flat = xs[0].new_empty(L, len(xs), B, D)
    for i, x in enumerate(xs):
        flat[:, i].copy_(x[:, h].transpose(0, 1))  # (L, B, Dh)
    if mask is not None:  # padded rows carry nothing, whatever their value
        flat.masked_fill_(~mask.t()[:, None, :, None], 0.0)
    return flat.view(L, -1)


class _ProjectLength(torch.autograd.Function):
    """proj (k, L), or per head (H, k, L), applied along the length of each of xs (B, H, L, Dh) with
    padded rows zeroed first: one GEMM per head for all of xs (keys and values together when they share
    a projection); backward writes each input's gradient straight into (B, L, H, Dh) memory, the
    layout of the q/k/v projections, so nothing downstream copies it again."""

    @staticmethod
    def forward(ctx, proj: torch.Tensor, mask: torch.Tensor | None,  # type: ignore[override]
                *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B, H, L, D = xs[0].shape
        n, k = len(xs), proj.shape[-2]
        out = xs[0].new_empty(n, B, k, H, D)
        flats = []
        for h in range(H):
            flat = _flat(xs, h, mask)  # (L, n*B*Dh)
            flats.append(flat)
            res = torch.mm(proj[h] if proj.dim() == 3 else proj, flat)  # (k, n*B*Dh)
            out[:, :, :, h].copy_(res.view(k, n, B, D).permute(1, 2, 0, 3))
        ctx.save_for_backward(proj, mask, *flats)
        ctx.shape = (B, H, L, D)
        return tuple(out.transpose(2, 3).unbind(0))  # each (B, H, k, Dh)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        proj, mask, *flats = ctx.saved_tensors
        B, H, L, D = ctx.shape
        n, k = len(grads), proj.shape[-2]
        grad_proj = torch.zeros_like(proj) if ctx.needs_input_grad[0] else None
        need_x = [ctx.needs_input_grad[2 + i] for i in range(n)]
        gxs = [proj.new_empty(B, L, H, D) if need else None for need in need_x]
        for h in range(H):
            g = proj.new_empty(k, n, B, D)
            for i, gi in enumerate(grads):
                g[:, i].copy_(gi[:, h].transpose(0, 1))  # (k, B, Dh)
            g = g.view(k, -1)  # (k, n*B*Dh)
            p = proj[h] if proj.dim() == 3 else proj
            if grad_proj is not None:
                (grad_proj[h] if proj.dim() == 3 else grad_proj).addmm_(g, flats[h].t())
            if any(need_x):
                gflat = torch.mm(p.t(), g).view(L, n, B, D)
                for i, gx in enumerate(gxs):
                    if gx is not None:
                        gx[:, :, h].copy_(gflat[:, i].transpose(0, 1))  # (B, L, Dh)
        if mask is not None:
            for gx in gxs:
                if gx is not None:
                    gx.masked_fill_(~mask[:, :, None, None], 0.0)
        return (grad_proj, None, *[None if gx is None else gx.transpose(1, 2) for gx in gxs])


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
        if torch.compiler.is_compiling():  # the same function in plain ops, which the compiler can trace
            proj_v = proj_k if self.proj_v is None else self.proj_v[..., :L]
            if key_padding_mask is not None:
                pad = ~key_padding_mask[:, None, :, None]  # (B, 1, L, 1)
                k, v = k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)
            k_proj = torch.matmul(proj_k.to(k.dtype), k)  # (k, L) or (H, k, L) @ (B, H, L, Dh) -> (B, H, k, Dh)
            v_proj = torch.matmul(proj_v.to(v.dtype), v)
            return F.scaled_dot_product_attention(q, k_proj, v_proj)
        if self.proj_v is None:  # E = F: keys and values side by side in one GEMM
            k_proj, v_proj = _ProjectLength.apply(proj_k.to(k.dtype), key_padding_mask, k, v)  # (B, H, k, Dh)
        else:
            proj_v = self.proj_v if L == self.max_len else self.proj_v[..., :L]
            (k_proj,) = _ProjectLength.apply(proj_k.to(k.dtype), key_padding_mask, k)
            (v_proj,) = _ProjectLength.apply(proj_v.to(v.dtype), key_padding_mask, v)
        return F.scaled_dot_product_attention(q, k_proj, v_proj)

    def extra_repr(self) -> str:
        return f"proj_dim={self.proj_dim}, max_len={self.max_len}, sharing={self.sharing}"
