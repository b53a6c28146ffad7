"""lra-bench: efficiency of the attention backends (time, peak memory) and of whole classifiers, the
side-by-side with public implementations (--with-reference) and approximation quality (--approx).

    lra-bench --threads 2                              # every backend, n = 512 ... 16384, + ListOps model
    lra-bench --threads 2 --with-reference             # ours vs nystrom-attention / linformer / performer-pytorch
    lra-bench --threads 2 --approx                     # error vs exact softmax, every approximating backend

Each configuration runs in a fresh worker process (memory is that process's peak minus its baseline)
under a per-configuration timeout. Writes results/bench/<device>-<backends>.json and a PNG beside it,
prints markdown tables and the issue's targets as PASS/FAIL.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lra.atomic import write_json_atomic
from lra.bench import report
from lra.bench.runner import cpu_load, machine_info, package_versions, run_config
from lra.bench.workloads import REFERENCE_PACKAGES, model_reference_options

DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
# The side-by-side settings: dim 64, 2 heads x 32; Nyström 64 landmarks, 6 iterations, conv 33
# (nystrom-attention's default kernel); Linformer k = 256; Performer 256 features, softmax kernel.
REFERENCE_OPTIONS = {
    "nystrom": {"num_landmarks": 64, "pinv_iterations": 6, "conv_kernel": 33},
    "linformer": {"proj_dim": 256},
    "performer": {"num_features": 256, "kernel": "softmax"},
}


def _csv(cast: Callable[[str], object]) -> Callable[[str], list]:
    return lambda text: [cast(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from lra.config import backend_names, error_text

    try:
        backends = backend_names()  # conf/attention/ plus the searchpath (LRA_CONFIG_PATH)
    except Exception as err:  # noqa: BLE001 - e.g. a bad LRA_CONFIG_PATH: one line, no traceback
        raise SystemExit(f"lra-bench: error: {error_text(err)}") from None

    p = argparse.ArgumentParser(prog="lra-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--with-reference", action="store_true", help="time ours beside the public implementations")
    mode.add_argument("--approx", action="store_true", help="approximation error vs exact softmax (backends with approximates_softmax)")
    p.add_argument("--backends", type=_csv(str), default=None,
                   help=f"comma list (default: all of {','.join(backends)}; reference: nystrom,linformer,performer)")
    p.add_argument("--lengths", type=_csv(int), default=list(DEFAULT_LENGTHS), help="comma list of sequence lengths")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--dim", type=int, default=None, help="model dim (default heads x head-dim)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--tasks", type=_csv(str), default=["listops"],
                   help="classifiers at protocol size: comma list of tasks (conf/task), 'all' or 'none'")
    p.add_argument("--model-batch", type=int, default=None, help="classifier batch (default: the task's protocol batch)")
    p.add_argument("--model-length", type=int, default=None, help="classifier length (default: the task's max_len)")
    p.add_argument("--num-workers", type=int, default=0,
                   help="DataModule loader processes for the data-loading rows (the training default is 0)")
    p.add_argument("--preset", default="nystromformer",
                   help="protocol whose preset model the classifier rows time ('none': the default recipe)")
    p.add_argument("--model-options", type=_csv(str), default=[],
                   help="attention options for the classifier rows, comma list of KEY=VALUE (e.g. attn_dropout=0)")
    p.add_argument("--compile", action="store_true",
                   help="time the classifier compiled (torch.compile, as lra-train compile=true); warm-up steps compile")
    p.add_argument("--model-warmup", type=int, default=1)
    p.add_argument("--model-repeats", type=int, default=3)
    p.add_argument("--model-processes", type=int, default=1,
                   help="time each classifier in this many fresh processes and pool them (steps differ by "
                        "up to ~5%% from process to process on a CPU; 3 for figures you cite)")
    p.add_argument("--layer-processes", type=int, default=1,
                   help="time each attention layer (and --with-reference kernel pair) in this many fresh "
                        "processes and pool them (a layer's step drifted by up to ~25%% within a minute on a "
                        "shared CPU; 3 or more for figures you cite)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration (its worker is killed)")
    p.add_argument("--memory-limit-mb", type=float, default=None, help="memory cap per configuration (beyond: OOM)")
    p.add_argument("--keep-going", action="store_true", help="also run lengths above one that ran out of memory/time")
    p.add_argument("--approx-length", type=int, default=1024)
    p.add_argument("--out-dir", type=Path, default=Path("results/bench"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.dim = args.dim or args.heads * args.head_dim
    if args.backends is None:
        args.backends = list(REFERENCE_PACKAGES) if args.with_reference else list(backends)
    unknown = [b for b in args.backends if b not in backends]
    if unknown:
        p.error(f"unknown backend(s) {unknown}; valid: {', '.join(backends)}")
    if args.with_reference and any(b not in REFERENCE_PACKAGES for b in args.backends):
        p.error(f"--with-reference compares {', '.join(REFERENCE_PACKAGES)} only")
    from lra.config import task_names

    all_tasks = task_names()
    args.tasks = [] if args.tasks == ["none"] else all_tasks if args.tasks == ["all"] else args.tasks
    bad = [t for t in args.tasks if t not in all_tasks]
    for flag in ("model_processes", "layer_processes"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if any("=" not in kv or not kv.split("=", 1)[0] for kv in args.model_options):
        p.error(f"--model-options takes KEY=VALUE pairs separated by commas, got {','.join(args.model_options)}")
    if bad:
        p.error(f"unknown task(s) {bad}; valid: {', '.join(all_tasks)}, all, none")
    return args


def yaml_options(backend: str) -> dict:
    """The backend's protocol options from its attention/<backend>.yaml (everything but `_target_`, `name`)."""
    from lra.config import attention_spec

    spec = attention_spec(backend)
    return {k: v for k, v in spec.items() if k not in ("_target_", "name")}


def check_reference_installed(kinds: Iterable[str]) -> None:
    from importlib import import_module

    modules = {"nystrom": "nystrom_attention", "linformer": "linformer", "performer": "performer_pytorch"}
    for kind in kinds:
        try:
            import_module(modules[kind])
        except ImportError as err:
            pkg, ver = REFERENCE_PACKAGES[kind]
            raise SystemExit(f"lra-bench --with-reference needs {pkg}=={ver} ({err}); run `make install-bench`")


def _spec(args: argparse.Namespace, **fields) -> dict:
    base = {"workload": "layer", "batch": args.batch, "dim": args.dim, "heads": args.heads, "head_dim": args.head_dim,
            "dtype": args.dtype, "device": args.device, "threads": args.threads, "warmup": args.warmup,
            "repeats": args.repeats, "memory_limit_mb": args.memory_limit_mb}
    return {**base, **fields}


def plan(args: argparse.Namespace) -> list[dict]:
    """One job per worker process: {"label", "entries": [entry keys], "spec"}."""
    jobs = []
    for backend in args.backends:
        for n in sorted(args.lengths):
            if args.with_reference:
                opts = REFERENCE_OPTIONS[backend]
                ours = {"impl": "ours", "backend": backend, "options": opts}
                ref = {"impl": "reference", "backend": backend, "options": opts}
                for impl in (ours, ref):
                    jobs.append({"label": f"{backend} {impl['impl']} n={n} memory", "n": n,
                                 "spec": _spec(args, n=n, impls=[impl], timing=False)})
                jobs.append({"label": f"{backend} ours|reference n={n} time", "n": n,
                             "spec": _spec(args, n=n, impls=[ours, ref], memory=False)})
            else:
                impl = {"impl": "ours", "backend": backend, "options": yaml_options(backend)}
                jobs.append({"label": f"{backend} n={n}", "n": n, "spec": _spec(args, n=n, impls=[impl])})
    if args.with_reference:  # whole classifiers: ours beside the same model with the package's attention
        for task in args.tasks:
            for backend in args.backends:
                preset = None if args.preset == "none" else args.preset
                impls = [{"impl": "ours", "backend": backend, "options": {}},
                         {"impl": "reference", "backend": backend,
                          "options": model_reference_options({"task": task, "preset": preset}, backend)}]
                model = dict(workload="model", task=task, n=0, preset=preset,
                             warmup=args.model_warmup, repeats=args.model_repeats, model_batch=args.model_batch,
                             model_length=args.model_length)
                for impl in impls:
                    jobs.append({"label": f"{task} classifier, {backend} {impl['impl']} memory", "n": None, "task": task,
                                 "spec": _spec(args, **model, impls=[impl], timing=False)})
                jobs.append({"label": f"{task} classifier, {backend} ours|reference time", "n": None, "task": task,
                             "spec": _spec(args, **model, impls=impls, memory=False)})
    else:
        for task in args.tasks:
            for backend in args.backends:
                impl = {"impl": "ours", "backend": backend, "options": dict(kv.split("=", 1) for kv in args.model_options)}
                jobs.append({"label": f"{task} classifier, {backend}" + (" (compiled)" if args.compile else ""),
                             "n": None, "task": task,
                             "spec": _spec(args, workload="model", task=task, n=0, impls=[impl],
                                           preset=None if args.preset == "none" else args.preset,
                                           warmup=args.model_warmup, repeats=args.model_repeats,
                                           model_batch=args.model_batch, model_length=args.model_length,
                                           compile=args.compile)})
        for task in args.tasks:  # the DataModule alone, to put beside the step times above
            impl = {"impl": "ours", "backend": "data", "options": {"num_workers": args.num_workers}}
            jobs.append({"label": f"{task} data loading", "n": None, "task": task,
                         "spec": _spec(args, workload="data", task=task, n=0, impls=[impl], memory=False,
                                       warmup=3, repeats=20, num_workers=args.num_workers,
                                       model_batch=args.model_batch, model_length=args.model_length)})
    replicated = []
    for job in jobs:  # layer and classifier timings: one job per process, pooled by execute()
        copies = {"model": args.model_processes, "layer": args.layer_processes}.get(job["spec"]["workload"], 1)
        replicated += [job] + [{**job, "label": f"{job['label']} (process {i + 1}/{copies})", "process": i}
                               for i in range(1, copies)]
    return replicated


def _pool(entry: dict, result: dict) -> None:
    """Fold a further process's result for the same configuration into `entry`: timings pooled (the
    summary of every run of every process, plus each process's median), memory, the matmul rate and the
    profiled kernel times the median over processes."""
    from lra.bench.worker import summarize

    entry["processes"] = entry.get("processes", 1) + 1
    for key in ("fwd", "fwdbwd"):
        if key not in result:
            continue
        if key in entry:
            medians = entry.setdefault(f"{key}_process_medians_ms", [entry[key]["median_ms"]])
            medians.append(result[key]["median_ms"])
            entry[key] = summarize([t / 1e3 for t in entry[key]["times_ms"] + result[key]["times_ms"]])
        else:
            entry[key] = result[key]
    for key in ("mem_fwd_mb", "mem_fwdbwd_mb", "matmul_gflops", "products_ms", "attention_ms", "profiled_ms"):
        if result.get(key) is None:
            continue
        values = entry.setdefault(f"{key}_per_process", [] if entry.get(key) is None else [entry[key]])
        values.append(result[key])
        entry[key] = statistics.median(values)
    for key in ("step_gflop", "attention_gflop"):
        if result.get(key) is not None:
            entry[key] = result[key]
    if entry.get("fwdbwd") and entry.get("tokens"):
        entry["tokens_per_s"] = entry["tokens"] / (entry["fwdbwd"]["median_ms"] / 1e3)


def execute(jobs: list[dict], args: argparse.Namespace, console: Console) -> list[dict]:
    """Run the jobs; merge per-implementation results into entries keyed by (workload, impl, backend, n)."""
    entries: dict[tuple, dict] = {}
    failed_at: dict[tuple, str] = {}  # (impl, backend) -> why larger lengths are skipped
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=args.no_progress, transient=False) as bar:
        task_id = bar.add_task("lra-bench", total=len(jobs))
        for job in jobs:
            spec = job["spec"]
            bar.update(task_id, description=job["label"])
            keys = [(spec["workload"], i["impl"], i["backend"], job.get("task")) for i in spec["impls"]]
            skip = next((failed_at[k] for k in keys if k in failed_at), None)
            if skip and not args.keep_going:
                result = {"status": "skipped", "error": skip, "results": []}
            else:
                result = run_config(spec, args.timeout)
            by_impl = {(r["impl"], r["backend"]): r for r in result.get("results", [])}
            for impl, key in zip(spec["impls"], keys):
                ekey = (*key, job["n"])
                e = entries.setdefault(ekey, {
                    "workload": spec["workload"], "impl": impl["impl"], "backend": impl["backend"], "n": job["n"],
                    "task": job.get("task"), "options": impl["options"], "status": "ok", "error": None})
                if result["status"] != "ok":
                    if e["status"] == "ok":  # keep the first failure of this entry
                        e["status"], e["error"] = result["status"], result.get("error")
                    if result["status"] in ("oom", "timeout"):
                        failed_at.setdefault(key, f"not run: {result['status']} at n={job['n']}")
                    continue
                fields = {k: v for k, v in by_impl[(impl["impl"], impl["backend"])].items() if k not in ("impl", "backend")}
                if job.get("process"):  # a further process of a configuration already timed
                    _pool(e, fields)
                    e["wall_s"] = (e.get("wall_s") or 0) + (result.get("wall_s") or 0)
                    continue
                e.update(fields)
                e["threads"], e["wall_s"] = result.get("threads"), result.get("wall_s")
                e["malloc_tuned"] = result.get("malloc_tuned")
                if spec["workload"] in ("model", "data"):
                    e.update(n=result.get("n"), batch=result.get("batch"), tokens=result.get("tokens"))
            bar.advance(task_id)
    return list(entries.values())


def _record(args: argparse.Namespace, mode: str, load_before: dict) -> dict:
    from lra.training.records import git_sha

    settings = {k: getattr(args, k) for k in ("backends", "lengths", "batch", "heads", "head_dim", "dim", "dtype",
                                              "device", "threads", "warmup", "repeats", "timeout", "memory_limit_mb",
                                              "layer_processes")}
    if mode in ("layer", "reference"):  # both time classifiers too
        settings.update({k: getattr(args, k) for k in ("tasks", "preset", "model_warmup", "model_repeats",
                                                        "model_processes", "model_batch", "model_length")})
    if mode == "layer":
        settings.update(model_options=args.model_options, compile=args.compile)
    if mode == "reference":
        settings["reference_options"] = {b: REFERENCE_OPTIONS[b] for b in args.backends}
    return {"schema": 1, "mode": mode, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(args.device), "versions": package_versions(), "git_sha": git_sha(),
            "settings": settings, "load_before": load_before}


def main(argv: list[str] | None = None) -> int:

    args = parse_args(argv)
    console = Console(stderr=True)
    load = cpu_load(2.0)
    if not load["idle"]:
        console.print(f"[yellow]warning: the CPU is not idle (use {load['cpu_percent']:.0f}% over 2 s, load average "
                      f"{load['loadavg'][0]:.2f} on {load['cpus']} CPUs): timings will be slower and noisier.[/]")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.approx:
        return _main_approx(args, console, load)
    mode = "reference" if args.with_reference else "layer"
    if args.with_reference:
        check_reference_installed(args.backends)
    record = _record(args, mode, load)
    record["results"] = execute(plan(args), args, console)
    record["threads"] = next((e["threads"] for e in record["results"] if e.get("threads")), args.threads)
    record["load_after"] = cpu_load(2.0)
    record["targets"] = report.targets(record)
    stem = f"{args.device}-{'reference-' if args.with_reference else ''}{'+'.join(args.backends)}"
    path = args.out_dir / f"{stem}.json"
    write_json_atomic(path, record)
    png = report.plot_layers(record, args.out_dir / f"{stem}.png")
    print(report.layer_table(record))
    for table in (report.ratio_table(record) if args.with_reference else "", report.model_table(record),
                  report.model_ratio_table(record), report.time_split_table(record),
                  report.data_table(record), report.targets_table(record["targets"])):
        if table:
            print("\n" + table)
    _warn_if_loaded(record, console)
    console.print(f"wrote {path} and {png}")
    return 0


def _warn_if_loaded(record: dict, console: Console) -> None:
    busy = [f"{when}: {load['cpu_percent']:.0f}% CPU, load average {load['loadavg'][0]:.2f}"
            for when, load in (("before", record["load_before"]), ("after", record["load_after"])) if not load["idle"]]
    if busy:
        console.print(f"[yellow]warning: the machine was busy ({'; '.join(busy)}); the timings and the targets "
                      "decided from them are not final: rerun on an idle machine.[/]")


def _main_approx(args: argparse.Namespace, console: Console, load: dict) -> int:
    import torch

    from lra.bench.approx import approx_tables, count_settings, plot_approx, run_approx
    from lra.bench.approx_backends import approximating_backends
    from lra.bench.workloads import DTYPES

    if args.threads:
        torch.set_num_threads(args.threads)
    record = _record(args, "approx", load)
    record["settings"].update(approx_length=args.approx_length)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    backends = {b: spec for b, spec in approximating_backends().items() if b in args.backends}
    record["settings"].update(approx_backends=sorted(backends))
    with Progress(*columns, console=console, disable=args.no_progress) as bar:
        tid = bar.add_task("approximation error", total=count_settings(args.approx_length, backends))
        record["approx"] = run_approx(args.approx_length, args.heads, args.head_dim, DTYPES[args.dtype],
                                      progress=lambda: bar.advance(tid), backends=backends)
    record["threads"] = torch.get_num_threads()
    path = args.out_dir / f"{args.device}-approx.json"
    write_json_atomic(path, record)
    png = plot_approx(record["approx"], args.out_dir / f"{args.device}-approx.png")
    print(approx_tables(record["approx"]))
    console.print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
