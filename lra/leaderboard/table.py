"""The leaderboard as data: cells of runs that share section, task, backend and fingerprint.

A row is a backend plus its variant (the settings that differ from the section's reference), so two
experiments under one backend never share a cell: a cell averages seeds of one fingerprint only. Of several
records of one (section, task, row, seed), the newest `created` is kept.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from lra.leaderboard.load import Entry, variant_label
from lra.published import AVG_TASKS, SOURCES, PublishedRow, published_backends

TASKS: tuple[str, ...] = AVG_TASKS + ("pathx",)  # the LRA table's columns
TASK_TITLES = {"listops": "ListOps", "text": "Text", "retrieval": "Retrieval", "image": "Image",
               "pathfinder": "Pathfinder", "pathx": "Path-X"}
TEXT_NOTE = ("Text: LRA has no separate Text validation set; as in LRA, its test set is also the validation "
             "set that picks the checkpoint, so Text accuracy is not a held-out number.")


def title(task: str) -> str:
    return TASK_TITLES.get(task, task)


def _ordered(items, order: Sequence[str]) -> list[str]:
    """Items in `order` first (in that order), then the others sorted by name."""
    items = set(items)
    return [x for x in order if x in items] + sorted(items - set(order))


@dataclass(frozen=True, order=True)
class Row:
    """A backend and the settings in which its runs differ from the section's reference (empty: none)."""

    backend: str
    variant: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        return variant_label(self.backend, self.variant)


@dataclass
class Cell:
    """The kept runs of one section/task/row (one fingerprint)."""

    runs: list[Entry] = field(default_factory=list)

    @property
    def finished(self) -> list[Entry]:
        return [r for r in self.runs if r.finished]

    @property
    def n(self) -> int:
        return len(self.finished)

    @property
    def failed(self) -> int:
        return len(self.runs) - self.n

    @property
    def mean(self) -> float | None:
        return statistics.fmean(r.record.test_acc for r in self.finished) if self.n else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation (n - 1) over seeds; None with fewer than two finished seeds."""
        return statistics.stdev(r.record.test_acc for r in self.finished) if self.n >= 2 else None

    @property
    def seeds(self) -> list[int]:
        return sorted(r.record.seed for r in self.finished)

    @property
    def fingerprints(self) -> list[str]:
        return sorted({r.record.fingerprint for r in self.runs})

    def cost(self, key: str) -> float | None:
        """Mean of a cost field (steps_per_second, peak_memory_mb, params) over finished runs that have it."""
        values = [v for r in self.finished if (v := getattr(r.record, key)) is not None]
        return statistics.fmean(values) if values else None

    def attention_options(self) -> dict[str, object]:
        """The `attention.*` settings the cell's runs share (one fingerprint: all of them)."""
        settings = self.runs[0].record.fingerprint_settings if self.runs else {}
        return {k.split(".", 1)[1]: v for k, v in settings.items() if k.startswith("attention.")}


def like_for_like(row: PublishedRow, ours: dict) -> dict[str, tuple[object, object]]:
    """Backend options in which ours differ from what the paper's model ran: {option: (ours, theirs)}."""
    return {k: (ours.get(k, "(unset)"), v) for k, v in row.ran_options.items() if ours.get(k, "(unset)") != v}


def section_order(sections) -> list[str]:
    """Protocols that a paper follows first, then the rest by name, `custom` last; each protocol's
    modified/unverified runs right after it."""
    papers = [s.protocol for s in SOURCES]

    def key(name: str):
        base, _, suffix = name.partition(" (")
        return (base == "custom", base not in papers, papers.index(base) if base in papers else 0, base, suffix)

    return sorted(set(sections), key=key)


@dataclass
class Leaderboard:
    """Kept runs grouped by (section, task, row)."""

    cells: dict[tuple[str, str, Row], Cell]
    duplicates: dict[str, list[Path]]  # section -> ignored (older) record files
    majority: dict[tuple[str, str], list[float]]  # (section, task) -> majority_acc values of kept runs
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def n_records(self) -> int:
        return sum(len(c.runs) for c in self.cells.values())

    def sections(self) -> list[str]:
        return section_order(p for p, _, _ in self.cells)

    def rows(self, section: str, extra: Sequence[str] = ()) -> list[Row]:
        """The section's rows: backends in the papers' order, then by name; a backend's variants together."""
        rows = {r for p, _, r in self.cells if p == section} | {Row(b) for b in extra}
        order = _ordered({r.backend for r in rows}, published_backends())
        return sorted(rows, key=lambda r: (order.index(r.backend), r.variant))

    def tasks(self, section: str) -> list[str]:
        """The six LRA columns always, then any other task this section has."""
        return _ordered(set(TASKS) | {t for p, t, _ in self.cells if p == section}, TASKS)

    def cell(self, section: str, task: str, row: Row) -> Cell | None:
        return self.cells.get((section, task, row))

    def average(self, section: str, row: Row) -> tuple[float | None, list[str]]:
        """Mean over the five LRA tasks that have a finished mean, and the list of those tasks.

        Missing or all-failed tasks are left out (never counted as 0); callers mark a partial average.
        """
        present = [t for t in AVG_TASKS if (c := self.cell(section, t, row)) and c.mean is not None]
        if not present:
            return None, []
        return statistics.fmean(self.cells[(section, t, row)].mean for t in present), present


def build_leaderboard(entries: Sequence[Entry], skipped: Sequence[tuple[Path, str]] = ()) -> Leaderboard:
    """Group entries; of several with the same section/task/row/seed keep the newest `created`."""
    by_run: dict[tuple[str, str, Row, int], list[Entry]] = defaultdict(list)
    for e in entries:
        by_run[(e.section, e.task, Row(e.backend, e.variant), e.record.seed)].append(e)
    cells: dict[tuple[str, str, Row], Cell] = {}
    duplicates: dict[str, list[Path]] = defaultdict(list)
    majority: dict[tuple[str, str], list[float]] = defaultdict(list)
    for (section, task, row, _seed), group in sorted(by_run.items(), key=lambda kv: repr(kv[0])):
        group.sort(key=lambda e: (e.created, str(e.path)))
        keep = group[-1]
        duplicates[section].extend(e.path for e in group[:-1])
        cells.setdefault((section, task, row), Cell()).runs.append(keep)
        if keep.record.majority_acc is not None:
            majority[(section, task)].append(keep.record.majority_acc)
    return Leaderboard(cells, dict(duplicates), dict(majority), list(skipped))
