"""Dropout that is cheap on a CPU.

`torch.nn.Dropout` on a CPU draws one Bernoulli sample per element, which costs more than the matrix
multiplies of a small model (measured in `lra-bench`'s classifier profile: about a seventh of a ListOps
training step). Here one 64-bit random word decides four elements: it is split into four 16-bit
words and an element is dropped when its word falls below `round(p * 65536)`. The drop probability is
therefore p rounded to a multiple of 1/65536 (0.1 -> 0.1000061), and the kept values are scaled by
1 / (1 - that probability), so the layer stays unbiased. The keep mask is saved for backward as one
byte per element (`nn.Dropout` saves a float mask).

On other devices (CUDA's dropout is fused and fast), under `torch.compile` (which fuses its own) and in
eval mode this is `F.dropout` exactly.
Randomness comes from torch's global generator of the input's device, so runs stay reproducible
under `torch.manual_seed` and resume restores it like any other draw.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 65536  # one 16-bit word per element


def quantized_p(p: float) -> float:
    """The drop probability actually used on a CPU: p rounded to a multiple of 1/65536."""
    return round(p * LEVELS) / LEVELS


def keep_threshold(p: float) -> int:
    """An element is kept when its int16 word (uniform on [-32768, 32767]) is >= this: it is dropped
    with probability exactly `quantized_p(p)`."""
    return round(p * LEVELS) - LEVELS // 2


def random_words(n: int, device: torch.device | str = "cpu", out: torch.Tensor | None = None) -> torch.Tensor:
    """n uniform int16 words (flat) from the global generator: (n + 3) // 4 64-bit draws, four words each.
    `out`, if given, is an int64 buffer of at least that many draws that is overwritten and viewed."""
    draws = (n + 3) // 4
    if out is None:
        out = torch.empty(draws, dtype=torch.int64, device=device)
    return out[:draws].random_(-(2**63), None).view(torch.int16)[:n]


CHUNK = 1 << 18  # elements per pass of _keep_and_scale: the converted mask and the product stay in cache


def _keep_and_scale(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """x * keep * scale, keep a bool tensor of x's shape, a chunk at a time: x times the mask's uint8 view,
    then the scale, while the chunk is in cache. torch converts a uint8 operand to x's dtype first; a
    chunk at a time that conversion needs no full-size temporary, and the multiply is vectorised (torch's
    `where` is not: dropout forward + backward at 32 x 2,048 x 128 on one thread 16.1 ms chunked, 17.8
    whole-tensor multiply with its temporary, 28.1 `where`). A dropped NaN or inf stays NaN, as in
    torch's own dropout (input times a mask)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    flat_x, flat_keep, flat_out = x.view(-1), keep.reshape(-1).view(torch.uint8), out.view(-1)
    for i in range(0, flat_x.numel(), CHUNK):
        torch.mul(flat_x[i:i + CHUNK], flat_keep[i:i + CHUNK], out=flat_out[i:i + CHUNK]).mul_(scale)
    return out


class _WordDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:  # type: ignore[override]
        keep = random_words(x.numel(), x.device).view(x.shape) >= keep_threshold(p)  # (x.shape) bool
        scale = 1.0 / (1.0 - quantized_p(p))
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return _keep_and_scale(x, keep, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return _keep_and_scale(grad, keep, ctx.scale), None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout(x, p, training)`, with the word-based sampler on a CPU (see the module docstring)."""
    if not training or p == 0.0:
        return x
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if x.device.type != "cpu" or quantized_p(p) == 0.0 or torch.compiler.is_compiling():
        return F.dropout(x, p, training)  # under torch.compile: the compiler's own fused dropout
    return _WordDropout.apply(x, p)


class Dropout(nn.Module):
    """Drop-in for `nn.Dropout(p)` (same `p` attribute and repr), cheaper on a CPU."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
