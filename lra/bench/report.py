"""lra-bench output: markdown tables, PNG plots and the PASS/FAIL targets, all computed from the JSON
record (never from anything else), so a table can be rebuilt from a saved file."""
from __future__ import annotations

import math
from pathlib import Path

# The targets of the efficiency issue, checked only under these settings (CPU, fp32, B=2, 2 heads x 32).
TARGET_SETTINGS = {"device": "cpu", "dtype": "float32", "batch": 2, "heads": 2, "head_dim": 32, "threads": 2}
LINEAR = ("nystrom", "linformer", "performer")
DASH = "—"


def _cell(entry: dict | None, key: str, metric: str = "median_ms") -> str:
    if entry is None:
        return DASH
    if entry["status"] != "ok":
        return entry["status"].upper()
    value = entry.get(key)
    if isinstance(value, dict):
        return f"{value[metric]:.1f} ±{value['iqr_ms'] / 2:.1f}"
    return DASH if value is None else f"{value:.1f}"


def _entries(record: dict, workload: str = "layer") -> list[dict]:
    return [e for e in record["results"] if e["workload"] == workload]


def _find(record: dict, impl: str, backend: str, n: int, workload: str = "layer") -> dict | None:
    for e in _entries(record, workload):
        if e["impl"] == impl and e["backend"] == backend and e["n"] == n:
            return e
    return None


def floor_ms(entry: dict) -> float | None:
    """The step's matmul floor in ms: step_gflop at the worker's measured matmul_gflops
    (lra.bench.flops); None where either was not measured."""
    if not entry.get("step_gflop") or not entry.get("matmul_gflops"):
        return None
    return 1e3 * entry["step_gflop"] / entry["matmul_gflops"]


def floor_ratio(entry: dict | None) -> float | None:
    """fwd+bwd (training step) time over its matmul floor; None where either was not measured."""
    t = _value(entry, "fwdbwd")
    floor = None if t is None else floor_ms(entry)
    return None if floor is None else t / floor


def _floor_cell(entry: dict) -> str:
    x = floor_ratio(entry)
    return DASH if x is None else f"{entry['step_gflop']:.3g} / {x:.2f}×"


def layer_table(record: dict) -> str:
    """One row per (implementation, backend, n): fwd and fwd+bwd median ms (± half IQR), peak MB, and the
    step's matmul GFLOP with its time over the matmul floor."""
    rows = ["| impl | backend | n | fwd ms | fwd+bwd ms | fwd MB | fwd+bwd MB | GFLOP / × floor |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for e in _entries(record):
        rows.append(f"| {e['impl']} | {e['backend']} | {e['n']} | {_cell(e, 'fwd')} | {_cell(e, 'fwdbwd')} | "
                    f"{_cell(e, 'mem_fwd_mb')} | {_cell(e, 'mem_fwdbwd_mb')} | {_floor_cell(e)} |")
    return "\n".join(rows)


def time_split(entry: dict) -> dict | None:
    """Where a timed step's time goes (lra.bench.flops.step_time_split), or None where it was not
    profiled: the step's median, its matmul floor, the plain products' and the fused attention kernels'
    profiled time and the rate each reached (GFLOP/s), the rest of the step, and the products plus
    attention kernels alone over the floor (what the step would be if every elementwise op were free)."""
    step = _value(entry, "fwdbwd")
    floor = None if step is None or entry.get("products_ms") is None else floor_ms(entry)
    if floor is None:
        return None
    att_gflop = entry.get("attention_gflop") or 0.0
    prod, att = entry["products_ms"], entry.get("attention_ms") or 0.0
    return {"step_ms": step, "floor_ms": floor, "products_ms": prod, "attention_ms": att,
            "products_gflops": (entry["step_gflop"] - att_gflop) / (prod / 1e3) if prod else None,
            "attention_gflops": att_gflop / (att / 1e3) if att else None,
            "rest_ms": step - prod - att, "kernels_floor_ratio": (prod + att) / floor}


def time_split_table(record: dict) -> str:
    """One row per profiled step (layers and classifiers): the step against its matmul floor, split into
    plain matrix products, fused attention kernels and the rest ('' when nothing was profiled)."""
    rows = []
    rate = lambda v: DASH if v is None else f"{v:.0f}"  # noqa: E731
    for e in record["results"]:
        split = time_split(e) if e["status"] == "ok" else None
        if split is None:
            continue
        where = e["task"] if e["workload"] == "model" else "layer"
        rows.append(f"| {where} | {e['impl']} | {e['backend']} | {e['n']} | {split['step_ms']:.1f} | "
                    f"{split['floor_ms']:.1f} | {split['products_ms']:.1f} ({rate(split['products_gflops'])}) | "
                    f"{split['attention_ms']:.1f} ({rate(split['attention_gflops'])}) | {split['rest_ms']:.1f} | "
                    f"{split['step_ms'] / split['floor_ms']:.2f}× | {split['kernels_floor_ratio']:.2f}× |")
    if not rows:
        return ""
    head = ["Where the step goes (one profiled step; floor = its matrix-product FLOPs at the worker's own "
            "2,048³ product rate; in brackets the GFLOP/s reached at the step's own shapes)", "",
            "| workload | impl | backend | n | step ms | floor ms | products ms (GFLOP/s) | "
            "fused attention ms (GFLOP/s) | rest ms | step × floor | products + attention × floor |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    return "\n".join(head + rows)


def model_table(record: dict) -> str:
    entries = _entries(record, "model")
    if not entries:
        return ""
    packages = any(e["impl"] != "ours" for e in entries)  # a column saying whose attention, when both ran
    rows = ["| task | backend |" + (" attention |" if packages else "") + " batch x n | train step ms | tokens/s | "
            "steps/s | fwd+bwd MB | GFLOP / × floor |", "|---|---|" + ("---|" if packages else "") + "---:|---:|---:|---:|---:|---:|"]
    for e in entries:
        ok = e["status"] == "ok" and e.get("fwdbwd") is not None
        tps = f"{e['tokens_per_s']:.0f}" if ok else DASH
        sps = f"{1e3 / e['fwdbwd']['median_ms']:.2f}" if ok else DASH
        impl = (" ours |" if e["impl"] == "ours" else " package |") if packages else ""
        rows.append(f"| {e['task']} | {e['backend']} |{impl} {e.get('batch', '?')} x {e['n']} | "
                    f"{_cell(e, 'fwdbwd')} | {tps} | {sps} | {_cell(e, 'mem_fwdbwd_mb')} | {_floor_cell(e)} |")
    return "\n".join(rows)


def model_ratio_table(record: dict) -> str:
    """Whole classifiers, ours / the same model with the public package's attention: training-step time
    and peak memory, per task and backend ('' when the record has no such pair)."""
    rows = ["| task | backend | step time ours/package | peak memory ours/package |", "|---|---|---:|---:|"]
    for e in _entries(record, "model"):
        if e["impl"] != "ours":
            continue
        ref = next((r for r in _entries(record, "model")
                    if r["impl"] == "reference" and r["backend"] == e["backend"] and r["task"] == e["task"]), None)
        if ref is not None:
            rows.append(f"| {e['task']} | {e['backend']} | {_ratio(e, ref, 'fwdbwd')} | "
                        f"{_ratio(e, ref, 'mem_fwdbwd_mb')} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def data_table(record: dict) -> str:
    """Per task: the DataModule's time to hand over one training batch beside the slowest and fastest
    backend's training step at the same batch and length, as a share of the step."""
    rows = ["| task | batch x n | loader workers | ms per batch | fastest step ms (backend) | share of that step |",
            "|---|---:|---:|---:|---:|---:|"]
    for e in _entries(record, "data"):
        steps = [(_value(m, "fwdbwd"), m["backend"]) for m in _entries(record, "model") if m["task"] == e["task"]]
        steps = [s for s in steps if s[0] is not None]
        load = _value(e, "fwd")
        fastest = min(steps) if steps else None
        share = f"{100 * load / fastest[0]:.2f} %" if load is not None and fastest else DASH
        step = f"{fastest[0]:.1f} ({fastest[1]})" if fastest else DASH
        workers = e.get("options", {}).get("num_workers", 0)
        rows.append(f"| {e['task']} | {e.get('batch', '?')} x {e['n']} | {workers} | {_cell(e, 'fwd')} | {step} | {share} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def ratio_table(record: dict) -> str:
    """ours / theirs for time (fwd+bwd, fwd) and memory, per kind and length."""
    rows = ["| kind | n | fwd+bwd ours/theirs | fwd ours/theirs | memory ours/theirs |", "|---|---:|---:|---:|---:|"]
    for kind in record["settings"]["backends"]:
        for n in record["settings"]["lengths"]:
            ours, theirs = _find(record, "ours", kind, n), _find(record, "reference", kind, n)
            cells = [_ratio(ours, theirs, "fwdbwd"), _ratio(ours, theirs, "fwd"), _ratio(ours, theirs, "mem_fwdbwd_mb")]
            rows.append(f"| {kind} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _value(entry: dict | None, key: str) -> float | None:
    if entry is None or entry["status"] != "ok" or entry.get(key) is None:
        return None
    v = entry[key]
    return v["median_ms"] if isinstance(v, dict) else v


def _ratio(a: dict | None, b: dict | None, key: str) -> str:
    va, vb = _value(a, key), _value(b, key)
    return f"{va / vb:.2f}" if va is not None and vb else DASH


def _settings_match(record: dict) -> str | None:
    s = {**record["settings"], "device": record["machine"]["device"], "threads": record.get("threads")}
    wrong = [f"{k}={s.get(k)} (target {v})" for k, v in TARGET_SETTINGS.items() if s.get(k) != v]
    return ", ".join(wrong) or None


def targets(record: dict) -> list[dict]:
    """The issue's targets that this record can decide: PASS, FAIL, or N/A with the reason."""
    out: list[dict] = []

    def add(name: str, value: float | None, limit: float, why: str = "") -> None:
        status = "N/A" if value is None else ("PASS" if value <= limit else "FAIL")
        out.append({"target": name, "value": value, "limit": limit, "status": status, "note": why})

    mismatch = _settings_match(record)
    if record["mode"] == "reference":
        checks = [("nystrom", 4096, "fwdbwd", 0.7, "time"), ("nystrom", 16384, "mem_fwdbwd_mb", 1.0, "peak memory"),
                  ("performer", 8192, "fwdbwd", 0.7, "time"), ("linformer", 8192, "fwdbwd", 1.0, "time")]
        for kind, n, key, limit, what in checks:
            ours, theirs = _find(record, "ours", kind, n), _find(record, "reference", kind, n)
            va, vb = _value(ours, key), _value(theirs, key)
            value = va / vb if va is not None and vb else None
            add(f"{kind} n={n}: {what} ours/theirs <= {limit}", None if mismatch else value, limit,
                mismatch or ("" if value is not None else "not measured"))
    elif record["mode"] == "layer":
        for kind in LINEAR:
            a, b = _value(_find(record, "ours", kind, 4096), "mem_fwdbwd_mb"), _value(_find(record, "ours", kind, 16384), "mem_fwdbwd_mb")
            value = b / a if a and b is not None else None
            add(f"{kind}: peak memory n=16384 / n=4096 <= 4.5", None if mismatch else value, 4.5,
                mismatch or ("" if value is not None else "not measured"))
            t, ts = _value(_find(record, "ours", kind, 16384), "fwdbwd"), _value(_find(record, "ours", "softmax", 16384), "fwdbwd")
            value = t / ts if t is not None and ts else None
            add(f"{kind}: time at n=16384 / softmax's <= 0.15", None if mismatch else value, 0.15,
                mismatch or ("" if value is not None else "not measured"))
        value = floor_ratio(_find(record, "ours", "nystrom", 4096))
        add("nystrom n=4096: fwd+bwd / matmul floor <= 2", None if mismatch else value, 2.0,
            mismatch or ("" if value is not None else "not measured"))
        step = next((e for e in _entries(record, "model") if e["backend"] == "nystrom" and e["task"] == "listops"
                     and record["settings"].get("preset") == "nystromformer" and not record["settings"].get("compile")
                     and not record["settings"].get("model_length") and not record["settings"].get("model_batch")
                     and not record["settings"].get("model_options")), None)
        if step is not None:
            value = floor_ratio(step)
            add("nystrom ListOps preset step / matmul floor <= 2", value, 2.0,
                "" if value is not None else "not measured")
    return out


def targets_table(items: list[dict]) -> str:
    if not items:
        return ""
    rows = ["| target | value | result |", "|---|---:|---|"]
    for t in items:
        value = DASH if t["value"] is None else f"{t['value']:.3f}"
        rows.append(f"| {t['target']} | {value} | {t['status']}{' (' + t['note'] + ')' if t['note'] else ''} |")
    return "\n".join(rows)


def plot_layers(record: dict, path: Path) -> Path:
    """Log-log fwd time, fwd+bwd time and fwd+bwd peak memory against n, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [("fwd", "forward time (ms)"), ("fwdbwd", "forward+backward time (ms)"),
              ("mem_fwdbwd_mb", "forward+backward peak memory (MB)")]
    series: dict[tuple[str, str], list[dict]] = {}
    for e in _entries(record):
        series.setdefault((e["impl"], e["backend"]), []).append(e)
    for ax, (key, label) in zip(axes, panels):
        for (impl, backend), entries in sorted(series.items()):
            pts = [(e["n"], _value(e, key)) for e in sorted(entries, key=lambda e: e["n"])]
            pts = [(n, v) for n, v in pts if v is not None and v > 0]
            if pts:
                name = backend if impl == "ours" else f"{backend} (reference)"
                ax.plot(*zip(*pts), marker="o", linestyle="-" if impl == "ours" else "--", label=name)
        ax.set(xscale="log", yscale="log", xlabel="sequence length n", ylabel=label)
        lengths = sorted({e["n"] for e in _entries(record)})
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    s = record["settings"]
    fig.suptitle(f"{record['machine']['device']} {s['dtype']}, B={s['batch']}, {s['heads']} heads x {s['head_dim']}, "
                 f"{record['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
