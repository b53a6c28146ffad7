"""One lra-bench configuration, run in a fresh process: `python -m lra.bench.worker SPEC.json OUT.json`.

Memory first (nothing has run yet): baseline after imports, model and input creation, then the peak
of one forward (inference) and of one forward+backward, each minus that baseline. CPU: the process's
peak resident set (VmHWM, reset through /proc/self/clear_refs; ru_maxrss where that is not possible);
CUDA: torch.cuda.max_memory_allocated. Then timing: warm-up runs, then `repeats` timed runs; with
several implementations they alternate run by run (order reversed every other round). Last, for layers
and classifiers, the matmul floor (lra.bench.flops): the FLOPs of one more training step's matrix
products, and the process's own matrix-multiply rate; on a CPU, one more step under the profiler says
how much of it the products and the fused attention kernels take.
A failed allocation is reported as status "oom"; any other error as "error".
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import psutil
import torch

from lra.bench.flops import matmul_gflops, step_flop_counts, step_time_split
from lra.bench.workloads import Workload, layer_workload, model_workload

MB = 2**20


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(fn: Callable[[], object], device: torch.device, baseline: int) -> float:
    """Peak memory of fn() above `baseline` bytes (RSS on CPU, allocated bytes on CUDA)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - baseline) / MB
    _reset_peak()
    fn()
    return (_peak_rss() - baseline) / MB


def time_runs(fns: list[Callable[[], object]], device: torch.device, warmup: int, repeats: int) -> list[list[float]]:
    """Seconds per run of each fn, interleaved round by round (order reversed every other round)."""
    times: list[list[float]] = [[] for _ in fns]
    for r in range(warmup + repeats):
        order = list(range(len(fns))) if r % 2 == 0 else list(reversed(range(len(fns))))
        for i in order:
            _sync(device)
            t0 = time.perf_counter()
            fns[i]()
            _sync(device)
            if r >= warmup:
                times[i].append(time.perf_counter() - t0)
    return times


def summarize(seconds: list[float]) -> dict:
    """Median, quartiles, min, max (ms) of repeated runs."""
    ms = sorted(s * 1e3 for s in seconds)
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "q1_ms": q[0], "q3_ms": q[2], "iqr_ms": q[2] - q[0],
            "min_ms": ms[0], "max_ms": ms[-1], "runs": len(ms), "times_ms": ms}


def _limit_memory(limit_mb: float | None, device: torch.device) -> None:
    if not limit_mb:
        return
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_allocated(device) + limit_mb * MB) / total))
        return
    vms = psutil.Process().memory_info().vms  # address space now, threads already started
    resource.setrlimit(resource.RLIMIT_AS, (vms + int(limit_mb * MB), resource.getrlimit(resource.RLIMIT_AS)[1]))


def is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text or "out of memory" in text


def run(spec: dict) -> dict:
    from lra.training.allocator import allocator_tuned, tune_allocator

    tune_allocator()  # as lra-train does (LRA_MALLOC_TUNING=0 times glibc's defaults)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    if spec["workload"] == "data":
        from lra.bench.data import data_workload

        build = lambda spec_, impl, device_: data_workload(spec_)  # noqa: E731
    else:
        build = layer_workload if spec["workload"] == "layer" else model_workload
    out: dict = {"status": "ok", "error": None, "threads": torch.get_num_threads(), "results": [],
                 "malloc_tuned": allocator_tuned()}
    try:
        loads: list[Workload] = [build(spec, impl, device) for impl in spec["impls"]]
        torch.ones(256, 256) @ torch.ones(256, 256)  # start the thread pool before measuring
        _sync(device)
        out.update(tokens=loads[0].tokens, batch=loads[0].batch, n=loads[0].n)
        results = [{"impl": i["impl"], "backend": i["backend"]} for i in spec["impls"]]
        if spec.get("memory", True):  # only meaningful with one implementation in the process
            baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else psutil.Process().memory_info().rss
            out["baseline_mb"] = baseline / MB
            out["peak_reset"] = device.type == "cuda" or _reset_peak()
            _limit_memory(spec.get("memory_limit_mb"), device)
            for res, load in zip(results, loads):
                res["mem_fwd_mb"] = peak_memory_mb(load.forward, device, baseline)
                res["mem_fwdbwd_mb"] = peak_memory_mb(load.train_step, device, baseline)
        if spec.get("timing", True):
            fwd = time_runs([ld.forward for ld in loads], device, spec["warmup"], spec["repeats"])
            step = time_runs([ld.train_step for ld in loads], device, spec["warmup"], spec["repeats"])
            for res, tf, ts in zip(results, fwd, step):
                res["fwd"], res["fwdbwd"] = summarize(tf), summarize(ts)
                res["tokens_per_s"] = loads[0].tokens / (res["fwdbwd"]["median_ms"] / 1e3)
            if spec["workload"] != "data" and not spec.get("compile"):  # the matmul floor (lra.bench.flops): the step's products at the best rate
                rate = matmul_gflops(device, loads[0].dtype or torch.float32)
                for res, load in zip(results, loads):
                    flops = step_flop_counts(load.train_step)
                    res["step_gflop"], res["matmul_gflops"] = sum(flops.values()) / 1e9, rate
                    res["attention_gflop"] = flops["attention"] / 1e9
                    if device.type == "cpu":  # where the step's time goes (the profiler's CPU self times)
                        res.update(step_time_split(load.train_step))
        out["results"] = results
    except Exception as err:  # reported to the parent, which records it; never a crash of the sweep
        out["status"] = "oom" if is_oom(err) else "error"
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        out["error"] = f"{type(err).__name__}: {first[:300]}"
        out["traceback"] = traceback.format_exc(limit=4)
    return out


def main(argv: list[str] | None = None) -> None:
    spec_path, out_path = (argv or sys.argv[1:])[:2]
    result = run(json.loads(Path(spec_path).read_text()))
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
