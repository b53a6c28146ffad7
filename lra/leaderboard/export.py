"""CSV and JSON outputs of `lra-leaderboard`: one flat row per section/task/row. Written atomically.

CSV cells that are text and begin with `=`, `+`, `-`, `@`, a tab or a carriage return get a leading `'`, so
a spreadsheet shows them as text instead of running them as formulas (numbers stay numbers).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Sequence

from lra.atomic import atomic_write
from lra.leaderboard.table import TEXT_NOTE, Leaderboard, like_for_like
from lra.published import AVG_TASKS, SOURCES

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def rows(board: Leaderboard) -> list[dict]:
    """One row per section/task/row that has runs (the CSV, JSON and wandb table).

    `published_<paper>` is the paper's number for the backend; `diff_<paper>` (ours − published) is set only
    where the section is the protocol that follows that paper, i.e. the runs are exactly its preset.
    """
    out = []
    for section in board.sections():
        for r in board.rows(section):
            for t in board.tasks(section):
                cell = board.cell(section, t, r)
                if cell is None:
                    continue
                first = cell.runs[0]
                row = {"protocol": section, "claimed_protocol": first.claimed, "matches_preset": first.matches,
                       "task": t, "backend": r.backend, "row": r.label,
                       "differs": " ".join(f"{k}={v}" for k, v in r.variant),
                       "fingerprint": " ".join(cell.fingerprints), "mean": cell.mean, "std": cell.std,
                       "n": cell.n, "failed": cell.failed, "seeds": " ".join(map(str, cell.seeds)),
                       "steps_per_second": cell.cost("steps_per_second"),
                       "peak_memory_mb": cell.cost("peak_memory_mb"), "params": cell.cost("params"),
                       "majority_acc": (statistics.fmean(m) if (m := board.majority.get((section, t))) else None),
                       "note": TEXT_NOTE if t == "text" else ""}
                for s in SOURCES:
                    pub = (p.acc.get(t) if (p := s.row(r.backend)) else None)
                    row[f"published_{s.key}"] = pub
                    comparable = section == s.protocol and first.matches
                    row[f"diff_{s.key}"] = (cell.mean - pub if comparable and pub is not None
                                            and cell.mean is not None else None)
                    # where the paper says what its model ran: each option in which ours differs
                    row[f"differs_from_{s.key}"] = ("; ".join(
                        f"{k} (ours {a}, theirs {b})" for k, (a, b) in like_for_like(p, cell.attention_options()).items())
                        if comparable and p is not None and p.ran_options else None)
                out.append(row)
    return out


def csv_safe(value: object) -> object:
    """Text that a spreadsheet would run as a formula, prefixed with `'`; anything else unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return "" if value is None else value


def write_csv(table: Sequence[dict], path: Path) -> None:
    buf = io.StringIO()
    fields = list(table[0]) if table else ["protocol", "task", "backend"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: csv_safe(v) for k, v in r.items()} for r in table)
    atomic_write(path, buf.getvalue())


def write_json(board: Leaderboard, table: Sequence[dict], path: Path, sources: Sequence[str]) -> None:
    averages = []
    for section in board.sections():
        for r in board.rows(section):
            avg, present = board.average(section, r)
            averages.append({"protocol": section, "backend": r.backend, "row": r.label, "avg": avg,
                             "tasks": present, "complete": len(present) == len(AVG_TASKS)})
    doc = {"sources": list(sources), "runs": board.n_records, "rows": list(table), "averages": averages,
           "notes": {"text": TEXT_NOTE},
           "duplicates_ignored": {p: [str(x) for x in v] for p, v in board.duplicates.items() if v},
           "skipped": [{"path": str(p), "reason": r} for p, r in board.skipped],
           "published": [{"source": s.key, "title": s.title, "citation": s.citation, "protocol": s.protocol,
                          "rows": [{"backend": r.backend, "paper_name": r.paper_name, "acc": r.acc, "avg": r.avg,
                                    "failed": list(r.failed), "ran": r.ran, "avg_note": r.avg_note}
                                   for r in s.rows]} for s in SOURCES]}
    atomic_write(path, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
