"""Heads: pooling, the single-sequence classifier and the Retrieval two-tower head."""
from __future__ import annotations

import torch
from torch import nn

from models.encoder import Encoder

POOLINGS = ("mean", "mean_padded", "cls", "mean_pos")
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def pool(states: torch.Tensor, mask: torch.Tensor, mode: str, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L, dim) states, (B, L) mask (True = real token) -> (B, dim).

    `mean` averages the real tokens; `cls` takes position 0; `mean_padded` sums the real tokens and
    divides by the padded length L (the Nyströmformer authors' code: a defect, kept only as a switch:
    a short sequence's pooled vector shrinks with the padding). `mean_pos` is `mean` plus
    sum_l pos_weight[l] * states[:, l] over the real tokens: a learned weight per position (`pos_weight`,
    (max_len,), zero at the start), a linear path from any one position to the head that does not pass
    through a softmax over all positions."""
    if mode == "cls":
        return states[:, 0]
    m = mask.to(states.dtype)  # (B, L)
    if mode in ("mean", "mean_pos"):
        weights = m / m.sum(1, keepdim=True).clamp_min(1.0)
        if mode == "mean_pos":
            weights = weights + m * pos_weight[: states.shape[1]]  # weights (L,)
    elif mode == "mean_padded":
        weights = m / states.shape[1]
    else:
        raise ValueError(f"unknown pooling '{mode}'; valid: {', '.join(POOLINGS)}")
    # one weighted sum per example as a (1, L) x (L, dim) product: no (B, L, dim) temporary either way;
    # in the states' dtype, as a sum would be (autocast would lower a bmm)
    with torch.autocast(device_type=states.device.type, enabled=False):
        return torch.bmm(weights.unsqueeze(1), states).squeeze(1)  # (B, dim)


def classifier_mlp(in_dim: int, hidden: int, num_classes: int, activation: str) -> nn.Sequential:
    """Linear(in_dim -> hidden) -> activation -> Linear(hidden -> num_classes)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown head activation '{activation}'; valid: {', '.join(ACTIVATIONS)}")
    return nn.Sequential(nn.Linear(in_dim, hidden), ACTIVATIONS[activation](), nn.Linear(hidden, num_classes))


def _pos_weight(encoder: Encoder, pooling: str) -> nn.Parameter | None:
    """`mean_pos` pooling's learned per-position weights (max_len,), zero at the start (= plain mean)."""
    return nn.Parameter(torch.zeros(encoder.cfg.max_len)) if pooling == "mean_pos" else None


class SequenceClassifier(nn.Module):
    """Encoder -> pooled vector -> Linear/activation/Linear logits. `hidden` None = the model dim."""

    def __init__(self, encoder: Encoder, num_classes: int, pooling: str = "mean", hidden: int | None = None,
                 activation: str = "gelu"):
        super().__init__()
        dim = encoder.cfg.dim
        self.encoder, self.pooling = encoder, pooling
        self.mlp = classifier_mlp(dim, hidden or dim, num_classes, activation)
        self.pos_weight = _pos_weight(encoder, pooling)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        states, mask = self.encoder(batch["input_ids"], batch["mask"])
        return self.mlp(pool(states, mask, self.pooling, self.pos_weight))


class DualClassifier(nn.Module):
    """Two-tower Retrieval head: one shared encoder embeds both documents into u, v; the classifier
    reads [u, v, u*v, u-v]. No cross-attention between the documents."""

    def __init__(self, encoder: Encoder, num_classes: int, pooling: str = "mean", hidden: int | None = None,
                 activation: str = "gelu"):
        super().__init__()
        dim = encoder.cfg.dim
        self.encoder, self.pooling = encoder, pooling
        self.mlp = classifier_mlp(4 * dim, hidden or dim, num_classes, activation)
        self.pos_weight = _pos_weight(encoder, pooling)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        B = batch["input_ids"].shape[0]
        ids = torch.cat([batch["input_ids"], batch["input_ids2"]])  # (2B, L): both towers in one pass
        mask = torch.cat([batch["mask"], batch["mask2"]])
        states, mask = self.encoder(ids, mask)
        pooled = pool(states, mask, self.pooling, self.pos_weight)
        u, v = pooled[:B], pooled[B:]
        return self.mlp(torch.cat([u, v, u * v, u - v], dim=-1))


HEADS = {"pooled": SequenceClassifier, "dual": DualClassifier}
