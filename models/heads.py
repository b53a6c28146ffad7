"""Heads: pooling, the single-sequence classifier and the Retrieval two-tower head."""
from __future__ import annotations

import torch
from torch import nn

from models.encoder import Encoder


def pool(states: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, L, dim) -> (B, dim). `mean` averages real tokens only; `cls` takes position 0."""
    if mode == "cls":
        return states[:, 0]
    if mode == "mean":
        m = mask.unsqueeze(-1).to(states.dtype)  # (B, L, 1)
        return (states * m).sum(1) / m.sum(1).clamp_min(1.0)
    raise ValueError(f"unknown pooling '{mode}'; valid: mean, cls")


class SequenceClassifier(nn.Module):
    """Encoder -> pooled vector -> Linear/GELU/Linear logits."""

    def __init__(self, encoder: Encoder, num_classes: int, pooling: str = "mean", hidden: int | None = None):
        super().__init__()
        dim = encoder.cfg.dim
        self.encoder, self.pooling = encoder, pooling
        self.mlp = nn.Sequential(nn.Linear(dim, hidden or dim), nn.GELU(), nn.Linear(hidden or dim, num_classes))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        states, mask = self.encoder(batch["input_ids"], batch["mask"])
        return self.mlp(pool(states, mask, self.pooling))


class DualClassifier(nn.Module):
    """Two-tower Retrieval head: one shared encoder embeds both documents into u, v; the classifier
    reads [u, v, u*v, u-v]. No cross-attention between the documents."""

    def __init__(self, encoder: Encoder, num_classes: int, pooling: str = "mean", hidden: int | None = None):
        super().__init__()
        dim = encoder.cfg.dim
        self.encoder, self.pooling = encoder, pooling
        self.mlp = nn.Sequential(nn.Linear(4 * dim, hidden or dim), nn.GELU(), nn.Linear(hidden or dim, num_classes))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        B = batch["input_ids"].shape[0]
        ids = torch.cat([batch["input_ids"], batch["input_ids2"]])  # (2B, L): both towers in one pass
        mask = torch.cat([batch["mask"], batch["mask2"]])
        states, mask = self.encoder(ids, mask)
        pooled = pool(states, mask, self.pooling)
        u, v = pooled[:B], pooled[B:]
        return self.mlp(torch.cat([u, v, u * v, u - v], dim=-1))


HEADS = {"pooled": SequenceClassifier, "dual": DualClassifier}
