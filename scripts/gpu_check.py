"""The GPU check: one script, one table, a few minutes on a CUDA machine (`scripts/gpu_check.sh`).

1. Every discovered attention backend (projections included, B = 2, 2 heads x 32, its conf/attention
   options) at n = 1,024 ... 32,768 in fp32 and bf16: forward+backward median time, peak allocated
   memory, speed-up over softmax at the same n and dtype. One process, peak memory reset per
   configuration (exact on CUDA); a configuration that runs out of memory is marked OOM and larger n
   are skipped for that backend and dtype.
2. A 200-step training run per backend through the real `lra-train` on generated ListOps at 2,048
   tokens (the Nyströmformer protocol's batch 32 and length), bf16-mixed: steps/s and peak memory
   from the run's record.

Writes `results/bench/gpu-check.json` (and `.md`) and prints the table. Fails within seconds on a
machine without CUDA. `--tiny --allow-cpu` runs the same code path on a CPU at toy sizes (tests).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
DTYPES = ("float32", "bfloat16")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/bench/gpu-check.json"))
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    p.add_argument("--steps", type=int, default=200, help="training steps per backend")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backends", default=None, help="comma list (default: every discovered backend)")
    p.add_argument("--allow-cpu", action="store_true", help="run on a CPU (only with --tiny: a test of the script)")
    p.add_argument("--tiny", action="store_true", help="toy sizes: lengths 64,128, 3 steps, a 32-token ListOps set")
    return p.parse_args(argv)


def kernel_rows(backends: list[str], lengths: list[int], device, repeats: int) -> list[dict]:
    import torch

    from lra.bench.cli import yaml_options
    from lra.bench.worker import is_oom, peak_memory_mb, summarize, time_runs
    from lra.bench.workloads import layer_workload

    rows = []
    for dtype in DTYPES:
        for backend in backends:
            failed = None
            for n in lengths:
                row = {"backend": backend, "dtype": dtype, "n": n, "status": "ok"}
                rows.append(row)
                if failed:
                    row["status"] = f"skipped ({failed})"
                    continue
                spec = {"n": n, "dim": 64, "heads": 2, "head_dim": 32, "batch": 2, "dtype": dtype}
                impl = {"impl": "ours", "backend": backend, "options": yaml_options(backend)}
                try:
                    torch.manual_seed(0)
                    load = layer_workload(spec, impl, device)
                    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                    row["mem_mb"] = round(peak_memory_mb(load.train_step, device, base), 1)
                    times = time_runs([load.train_step], device, warmup=2, repeats=repeats)[0]
                    row["ms"] = round(summarize(times)["median_ms"], 2)
                except Exception as err:  # noqa: BLE001 - recorded, the sweep goes on
                    row["status"] = "OOM" if is_oom(err) else f"error: {type(err).__name__}: {str(err)[:120]}"
                    failed = row["status"] if row["status"] == "OOM" else "error"
                finally:
                    load = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    soft = {(r["dtype"], r["n"]): r.get("ms") for r in rows if r["backend"] == "softmax"}
    for r in rows:
        s = soft.get((r["dtype"], r["n"]))
        r["speedup_vs_softmax"] = round(s / r["ms"], 2) if s and r.get("ms") else None
    return rows


def training_rows(backends: list[str], steps: int, tiny: bool, device_type: str) -> list[dict]:
    """One `lra-train` run per backend on a generated ListOps set; figures read from its record."""
    bindir = Path(sys.executable).parent
    tmp = Path(tempfile.mkdtemp(prefix="lra-gpu-check-"))
    data, results = tmp / "listops", tmp / "results"
    sizes = ["--train", "200", "--val", "40", "--test", "40", "--max-depth", "3", "--min-len", "5", "--max-len", "32"] \
        if tiny else ["--train", str(32 * steps + 64), "--val", "256", "--test", "256"]
    subprocess.run([str(bindir / "lra-data"), "generate", "listops", "--out", str(data), *sizes], check=True,
                   stdout=subprocess.DEVNULL)
    length = 32 if tiny else 2048
    rows = []
    for backend in backends:
        cmd = [str(bindir / "lra-train"), "task=listops", f"attention={backend}", f"data_dir={data}",
               f"results_dir={results}", f"task.max_len={length}", f"trainer.max_steps={steps}",
               f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=4", "trainer.limit_test_batches=4",
               "progress=false", "logger=none", "skip_done=false", "resume=never",
               "precision=bf16-mixed" if device_type == "cuda" else "precision=32"]
        if tiny:
            cmd += ["experiment=smoke", "data.batch_size=8"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
        row = {"backend": backend, "wall_s": round(time.perf_counter() - t0, 1)}
        recs = sorted(results.glob(f"listops-{backend}-*.json"), key=lambda p: p.stat().st_mtime)
        rec = json.loads(recs[-1].read_text()) if recs else None
        if proc.returncode != 0 or rec is None or rec.get("status") != "finished":
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            row["status"] = f"failed: {tail[:160]}"
        else:
            row.update(status="ok", steps_per_second=rec["steps_per_second"], peak_memory_mb=rec["peak_memory_mb"],
                       params=rec["params"], test_acc=rec["test_acc"])
        rows.append(row)
    return rows


def render(record: dict) -> str:
    lines = [f"# GPU check: {record['device']} (torch {record['torch']})", "",
             "## Attention layer, forward+backward, B = 2, 2 heads x 32 (ms / peak MB / speed-up over softmax)",
             "", "Peak MB: allocated CUDA memory above the layer's inputs (on a CPU test run: the process's RSS).", ""]
    lengths = record["lengths"]
    lines += ["| backend | dtype | " + " | ".join(f"n={n}" for n in lengths) + " |",
              "|---|---|" + "---:|" * len(lengths)]
    for dtype in DTYPES:
        for backend in record["backends"]:
            cells = []
            for n in lengths:
                r = next(x for x in record["kernels"] if x["backend"] == backend and x["dtype"] == dtype and x["n"] == n)
                if r["status"] != "ok":
                    cells.append(r["status"].split(":")[0])
                else:
                    up = f" / {r['speedup_vs_softmax']}x" if r["speedup_vs_softmax"] else ""
                    cells.append(f"{r['ms']} / {r['mem_mb']}{up}")
            lines.append(f"| {backend} | {dtype} | " + " | ".join(cells) + " |")
    lines += ["", f"## {record['steps']}-step ListOps training at {record['train_length']} tokens, batch "
              f"{record['train_batch']} "
              f"({record['train_precision']})", "", "| backend | steps/s | peak MB | params | wall s | status |",
              "|---|---:|---:|---:|---:|---|"]
    for r in record["training"]:
        lines.append(f"| {r['backend']} | {r.get('steps_per_second', '—')} | {r.get('peak_memory_mb', '—')} | "
                     f"{r.get('params', '—')} | {r['wall_s']} | {r['status']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not (args.allow_cpu and args.tiny):
        print("gpu_check: no CUDA device is visible to torch "
              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}). Run it on a machine with "
              "an NVIDIA GPU and a CUDA build of torch (make install TORCH=\"torch==2.13.0 --index-url "
              "https://download.pytorch.org/whl/cu128\"); nothing was measured.", file=sys.stderr)
        return 2
    from lra.config import backend_names

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = args.backends.split(",") if args.backends else backend_names()
    lengths = [64, 128] if args.tiny else [int(n) for n in args.lengths.split(",")]
    steps = 3 if args.tiny else args.steps
    t0 = time.perf_counter()
    record = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (test run)",
              "torch": torch.__version__, "backends": backends, "lengths": lengths, "steps": steps,
              "train_length": 32 if args.tiny else 2048, "train_batch": 8 if args.tiny else 32,
              "train_precision": "bf16-mixed" if device.type == "cuda" else "32-true"}
    record["kernels"] = kernel_rows(backends, lengths, device, 2 if args.tiny else args.repeats)
    record["kernel_seconds"] = round(time.perf_counter() - t0, 1)
    record["training"] = training_rows(backends, steps, args.tiny, device.type)
    record["total_seconds"] = round(time.perf_counter() - t0, 1)
    table = render(record)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from lra.atomic import atomic_write, write_json_atomic

    write_json_atomic(args.out, record)
    atomic_write(args.out.with_suffix(".md"), table + "\n")
    print(table)
    print(f"\n{record['total_seconds']} s in all; wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0 if all(r["status"] == "ok" for r in record["training"]) else 1


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    sys.exit(main())
