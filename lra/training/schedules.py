"""Learning-rate schedules (factories used through Hydra `_partial_`)."""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR


def warmup_linear(optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warm-up from 0 to the optimizer's lr over `warmup_steps`, then linear decay to 0 at
    `total_steps` (the one-cycle linear shape, with no momentum cycling)."""
    warmup_steps, total_steps = max(0, int(warmup_steps)), max(1, int(total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return LambdaLR(optimizer, factor)


def warmup_rsqrt(optimizer: Optimizer, warmup_steps: int, total_steps: int | None = None) -> LambdaLR:
    """LRA's `constant * linear_warmup * rsqrt_decay`: lr * min(1, s/w) / sqrt(max(s, w)).
    The optimizer's lr is the LRA `learning_rate` constant (0.05 for ListOps/Text/Retrieval), so the
    peak is lr / sqrt(w). `total_steps` is accepted for a uniform factory signature and unused."""
    w = max(1, int(warmup_steps))

    def factor(step: int) -> float:
        s = step + 1
        return min(1.0, s / w) / math.sqrt(max(s, w))

    return LambdaLR(optimizer, factor)


def warmup_cosine(optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """LRA's image/pathfinder `constant * linear_warmup * cosine_decay`: linear warm-up, and a cosine
    from 1 to 0 over `total_steps` (one cycle)."""
    w, total = max(1, int(warmup_steps)), max(1, int(total_steps))

    def factor(step: int) -> float:
        s = step + 1
        return min(1.0, s / w) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, s / total)))

    return LambdaLR(optimizer, factor)


def one_cycle(optimizer: Optimizer, warmup_steps: int, total_steps: int, anneal_strategy: str = "linear",
              cycle_momentum: bool = True, div_factor: float = 25.0, final_div_factor: float = 1e4) -> OneCycleLR:
    """PyTorch's own `OneCycleLR`, as the Nyströmformer authors' LRA code ran it: peak = the optimizer's
    lr, pct_start = warmup_steps / total_steps, start at peak / div_factor, end at
    start / final_div_factor. With `cycle_momentum` (PyTorch's default, and theirs) it also cycles
    AdamW's beta1 0.95 -> 0.85 at the peak -> 0.95, overriding the optimizer's betas[0].
    OneCycleLR divides by the length of each phase, so pct_start is kept where both phases last at least
    one step: only degenerate runs (warm-up >= steps, or fewer than 2 steps, e.g. a smoke test) differ."""
    total = max(2, int(total_steps))
    pct = min(max(max(0, int(warmup_steps)) / total, 1.5 / total), (total - 0.5) / total)
    peak = [group["lr"] for group in optimizer.param_groups]
    return OneCycleLR(optimizer, max_lr=peak, total_steps=total, pct_start=pct,
                      anneal_strategy=anneal_strategy, cycle_momentum=cycle_momentum, div_factor=div_factor,
                      final_div_factor=final_div_factor)
