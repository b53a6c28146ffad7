"""Exact softmax attention.

Without attention dropout: PyTorch's fused `scaled_dot_product_attention` (no L x L tensor on its
memory-efficient and flash paths). With attention dropout in training, SDPA on a CPU falls back to
its math path, which stores the whole (B, H, L, L) probability matrix and draws one Bernoulli sample
per entry (measured 3-7x slower than without dropout at L = 512). Here instead the queries are taken
in chunks of at most `CHUNK_ELEMENTS` scores, each chunk's probabilities are dropped with the cheap
word-based sampler of `models.dropout`, and for long inputs each chunk is recomputed in backward
(activation checkpointing, which replays the same random draws), so memory stays O(chunk x L).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models.attention.base import AttentionBackend
from models.dropout import dropout

CHUNK_ELEMENTS = 2**21  # scores (B x H x queries x keys) per chunk: 8 MB; measured best at L = 512 (2**19..2**23)
STORE_ELEMENTS = 2**26  # above this many scores in all, chunks are recomputed in backward


def _chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     p: float) -> torch.Tensor:
    """dropout(softmax(q kᵀ / √Dh)) v for one chunk of queries q (B, H, c, Dh) over every key."""
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(1.0 / math.sqrt(q.shape[-1]))  # (B, H, c, L)
    if mask is not None:
        s = s.masked_fill(~mask, torch.finfo(s.dtype).min)  # mask (B, 1, 1, L)
    return torch.matmul(dropout(s.softmax(-1), p, True), v)  # (B, H, c, Dh)


def dropout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                      p: float) -> torch.Tensor:
    """Softmax attention with dropout `p` on the probabilities; q, k, v (B, H, L, Dh), attn_mask
    (B, 1, 1, L) bool (True = attend) or None. Chunked over queries; see the module docstring."""
    B, H, L, _ = q.shape
    S = k.shape[2]
    c = max(1, CHUNK_ELEMENTS // (B * H * S))
    recompute = B * H * L * S > STORE_ELEMENTS and torch.is_grad_enabled()
    outs = []
    for i in range(0, L, c):
        if recompute:
            outs.append(checkpoint(_chunk_attention, q[:, :, i:i + c], k, v, attn_mask, p, use_reentrant=False))
        else:
            outs.append(_chunk_attention(q[:, :, i:i + c], k, v, attn_mask, p))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # (B, H, L, Dh)


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
        if p > 0.0 and q.device.type == "cpu":
            return dropout_attention(q, k, v, attn_mask, p)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
