"""The matmul floor of a step: its matrix-multiply FLOPs over the machine's matrix-multiply throughput.

`step_flops(fn)` runs fn once under torch's FlopCounterMode and returns the FLOPs of every matrix
product it dispatched (mm, addmm, bmm, baddbmm, in place or not, and the fused attention kernels), each
counted as 2·m·k·n. The fused CPU attention kernel counts its two products forward and the four products
of its gradients backward (the flash kernel also recomputes the scores; the floor does not count that).
Elementwise work (softmax, LayerNorm, GELU, dropout, the optimizer) counts nothing: the floor is what the
step would take if it were nothing but its matrix products at the machine's best rate.

`matmul_gflops(device)` is that rate: the median of timed fp32 (or `dtype`) 2,048 x 2,048 x 2,048
products with the process's threads. floor = flops / rate; a step's "x floor" is its time over that.

`step_time_split(fn)` says where a step's time goes against that floor: fn runs once under torch's
profiler (CPU devices) and the self time of its matrix-product kernels and of its fused attention
kernels is summed. Their time over their FLOPs is the rate these products reach at the step's own shapes
(thin products run well below the 2,048³ rate); the rest of the step is elementwise work, copies and
Python.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _prod2(a: Any, b: Any) -> int:
    """2·m·k·n for (..., m, k) @ (..., k, n) shapes with equal batch dimensions."""
    batch = 1
    for d in a[:-2]:
        batch *= d
    return 2 * batch * a[-2] * a[-1] * b[-1]


def _addmm(self_shape: Any, a: Any, b: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return _prod2(a, b)


def _attention(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """softmax(q kᵀ) v, (B, H, Lq, D) x (B, H, Lk, D): scores and output."""
    B, H, Lq, D = q
    Lk, Dv = k[-2], v[-1]
    return 2 * B * H * Lq * Lk * (D + Dv)


def _attention_backward(grad_out: Any, q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None,
                        **kwargs: Any) -> int:
    """dV = Pᵀ dO, dP = dO Vᵀ, dQ = dS K, dK = dSᵀ Q (no recomputation of the scores)."""
    B, H, Lq, D = q
    Lk, Dv = k[-2], v[-1]
    return 2 * B * H * Lq * Lk * (2 * Dv + 2 * D)


FUSED_ATTENTION_KERNELS = ("flash_attention_for_cpu", "flash_attention", "efficient_attention", "cudnn_attention")
FORMULAS = {aten.addmm_: _addmm, aten.baddbmm_: _addmm}
for _kernel in FUSED_ATTENTION_KERNELS:
    # every fused kernel alike (torch's own formulas for the GPU kernels add the recomputed scores)
    if hasattr(aten, f"_scaled_dot_product_{_kernel}"):
        FORMULAS[getattr(aten, f"_scaled_dot_product_{_kernel}")] = _attention
        FORMULAS[getattr(aten, f"_scaled_dot_product_{_kernel}_backward")] = _attention_backward


ATTENTION_OPS = frozenset(name for kernel in FUSED_ATTENTION_KERNELS
                          for name in (f"_scaled_dot_product_{kernel}", f"_scaled_dot_product_{kernel}_backward"))
PRODUCT_OPS = frozenset(("mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_", "_addmm_activation"))


def step_flop_counts(fn: Callable[[], object]) -> dict[str, int]:
    """Matrix-multiply FLOPs of one call of fn (fn really runs, once): {"products": plain products,
    "attention": the fused attention kernels' products}."""
    with FlopCounterMode(display=False, custom_mapping=FORMULAS) as counter:
        fn()
    counts = {"products": 0, "attention": 0}
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        name = str(op).rsplit(".", 1)[-1]  # aten.mm -> mm
        counts["attention" if name in ATTENTION_OPS else "products"] += int(flops)
    return counts


def step_flops(fn: Callable[[], object]) -> int:
    """Matrix-multiply FLOPs of one call of fn (fn really runs, once)."""
    return sum(step_flop_counts(fn).values())


def step_time_split(fn: Callable[[], object]) -> dict[str, float]:
    """One profiled call of fn on a CPU: {"products_ms": self time of the plain matrix products (mm, addmm,
    bmm, baddbmm and their in-place forms), "attention_ms": of the fused attention kernels, forward and
    backward, "profiled_ms": the call's wall time under the profiler}. The profiler's own cost lands in
    profiled_ms, not in the kernels' self times."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    wall = time.perf_counter() - t0
    split = {"products_ms": 0.0, "attention_ms": 0.0, "profiled_ms": wall * 1e3}
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        name = event.key.removeprefix("aten::")
        if name in ATTENTION_OPS:
            split["attention_ms"] += event.self_cpu_time_total / 1e3
        elif name in PRODUCT_OPS:
            split["products_ms"] += event.self_cpu_time_total / 1e3
    return split


def matmul_gflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 7) -> float:
    """Median GFLOP/s of n x n x n products on device with the current thread setting."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e9
