"""The one contract every attention backend follows.

A backend only mixes tokens. The multi-head wrapper (`models.multihead`) owns the projections and the
head split, so parameter counts stay comparable across backends.

    __init__(num_heads, head_dim, max_len=None, **options)
    forward(q, k, v, key_padding_mask) -> out
    q, k, v, out: (B, H, L, Dh)      key_padding_mask: (B, L) bool, True = real token, or None

Subclassing AttentionBackend is optional: any nn.Module with that signature is a backend (flags it does
not set take the defaults below). The subclass adds the build-time max_len check and `check_length`.
A backend is named by its config file (`attention/<name>.yaml`), not by the class.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


class AttentionConfigError(ValueError):
    """A backend cannot be built as asked (unknown name, a length it cannot take, a bad option)."""


class AttentionBackend(nn.Module):
    """Base class: capability flags plus the build-time length check.

    Capability flags (class attributes, never mutated):
      supports_padding_mask: padded keys are excluded from the mixing.
      needs_max_len: the backend owns parameters sized by the maximum length (Linformer).
      mixed_precision: None, or one line saying which parts run in fp32 under autocast (in records).
      approximates_softmax: the output estimates softmax attention, softmax(q kᵀ/√Dh) v over the real
        keys, by a sparse pattern, a low-rank or kernel estimate, or hashing: `lra-bench --approx`
        reports its error against exact softmax. False for softmax itself and for a backend that
        computes another function of q, k, v by design (learned logits, another kernel), where an
        error against softmax measures a choice, not an approximation.
      shared_qk: the keys are the normalised queries and a query attends to itself only when nothing
        else is there (Reformer): the exact attention it approximates is that one, not softmax(q kᵀ).
      approx_fixed_options: options the approximation report sets because they add something that is
        not part of the approximation (Nyström's convolution skip on V).
      quadratic_memory: the method holds L x L (or L x max_len) tensors by design (a Synthesizer's
        logits); the contract's no-L x L check does not apply to it.
    `exact_options(length)` gives the options under which the backend computes its exact target.
    `name` is only used in messages; the harness names a backend by its yaml file.
    """

    name: ClassVar[str] = ""
    supports_padding_mask: ClassVar[bool] = True
    needs_max_len: ClassVar[bool] = False
    mixed_precision: ClassVar[str | None] = None
    approximates_softmax: ClassVar[bool] = False
    shared_qk: ClassVar[bool] = False
    approx_fixed_options: ClassVar[dict[str, Any]] = {}
    quadratic_memory: ClassVar[bool] = False

    @classmethod
    def exact_options(cls, length: int) -> dict[str, Any] | None:
        """Options with which the backend computes its exact target (softmax attention, or the shared-QK
        one) at `length` tokens, up to rounding; None when no setting does (random features, learned
        projections or sorting)."""
        return None

    def __init__(self, num_heads: int, head_dim: int, max_len: int | None = None) -> None:
        super().__init__()
        if self.needs_max_len and not max_len:
            raise AttentionConfigError(
                f"attention backend '{self.name or type(self).__name__}' needs a maximum sequence length (max_len) when it is "
                "built; the model passes the task's max_len, so set task.max_len (or model.max_len)."
            )
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.max_len = max_len

    def require_at_least(self, key: str, value: int, low: int) -> None:
        """Build-time bound of an integer option: AttentionConfigError "<name>: <key> must be >= <low>"."""
        if value < low:
            raise AttentionConfigError(f"{self.name}: {key} must be >= {low}, got {value}")

    def check_length(self, length: int) -> None:
        """Raise AttentionConfigError if this backend cannot take sequences of `length` tokens."""
        if self.max_len is not None and length > self.max_len:
            raise AttentionConfigError(
                f"attention backend '{self.name or type(self).__name__}' was built for at most {self.max_len} tokens but got "
                f"{length}; rebuild it with max_len >= {length} (task.max_len)."
            )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
