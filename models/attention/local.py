"""Block-local attention, the "Local Attention" baseline of Long Range Arena (Tay et al. 2020).

Pattern: the sequence is cut into consecutive blocks of `block_size` tokens (the last one padded
internally); query i attends to key j iff

    block(i) - look_back  <=  block(j)  <=  block(i) + look_ahead,      block(t) = t // block_size

LRA's implementation attends within the query's own block only (look_back = look_ahead = 0, the
default): no neighbour block. Its code reshapes the length axis as (block_size, num_blocks), which
groups positions t with the same t mod num_blocks (a strided pattern) while its padding mask is
reshaped the other way; we implement the contiguous blocks its docstring and the paper describe.
look_back / look_ahead > 0 give the neighbour-block variants (e.g. look_back = 1: block and previous).
"""
from __future__ import annotations

from typing import ClassVar

import torch

from models.attention._blocks import block_sparse_attention, num_blocks
from models.attention.base import AttentionBackend, AttentionConfigError


class LocalAttention(AttentionBackend):
    """Softmax attention within blocks of `block_size` tokens (plus `look_back` previous and
    `look_ahead` next blocks). q, k, v, out: (B, H, L, Dh); mask (B, L) bool, True = real token.
    Memory O(L * block_size * (1 + look_back + look_ahead)); any length (padded internally)."""

    name = "local"
    approximates_softmax: ClassVar[bool] = True

    @classmethod
    def exact_options(cls, length: int) -> dict[str, object]:
        """Exact at `length` tokens: one block holds every key."""
        return {"block_size": length}

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        max_len: int | None = None,
        block_size: int = 50,
        look_back: int = 0,
        look_ahead: int = 0,
    ) -> None:
        super().__init__(num_heads, head_dim, max_len)
        self.require_at_least("block_size", block_size, 1)
        if look_back < 0 or look_ahead < 0:
            raise AttentionConfigError(f"local: look_back and look_ahead must be >= 0, got {look_back}, {look_ahead}")
        self.block_size, self.look_back, self.look_ahead = block_size, look_back, look_ahead

    def key_blocks(self, nb: int, device: torch.device | None = None) -> torch.Tensor:
        """(1, nb, m) key block indices of each query block (out-of-range ones are empty slots)."""
        offsets = torch.arange(-self.look_back, self.look_ahead + 1, device=device)
        return (torch.arange(nb, device=device)[:, None] + offsets)[None]

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        nb = num_blocks(q.shape[2], self.block_size)
        return block_sparse_attention(q, k, v, key_padding_mask, self.block_size, self.key_blocks(nb, q.device))

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, look_back={self.look_back}, look_ahead={self.look_ahead}"
