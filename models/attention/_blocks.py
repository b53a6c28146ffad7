"""Blocked sparse attention shared by the block/window-sparse backends (local, sparse, longformer, bigbird).

The sequence, padded to nb blocks of `block` tokens, is cut into query blocks. Query block i attends to

  * the m key blocks listed in `key_blocks[h, i, :]` (its window, random blocks, ...), gathered into
    one (m * block)-long key set; a slot whose index is out of range or repeats an earlier slot of
    the same row is empty (so no key is ever counted twice);
  * optionally G extra key positions shared by every block (global tokens, summary columns);

restricted by a token-level `allowed` mask (a band, a causal rule, duplicate removal) and by the key
padding mask. Scores are (B, H, nb, block, m * block + G): memory O(L * (m * block + G)), never L x L.
A query row whose allowed keys are all padding returns zeros, the convention of the fused
`scaled_dot_product_attention` that the softmax backend uses.

Rows that attend to every key (global tokens) are computed by `full_rows`: O(G * L).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def num_blocks(length: int, block: int) -> int:
    """Blocks of `block` tokens needed to hold `length` tokens (the last one padded)."""
    return -(-length // block)


def slot_positions(key_blocks: torch.Tensor, block: int) -> torch.Tensor:
    """Absolute key position of every gathered slot: key_blocks (Hb, nb, m) -> (Hb, nb, m * block).
    Positions of empty (out-of-range) slots are meaningless; callers mask them through the slots."""
    Hb, nb, m = key_blocks.shape
    pos = key_blocks[..., None] * block + torch.arange(block, device=key_blocks.device)  # (Hb, nb, m, block)
    return pos.reshape(Hb, nb, m * block)


def live_slots(key_blocks: torch.Tensor, nb: int) -> torch.Tensor:
    """(Hb, nb, m) bool: the slot holds a block in [0, nb) that no earlier slot of its row holds."""
    in_range = (key_blocks >= 0) & (key_blocks < nb)
    same = key_blocks[..., :, None] == key_blocks[..., None, :]  # (Hb, nb, m, m)
    earlier = torch.ones(same.shape[-1], same.shape[-1], dtype=torch.bool, device=key_blocks.device).tril(-1)
    return in_range & ~(same & earlier).any(-1)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    block: int,
    key_blocks: torch.Tensor,
    allowed: torch.Tensor | None = None,
    extra_pos: torch.Tensor | None = None,
    extra_allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ/√Dh) v over each query block's gathered keys. Returns (B, H, L, Dh).

    q, k, v: (B, H, L, Dh); key_padding_mask: (B, L) bool, True = real token, or None.
    key_blocks: (Hb, nb, m) long, Hb in {1, H}, nb = ceil(L / block): key blocks of each query block.
    allowed: bool, broadcastable to (Hb, nb, block, m * block): which gathered keys each query may see.
    extra_pos: (G,) long positions < L seen by every query block (after the gathered keys).
    extra_allowed: bool, broadcastable to (nb, block, G).
    """
    B, H, L, D = q.shape
    Hb, nb, m = key_blocks.shape
    pad = nb * block - L
    real = key_padding_mask if key_padding_mask is not None else torch.ones(1, L, dtype=torch.bool, device=q.device)
    real_p = F.pad(real, (0, pad))  # (B|1, nb*block), internal padding is not real
    # block-major layout (B, nb, H, block, Dh): the mask then broadcasts over heads in the fused kernel
    qb, kb, vb = (F.pad(t, (0, 0, 0, pad)).view(B, H, nb, block, D).transpose(1, 2) for t in (q, k, v))

    live = live_slots(key_blocks, nb)  # (Hb, nb, m)
    idx = key_blocks.clamp(0, nb - 1)
    if Hb == 1:
        kg, vg = (t[:, idx[0]].transpose(2, 3) for t in (kb, vb))  # (B, nb, H, m, block, Dh)
    else:
        heads = torch.arange(H, device=q.device)[None, :, None]
        kg, vg = kb[:, idx.transpose(0, 1), heads], vb[:, idx.transpose(0, 1), heads]  # (B, nb, H, m, block, Dh)
    S = m * block
    kg, vg = kg.reshape(B, nb, H, S, D), vg.reshape(B, nb, H, S, D)
    key_ok = real_p.view(-1, nb, block)[:, idx] & live[None, ..., None]  # (B|1, Hb, nb, m, block)
    mask = key_ok.reshape(-1, Hb, nb, 1, S).transpose(1, 2)  # (B|1, nb, Hb, 1, S)
    if allowed is not None:
        mask = mask & allowed.transpose(0, 1)  # allowed (Hb|1, nb, block|1, S) -> (B|1, nb, Hb, block|1, S)

    if extra_pos is not None and extra_pos.numel():
        G = extra_pos.numel()
        ke = k[:, :, extra_pos][:, None].expand(B, nb, H, G, D)  # (B, nb, H, G, Dh)
        ve = v[:, :, extra_pos][:, None].expand(B, nb, H, G, D)
        kg, vg = torch.cat([kg, ke], 3), torch.cat([vg, ve], 3)  # (B, nb, H, S+G, Dh)
        emask = real[:, extra_pos][:, None, None, None, :]  # (B|1, 1, 1, 1, G)
        if extra_allowed is not None:
            emask = emask & extra_allowed[:, None]  # extra_allowed (nb|1, block|1, G)
        lead = (max(mask.shape[0], emask.shape[0]), nb, Hb, max(mask.shape[3], emask.shape[3]))
        mask = torch.cat([mask.expand(*lead, S), emask.expand(*lead, G)], -1)  # (B|1, nb, Hb, block|1, S+G)
        S = S + G

    mask = mask.expand(B, nb, *mask.shape[2:]).reshape(B * nb, *mask.shape[2:])  # (B*nb, Hb, block|1, S)
    out = F.scaled_dot_product_attention(
        qb.reshape(B * nb, H, block, D), kg.reshape(B * nb, H, S, D), vg.reshape(B * nb, H, S, D), attn_mask=mask
    )  # (B*nb, H, block, Dh)
    return out.view(B, nb, H, block, D).transpose(1, 2).reshape(B, H, nb * block, D)[:, :, :L]


def full_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None, rows: torch.Tensor
) -> torch.Tensor:
    """Dense attention of the queries at positions `rows` (G,) over every real key: (B, H, G, Dh)."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # (B, 1, 1, L)
    return F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=mask)


def with_rows(out: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """out (B, H, L, Dh) with the rows at positions `rows` (G,) replaced by values (B, H, G, Dh)."""
    return out.index_copy(2, rows, values.to(out.dtype))
