"""Reading and unpacking tar archives we did not write (the LRA release, aclImdb, CIFAR-10), defensively.

* Decompression is ours, not tarfile's: gzip, bzip2 and xz streams are read to their end and their
  checksums and lengths checked, and the tar must end with its end-of-archive block, so an archive cut
  anywhere (even on a member boundary) fails instead of passing for a shorter one.
* `unpack` writes regular files and folders only. Symbolic and hard links, devices, FIFOs and sparse
  members are refused (none of the archives we read hold any), as are absolute names and `..`; every
  destination is resolved and checked to lie inside `out` before anything is written, so the result does
  not depend on the interpreter's tarfile filter (3.11.7 has the long-path symlink bypass, CVE-2025-4517).
  Files are written under a temporary name and renamed when complete; on any failure everything this run
  created is removed again (and nothing else).
* Member sizes are bounded before anything is read, free space is checked before each member is
  written, and readers keep only the bytes they use (`read=`), so a small archive cannot exhaust memory
  or disk.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import tarfile
import zlib
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO, Callable, Iterator

from lra.data.cache import DataError
from lra.data.release import ByteBar, ensure_free_space, human_size

BLOCK = tarfile.BLOCKSIZE
MAX_MEMBER_BYTES = 64 << 30  # unpack: no file of the LRA release comes near this
TRAILER_LIMIT = 16 << 20  # bytes tolerated after the end-of-archive block (record padding is ~10 KB)
READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)  # what a damaged archive raises
_CHUNK = 1 << 20


class _StreamError(tarfile.ReadError):
    """The compressed stream is damaged (bad magic, checksum or length) or could not be read."""


class _Source:
    """The decompressed bytes of an archive file, read forward only, counted."""

    def __init__(self, raw: BinaryIO) -> None:
        magic = raw.read(6)
        raw.seek(0)
        if magic[:2] == b"\x1f\x8b":
            self._f: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb")  # checks CRC32 and length per member
        elif magic[:3] == b"BZh":
            self._f = bz2.BZ2File(raw)
        elif magic == b"\xfd7zXZ\x00":
            self._f = lzma.LZMAFile(raw)
        else:
            self._f = raw  # an uncompressed tar
        self.count = 0

    def read(self, n: int = _CHUNK) -> bytes:
        try:
            data = self._f.read(n if n is not None and n >= 0 else _CHUNK)
        except OSError as err:  # gzip.BadGzipFile (CRC or length mismatch, garbage), or the disk
            raise _StreamError(str(err)) from err
        self.count += len(data)
        return data

    def drain(self, limit: int) -> int:
        """Read to the end of the stream (so its checksum is verified); bytes read, at most `limit` + 1 MiB."""
        n = 0
        while n <= limit and (data := self.read(_CHUNK)):
            n += len(data)
        return n


class _Position:
    """Where a pass over an archive is, for error messages, and where its last member's data ends."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.done: str | None = None
        self.end = 0  # offset just past the last member's (block-padded) data

    def start(self, info: tarfile.TarInfo) -> None:
        self.current = info.name
        stored = info.size if info.isreg() or info.type not in tarfile.SUPPORTED_TYPES else 0
        if not info.issparse():
            self.end = info.offset_data + -(-stored // BLOCK) * BLOCK

    def finish(self) -> None:
        self.done, self.current = self.current, None

    def where(self) -> str:
        if self.current:
            return f"in member '{self.current}'"
        return f"after member '{self.done}'" if self.done else "before its first member"


def _truncated(archive: Path, pos: _Position, err: BaseException | str, kept: str) -> DataError:
    return DataError(
        f"archive '{archive}' is truncated or corrupt: reading stopped {pos.where()} ({err}). The download "
        f"was probably cut short: download it again (compare its size with the published one) and retry; {kept}"
    )


@contextmanager
def _open(archive: Path) -> Iterator[tuple[BinaryIO, _Source, tarfile.TarFile]]:
    with open(archive, "rb") as raw:
        src = _Source(raw)
        with tarfile.open(fileobj=src, mode="r|") as tar:  # type: ignore[call-overload]
            yield raw, src, tar


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members in order, without tarfile's list of every member read (millions for the release)."""
    while (info := tar.next()) is not None:
        tar.members.clear()
        yield info


def _check_end(archive: Path, src: _Source, pos: _Position, kept: str) -> None:
    """After the last member: the stream must hold the end-of-archive block and end cleanly (checksum)."""
    extra = src.drain(TRAILER_LIMIT)
    if extra > TRAILER_LIMIT:
        raise DataError(f"archive '{archive}' holds more than {human_size(TRAILER_LIMIT)} after the end of its tar "
                        f"data (after member '{pos.done}'); it is not a plain tar archive. {kept}")
    if src.count < pos.end + BLOCK:
        raise _truncated(archive, pos, "the archive ends without tar's end-of-archive block", kept)


def _refuse(archive: Path, info: tarfile.TarInfo, why: str) -> DataError:
    return DataError(f"archive '{archive}': member '{info.name}' was refused: {why}. The archive tries to write "
                     "outside the target folder or holds something the LRA data never holds: do not use it.")


def iter_tar(archive: Path, accept: Callable[[str], bool], read: Callable[[IO[bytes]], bytes] | None = None,
             max_member: int = 1 << 30) -> Iterator[tuple[str, bytes]]:
    """Stream `(member name, content)` of the regular files whose name `accept`s, in archive order, without
    unpacking. `read(f)` takes what is kept of a member (default: all of it); members larger than
    `max_member` bytes are refused before any of their bytes is read. A truncated archive raises DataError
    naming the member, after the last member at the latest (so nothing read from it is used)."""
    archive = Path(archive)
    if not archive.is_file():
        raise DataError(f"archive '{archive}' does not exist; check the path.")
    pos = _Position()
    kept = "nothing read from it was used."
    try:
        with _open(archive) as (_, src, tar):
            for info in _members(tar):
                pos.start(info)
                if info.isreg() and accept(info.name):
                    if info.issparse():
                        raise _refuse(archive, info, "it is a sparse file")
                    if info.size > max_member:
                        raise DataError(
                            f"archive '{archive}': member '{info.name}' claims {human_size(info.size)}, more than "
                            f"the {human_size(max_member)} any such file of the real data set has; the archive is "
                            f"not the one expected (or a decompression bomb). {kept}")
                    f = tar.extractfile(info)
                    assert f is not None  # a regular file
                    data = read(f) if read is not None else f.read()
                    pos.finish()
                    yield info.name, data
                else:
                    pos.finish()  # tarfile skips its data while reading the next header
            _check_end(archive, src, pos, kept)
    except DataError:
        raise
    except (*READ_ERRORS, OSError) as err:
        raise _truncated(archive, pos, err, kept) from err


class _Created:
    """What one unpack run created under `base` (folders and files), so a failure removes exactly that."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.dirs: set[Path] = set()  # every folder this run made (and those it checked)
        self.checked: set[Path] = {base}
        self.roots: list[Path] = []  # created paths whose parent existed before
        self.pending: Path | None = None  # the temporary file being written

    def made(self, path: Path) -> None:
        if path.parent not in self.dirs:
            self.roots.append(path)

    def remove(self) -> None:
        if self.pending is not None:
            self.pending.unlink(missing_ok=True)
        for p in reversed(self.roots):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _inside(base: Path, path: Path) -> bool:
    real = os.path.realpath(path)
    return os.path.commonpath([real, str(base)]) == str(base)


def _member_parts(archive: Path, info: tarfile.TarInfo) -> tuple[str, ...]:
    """The path components of a member that may be written, or DataError."""
    if info.issym() or info.islnk():
        kind = "symbolic" if info.issym() else "hard"
        raise _refuse(archive, info, f"it is a {kind} link (to '{info.linkname}'); links are how archives write "
                      "outside their folder, and the LRA release and the other archives we read hold none")
    if info.issparse():
        raise _refuse(archive, info, "it is a sparse file")
    if not (info.isreg() or info.isdir()):
        raise _refuse(archive, info, "it is a device, FIFO or other special file")
    name = PurePosixPath(info.name)
    if name.is_absolute():
        raise _refuse(archive, info, "its name is an absolute path")
    if ".." in name.parts:
        raise _refuse(archive, info, "its name holds '..'")
    parts = tuple(p for p in name.parts if p not in ("", "."))
    if not parts and not info.isdir():
        raise _refuse(archive, info, "it has an empty name")
    return parts


def _folder(archive: Path, info: tarfile.TarInfo, made: _Created, parts: tuple[str, ...]) -> Path:
    """`base/<parts>` as a real folder inside base, made as needed; refuses links and files in the way."""
    cur = made.base
    for part in parts:
        cur = cur / part
        if cur in made.checked:
            continue
        if cur.is_symlink():
            raise _refuse(archive, info, f"'{cur}' inside the target folder is a symbolic link; unpack does not "
                          "write through links (unpack into a new folder)")
        if not cur.exists():
            cur.mkdir(mode=0o755)
            made.made(cur)
            made.dirs.add(cur)
        elif not cur.is_dir():
            raise _refuse(archive, info, f"'{cur}' is a file, where the member needs a folder")
        if not _inside(made.base, cur):
            raise _refuse(archive, info, f"'{cur}' resolves to '{os.path.realpath(cur)}', outside the target folder")
        made.checked.add(cur)
    return cur


def _write_file(archive: Path, tar: tarfile.TarFile, info: tarfile.TarInfo, made: _Created,
                parts: tuple[str, ...], max_member: int) -> None:
    if info.size > max_member:
        raise _refuse(archive, info, f"it claims {human_size(info.size)}, more than the {human_size(max_member)} "
                      "allowed per member (--max-member-size); a decompression bomb or not the expected archive")
    parent = _folder(archive, info, made, parts[:-1])
    dest = parent / parts[-1]
    if dest.is_symlink() or (dest.exists() and not dest.is_file()):
        raise _refuse(archive, info, f"'{dest}' already exists as a link or folder")
    ensure_free_space(parent, info.size, f"unpacking member '{info.name}'")
    tmp = parent / f".lra-unpack.tmp{os.getpid()}"
    made.pending = tmp
    src = tar.extractfile(info)
    assert src is not None
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as out:
        left = info.size
        while left > 0 and (chunk := src.read(min(_CHUNK, left))):
            out.write(chunk)
            left -= len(chunk)
        if left:
            raise EOFError(f"{left} bytes of the member are missing")
        os.fchmod(out.fileno(), 0o755 if info.mode & 0o100 else 0o644)
    mtime = min(max(float(info.mtime), 0.0), 2.0 ** 33)
    os.utime(tmp, (mtime, mtime))
    existed = dest.exists()
    os.replace(tmp, dest)
    made.pending = None
    if not existed:
        made.made(dest)


def unpack(archive: Path, out: Path, progress: bool = True, max_member: int = MAX_MEMBER_BYTES) -> Path:
    """Unpack a (gzip/bzip2/xz-compressed) tar into `out`: regular files and folders only, every one checked
    to land inside `out`; all or nothing (a failure removes what this run created). Returns `out`.
    Progress is shown in bytes of the archive read."""
    archive, out = Path(archive), Path(out)
    if not archive.is_file():
        raise DataError(f"archive '{archive}' does not exist; download it first (see `lra-data download`).")
    ensure_free_space(out, archive.stat().st_size, f"unpacking {archive.name}")  # at least its own size
    existed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    made = _Created(Path(os.path.realpath(out)))
    if not existed:
        made.roots.append(made.base)
    pos = _Position()
    kept = f"nothing of it was kept in '{out}'."
    bar = ByteBar(f"unpacking {archive.name}", archive.stat().st_size, progress)
    try:
        with _open(archive) as (raw, src, tar), bar:
            for info in _members(tar):
                pos.start(info)
                parts = _member_parts(archive, info)
                try:
                    if info.isdir():
                        _folder(archive, info, made, parts)
                    else:
                        _write_file(archive, tar, info, made, parts, max_member)
                except OSError as err:  # writing failed (disk full, permissions, a name too long)
                    raise DataError(f"unpacking '{archive}' into '{out}': cannot write member '{info.name}' "
                                    f"({err}); {kept}") from err
                pos.finish()
                bar.update(raw.tell())
            _check_end(archive, src, pos, kept)
    except BaseException as err:
        made.remove()
        if isinstance(err, READ_ERRORS):
            raise _truncated(archive, pos, err, kept) from err
        if isinstance(err, OSError):
            raise DataError(f"cannot read archive '{archive}' ({err}); {kept}") from err
        raise
    return out
