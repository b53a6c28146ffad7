"""Synthesizer attention (Tay et al., "Synthesizer: Rethinking Self-Attention in Transformer Models",
ICML 2021), the dense and random variants, optionally mixed with dot-product attention.

    dense:   logits_i = W2 relu(W1 x_i + b1) + b2        (L_max logits per token, per head; first L kept)
    random:  logits   = R[:L, :L]                        (R: a learned (H, L_max, L_max) matrix)
    out      = softmax(logits [+ q kᵀ/√Dh] + mask) v      (padded keys masked before the softmax)

Our multi-head wrapper projects the input before the backend sees it, so in the dense variant q plays
the role of the paper's X (the per-head input of the MLP). The random variant ignores q and k.

Capability note: a synthesizer is quadratic by nature. The logits are (B, H, L, L_max) (dense) or
(H, L, L) (random), so time and memory grow with L·L_max; this backend does not pretend otherwise.
The learned matrices are sized by L_max, so it needs max_len and refuses longer inputs.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from models.attention.base import AttentionBackend, AttentionConfigError

MODES = ("dense", "random")
MAX_RANDOM_ENTRIES = 2**28  # a full random logit matrix above this (1 GiB fp32 per layer) is refused at build


def synthetic_attention(
    logits: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(logits [+ q kᵀ/√Dh], padded keys masked) v.

    logits: (B or 1, H, L, L); v, q, k: (B, H, L, Dh); mask (B, L) bool, True = real token.
    Logits, softmax and the weighted sum run in at least fp32 with autocast off."""
    acc = torch.promote_types(v.dtype, torch.float32)
    with torch.autocast(device_type=v.device.type, enabled=False):
        logits = logits.to(acc)
        if q is not None and k is not None:
            logits = logits + q.to(acc) @ k.to(acc).transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, L, L)
        if key_padding_mask is not None:
            pad = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, L)
            logits = logits.masked_fill(pad, torch.finfo(acc).min)
        out = logits.softmax(-1) @ v.to(acc)  # (B, H, L, Dh)
    return out.to(v.dtype)


class SynthesizerAttention(AttentionBackend):
    """Dense or random Synthesizer. q, k, v, out: (B, H, L, Dh); mask (B, L) bool, True = real token.

    Options:
      mode: 'random' (a learned (H, max_len, max_len) logit matrix, the same for every example) or
        'dense' (a per-head two-layer MLP of q giving max_len logits per token).
      dot_product: also add the usual q kᵀ/√Dh to the synthetic logits (the paper's "+ V" mixtures).
        The default, random + dot product, is what LRA's code ran for its Synthesizer row
        (`synthesizer_mode='random'`, `ignore_dot_product=False` in its encoder).
      hidden_dim: width of the dense variant's MLP (default head_dim).
      rank: None = the full random matrix (LRA's 'random'); k = R1 R2 with R1 (H, max_len, k),
        R2 (H, k, max_len) (LRA's 'factorized_random', k = 32 there). A full matrix with more than
        MAX_RANDOM_ENTRIES entries (H·max_len², e.g. Path-X) is refused at build time.
    Parameters are owned by the instance; R starts N(0, 1/max_len) (near-uniform attention), the MLP
    like nn.Linear (uniform ±1/√fan_in).
    """

    name = "synthesizer"
    approximates_softmax: ClassVar[bool] = False  # learned logits (+ dot product): another function by design
    needs_max_len = True
    quadratic_memory: ClassVar[bool] = True  # capability note: logits are L x L_max by design
    mixed_precision: ClassVar[str] = "logits, softmax and the weighted sum run in fp32 with autocast off"

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        max_len: int | None = None,
        mode: str = "random",
        dot_product: bool = True,
        hidden_dim: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(num_heads, head_dim, max_len)
        if mode not in MODES:
            raise AttentionConfigError(
                f"synthesizer: mode must be one of {MODES}, got '{mode}' (set attention.mode=random or dense)."
            )
        assert max_len is not None  # the base class raised otherwise
        self.mode, self.dot_product = mode, bool(dot_product)
        hidden = hidden_dim or head_dim
        if hidden < 1:
            raise AttentionConfigError(f"synthesizer: hidden_dim must be >= 1, got {hidden_dim}")
        self.rank = rank
        if mode == "random" and rank is not None:
            if rank < 1:
                raise AttentionConfigError(f"synthesizer: rank must be >= 1 or null, got {rank}")
            std = (max_len * rank) ** -0.25  # R1 R2 entries then have variance 1/max_len, like the full R
            self.random_left = nn.Parameter(torch.randn(num_heads, max_len, rank) * std)
            self.random_right = nn.Parameter(torch.randn(num_heads, rank, max_len) * std)
        elif mode == "random":
            entries = num_heads * max_len * max_len
            if entries > MAX_RANDOM_ENTRIES:
                raise AttentionConfigError(
                    f"synthesizer: a full random logit matrix for max_len={max_len} and {num_heads} heads has "
                    f"{entries:,} entries ({entries * 4 / 2**30:.1f} GiB fp32 per layer, before gradients and "
                    f"optimizer state), over the {MAX_RANDOM_ENTRIES:,} this backend builds. Use the factorised "
                    "form (attention.rank=32, LRA's factorized_random), attention.mode=dense, or a shorter task.max_len."
                )
            self.random_logits = nn.Parameter(torch.randn(num_heads, max_len, max_len) * max_len**-0.5)
        else:
            b1, b2 = head_dim**-0.5, hidden**-0.5
            self.w1 = nn.Parameter(torch.empty(num_heads, head_dim, hidden).uniform_(-b1, b1))
            self.b1 = nn.Parameter(torch.empty(num_heads, hidden).uniform_(-b1, b1))
            self.w2 = nn.Parameter(torch.empty(num_heads, hidden, max_len).uniform_(-b2, b2))
            self.b2 = nn.Parameter(torch.empty(num_heads, max_len).uniform_(-b2, b2))

    def synthetic_logits(self, q: torch.Tensor) -> torch.Tensor:
        """(B, H, L, L) dense logits from q (B, H, L, Dh), or (1, H, L, L) random logits."""
        L = q.shape[-2]
        if self.mode == "random" and self.rank is not None:
            return (self.random_left[:, :L] @ self.random_right[:, :, :L])[None]  # (1, H, L, L)
        if self.mode == "random":
            return self.random_logits[None, :, :L, :L]  # (1, H, L, L)
        acc = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(device_type=q.device.type, enabled=False):
            x = q.to(acc)
            hid = torch.relu(torch.einsum("bhld,hde->bhle", x, self.w1.to(acc)) + self.b1[None, :, None].to(acc))
            w2, b2 = self.w2[:, :, :L].to(acc), self.b2[None, :, None, :L].to(acc)  # first L of max_len outputs
            return torch.einsum("bhle,hem->bhlm", hid, w2) + b2  # (B, H, L, L)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.check_length(q.shape[-2])
        logits = self.synthetic_logits(q)
        if self.dot_product:
            return synthetic_attention(logits, v, key_padding_mask, q, k)
        return synthetic_attention(logits, v, key_padding_mask)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, dot_product={self.dot_product}, rank={self.rank}, max_len={self.max_len}"
