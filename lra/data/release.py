"""The LRA release on disk: find a task's folder at either nesting level; byte progress and free space.
(Reading and unpacking its tar archive: lra/data/archive.py.)

The release archive `lra_release.gz` (a gzipped tar) unpacks to `lra_release/lra_release/<task folder>`,
with extra copies of `listops-1000/` and `pathfinder128/` one level up. A source may be the folder
that holds `lra_release/`, the outer `lra_release/` or the inner one; the inner copy is preferred.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from lra.data.cache import DataError

RELEASE_URL = "https://storage.googleapis.com/long-range-arena/lra_release.gz"
# Deepest first, so the inner `lra_release/lra_release/` copy wins over the outer extras.
NESTINGS = (("lra_release", "lra_release"), ("lra_release",), ())


def release_candidates(source: Path, *parts: str) -> list[Path]:
    """`source/[lra_release/[lra_release/]]<parts>`, deepest nesting first."""
    return [Path(source).joinpath(*nest, *parts) for nest in NESTINGS]


def find_in_release(source: Path, *parts: str, accept: Callable[[Path], bool] = Path.is_dir) -> Path | None:
    """The first of `release_candidates(source, *parts)` that `accept`s, else None."""
    return next((p for p in release_candidates(source, *parts) if accept(p)), None)


class ByteBar:
    """A rich byte-progress bar that is a no-op when disabled (tests, pipes)."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self._progress = self._task = None

    def __enter__(self) -> "ByteBar":
        if self.enabled:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), TimeRemainingColumn(), transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.label, total=self.total)
        return self

    def update(self, done: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def free_bytes(folder: Path) -> int:
    """Bytes available to us on the file system of `folder` (or of its nearest existing parent)."""
    folder = Path(folder)
    probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("."))
    st = os.statvfs(probe)
    return st.f_bavail * st.f_frsize


def ensure_free_space(folder: Path, needed: int, what: str) -> None:
    """DataError if `folder`'s file system has less than `needed` bytes free."""
    free = free_bytes(folder)
    if free < needed:
        raise DataError(f"{what} needs about {human_size(needed)} in '{folder}', but only {human_size(free)} "
                        "is free there; free some space or choose another folder.")
