"""The LRA release on disk: find a task's folder at either nesting level, read and unpack tar archives.

The release archive `lra_release.gz` (a gzipped tar) unpacks to `lra_release/lra_release/<task folder>`,
with extra copies of `listops-1000/` and `pathfinder128/` one level up. A source may be the folder
that holds `lra_release/`, the outer `lra_release/` or the inner one; the inner copy is preferred.
"""
from __future__ import annotations

import os
import tarfile
import zlib
from pathlib import Path
from typing import Callable, Iterator

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


class _Position:
    """Where a pass over an archive is: the member being read, else the last one finished."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.done: str | None = None

    def start(self, name: str) -> None:
        self.current = name

    def finish(self) -> None:
        self.done, self.current = self.current, None

    def where(self) -> str:
        if self.current:
            return f"in member '{self.current}'"
        return f"after member '{self.done}'" if self.done else "before its first member"


def _truncated(archive: Path, pos: _Position, err: BaseException, kept: str) -> DataError:
    return DataError(
        f"archive '{archive}' is truncated or corrupt: reading stopped {pos.where()} ({err}). The download "
        f"was probably cut short: download it again (compare its size with the published one) and retry; {kept}"
    )


def iter_tar(archive: Path, accept: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """Stream `(member name, content)` of the regular files whose name `accept`s, in archive order,
    without unpacking (one pass, bounded memory). A truncated archive raises DataError naming the member."""
    archive = Path(archive)
    if not archive.is_file():
        raise DataError(f"archive '{archive}' does not exist; check the path.")
    pos = _Position()
    try:
        with tarfile.open(archive, mode="r|*") as tar:
            for info in tar:
                pos.start(info.name)
                if info.isfile() and accept(info.name):
                    f = tar.extractfile(info)
                    data = f.read() if f is not None else b""
                    pos.finish()
                    yield info.name, data
                else:
                    pos.finish()  # tarfile skips its data while reading the next header
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise _truncated(archive, pos, err, "nothing read from it was used.") from err


def unpack(archive: Path, out: Path, progress: bool = True) -> Path:
    """Unpack a (gzipped) tar into `out` safely: members that would land outside `out` (absolute paths,
    `..`, links pointing out) and device files are refused (tarfile's `data` filter). Returns `out`.
    Progress is shown in bytes of the archive read."""
    archive, out = Path(archive), Path(out)
    if not archive.is_file():
        raise DataError(f"archive '{archive}' does not exist; download it first (see `lra-data download`).")
    out.mkdir(parents=True, exist_ok=True)
    pos = _Position()
    bar = ByteBar(f"unpacking {archive.name}", archive.stat().st_size, progress)
    try:
        with open(archive, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar, bar:
            for info in tar:
                pos.start(info.name)
                try:
                    tar.extract(info, out, filter="data")
                except tarfile.FilterError as err:
                    raise DataError(
                        f"archive '{archive}': member '{info.name}' was refused ({err}); the archive tries to "
                        "write outside the target folder or holds a special file. Do not use this archive."
                    ) from err
                pos.finish()
                bar.update(raw.tell())
    except DataError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        if pos.current is not None and (out / pos.current).is_file():
            (out / pos.current).unlink()  # the half-written member must not pass for a complete one
        raise _truncated(archive, pos, err, f"the members before it are complete in '{out}'.") from err
    return out


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


def ensure_free_space(folder: Path, needed: int, what: str) -> None:
    """DataError if `folder`'s file system has less than `needed` bytes free."""
    folder = Path(folder)
    probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("."))
    st = os.statvfs(probe)
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise DataError(f"{what} needs about {human_size(needed)} in '{folder}', but only {human_size(free)} "
                        "is free there; free some space or choose another folder.")
