"""Markdown, CSV and JSON writers of `lra-leaderboard`. Every file is written atomically."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Sequence

from lra.atomic import atomic_write
from lra.leaderboard import TASK_TITLES, Cell, Leaderboard
from lra.published import AVG_TASKS, SOURCES, PublishedSource

MISSING = "—"
AVG_NOTE = ("Avg = mean over the five LRA tasks (ListOps, Text, Retrieval, Image, Pathfinder). Path-X is reported "
            "but left out of Avg, as in the 5-task averages of both papers. A missing or failed task is never "
            "counted as 0.")


def title(task: str) -> str:
    return TASK_TITLES.get(task, task)


def format_cell(cell: Cell | None) -> str:
    """`37.10 ± 0.52 (n=3)`, `37.10 (n=1)`, `… (n=2, 1 failed)`, `FAIL (2 runs)` or `—`."""
    if cell is None or not cell.runs:
        return MISSING
    if cell.mean is None:
        return f"FAIL ({cell.failed} run{'s' if cell.failed > 1 else ''})"
    text = f"{cell.mean:.2f}" + (f" ± {cell.std:.2f}" if cell.std is not None else "")
    return text + f" (n={cell.n}" + (f", {cell.failed} failed)" if cell.failed else ")")


def format_avg(avg: float | None, present: Sequence[str]) -> str:
    if avg is None:
        return MISSING
    return f"{avg:.2f}" + ("" if len(present) == len(AVG_TASKS) else "*")


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def _partial_note(board: Leaderboard, protocol: str, backends: Sequence[str]) -> list[str]:
    parts = []
    for b in backends:
        avg, present = board.average(protocol, b)
        if avg is not None and len(present) < len(AVG_TASKS):
            parts.append(f"{b} {len(present)}/{len(AVG_TASKS)} ({', '.join(map(title, present))})")
    return [f"\\* average over the tasks present only: {'; '.join(parts)}."] if parts else []


def majority_line(board: Leaderboard, protocol: str) -> str:
    parts = []
    for task in board.tasks(protocol):
        values = board.majority.get((protocol, task))
        if values:
            lo, hi = min(values), max(values)
            parts.append(f"{title(task)} {lo:.2f}" + (f"–{hi:.2f}" if hi - lo >= 0.005 else ""))
    return "Majority-class rate (test, chance level): " + (" · ".join(parts) if parts else "not recorded") + "."


def _accuracy_section(board: Leaderboard, protocol: str) -> list[str]:
    tasks, backends = board.tasks(protocol), board.backends(protocol)
    body = []
    for b in backends:
        avg, present = board.average(protocol, b)
        body.append([b] + [format_cell(board.cell(protocol, t, b)) for t in tasks] + [format_avg(avg, present)])
    lines = ["### Test accuracy (%)", ""] + _table(["Backend"] + [title(t) for t in tasks] + ["Avg"], body)
    lines += ["", AVG_NOTE] + _partial_note(board, protocol, backends) + ["", majority_line(board, protocol)]
    dups = board.duplicates.get(protocol, [])
    if dups:
        lines += ["", f"Duplicates: {len(dups)} record(s) with the same task/backend/seed as a newer one were "
                      "ignored (the newest `created` is kept)."]
    failures = [(b, t, r) for (p, t, b), c in sorted(board.cells.items()) if p == protocol
                for r in c.runs if r.status == "failed"]
    if failures:
        lines += ["", "Failed runs:"] + [f"- {b} / {title(t)} seed {r.seed}: {r.error or 'no error recorded'}"
                                         for b, t, r in failures]
    return lines


def _published_cell(source: PublishedSource, backend: str, task: str, ours: float | None) -> str:
    row = source.row(backend)
    if row is None:
        return MISSING
    if task in row.failed:
        return "FAIL"
    if task not in row.acc:
        return MISSING
    return f"{row.acc[task]:.2f}" + (f" ({ours - row.acc[task]:+.2f})" if ours is not None else "")


def _published_avg(source: PublishedSource, backend: str, avg: float | None, present: Sequence[str]) -> str:
    """The paper's average; over the same tasks as ours (marked *) when ours is partial."""
    row = source.row(backend)
    if row is None:
        return MISSING
    if avg is None or len(present) == len(AVG_TASKS):
        return f"{row.avg:.2f}" + (f" ({avg - row.avg:+.2f})" if avg is not None else "")
    same = statistics.fmean(row.acc[t] for t in present)
    return f"{same:.2f}* ({avg - same:+.2f})"


def _comparison_section(board: Leaderboard, protocol: str) -> list[str]:
    tasks = board.tasks(protocol)
    backends = board.backends(protocol, extra=[r.backend for s in SOURCES for r in s.rows])
    sources = sorted(SOURCES, key=lambda s: s.protocol != protocol)  # the matching paper first
    body = []
    for b in backends:
        avg, present = board.average(protocol, b)
        cells = {t: board.cell(protocol, t, b) for t in tasks}
        means = {t: (c.mean if c else None) for t, c in cells.items()}
        ours = [MISSING if c is None else "FAIL" if c.mean is None else f"{c.mean:.2f}" for c in cells.values()]
        body.append([b, "ours"] + ours + [format_avg(avg, present)])
        for s in sources:
            row = s.row(b)
            if row is not None:
                body.append(["", f"{s.title} ({row.paper_name})"]
                            + [_published_cell(s, b, t, means[t]) for t in tasks]
                            + [_published_avg(s, b, avg, present)])
    match = [s.title for s in SOURCES if s.protocol == protocol]
    intro = (f"Protocol `{protocol}` follows the {match[0]}'s training setup." if match else
             f"Neither paper used protocol `{protocol}`: the differences are for orientation only.")
    lines = ["### Compared with published results", "",
             f"{intro} Published value, then ours − published in parentheses.", ""]
    lines += _table(["Backend", "Source"] + [title(t) for t in tasks] + ["Avg"], body)
    lines += ["", AVG_NOTE] + _partial_note(board, protocol, backends)
    if any(len(board.average(protocol, b)[1]) not in (0, len(AVG_TASKS)) for b in backends):
        lines.append("A published Avg marked \\* is the paper's numbers re-averaged over the same tasks as ours.")
    lines += ["", majority_line(board, protocol), "", "Sources:"] + [f"- {s.title}: {s.citation}." for s in SOURCES]
    return lines


def _cost_section(board: Leaderboard, protocol: str) -> list[str]:
    body = []
    for b in board.backends(protocol):
        for t in board.tasks(protocol):
            cell = board.cell(protocol, t, b)
            if cell is None:
                continue
            sps, mem, params = (cell.cost(k) for k in ("steps_per_second", "peak_memory_mb", "params"))
            body.append([b, title(t), MISSING if sps is None else f"{sps:.2f}",
                         MISSING if mem is None else f"{mem:,.0f}", MISSING if params is None else f"{params:,.0f}",
                         f"{cell.n}" + (f" (+{cell.failed} failed)" if cell.failed else "")])
    return ["### Training cost (mean over finished seeds)", ""] + _table(
        ["Backend", "Task", "steps/s", "peak memory (MB)", "parameters", "runs"], body)


def render_markdown(board: Leaderboard, sources: Sequence[str], png: Path | None = None) -> str:
    n_dup = sum(len(v) for v in board.duplicates.values())
    lines = ["# Long Range Arena leaderboard", "",
             f"Generated by `lra-leaderboard` from {board.n_records} run(s) in {', '.join(f'`{s}`' for s in sources)}"
             f" ({len(board.skipped)} file(s) skipped, {n_dup} duplicate(s) ignored). Cells: test accuracy mean ± "
             "sample standard deviation over seeds, n = finished seeds; `FAIL` = every run of the cell failed; "
             f"`{MISSING}` = not run."]
    if png is not None:
        lines += ["", f"![accuracy against speed and memory]({png.name})"]
    for protocol in board.protocols():
        lines += ["", f"## Protocol `{protocol}`", ""] + _accuracy_section(board, protocol)
        lines += [""] + _comparison_section(board, protocol) + [""] + _cost_section(board, protocol)
    if board.skipped:
        lines += ["", "## Skipped files", ""] + [f"- `{p}`: {reason}" for p, reason in board.skipped]
    return "\n".join(lines) + "\n"


def write_markdown(board: Leaderboard, path: Path, sources: Sequence[str], png: Path | None = None) -> None:
    same_dir = png is not None and png.parent.resolve() == path.parent.resolve()
    atomic_write(path, render_markdown(board, sources, png if same_dir else None))


def rows(board: Leaderboard) -> list[dict]:
    """One flat row per protocol/task/backend that has runs (the CSV, JSON and wandb table)."""
    out = []
    for protocol in board.protocols():
        for b in board.backends(protocol):
            for t in board.tasks(protocol):
                cell = board.cell(protocol, t, b)
                if cell is None:
                    continue
                row = {"protocol": protocol, "task": t, "backend": b, "mean": cell.mean, "std": cell.std,
                       "n": cell.n, "failed": cell.failed, "seeds": " ".join(map(str, cell.seeds)),
                       "steps_per_second": cell.cost("steps_per_second"),
                       "peak_memory_mb": cell.cost("peak_memory_mb"), "params": cell.cost("params"),
                       "majority_acc": (statistics.fmean(m) if (m := board.majority.get((protocol, t))) else None)}
                for s in SOURCES:
                    pub = (r.acc.get(t) if (r := s.row(b)) else None)
                    row[f"published_{s.key}"] = pub
                    row[f"diff_{s.key}"] = None if pub is None or cell.mean is None else cell.mean - pub
                out.append(row)
    return out


def write_csv(table: Sequence[dict], path: Path) -> None:
    buf = io.StringIO()
    fields = list(table[0]) if table else ["protocol", "task", "backend"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in table)
    atomic_write(path, buf.getvalue())


def write_json(board: Leaderboard, table: Sequence[dict], path: Path, sources: Sequence[str]) -> None:
    averages = []
    for protocol in board.protocols():
        for b in board.backends(protocol):
            avg, present = board.average(protocol, b)
            averages.append({"protocol": protocol, "backend": b, "avg": avg, "tasks": present,
                             "complete": len(present) == len(AVG_TASKS)})
    doc = {"sources": list(sources), "runs": board.n_records, "rows": list(table), "averages": averages,
           "duplicates_ignored": {p: [str(x) for x in v] for p, v in board.duplicates.items() if v},
           "skipped": [{"path": str(p), "reason": r} for p, r in board.skipped],
           "published": [{"source": s.key, "title": s.title, "citation": s.citation, "protocol": s.protocol,
                          "rows": [{"backend": r.backend, "paper_name": r.paper_name, "acc": r.acc, "avg": r.avg,
                                    "failed": list(r.failed)} for r in s.rows]} for s in SOURCES]}
    atomic_write(path, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
