"""Measure each departure of docs/DEPARTURES.md on the long-range ListOps check.

For every row of the table with a switch, and every backend it touches, trains the Nyströmformer preset
with our fix and with the authors' switch, same seeds, through scripts/check_learning.py
(`--preset nystromformer/listops`: the preset's model, optimiser and backend options; the check's data
and budget), one process at a time. Rows that touch `all` backends are measured on --all-backends.

    python scripts/measure_departures.py --seeds 0,1,2 --results results/departures -- optimizer.lr=3e-3
    python scripts/measure_departures.py --table-only --results results/departures

Each arm gets its own folder (RESULTS/<backend>/<arm>, arm = `preset` or the switch), so no two recipes
share one; RESULTS/SUMMARY.md gets one line per arm: test accuracy per seed, mean, runs off the plateau.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from check_learning import load_rows  # noqa: E402

from lra.atomic import atomic_write  # noqa: E402

PRESET = "nystromformer/listops"


def switch_rows(table: Path) -> list[tuple[str, str, list[str]]]:
    """(departure, `key=value`, backends) for every row of the table that has a switch."""
    lines = table.read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    lines = lines[start:end]  # the first table: the departures (the measurements follow it)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    out = []
    for ln in lines[2:]:
        row = dict(zip(header, (c.strip() for c in ln.strip("|").split("|"))))
        m = re.fullmatch(r"`([\w.]+=[^`]+)`", row.get("Switch for theirs", ""))
        if m:
            out.append((row["Departure"], m.group(1), [b.strip() for b in row["Backends"].split(",")]))
    return out


def arms(rows, all_backends: list[str]) -> list[tuple[str, str | None]]:
    """(backend, switch or None for the preset itself), preset first for each backend."""
    plan: dict[str, list[str]] = {}
    for _, switch, backends in rows:
        for b in (all_backends if backends == ["all"] else backends):
            plan.setdefault(b, []).append(switch)
    return [(b, s) for b in plan for s in (None, *plan[b])]


def folder(results: Path, backend: str, switch: str | None) -> Path:
    """RESULTS/<backend>/<arm>; the arm names the switch with `=` as `--` (a path must not hold `=`: it is
    passed to lra-train as results_dir=PATH)."""
    return results / backend / ("preset" if switch is None else switch.replace("=", "--").replace("/", "_"))


def summary(results: Path, rows, all_backends: list[str]) -> str:
    names = {s: d for d, s, _ in rows}
    out = ["| Backend | Arm | Test accuracy per seed (%) | Mean | Off the plateau |", "|---|---|---|---:|---:|"]
    for backend, switch in arms(rows, all_backends):
        f = folder(results, backend, switch)
        runs = [r for r in load_rows(f)] if f.is_dir() else []
        done = [r for r in runs if r.status == "finished" and r.test_acc is not None]
        per_seed = ", ".join(f"s{r.seed} {r.test_acc:.1f}" for r in done) or "—"
        mean = f"{statistics.mean(r.test_acc for r in done):.1f}" if done else "—"
        left = f"{sum(r.exit_step is not None for r in done)}/{len(runs)}" if runs else "—"
        arm = "preset (ours)" if switch is None else f"`{switch}` ({names[switch]}, theirs)"
        out.append(f"| {backend} | {arm} | {per_seed} | {mean} | {left} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=Path("results/departures"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--all-backends", default="nystrom", help="backends for rows that touch all of them")
    p.add_argument("--table", type=Path, default=ROOT / "docs" / "DEPARTURES.md")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("overrides", nargs="*", help="lra-train overrides for every arm (after --)")
    a = p.parse_args(argv)
    rows = switch_rows(a.table)
    all_backends = [b.strip() for b in a.all_backends.split(",") if b.strip()]
    if not a.table_only:
        for backend, switch in arms(rows, all_backends):
            cmd = [sys.executable, str(ROOT / "scripts" / "check_learning.py"), "--preset", PRESET,
                   "--backends", backend, "--seeds", a.seeds, "--results", str(folder(a.results, backend, switch)),
                   "--", *a.overrides, *([switch] if switch else [])]
            print("[departures]", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=False)
    table = summary(a.results, rows, all_backends)
    atomic_write(a.results / "SUMMARY.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
