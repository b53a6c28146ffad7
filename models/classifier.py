"""Build a task model from plain settings (no Hydra, no task knowledge beyond sizes)."""
from __future__ import annotations

from torch import nn

from models.attention import AttentionConfigError
from models.encoder import Encoder, EncoderConfig
from models.heads import ACTIVATIONS, HEADS, POOLINGS


def build_model(*, head: str, vocab_size: int, num_classes: int, max_len: int, attention: dict,
                dim: int = 64, depth: int = 2, heads: int = 2, head_dim: int = 32, ffn_dim: int = 128,
                dropout: float = 0.1, pooling: str = "mean", embed_init_std: float | None = None,
                head_hidden: int | None = None, head_activation: str = "gelu") -> nn.Module:
    """`attention` is the backend's spec (the composed cfg.attention): {"_target_": "pkg.module.Class",
    "name": <its yaml's name>, **options}; only the options reach the backend's constructor.

    pooling: mean (real tokens) | mean_padded (the authors' divide-by-padded-length) | cls | mean_pos (mean +
    a learned weight per position).
    embed_init_std: None = nn.Embedding's N(0, 1) for tokens (positions N(0, 0.02)); a float = both N(0, std).
    head_hidden: the classifier MLP's hidden width (None = dim); head_activation: gelu | relu."""
    if head not in HEADS:
        raise AttentionConfigError(f"unknown head '{head}'; valid: {', '.join(HEADS)}")
    if pooling not in POOLINGS:
        raise AttentionConfigError(f"model.pooling={pooling} is not a pooling; valid: {', '.join(POOLINGS)}")
    if head_activation not in ACTIVATIONS:
        raise AttentionConfigError(f"model.head_activation={head_activation} is not supported; valid: "
                                   f"{', '.join(ACTIVATIONS)}")
    if embed_init_std is not None and not embed_init_std > 0:
        raise AttentionConfigError(f"model.embed_init_std={embed_init_std} must be > 0, or null for "
                                   "PyTorch's default N(0, 1) token embedding")
    if head_hidden is not None and head_hidden < 1:
        raise AttentionConfigError(f"model.head_hidden={head_hidden} must be >= 1, or null for the model dim")
    cfg = EncoderConfig(vocab_size=vocab_size, max_len=max_len, dim=dim, depth=depth, heads=heads,
                        head_dim=head_dim, ffn_dim=ffn_dim, dropout=dropout, cls=pooling == "cls",
                        embed_init_std=embed_init_std)
    return HEADS[head](Encoder(cfg, dict(attention)), num_classes, pooling=pooling, hidden=head_hidden,
                       activation=head_activation)

