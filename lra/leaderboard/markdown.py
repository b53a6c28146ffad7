"""The markdown report of `lra-leaderboard` (LEADERBOARD.md). Text from records is escaped: a name with a
newline, pipe or backtick cannot break a table or a heading."""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Sequence

from lra.atomic import atomic_write
from lra.leaderboard.table import TEXT_NOTE, Cell, Leaderboard, Row, like_for_like, title
from lra.published import AVG_TASKS, SOURCES, PublishedRow, PublishedSource

MISSING = "—"
AVG_NOTE = ("Avg = mean over the five LRA tasks (ListOps, Text, Retrieval, Image, Pathfinder). Path-X is reported "
            "but left out of Avg, as in the 5-task averages of both papers. A missing or failed task is never "
            "counted as 0.")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]+")


def md(text: object) -> str:
    """Record text made safe for a table cell or a code span: no line breaks, pipes escaped, no backticks."""
    return _CONTROL.sub(" ", str(text)).replace("\\", "\\\\").replace("|", "\\|").replace("`", "'")


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


def _partial_note(board: Leaderboard, section: str, rows: Sequence[Row]) -> list[str]:
    parts = []
    for r in rows:
        avg, present = board.average(section, r)
        if avg is not None and len(present) < len(AVG_TASKS):
            parts.append(f"{md(r.label)} {len(present)}/{len(AVG_TASKS)} ({', '.join(map(title, present))})")
    return [f"\\* average over the tasks present only: {'; '.join(parts)}."] if parts else []


def majority_line(board: Leaderboard, section: str) -> str:
    parts = []
    for task in board.tasks(section):
        values = board.majority.get((section, task))
        if values:
            lo, hi = min(values), max(values)
            parts.append(f"{md(title(task))} {lo:.2f}" + (f"–{hi:.2f}" if hi - lo >= 0.005 else ""))
    return "Majority-class rate (test, chance level): " + (" · ".join(parts) if parts else "not recorded") + "."


def _section_intro(board: Leaderboard, section: str) -> str:
    base, _, suffix = section.partition(" (")
    if section == "custom":
        return ("Runs that claim no protocol. A row's label names the settings that differ from the plain "
                "`task=<task> attention=<backend>` defaults. Not compared with any paper.")
    if suffix.startswith("modified"):
        return (f"Runs that asked for protocol `{md(base)}` but whose settings differ from its preset; the row "
                "label names each differing setting and our value, and `lacks` the keys the record has no value for "
                "(e.g. an option added after it was written). They are not that protocol's results and are never "
                "compared with a paper.")
    if suffix.startswith("unverified"):
        return (f"Runs that claim protocol `{md(base)}`, for which no preset composes here (no "
                f"`experiment={md(base)}/<task>` for this task and backend), so the claim cannot be checked. Labels "
                "name the settings that differ from the plain defaults. Never compared with a paper.")
    return (f"Every run here has exactly the settings of the `experiment={md(section)}/<task>` preset for its "
            "backend (its fingerprint equals the preset's).")


def _accuracy_section(board: Leaderboard, section: str) -> list[str]:
    tasks, rows = board.tasks(section), board.rows(section)
    body = []
    for r in rows:
        avg, present = board.average(section, r)
        body.append([md(r.label)] + [format_cell(board.cell(section, t, r)) for t in tasks]
                    + [format_avg(avg, present)])
    lines = ["### Test accuracy (%)", ""] + _table(["Backend"] + [md(title(t)) for t in tasks] + ["Avg"], body)
    lines += ["", AVG_NOTE, TEXT_NOTE] + _partial_note(board, section, rows) + ["", majority_line(board, section)]
    dups = board.duplicates.get(section, [])
    if dups:
        lines += ["", f"Duplicates: {len(dups)} record(s) with the same task/backend/settings/seed as a newer one "
                      "were ignored (the newest `created` is kept)."]
    failures = [(r, t, e) for (p, t, r), c in sorted(board.cells.items(), key=lambda kv: repr(kv[0]))
                if p == section for e in c.runs if not e.finished]
    if failures:
        lines += ["", "Failed runs:"] + [f"- {md(r.label)} / {md(title(t))} seed {e.record.seed}: "
                                         f"{md(e.error or 'no error recorded')}" for r, t, e in failures]
    return lines


def _published_cell(row: PublishedRow, task: str, ours: float | None) -> str:
    if task in row.failed:
        return "FAIL"
    if task not in row.acc:
        return MISSING
    return f"{row.acc[task]:.2f}" + (f" ({ours - row.acc[task]:+.2f})" if ours is not None else "")


def _published_avg(row: PublishedRow, avg: float | None, present: Sequence[str]) -> str:
    """The paper's average as printed; over the same tasks as ours (marked *) when ours is partial."""
    if avg is None or len(present) == len(AVG_TASKS):
        return f"{row.avg:.2f}" + (f" ({avg - row.avg:+.2f})" if avg is not None else "")
    same = statistics.fmean(row.acc[t] for t in present)
    return f"{same:.2f}* ({avg - same:+.2f})"


def _options(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(options.items())) or "no options"


def _like_for_like(row: PublishedRow, ours: dict) -> str:
    differ = like_for_like(row, ours)
    if not differ:
        return "the same as the paper ran" if row.ran_options else "see the options"
    return "differs from what the paper ran in " + "; ".join(f"{k} (ours {md(a)}, theirs {b})" for k, (a, b) in differ.items())


def _comparison_section(board: Leaderboard, section: str, source: PublishedSource) -> list[str]:
    """Our preset runs beside the paper whose setup the protocol follows, with ours − published."""
    tasks = board.tasks(section)
    body, notes = [], []
    for r in board.rows(section):
        row = source.row(r.backend)
        if row is None:
            continue
        avg, present = board.average(section, r)
        cells = {t: board.cell(section, t, r) for t in tasks}
        ours = [MISSING if c is None else "FAIL" if c.mean is None else f"{c.mean:.2f}" for c in cells.values()]
        body.append([md(r.label), "ours"] + ours + [format_avg(avg, present)])
        body.append(["", f"{source.title} ({row.paper_name})"]
                    + [_published_cell(row, t, c.mean if c else None) for t, c in cells.items()]
                    + [_published_avg(row, avg, present)])
        ran = next((c.attention_options() for c in cells.values() if c is not None and c.runs), {})
        if row.avg_note and (avg is None or len(present) == len(AVG_TASKS)):  # the printed average is shown
            body[-1][-1] += " †"
            notes.append(f"- † {md(r.backend)}: {row.avg_note}; the Avg above is what the paper printed.")
        if row.ran:
            notes.append(f"- {md(r.backend)}: the paper's {row.paper_name} ran {row.ran}; ours ran the preset's "
                         f"{md(_options(ran))}: {_like_for_like(row, ran)}.")
    if not body:
        return []
    lines = ["### Compared with published results", "",
             f"Only this protocol's preset runs, against the {source.title}, whose training setup the preset "
             "follows: published value, then ours − published in parentheses.", ""]
    lines += _table(["Backend", "Source"] + [md(title(t)) for t in tasks] + ["Avg"], body)
    lines += ["", AVG_NOTE, TEXT_NOTE]
    if any(len(board.average(section, r)[1]) not in (0, len(AVG_TASKS)) for r in board.rows(section)):
        lines.append("A published Avg marked \\* is the paper's numbers re-averaged over the same tasks as ours.")
    return lines + ([""] + notes if notes else []) + ["", f"Source: {source.citation}."]


def _cost_section(board: Leaderboard, section: str) -> list[str]:
    body = []
    for r in board.rows(section):
        for t in board.tasks(section):
            cell = board.cell(section, t, r)
            if cell is None:
                continue
            sps, mem, params = (cell.cost(k) for k in ("steps_per_second", "peak_memory_mb", "params"))
            body.append([md(r.label), md(title(t)), MISSING if sps is None else f"{sps:.2f}",
                         MISSING if mem is None else f"{mem:,.0f}", MISSING if params is None else f"{params:,.0f}",
                         f"{cell.n}" + (f" (+{cell.failed} failed)" if cell.failed else "")])
    return ["### Training cost (mean over finished seeds)", ""] + _table(
        ["Backend", "Task", "steps/s", "peak memory (MB)", "parameters", "runs"], body)


def published_section() -> list[str]:
    """Both papers' tables as printed (every row we map to a backend), with their notes."""
    lines = ["## Published results", "", "As printed in the papers (test accuracy %). Rows are named by our "
             "backend (the conf/attention file name) and the paper's model name.", ""]
    for s in SOURCES:
        body = [[r.backend, r.paper_name] + [_published_cell(r, t, None) for t in AVG_TASKS + ("pathx",)]
                + [f"{r.avg:.2f}" + (" †" if r.avg_note else "")] for r in s.rows]
        lines += [f"### {s.title} (protocol `{s.protocol}`)", ""]
        lines += _table(["Backend", "Model"] + [title(t) for t in AVG_TASKS + ("pathx",)] + ["Avg"], body)
        lines += [""] + [f"† {r.paper_name}: {r.avg_note}; we print what the paper printed." for r in s.rows
                         if r.avg_note]
        ran = [f"- {r.paper_name} ran {r.ran}." for r in s.rows if r.ran]
        lines += ([""] + ran + [""] if ran else []) + [f"Source: {s.citation}.", TEXT_NOTE, ""]
    return lines


def render_markdown(board: Leaderboard, sources: Sequence[str], png: Path | None = None) -> str:
    n_dup = sum(len(v) for v in board.duplicates.values())
    lines = ["# Long Range Arena leaderboard", "",
             f"Generated by `lra-leaderboard` from {board.n_records} run(s) in "
             f"{', '.join(f'`{md(s)}`' for s in sources)} ({len(board.skipped)} file(s) skipped, {n_dup} duplicate(s) "
             "ignored). Cells: test accuracy mean ± sample standard deviation over seeds, n = finished seeds; "
             f"`FAIL` = every run of the cell failed; `{MISSING}` = not run. A cell only averages runs with one "
             "fingerprint (the same settings but the seed); a row label in brackets names the settings in which "
             "its runs differ from the section's preset."]
    if png is not None:
        lines += ["", f"![accuracy against speed and memory]({md(png.name)})"]
    for section in board.sections():
        lines += ["", f"## Protocol `{md(section)}`", "", _section_intro(board, section), ""]
        lines += _accuracy_section(board, section)
        source = next((s for s in SOURCES if s.protocol == section), None)
        compared = _comparison_section(board, section, source) if source else []
        lines += ([""] + compared if compared else []) + [""] + _cost_section(board, section)
    lines += [""] + published_section()
    if board.skipped:
        lines += ["## Skipped files", ""] + [f"- `{md(p)}`: {md(reason)}" for p, reason in board.skipped]
    return "\n".join(lines).rstrip() + "\n"


def write_markdown(board: Leaderboard, path: Path, sources: Sequence[str], png: Path | None = None) -> None:
    same_dir = png is not None and png.parent.resolve() == path.parent.resolve()
    atomic_write(path, render_markdown(board, sources, png if same_dir else None))
