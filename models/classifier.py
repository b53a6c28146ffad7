"""Build a task model from plain settings (no Hydra, no task knowledge beyond sizes)."""
from __future__ import annotations

from torch import nn

from models.attention import AttentionConfigError
from models.encoder import Encoder, EncoderConfig
from models.heads import HEADS


def build_model(*, head: str, vocab_size: int, num_classes: int, max_len: int, attention: dict,
                dim: int = 64, depth: int = 2, heads: int = 2, head_dim: int = 32, ffn_dim: int = 128,
                dropout: float = 0.1, pooling: str = "mean") -> nn.Module:
    """`attention` is the backend's settings: {"name": ..., **options}."""
    if head not in HEADS:
        raise AttentionConfigError(f"unknown head '{head}'; valid: {', '.join(HEADS)}")
    options = dict(attention)
    name = options.pop("name")
    cfg = EncoderConfig(vocab_size=vocab_size, max_len=max_len, dim=dim, depth=depth, heads=heads,
                        head_dim=head_dim, ffn_dim=ffn_dim, dropout=dropout, cls=pooling == "cls")
    return HEADS[head](Encoder(cfg, name, **options), num_classes, pooling=pooling)
