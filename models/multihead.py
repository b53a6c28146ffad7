"""Multi-head wrapper shared by every backend: fused QKV projection, head split, output projection."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import AttentionConfigError, build_attention, capability
from models.dropout import Dropout


class MultiHeadAttention(nn.Module):
    """(B, L, dim) -> (B, L, dim) around one backend.

    `attention` is the backend's spec, {"_target_": "pkg.module.Class", "name": ..., **options} (the
    composed `cfg.attention`), or a backend class; extra keyword arguments are more options for it.
    `out_dropout` drops the output projection's activations; a backend's own dropout has another name
    (softmax: `attn_dropout`), so the two never collide."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention: Mapping[str, Any] | type[nn.Module],
        head_dim: int | None = None,
        max_len: int | None = None,
        out_dropout: float = 0.0,
        **attention_kwargs: Any,
    ) -> None:
        super().__init__()
        head_dim = head_dim or dim // num_heads
        self.num_heads, self.head_dim, self.max_len = num_heads, head_dim, max_len
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner)
        self.out = nn.Linear(inner, dim)
        spec = {"_target_": attention} if isinstance(attention, type) else dict(attention)
        self.backend_name = spec.get("name") or getattr(spec["_target_"], "__name__", str(spec.get("_target_")))
        self.attn = build_attention({**spec, **attention_kwargs}, num_heads=num_heads, head_dim=head_dim,
                                    max_len=max_len)
        self.drop = Dropout(out_dropout)

    def check_length(self, length: int) -> None:
        """Raise AttentionConfigError if the backend cannot take `length` tokens (call at build time)."""
        own = getattr(self.attn, "check_length", None)
        if callable(own):
            own(length)
        elif capability(self.attn, "needs_max_len") and self.max_len is not None and length > self.max_len:
            raise AttentionConfigError(
                f"attention backend '{self.backend_name}' was built for at most {self.max_len} tokens but got "
                f"{length}; rebuild it with max_len >= {length} (task.max_len).")

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, dim); key_padding_mask: (B, L) bool, True = real token. Returns (B, L, dim)."""
        B, L, _ = x.shape
        H, Dh = self.num_heads, self.head_dim
        # q, k, v by one GEMM each with the rows of the fused weight (views): each comes out (B, L, H, Dh)
        # contiguous, and so does its gradient from the fused kernels, which then needs no copy
        w, b = self.qkv.weight.view(3, H * Dh, -1), self.qkv.bias.view(3, H * Dh)
        from_input = getattr(self.attn, "forward_from_input", None)
        if callable(from_input):  # the backend forms keys and values from x itself (Linformer)
            q = F.linear(x, w[0], b[0]).view(B, L, H, Dh).transpose(1, 2)  # (B, H, L, Dh)
            out = from_input(q, x, w[1:], b[1:], key_padding_mask)
        else:
            q, k, v = (F.linear(x, w[i], b[i]).view(B, L, H, Dh).transpose(1, 2) for i in range(3))  # (B, H, L, Dh)
            out = self.attn(q, k, v, key_padding_mask)  # (B, H, L, Dh)
        out = out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)
        return self.drop(self.out(out))
