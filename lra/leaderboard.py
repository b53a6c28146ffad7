"""`lra-leaderboard`: turn result records (docs/CONTRACTS.md) into LRA-style tables, CSV/JSON and a plot.

Records are read recursively from one or more folders; a file that is not a record is skipped with a
one-line warning. Runs that share protocol/task/backend/seed are deduplicated (newest `created` wins).
Writing lives in `lra.leaderboard_report` (markdown/CSV/JSON) and `lra.leaderboard_plot` (PNG, wandb).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from lra.published import AVG_TASKS

TASKS: tuple[str, ...] = AVG_TASKS + ("pathx",)
TASK_TITLES = {"listops": "ListOps", "text": "Text", "retrieval": "Retrieval", "image": "Image",
               "pathfinder": "Pathfinder", "pathx": "Path-X"}
_TASK_ALIASES = {"path-x": "pathx", "path_x": "pathx"}
BACKEND_ORDER: tuple[str, ...] = ("softmax", "nystrom", "linformer", "performer")
PROTOCOL_ORDER: tuple[str, ...] = ("nystromformer", "lra", "custom", "mini", "demo")
_OPTIONAL_NUMBERS = ("val_acc", "majority_acc", "steps_per_second", "peak_memory_mb", "params")


class RecordError(ValueError):
    """A file that cannot be used as a result record; the message says why in one line."""


@dataclass(frozen=True)
class Record:
    """The fields of one result record that the leaderboard uses."""

    path: Path
    protocol: str
    task: str
    backend: str
    seed: int
    status: str  # "finished" or "failed"
    created: datetime  # timezone-aware
    test_acc: float | None
    majority_acc: float | None
    steps_per_second: float | None
    peak_memory_mb: float | None
    params: float | None
    error: str | None


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _ordered(items, order: Sequence[str]) -> list[str]:
    """Items in `order` first (in that order), then the others sorted by name."""
    items = set(items)
    return [x for x in order if x in items] + sorted(items - set(order))


def parse_record(data: object, path: Path) -> Record:
    """Validate one decoded JSON document as a schema-1 result record; raise RecordError if it is not."""
    if not isinstance(data, dict):
        raise RecordError(f"not a result record (top level is a {type(data).__name__}, not an object)")
    if "schema" not in data:
        raise RecordError("not a result record (no 'schema' field)")
    if data["schema"] != 1:
        raise RecordError(f"unsupported record schema {data['schema']!r} (this tool reads schema 1)")
    missing = [k for k in ("status", "task", "attention", "protocol", "seed", "created") if data.get(k) is None]
    if missing:
        raise RecordError(f"record lacks field(s) {', '.join(missing)}")
    for key in ("task", "attention", "protocol", "created"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise RecordError(f"field '{key}' is not a non-empty string")
    if data["status"] not in ("finished", "failed"):
        raise RecordError(f"status {data['status']!r} is neither 'finished' nor 'failed'")
    if not isinstance(data["seed"], int) or isinstance(data["seed"], bool):
        raise RecordError(f"seed {data['seed']!r} is not an integer")
    for key in ("test_acc",) + _OPTIONAL_NUMBERS:
        if data.get(key) is not None and not _is_number(data[key]):
            raise RecordError(f"field '{key}' is {data[key]!r}, not a number or null")
    test_acc = data.get("test_acc")
    if data["status"] == "finished":
        if test_acc is None:
            raise RecordError("finished run without a test_acc")
        if not 0.0 <= test_acc <= 100.0:
            raise RecordError(f"test_acc {test_acc} is not a percentage in [0, 100]")
    try:
        created = datetime.fromisoformat(data["created"])
    except ValueError:
        raise RecordError(f"created {data['created']!r} is not an ISO 8601 time") from None
    if created.tzinfo is None:
        created = created.replace(tzinfo=timezone.utc)
    task = data["task"].strip().lower()
    error = data.get("error")
    return Record(
        path=path, protocol=data["protocol"].strip(), task=_TASK_ALIASES.get(task, task),
        backend=data["attention"].strip(), seed=data["seed"], status=data["status"], created=created,
        test_acc=float(test_acc) if data["status"] == "finished" else None,
        majority_acc=data.get("majority_acc"), steps_per_second=data.get("steps_per_second"),
        peak_memory_mb=data.get("peak_memory_mb"), params=data.get("params"),
        error=str(error).strip().splitlines()[-1] if error and str(error).strip() else None,
    )


def load_records(folders: Sequence[Path], exclude: Sequence[Path] = ()) -> tuple[list[Record], list[tuple[Path, str]]]:
    """All records under `folders` (recursive `*.json`; a folder may also be a single file).

    Returns (records, skipped) where skipped lists (path, one-line reason). Hidden files, paths in `exclude`
    (our own outputs, the wandb folder) and anything below them are ignored silently.
    """
    excluded = [p.resolve() for p in exclude]
    records: list[Record] = []
    skipped: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for folder in folders:
        if not folder.exists():
            skipped.append((folder, "no such file or folder"))
            continue
        files = [folder] if folder.is_file() else sorted(
            p for p in folder.rglob("*.json") if p.is_file() and not p.name.startswith("."))
        for path in files:
            real = path.resolve()
            if real in seen or any(real == e or e in real.parents for e in excluded):
                continue
            seen.add(real)
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as err:
                skipped.append((path, f"unreadable ({err.__class__.__name__}: {err})"))
                continue
            except json.JSONDecodeError as err:
                skipped.append((path, f"not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"))
                continue
            try:
                records.append(parse_record(data, path))
            except RecordError as err:
                skipped.append((path, str(err)))
    return records, skipped


@dataclass
class Cell:
    """All kept runs of one protocol/task/backend."""

    runs: list[Record] = field(default_factory=list)

    @property
    def finished(self) -> list[Record]:
        return [r for r in self.runs if r.status == "finished"]

    @property
    def n(self) -> int:
        return len(self.finished)

    @property
    def failed(self) -> int:
        return len(self.runs) - self.n

    @property
    def mean(self) -> float | None:
        return statistics.fmean(r.test_acc for r in self.finished) if self.n else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation (n - 1) over seeds; None with fewer than two finished seeds."""
        return statistics.stdev(r.test_acc for r in self.finished) if self.n >= 2 else None

    @property
    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.finished)

    def cost(self, key: str) -> float | None:
        """Mean of a cost field (steps_per_second, peak_memory_mb, params) over finished runs that have it."""
        values = [getattr(r, key) for r in self.finished if getattr(r, key) is not None]
        return statistics.fmean(values) if values else None


@dataclass
class Leaderboard:
    """Deduplicated runs grouped by (protocol, task, backend)."""

    cells: dict[tuple[str, str, str], Cell]
    duplicates: dict[str, list[Path]]  # protocol -> ignored (older) record files
    majority: dict[tuple[str, str], list[float]]  # (protocol, task) -> majority_acc values of kept runs
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def n_records(self) -> int:
        return sum(len(c.runs) for c in self.cells.values())

    def protocols(self) -> list[str]:
        return _ordered({p for p, _, _ in self.cells}, PROTOCOL_ORDER)

    def backends(self, protocol: str, extra: Sequence[str] = ()) -> list[str]:
        return _ordered({b for p, _, b in self.cells if p == protocol} | set(extra), BACKEND_ORDER)

    def tasks(self, protocol: str) -> list[str]:
        """The six LRA columns always, then any other task this protocol has."""
        return _ordered(set(TASKS) | {t for p, t, _ in self.cells if p == protocol}, TASKS)

    def cell(self, protocol: str, task: str, backend: str) -> Cell | None:
        return self.cells.get((protocol, task, backend))

    def average(self, protocol: str, backend: str) -> tuple[float | None, list[str]]:
        """Mean over the five LRA tasks that have a finished mean, and the list of those tasks.

        Missing or all-failed tasks are left out (never counted as 0); callers mark a partial average.
        """
        present = [t for t in AVG_TASKS if (c := self.cell(protocol, t, backend)) and c.mean is not None]
        if not present:
            return None, []
        return statistics.fmean(self.cells[(protocol, t, backend)].mean for t in present), present


def build_leaderboard(records: Sequence[Record], skipped: Sequence[tuple[Path, str]] = ()) -> Leaderboard:
    """Group records; of several with the same protocol/task/backend/seed keep the newest `created`."""
    by_run: dict[tuple[str, str, str, int], list[Record]] = defaultdict(list)
    for rec in records:
        by_run[(rec.protocol, rec.task, rec.backend, rec.seed)].append(rec)
    cells: dict[tuple[str, str, str], Cell] = {}
    duplicates: dict[str, list[Path]] = defaultdict(list)
    majority: dict[tuple[str, str], list[float]] = defaultdict(list)
    for (protocol, task, backend, _seed), group in sorted(by_run.items()):
        group.sort(key=lambda r: (r.created, str(r.path)))
        keep = group[-1]
        duplicates[protocol].extend(r.path for r in group[:-1])
        cells.setdefault((protocol, task, backend), Cell()).runs.append(keep)
        if keep.majority_acc is not None:
            majority[(protocol, task)].append(keep.majority_acc)
    return Leaderboard(cells, dict(duplicates), dict(majority), list(skipped))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="lra-leaderboard",
        description="Build the LRA leaderboard (markdown, CSV, JSON, PNG; optionally a wandb table) "
        "from result records (*.json, searched recursively).")
    ap.add_argument("folders", nargs="*", type=Path, default=[Path("results/runs")],
                    help="record folders or files (default: results/runs, lra-train's results_dir)")
    ap.add_argument("--out", type=Path, default=Path("results/LEADERBOARD.md"),
                    help="markdown output (default: results/LEADERBOARD.md)")
    ap.add_argument("--png", type=Path, help="plot output (default: leaderboard.png beside --out)")
    ap.add_argument("--csv", type=Path, help="CSV output (default: leaderboard.csv beside --out)")
    ap.add_argument("--json", type=Path, help="JSON output (default: leaderboard.json beside --out)")
    ap.add_argument("--wandb", action="store_true",
                    help="also log the table and plot to one wandb run (offline unless WANDB_MODE is set)")
    ap.add_argument("--wandb-project", default="lra", help="wandb project (default: lra)")
    ap.add_argument("--wandb-dir", type=Path,
                    help="folder for wandb files (default: $WANDB_DIR, else the folder of --out)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `lra-leaderboard`; returns the exit status (1 when no record could be read)."""
    from lra import leaderboard_plot, leaderboard_report  # writers import matplotlib/wandb lazily

    args = _parser().parse_args(argv)
    out_dir = args.out.parent
    png = args.png or out_dir / "leaderboard.png"
    csv_path = args.csv or out_dir / "leaderboard.csv"
    json_path = args.json or out_dir / "leaderboard.json"
    wandb_dir = leaderboard_plot.wandb_dir(args.wandb_dir, out_dir)
    records, skipped = load_records(args.folders, exclude=[args.out, png, csv_path, json_path, wandb_dir / "wandb"])
    for path, reason in skipped:
        print(f"warning: skipped {path}: {reason}", file=sys.stderr)
    if not records:
        print(f"error: no result records found in {', '.join(map(str, args.folders))}; nothing written",
              file=sys.stderr)
        return 1
    board = build_leaderboard(records, skipped)
    sources = [str(f) for f in args.folders]
    leaderboard_plot.write_png(board, png)
    leaderboard_report.write_markdown(board, args.out, sources=sources, png=png)
    rows = leaderboard_report.rows(board)
    leaderboard_report.write_csv(rows, csv_path)
    leaderboard_report.write_json(board, rows, json_path, sources=sources)
    written = [args.out, csv_path, json_path, png]
    if args.wandb:
        run_dir = leaderboard_plot.log_wandb(rows, png, project=args.wandb_project, directory=wandb_dir)
        written.append(run_dir or "wandb (disabled)")
    n_dup = sum(len(v) for v in board.duplicates.values())
    print(f"leaderboard: {board.n_records} run(s) in {len(board.protocols())} protocol(s), {n_dup} duplicate(s) "
          f"ignored, {len(skipped)} file(s) skipped -> {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
