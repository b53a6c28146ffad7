"""Sparse Transformer attention, "fixed" factorised pattern (Child et al. 2019, "Generating Long
Sequences with Sparse Transformers", section 4.3), bidirectional for classification.

Pattern, with stride l = `block_size` and c = `summary`: query i attends to key j iff

    j // l == i // l               (A1: its own block, the "local" part)
 or j mod l >= l - c               (A2: the "summary" columns, the last c positions of every block)
 [and j <= i                       only with causal=True]

Heads: every head uses the union A1 ∪ A2 (the paper's "merged" variant, the one LRA runs), not the
two-head variant with A1 in one head and A2 in the other. The paper writes A2 as
j mod l ∈ {l - c, ..., l}; we read it as the last c positions. LRA's code reads the "l" as 0 and also
keeps column 0 of each block (c + 1 summary columns), and applies a causal mask even in its
classification encoders; causal=True reproduces the latter, the default is the bidirectional
pattern. Work O(L * (l + c * L / l)) scores (quadratic in L at a fixed stride, as the method is; the
paper takes l ~ sqrt(L) for O(L sqrt(L))), never stored whole: the fused kernel runs per query chunk.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from models.attention._blocks import block_sparse_attention, num_blocks
from models.attention.base import AttentionBackend, AttentionConfigError


class SparseAttention(AttentionBackend):
    """Fixed sparse pattern: own stride block plus the summary columns of every block.
    q, k, v, out: (B, H, L, Dh); mask (B, L) bool, True = real token. Any length (padded internally)."""

    name = "sparse"
    approximates_softmax: ClassVar[bool] = True

    @classmethod
    def exact_options(cls, length: int) -> dict[str, object]:
        """Exact at `length` tokens: one stride block holds every key."""
        return {"block_size": length}

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        max_len: int | None = None,
        block_size: int = 50,
        summary: int = 10,
        causal: bool = False,
    ) -> None:
        super().__init__(num_heads, head_dim, max_len)
        if block_size < 1:
            raise AttentionConfigError(f"sparse: block_size (stride l) must be >= 1, got {block_size}")
        if not 1 <= summary <= block_size:
            raise AttentionConfigError(
                f"sparse: summary (c, summary columns per block) must be in [1, block_size={block_size}], got {summary}"
            )
        self.block_size, self.summary, self.causal = block_size, summary, causal

    def summary_positions(self, length: int, device: torch.device | None = None) -> torch.Tensor:
        """(G,) positions j < length with j mod l >= l - c."""
        pos = torch.arange(length, device=device)
        return pos[pos % self.block_size >= self.block_size - self.summary]

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        L, l, c, dev = q.shape[2], self.block_size, self.summary, q.device
        summ = self.summary_positions(L, dev)  # (G,): A2
        # Queries go in chunks of K stride blocks, so the G summary keys are copied once per chunk,
        # not once per block; K ~ G / 4l keeps the extra work (chunk keys a query may not see) <= ~25%.
        K = max(1, min(summ.numel() // (4 * l), num_blocks(L, l)))
        chunk = K * l
        nc = num_blocks(L, chunk)
        own = torch.arange(nc, device=dev)[None, :, None]  # (1, nc, 1): a chunk attends to its own keys
        qpos = torch.arange(nc * chunk, device=dev).view(1, nc, chunk, 1)  # (1, nc, chunk, 1)
        kpos = qpos.transpose(2, 3)  # (1, nc, 1, chunk)
        allowed = (kpos // l == qpos // l) | (kpos % l >= l - c)  # (1, nc, chunk, chunk): A1 or A2 in the chunk
        extra_allowed = (summ // chunk)[None, None, :] != torch.arange(nc, device=dev)[:, None, None]  # (nc, 1, G)
        if self.causal:
            allowed = allowed & (kpos <= qpos)
            extra_allowed = extra_allowed & (summ[None, None, :] <= qpos[0])  # (nc, chunk, G)
        return block_sparse_attention(q, k, v, key_padding_mask, chunk, own, allowed, summ, extra_allowed)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, summary={self.summary}, causal={self.causal}"
