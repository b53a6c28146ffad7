"""Attention backends. The registry is one explicit dict: adding a backend is one file, one line here,
one yaml in conf/attention/."""
from __future__ import annotations

from typing import Any

from models.attention.base import AttentionBackend, AttentionConfigError
from models.attention.linformer import LinformerAttention
from models.attention.nystrom import NystromAttention
from models.attention.performer import PerformerAttention
from models.attention.softmax import SoftmaxAttention

ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {
    "softmax": SoftmaxAttention,
    "nystrom": NystromAttention,
    "linformer": LinformerAttention,
    "performer": PerformerAttention,
}


def build_attention(name: str, **kwargs: Any) -> AttentionBackend:
    """Build backend `name` with its keyword arguments (num_heads, head_dim, max_len, options)."""
    try:
        cls = ATTENTION_BACKENDS[name]
    except KeyError:
        raise AttentionConfigError(
            f"unknown attention backend '{name}'; valid names: {', '.join(sorted(ATTENTION_BACKENDS))} "
            "(choose one with attention=<name>)."
        ) from None
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise AttentionConfigError(f"attention backend '{name}': bad options {sorted(kwargs)}: {err}") from None


__all__ = ["ATTENTION_BACKENDS", "AttentionBackend", "AttentionConfigError", "build_attention"]
