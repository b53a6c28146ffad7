"""Reformer LSH attention (Kitaev et al., "Reformer: The Efficient Transformer", ICLR 2020), non-causal.

Shared QK: the paper's keys are the normalised queries, k_j = q_j / ‖q_j‖. The multi-head wrapper
still projects a separate k; this backend ignores it and uses q for both (k receives no gradient).
Per hash round r (n_hashes rounds, each with its own random rotation R_r of shape (Dh, n_buckets/2)):
    bucket_r(i) = argmax([q_i R_r ; −q_i R_r])
    sort the tokens by (bucket, position), cut the sorted order into chunks of chunk_size tokens;
    a query attends to the keys of its chunk and of the previous chunk (cyclically; a single chunk
    does not look back at itself), logits q_i·k_j/√Dh, never to padded keys, and not to itself
    unless nothing else is available (its own logit is set to -1e5, as in the paper's code);
    o_r(i) = Σ_j softmax_j(...) v_j,  z_r(i) = logsumexp_j(...).
    out_i = Σ_r exp(z_r(i) − logsumexp_r z_r(i)) o_r(i)          (rounds combined by their normalisers)
Padded tokens (and the internal padding up to a multiple of chunk_size) get an extra bucket after
every real one, so they sort to the end and never change which real tokens share a chunk.
Memory O(n_hashes · L · chunk_size); nothing is L x L.

Randomness: the rotations live in the `rotations` buffer (H, Dh, n_hashes, n_buckets/2), drawn from
torch's global RNG at build; with redraw=True (the paper: new random rotations at every forward) each
training forward draws new ones into the buffer, and evaluation uses the last ones drawn, so a
checkpoint reproduces its evaluation outputs.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from models.attention.base import AttentionBackend, AttentionConfigError

SELF_LOGIT = -1e5  # a token's logit for itself: used only when no other key is in its window


def default_buckets(max_len: int, chunk_size: int) -> int:
    """Buckets for sequences of max_len tokens: the largest power of two <= 2·max_len/chunk_size
    (at least 2), so that a bucket holds about half a chunk on average."""
    return max(2, 2 ** int(math.log2(max(1, 2 * max_len // chunk_size))))


def lsh_buckets(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, Dh), rotations (H, Dh, R, n/2) -> bucket ids (B, H, R, L) in [0, n)."""
    proj = torch.einsum("bhld,hdrk->bhrlk", x, rotations)  # (B, H, R, L, n/2)
    top, arg_top = proj.max(-1)  # argmax over [xR ; -xR] without building it:
    bottom, arg_bottom = proj.min(-1)  # the largest of -xR is minus the smallest of xR
    return torch.where(top >= -bottom, arg_top, arg_bottom + proj.shape[-1])


def look_back(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Concatenate each chunk (along `dim`) with the previous one, cyclically, along dim + 1."""
    return torch.cat([x, x.roll(1, dims=dim)], dim + 1)


def lsh_attention(
    q: torch.Tensor,
    v: torch.Tensor,
    rotations: torch.Tensor,
    chunk_size: int,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shared-QK LSH attention. q, v: (B, H, L, Dh); rotations (H, Dh, R, n_buckets/2); mask (B, L)
    bool, True = real token. Returns (B, H, L, Dh) in q's dtype; everything runs in at least fp32
    with autocast off."""
    B, H, L, D = q.shape
    R, n_buckets = rotations.shape[2], 2 * rotations.shape[3]
    c = chunk_size
    nc = -(-L // c)
    Lp, extra = nc * c, nc * c - L
    acc = torch.promote_types(q.dtype, torch.float32)
    mask = key_padding_mask if key_padding_mask is not None else q.new_ones(B, L, dtype=torch.bool)
    mask = F.pad(mask, (0, extra), value=False)  # (B, Lp)
    with torch.autocast(device_type=q.device.type, enabled=False):
        x = F.pad(q.to(acc), (0, 0, 0, extra))  # (B, H, Lp, Dh)
        val = F.pad(v.to(acc), (0, 0, 0, extra))  # (B, H, Lp, Dh)
        with torch.no_grad():
            buckets = lsh_buckets(x, rotations.to(acc))  # (B, H, R, Lp)
            buckets = buckets.masked_fill(~mask[:, None, None, :], n_buckets)  # padding sorts last
            pos = torch.arange(Lp, device=q.device)
            order = (buckets * Lp + pos).argsort(-1)  # (B, H, R, Lp): sorted slot -> position
            undo = order.argsort(-1)  # position -> sorted slot
        idx = order.reshape(B, H, R * Lp, 1).expand(-1, -1, -1, D)
        xs = x.gather(2, idx).view(B, H, R, nc, c, D)  # (B, H, R, nc, c, Dh) sorted queries
        vs = val.gather(2, idx).view(B, H, R, nc, c, D)  # (B, H, R, nc, c, Dh)
        ks = xs / xs.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(acc).tiny)  # unit keys
        ms = mask[:, None, None, :].expand(B, H, R, Lp).gather(3, order).view(B, H, R, nc, c)
        ps = order.view(B, H, R, nc, c)
        if nc > 1:  # keys of this chunk and the one before it
            ks, vs_k, ms_k, ps_k = look_back(ks, 3), look_back(vs, 3), look_back(ms, 3), look_back(ps, 3)
        else:
            vs_k, ms_k, ps_k = vs, ms, ps
        logits = xs @ ks.transpose(-1, -2) / math.sqrt(D)  # (B, H, R, nc, c, 2c)
        logits = logits.masked_fill(ps[..., :, None] == ps_k[..., None, :], SELF_LOGIT)
        logits = logits.masked_fill(~ms_k[..., None, :], torch.finfo(acc).min)
        lse = logits.logsumexp(-1, keepdim=True)  # (B, H, R, nc, c, 1)
        o = torch.exp(logits - lse) @ vs_k  # (B, H, R, nc, c, Dh)
        back = undo[..., None]  # (B, H, R, Lp, 1)
        o = o.view(B, H, R, Lp, D).gather(3, back.expand(-1, -1, -1, -1, D))  # (B, H, R, Lp, Dh) unsorted
        lse = lse.view(B, H, R, Lp, 1).gather(3, back)  # (B, H, R, Lp, 1)
        out = (o * lse.softmax(2)).sum(2)  # (B, H, Lp, Dh): rounds weighted by their normalisers
    return out[:, :, :L].to(q.dtype)


class ReformerAttention(AttentionBackend):
    """LSH attention with shared QK (k is ignored: keys are the normalised queries).

    forward(q, k, v, key_padding_mask) -> (B, H, L, Dh); mask (B, L) bool, True = real token.
    Options: n_hashes (rounds), chunk_size, n_buckets (even; None = default_buckets(max_len,
    chunk_size)), redraw (new rotations at every training forward, from torch's global RNG).
    Any length: it is padded internally to a multiple of chunk_size.
    """

    name = "reformer"
    approximates_softmax: ClassVar[bool] = True
    shared_qk: ClassVar[bool] = True

    @classmethod
    def exact_options(cls, length: int) -> dict[str, object]:
        """Exact at `length` tokens: one chunk holds every key (shared-QK attention, no hashing left)."""
        return {"chunk_size": length}
    mixed_precision: ClassVar[str] = "hashing, sorting, chunk attention and the round combination run in fp32 with autocast off"

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        max_len: int | None = None,
        n_hashes: int = 2,
        chunk_size: int = 64,
        n_buckets: int | None = None,
        redraw: bool = True,
    ) -> None:
        super().__init__(num_heads, head_dim, max_len)
        self.require_at_least("n_hashes", n_hashes, 1)
        self.require_at_least("chunk_size", chunk_size, 1)
        if n_buckets is None:
            if not max_len:
                raise AttentionConfigError(
                    "reformer: n_buckets is null, which means 'from max_len', but no max_len was given; "
                    "set attention.n_buckets (an even number) or task.max_len."
                )
            n_buckets = default_buckets(max_len, chunk_size)
        if n_buckets < 2 or n_buckets % 2:
            raise AttentionConfigError(
                f"reformer: n_buckets must be an even number >= 2 (argmax over [xR, -xR]), got {n_buckets}"
            )
        self.n_hashes, self.chunk_size, self.n_buckets, self.redraw = n_hashes, chunk_size, n_buckets, redraw
        self.register_buffer("rotations", torch.randn(num_heads, head_dim, n_hashes, n_buckets // 2))

    @torch.no_grad()
    def redraw_rotations(self) -> None:
        """Replace the rotations by a fresh draw from torch's global RNG."""
        new = torch.randn(self.rotations.shape)
        self.rotations.copy_(new.to(self.rotations.device, self.rotations.dtype))

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.redraw and self.training:
            self.redraw_rotations()
        return lsh_attention(q, v, self.rotations, self.chunk_size, key_padding_mask)

    def extra_repr(self) -> str:
        return (
            f"n_hashes={self.n_hashes}, chunk_size={self.chunk_size}, n_buckets={self.n_buckets}, "
            f"redraw={self.redraw}"
        )
