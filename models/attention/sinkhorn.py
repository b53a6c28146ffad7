"""Sparse Sinkhorn attention (Tay et al., "Sparse Sinkhorn Attention", ICML 2020), non-causal.

The sequence is cut into nb blocks of b tokens (padded internally to a multiple of b). Per head:
    s_i   = Σ_{t in block i, real} k_t                       block summaries (padded keys excluded)
    R_ij  = (s_i W + c)_j / τ                                 a learned sorting network, (nb, nb) logits
    P     = Sinkhorn(R)                                       n_iters rounds of row then column
                                                              normalisation in log space (a soft permutation)
    K̃_i   = Σ_j P_ij K_j,  Ṽ_i = Σ_j P_ij V_j                 sorted blocks (slot by slot)
    out_t = softmax(q_t [K_i ; K̃_i]ᵀ / √Dh) [V_i ; Ṽ_i]       t in block i: local block + its sorted block,
                                                              one softmax over the 2b keys
Padding: blocks without a real token take no part in the Sinkhorn (their rows and columns are
dropped, which we compute as an identity on them so that every row and column stays finite), padded
keys are zeroed before the sorting and masked in the attention; a sorted slot s counts as real when
any real block has a real token at slot s. Memory: O(L·b + (L/b)²) per example and head.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.attention.base import AttentionBackend, AttentionConfigError


def sinkhorn_normalise(log_alpha: torch.Tensor, n_iters: int) -> torch.Tensor:
    """exp of `n_iters` alternating row / column log-normalisations of log_alpha (..., n, n) (entries
    may be -inf; every row and column needs a finite one). n_iters = 0: a row softmax."""
    if n_iters == 0:
        return log_alpha.softmax(-1)
    for _ in range(n_iters):
        log_alpha = log_alpha - log_alpha.logsumexp(-1, keepdim=True)  # rows sum to 1
        log_alpha = log_alpha - log_alpha.logsumexp(-2, keepdim=True)  # columns sum to 1
    return log_alpha.exp()


class SinkhornAttention(AttentionBackend):
    """Sparse Sinkhorn attention: local block plus a learned, Sinkhorn-sorted block per query block.

    forward(q, k, v, key_padding_mask) -> (B, H, L, Dh); mask (B, L) bool, True = real token.
    Options: block_size (b; capped at ceil(max_len / 2), since sorting a single block is a no-op
    that would leave the sorting network untrained), n_iters (Sinkhorn rounds; 0 = the row softmax
    that LRA's code ran), temperature (τ). The sorting network (one linear map Dh -> nb_max per head, nb_max =
    ceil(max_len / b)) is owned by the instance, so the backend needs max_len. Shorter inputs use
    ceil(L / b) blocks and the first columns of the sorting network.
    """

    name = "sinkhorn"
    approximates_softmax: ClassVar[bool] = True  # block-sparse softmax over learned block sorting
    needs_max_len = True
    mixed_precision: ClassVar[str] = "sorting logits, Sinkhorn normalisation and the block attention run in fp32 with autocast off"

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        max_len: int | None = None,
        block_size: int = 64,
        n_iters: int = 8,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(num_heads, head_dim, max_len)
        assert max_len is not None  # the base class raised otherwise
        self.require_at_least("block_size", block_size, 1)
        block_size = min(block_size, max(1, -(-max_len // 2)))  # at least two blocks at max_len
        self.require_at_least("n_iters", n_iters, 0)
        if not temperature > 0:
            raise AttentionConfigError(f"sinkhorn: temperature must be > 0, got {temperature}")
        self.block_size, self.n_iters, self.temperature = block_size, n_iters, float(temperature)
        self.max_blocks = -(-max_len // block_size)
        bound = head_dim**-0.5  # nn.Linear's default init range for fan_in = head_dim
        self.sort_weight = nn.Parameter(torch.empty(num_heads, head_dim, self.max_blocks).uniform_(-bound, bound))
        self.sort_bias = nn.Parameter(torch.empty(num_heads, self.max_blocks).uniform_(-bound, bound))

    def sort_matrix(self, k_blocks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Soft permutation P (B, H, nb, nb) from k_blocks (B, H, nb, b, Dh) with padded keys zeroed
        and valid (B, nb) bool (True = the block holds a real token). Runs in k_blocks' dtype."""
        nb = k_blocks.shape[2]
        summary = k_blocks.sum(3)  # (B, H, nb, Dh)
        w = self.sort_weight[:, :, :nb].to(summary.dtype)  # (H, Dh, nb)
        logits = torch.einsum("bhnd,hdm->bhnm", summary, w) + self.sort_bias[None, :, None, :nb].to(summary.dtype)
        logits = logits / self.temperature  # (B, H, nb, nb): row i = block i's scores for each source block
        pair = (valid[:, :, None] & valid[:, None, :])[:, None]  # (B, 1, nb, nb)
        eye = torch.eye(nb, dtype=torch.bool, device=valid.device)
        own = (~valid)[:, None, :, None] & eye  # (B, 1, nb, nb): empty blocks map to themselves
        zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
        logits = torch.where(pair, logits, torch.where(own, zero, zero - math.inf))
        return sinkhorn_normalise(logits, self.n_iters)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, H, L, D = q.shape
        dtype = q.dtype
        self.check_length(L)
        b = self.block_size
        nb = -(-L // b)
        extra = nb * b - L
        acc = torch.promote_types(q.dtype, torch.float32)
        mask = key_padding_mask if key_padding_mask is not None else q.new_ones(B, L, dtype=torch.bool)
        mask = F.pad(mask, (0, extra), value=False)  # (B, nb*b) internal padding is masked
        with torch.autocast(device_type=q.device.type, enabled=False):
            keep = mask[:, None, :, None].to(acc)  # (B, 1, nb*b, 1)
            q, k, v = (F.pad(t.to(acc), (0, 0, 0, extra)) for t in (q, k, v))  # (B, H, nb*b, Dh)
            k, v = k * keep, v * keep  # padded keys/values are zero: out of the summaries and the mixing
            qb, kb, vb = (t.view(B, H, nb, b, D) for t in (q, k, v))  # (B, H, nb, b, Dh)
            mb = mask.view(B, nb, b)  # (B, nb, b)
            valid = mb.any(-1)  # (B, nb)
            p = self.sort_matrix(kb, valid)  # (B, H, nb, nb)
            ks = torch.einsum("bhij,bhjsd->bhisd", p, kb)  # (B, H, nb, b, Dh) sorted keys
            vs = torch.einsum("bhij,bhjsd->bhisd", p, vb)  # (B, H, nb, b, Dh) sorted values
            slot_real = mb.any(1)[:, None, :] & valid[:, :, None]  # (B, nb, b)
            kmask = torch.cat([mb, slot_real], -1)  # (B, nb, 2b)
            keys, vals = torch.cat([kb, ks], 3), torch.cat([vb, vs], 3)  # (B, H, nb, 2b, Dh)
            logits = qb @ keys.transpose(-1, -2) / math.sqrt(D)  # (B, H, nb, b, 2b)
            logits = logits.masked_fill(~kmask[:, None, :, None, :], torch.finfo(acc).min)
            out = logits.softmax(-1) @ vals  # (B, H, nb, b, Dh)
        return out.reshape(B, H, nb * b, D)[:, :, :L].to(dtype)

    def extra_repr(self) -> str:
        return (
            f"block_size={self.block_size}, n_iters={self.n_iters}, temperature={self.temperature}, "
            f"max_blocks={self.max_blocks}"
        )
