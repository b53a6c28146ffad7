"""BigBird block-sparse attention (Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences"),
the ITC variant that LRA runs (global tokens are existing blocks, no extra tokens).

Pattern over blocks of `block_size` tokens (the sequence padded internally to nb blocks): query
block i attends to key block j iff

    |i - j| <= 1                      (window: 3 blocks)
 or j in {0, nb - 1}                  (every block attends to the first and last block)
 or i in {0, nb - 1}                  (the first and last block attend to everything)
 or j in R_h(i)                       (num_random_blocks random blocks, per head)

R_h(i) is drawn for every non-global row among the blocks outside its window that are not global
(fewer when fewer exist). The draw is fixed per layer: at build, a seed is taken from torch's
global RNG (so a seeded run is deterministic) and stored in the `random_seed` buffer (a checkpoint
keeps it); the pattern for nb blocks is a function of (seed, nb), the same at every forward, as in
LRA's code (one connectivity seed per layer). LRA's code also limits random blocks to the first
1,024 tokens; we draw from the whole sequence. Memory O(L * block * (5 + r)) plus O(block * L) for
the two global blocks. Any length.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from models.attention._blocks import block_sparse_attention, full_rows, num_blocks, with_rows
from models.attention.base import AttentionBackend

SEED_RANGE = 2**24  # seeds stay exact if a state dict passes through float32


class BigBirdAttention(AttentionBackend):
    """Block-sparse window + global + random attention. q, k, v, out: (B, H, L, Dh);
    mask (B, L) bool, True = real token."""

    name = "bigbird"
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
        block_size: int = 64,
        num_random_blocks: int = 3,
    ) -> None:
        super().__init__(num_heads, head_dim, max_len)
        self.require_at_least("block_size", block_size, 1)
        self.require_at_least("num_random_blocks", num_random_blocks, 0)
        self.block_size, self.num_random_blocks = block_size, num_random_blocks
        self.register_buffer("random_seed", torch.randint(0, SEED_RANGE, ()))

    def random_blocks(self, nb: int) -> torch.Tensor:
        """(H, nb, r) long: the random key blocks of each query block and head; -1 = none (global
        rows, or fewer candidates than r)."""
        H, r = self.num_heads, self.num_random_blocks
        gen = torch.Generator().manual_seed(int(self.random_seed))
        scores = torch.rand(H, nb, nb, generator=gen)  # a random order of the candidates per row
        i, j = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
        glob_i, glob_j = (i == 0) | (i == nb - 1), (j == 0) | (j == nb - 1)
        candidate = ((i - j).abs() > 1) & ~glob_j & ~glob_i  # (nb, nb)
        scores = scores.masked_fill(~candidate, -1.0)
        vals, idx = scores.topk(min(r, nb), dim=-1)  # (H, nb, r')
        idx = torch.where(vals >= 0, idx, -1)
        return torch.cat([idx, idx.new_full((H, nb, r - idx.shape[-1]), -1)], -1)  # (H, nb, r)

    def key_blocks(self, nb: int, device: torch.device | None = None) -> torch.Tensor:
        """(H, nb, 5 + r): window (3), first, last, random blocks; repeats and -1 are empty slots."""
        H = self.num_heads
        rows = torch.arange(nb)[:, None]
        fixed = torch.cat([rows + torch.arange(-1, 2), torch.tensor([[0, nb - 1]]).expand(nb, 2)], 1)  # (nb, 5)
        return torch.cat([fixed.expand(H, nb, 5), self.random_blocks(nb)], -1).to(device)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        L, b, dev = q.shape[2], self.block_size, q.device
        nb = num_blocks(L, b)
        out = block_sparse_attention(q, k, v, key_padding_mask, b, self.key_blocks(nb, dev))
        pos = torch.arange(L, device=dev)
        glob = pos[(pos < b) | (pos >= (nb - 1) * b)]  # (G,) tokens of the first and last block
        return with_rows(out, glob, full_rows(q, k, v, key_padding_mask, glob))

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, num_random_blocks={self.num_random_blocks}"
