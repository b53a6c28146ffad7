"""Longformer attention (Beltagy et al. 2020): sliding window plus global tokens.

Pattern, with window w and g global tokens (the first g positions): query i attends to key j iff

    -(w - w//2 - 1) <= j - i <= w//2     (the window: w keys, w//2 on each side for odd w; for even
                                           w the left side, counting i itself, gets one more; LRA's rule)
 or j < g                                (every token attends to the global tokens)
 or i < g                                (global tokens attend to every token)

Projections: the paper gives global attention its own Q/K/V projections; our multi-head wrapper
hands every backend one q/k/v, so global rows use the same projections (not modelled, and parameter
counts stay equal to the other backends'). Dilation and the autoregressive variant are not
implemented (nor were they in LRA's code). LRA's configs use w = 512 and pass no global mask (g = 0);
the paper's classification setting puts global attention on the first ([CLS]) token (g = 1).

The window is computed blockwise: chunks of c = max(w//2, w - w//2 - 1) queries attend to their own
and neighbouring chunks under a band mask: memory O(L * 3c) ~ O(L * 1.5 w) plus O(g * L) for the
global rows. Any length.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from models.attention._blocks import block_sparse_attention, full_rows, num_blocks, slot_positions, with_rows
from models.attention.base import AttentionBackend


class LongformerAttention(AttentionBackend):
    """Sliding-window attention (`window` keys per query) plus `num_global` global tokens at the
    start. q, k, v, out: (B, H, L, Dh); mask (B, L) bool, True = real token."""

    name = "longformer"
    approximates_softmax: ClassVar[bool] = True

    @classmethod
    def exact_options(cls, length: int) -> dict[str, object]:
        """Exact at `length` tokens: a window of 2 x length holds every key for every query."""
        return {"window": 2 * length}

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        max_len: int | None = None,
        window: int = 512,
        num_global: int = 0,
    ) -> None:
        super().__init__(num_heads, head_dim, max_len)
        self.require_at_least("window", window, 1)
        self.require_at_least("num_global", num_global, 0)
        self.window, self.num_global = window, num_global
        self.right = window // 2  # keys after the query
        self.left = window - self.right - 1  # keys before the query

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        L, dev = q.shape[2], q.device
        c = max(1, min(max(self.left, self.right), L))  # query chunk
        nb = num_blocks(L, c)
        n_left, n_right = min(-(-self.left // c), nb - 1), min(-(-self.right // c), nb - 1)
        key_blocks = (torch.arange(nb, device=dev)[:, None] + torch.arange(-n_left, n_right + 1, device=dev))[None]
        kpos = slot_positions(key_blocks, c)[:, :, None, :]  # (1, nb, 1, S)
        qpos = torch.arange(nb * c, device=dev).view(1, nb, c, 1)  # (1, nb, c, 1)
        g = min(self.num_global, L)
        # band; global keys are left out here and seen once, as extra keys
        allowed = (kpos - qpos >= -self.left) & (kpos - qpos <= self.right) & (kpos >= g)  # (1, nb, c, S)
        glob = torch.arange(g, device=dev)
        out = block_sparse_attention(q, k, v, key_padding_mask, c, key_blocks, allowed, glob if g else None)
        if g:
            out = with_rows(out, glob, full_rows(q, k, v, key_padding_mask, glob))
        return out

    def extra_repr(self) -> str:
        return f"window={self.window}, num_global={self.num_global}"
