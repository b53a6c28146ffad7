"""Long-range learning check: does a recipe leave the label-prior plateau on every backend and seed?

Runs `lra-train experiment=check/listops attention=B seed=S results_dir=DIR [extra overrides]` for each
backend and seed (one process at a time), then reads the records in DIR and writes DIR/TABLE.md: per
backend and seed, the step at which the run left the plateau, its best validation and its test accuracy.

    python scripts/check_learning.py --protocol-backends nystromformer   # the default recipe: the paper's 4 backends, seeds 0,1,2
    python scripts/check_learning.py --results DIR --backends softmax --seeds 0,1 -- optimizer.lr=3e-3
    python scripts/check_learning.py --preset nystromformer/listops --results DIR   # a preset at the check's length
    python scripts/check_learning.py --table-only --results DIR       # only (re)write the table
    python scripts/check_learning.py --check check/listops512 --results DIR   # the 512-token, 400-step check

Plateau exit (PLATEAU_MARGIN): a run is on the plateau while its validation accuracy stays below the
majority-class rate + margin points; it left the plateau at the first validation step at or above that.
The records' `val_history` ([[step, val acc %], ...]) and `majority_acc` are all that is read.
One results folder per recipe: two finished records of one backend and seed with different configs in one
folder are an error, never silently merged.
"""
from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lra.atomic import atomic_write

CHECK_EXPERIMENT = "check/listops"
PLATEAU_MARGIN = 10.0  # accuracy points above the majority-class rate that count as off the plateau


class CheckError(ValueError):
    """Bad input to the check (names the file or option and the fix)."""


def plateau_exit(history: list[list[float]] | list[tuple[float, float]], majority: float,
                 margin: float = PLATEAU_MARGIN) -> int | None:
    """The first validation step whose accuracy (%) is >= majority + margin; None if there is none.
    `history`: [[step, acc %], ...] in any order; entries with acc None are ignored."""
    threshold = majority + margin
    for step, acc in sorted((h for h in history if h[1] is not None), key=lambda h: h[0]):
        if acc >= threshold:
            return int(step)
    return None


@dataclass
class Row:
    backend: str
    seed: int
    status: str
    exit_step: int | None = None
    best_val: float | None = None
    final_val: float | None = None
    test_acc: float | None = None
    majority: float | None = None
    steps: int | None = None
    seconds: float | None = None
    file: str = ""
    data_dir: str | None = None  # the run's config.data_dir (where its TSVs are, relative to the working dir)


def row_from_record(rec: dict, file: str = "", margin: float = PLATEAU_MARGIN) -> Row:
    config = rec.get("config")
    data_dir = config.get("data_dir") if isinstance(config, dict) else None
    row = Row(rec.get("attention", "?"), int(rec.get("seed", -1)), rec.get("status", "?"), file=file,
              data_dir=None if data_dir is None else str(data_dir))
    if row.status != "finished":
        return row
    hist = [h for h in rec.get("val_history") or [] if h[1] is not None]
    row.majority, row.test_acc = rec.get("majority_acc"), rec.get("test_acc")
    row.steps, row.seconds = rec.get("steps"), rec.get("train_seconds")
    if hist:
        row.best_val = max(h[1] for h in hist)
        row.final_val = max(hist, key=lambda h: h[0])[1]
    if row.majority is not None:
        row.exit_step = plateau_exit(hist, row.majority, margin)
    return row


def load_rows(folder: Path, margin: float = PLATEAU_MARGIN) -> list[Row]:
    """One row per (backend, seed) from the JSON records in `folder`; CheckError on a conflict."""
    rows: dict[tuple[str, int], tuple[Row, str]] = {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CheckError(f"{path} is not a readable JSON record ({err}); delete it or rerun that run.") from None
        if not isinstance(rec, dict) or "attention" not in rec or "seed" not in rec:
            raise CheckError(f"{path} is not an lra-train record (no 'attention'/'seed'); move it out of {folder}.")
        row = row_from_record(rec, path.name, margin)
        key, prev = (row.backend, row.seed), rows.get((row.backend, row.seed))
        if prev is not None:
            if prev[0].status == "finished" and row.status == "finished" and prev[1] != rec.get("config_hash"):
                raise CheckError(f"{folder} holds two finished runs of {row.backend} seed {row.seed} with different "
                                 f"configs ({prev[0].file}, {path.name}): keep one recipe per results folder "
                                 "(--results DIR) and move the other record out.")
            if prev[0].status == "finished":
                continue  # a finished run wins over a failed attempt of the same run
        rows[key] = (row, rec.get("config_hash"))
    return sorted((r for r, _ in rows.values()), key=lambda r: (r.backend, r.seed))


def root_operator_baseline(data_dir: Path) -> dict[str, float] | None:
    """Accuracy (%) on val and test of the majority label per root operator (the first operator token of
    an expression, learned on train): what a model knows once it knows which operator stands first.
    None when the TSVs of `data_dir` are missing or not ListOps' `Source<TAB>Target` layout."""
    def rows(split: str):
        with open(Path(data_dir) / f"basic_{split}.tsv", newline="") as f:
            lines = csv.reader(f, delimiter="\t")
            next(lines, None)  # header
            for line in lines:
                ops = [t for t in line[0].split() if t.startswith("[")] if len(line) == 2 else []
                if not ops:
                    raise ValueError(f"{data_dir}/basic_{split}.tsv line {lines.line_num}: no operator")
                yield ops[0], line[1]

    try:
        by_op: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for op, label in rows("train"):
            by_op[op][label] += 1
        overall = sum(by_op.values(), collections.Counter()).most_common(1)[0][0]
        guess = {op: c.most_common(1)[0][0] for op, c in by_op.items()}
        out = {}
        for split in ("val", "test"):
            pairs = list(rows(split))
            out[split] = 100.0 * sum(guess.get(op, overall) == y for op, y in pairs) / max(1, len(pairs))
        return out
    except (OSError, ValueError, IndexError, csv.Error):
        return None


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def render_table(rows: list[Row], title: str, margin: float = PLATEAU_MARGIN,
                 baseline: dict[str, float] | None = None) -> str:
    """Markdown: a per-seed table and a per-backend summary (left the plateau k/n, mean test acc);
    `baseline`: the root-operator baseline of the check's data (root_operator_baseline)."""
    out = [f"# {title}", "",
           f"Plateau exit: the first validation step with accuracy >= majority-class rate + {margin:g} points "
           "(`—`: never left it). Accuracies in %.", ""]
    if baseline:
        out += [f"Root-operator baseline (the majority label per first operator, learned on train): val "
                f"{baseline['val']:.1f}, test {baseline['test']:.1f}. Leaving the plateau up to this level needs no "
                "more than knowing which operator stands first; only accuracy above it shows the model reading "
                "the rest of the expression.", ""]
    out += [
           "| backend | seed | plateau exit (step) | best val | final val | test | majority | steps | train s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.status != "finished":
            out.append(f"| {r.backend} | {r.seed} | FAIL ({r.status}) | — | — | — | — | — | — |")
            continue
        out.append(f"| {r.backend} | {r.seed} | {'—' if r.exit_step is None else r.exit_step} | {_pct(r.best_val)} | "
                   f"{_pct(r.final_val)} | {_pct(r.test_acc)} | {_pct(r.majority)} | {r.steps} | "
                   f"{'—' if r.seconds is None else f'{r.seconds:.0f}'} |")
    out += ["", "| backend | left the plateau | mean test (runs that finished) |", "|---|---:|---:|"]
    for b in sorted({r.backend for r in rows}):
        mine = [r for r in rows if r.backend == b]
        done = [r for r in mine if r.status == "finished"]
        left = sum(r.exit_step is not None for r in done)
        tests = [r.test_acc for r in done if r.test_acc is not None]
        mean = f"{statistics.mean(tests):.1f} (n={len(tests)})" if tests else "—"
        out.append(f"| {b} | {left}/{len(mine)} | {mean} |")
    return "\n".join(out) + "\n"


def baseline_of(rows: list[Row]) -> dict[str, float] | None:
    """The root-operator baseline of the data the runs were trained on (their config's data_dir), if
    every row names one folder and it is here."""
    dirs = {r.data_dir for r in rows}
    return root_operator_baseline(Path(dirs.pop())) if len(dirs) == 1 and None not in dirs else None


def discovered_backends() -> list[str]:
    """Backend names as conf/ (and the Hydra searchpath) define them."""
    from lra.config import backend_names

    return backend_names()


def protocol_backends(protocol: str) -> list[str]:
    """The backends a protocol compares (lra.config.protocol_backends: conf/protocol_attention/<protocol>/)."""
    from lra import config

    if not config.group_options(f"protocol_attention/{protocol}"):
        raise CheckError(f"--protocol-backends {protocol}: there is no conf/protocol_attention/{protocol}/ "
                         "(ls conf/protocol_attention/); pass another protocol or list backends with --backends.")
    return config.protocol_backends(protocol)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _lra_train() -> list[str]:
    exe = shutil.which("lra-train", path=str(Path(sys.executable).parent)) or shutil.which("lra-train")
    return [exe] if exe else [sys.executable, "-m", "lra.train"]


def train_commands(backends: list[str], seeds: list[int], results: Path, preset: str | None,
                   overrides: list[str], check: str = CHECK_EXPERIMENT) -> list[list[str]]:
    experiment = f"experiment=[{preset},{check}]" if preset else f"experiment={check}"
    return [[*_lra_train(), experiment, f"attention={b}", f"seed={s}", f"results_dir={results}",
             *overrides] for b in backends for s in seeds]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=Path("results/check-learning/default"),
                   help="one folder per recipe: records and TABLE.md")
    p.add_argument("--backends", help="comma list (default: every discovered backend)")
    p.add_argument("--protocol-backends", metavar="PROTOCOL",
                   help="the backends of conf/protocol_attention/PROTOCOL/ (make check-learning: nystromformer)")
    p.add_argument("--seeds", default="0,1,2", help="comma list (default: 0,1,2)")
    p.add_argument("--preset", help="an experiment applied before the check's data and budget, e.g. nystromformer/listops")
    p.add_argument("--check", default=CHECK_EXPERIMENT,
                   help=f"the check's data and budget, an experiment of conf/experiment/check/ (default {CHECK_EXPERIMENT}; "
                        "check/listops512 is 101..399 tokens padded to 512, 400 steps)")
    p.add_argument("--title", default=None)
    p.add_argument("--margin", type=float, default=PLATEAU_MARGIN)
    p.add_argument("--table-only", action="store_true", help="write the table from the records; train nothing")
    p.add_argument("overrides", nargs="*", help="extra lra-train overrides (after --), e.g. optimizer.lr=3e-3")
    a = p.parse_args(argv)
    try:
        if not a.table_only:
            known = discovered_backends()
            if a.backends and a.protocol_backends:
                raise CheckError("pass --backends or --protocol-backends, not both.")
            backends = (_csv(a.backends) if a.backends else
                        protocol_backends(a.protocol_backends) if a.protocol_backends else known)
            seeds = [int(s) for s in _csv(a.seeds)]
            unknown = [b for b in backends if b not in known]
            if unknown:
                raise CheckError(f"unknown backend(s) {', '.join(unknown)}; discovered: {', '.join(known)} "
                                 "(conf/attention/*.yaml). Fix --backends.")
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            from lra import config

            checks = [f"check/{c}" for c in config.group_options("experiment/check")]
            if a.check not in checks:
                raise CheckError(f"--check {a.check}: not an experiment of conf/experiment/check/; "
                                 f"choose one of {', '.join(checks)}.")
            for cmd in train_commands(backends, seeds, a.results, a.preset, a.overrides, a.check):
                print("[check-learning]", " ".join(cmd), flush=True)
                rc = subprocess.run(cmd, env=env).returncode
                if rc != 0:  # lra-train wrote a failed record; the table shows FAIL and the check goes on
                    print(f"[check-learning] exit status {rc}; going on", file=sys.stderr, flush=True)
        rows = load_rows(a.results, a.margin)
        if not rows:
            raise CheckError(f"no records in {a.results}; run without --table-only first.")
        title = a.title or f"Long-range learning check: {a.results.name}"
        table = render_table(rows, title, a.margin, baseline_of(rows))
        atomic_write(a.results / "TABLE.md", table)
        print(table)
    except CheckError as err:
        print(f"check_learning: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
