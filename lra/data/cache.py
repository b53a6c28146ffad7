"""One on-disk schema for every task: memory-mapped token arrays plus a manifest.

A cache folder `<data_dir>/cache/<cache_key>/` holds, per split `s`:
    s.ids.u16     uint16 (N, max_len) token ids, right-padded with 0
    s.len.i32     int32  (N,)         number of real tokens
    s.ids2.u16    uint16 (N, max_len) second sequence (pair tasks only)
    s.len2.i32    int32  (N,)
    s.labels.i64  int64  (N,)
and `manifest.json` (shapes, reader settings, the source's size/mtime fingerprint, label counts).
A cache is built in `.<cache_key>.partial/` one split at a time (a finished split is kept, so an
interrupted prepare resumes), then renamed into place, so a failed prepare never replaces a good cache.
Building holds an exclusive lock on `.<cache_key>.lock` (flock: the kernel releases it when its holder
dies): concurrent prepares of one cache (a sweep, the ranks of a DDP job) wait, then use the finished one.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
from abc import ABC, abstractmethod
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from lra.atomic import write_json_atomic

SPLITS = ("train", "val", "test")
SCHEMA_VERSION = 1
_CHUNK = 1024


class DataError(ValueError):
    """Bad or missing input data; the message names the file (and line or member) and the fix."""


@dataclass
class Example:
    ids: np.ndarray  # (n,) int token ids, not yet padded
    label: int
    ids2: np.ndarray | None = None  # second document (pair tasks)


class TaskReader(ABC):
    """Says how to find, read and tokenize one task's raw splits. Everything else is the base's job."""

    name: str = ""
    num_classes: int = 0
    vocab_size: int = 0
    pair: bool = False
    val_is_test: bool = False  # the task has no validation split of its own: its test split stands in (Text)
    fixed_length: bool = False  # every example has exactly max_len tokens (pixels): batches carry no padding

    def __init__(self, max_len: int) -> None:
        self.max_len = int(max_len)

    # -- what a task file implements ------------------------------------------------------------
    @abstractmethod
    def locate(self, source: Path) -> Path:
        """The task's raw folder/file under `source` (release root at either nesting level);
        raise DataError naming what is missing and how to get it."""

    @abstractmethod
    def read_split(self, root: Path, split: str) -> Iterator[Example]:
        """Yield the examples of `split` in a deterministic order."""

    def source_files(self, root: Path) -> list[Path]:
        """Files whose size/mtime decide whether a cache is stale (default: every file under root)."""
        return sorted(p for p in Path(root).rglob("*") if p.is_file()) if Path(root).is_dir() else [Path(root)]

    def settings(self) -> dict:
        """Tokenizer settings recorded in the manifest; a change rebuilds the cache."""
        return {"task": self.name, "max_len": self.max_len}

    def cache_key(self) -> str:
        blob = json.dumps(self.settings(), sort_keys=True).encode()
        return f"{self.name}-{hashlib.sha256(blob).hexdigest()[:10]}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings()})"


def fingerprint(files: Iterable[Path]) -> dict:
    """Cheap identity of the raw data: count, total size and newest mtime of its files."""
    files = list(files)
    return {
        "files": len(files),
        "bytes": sum(f.stat().st_size for f in files),
        "mtime": max((f.stat().st_mtime for f in files), default=0.0),
    }


class _SplitWriter:
    """Streams examples to the fixed-width arrays of one split in bounded memory."""

    def __init__(self, folder: Path, split: str, max_len: int, pair: bool) -> None:
        self.folder, self.split, self.max_len, self.pair = folder, split, max_len, pair
        names = ["ids.u16", "len.i32", "labels.i64"] + (["ids2.u16", "len2.i32"] if pair else [])
        self.files = {n: open(folder / f"{split}.{n}", "wb") for n in names}
        self.n, self.labels, self.lengths = 0, Counter(), []
        self._buf: list[Example] = []

    def add(self, ex: Example) -> None:
        self._buf.append(ex)
        if len(self._buf) >= _CHUNK:
            self._flush()

    def _pack(self, seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        out = np.zeros((len(seqs), self.max_len), dtype=np.uint16)
        lens = np.zeros(len(seqs), dtype=np.int32)
        for i, s in enumerate(seqs):
            s = np.asarray(s)[: self.max_len]
            out[i, : len(s)] = s
            lens[i] = len(s)
        return out, lens

    def _flush(self) -> None:
        if not self._buf:
            return
        ids, lens = self._pack([e.ids for e in self._buf])
        self.files["ids.u16"].write(ids.tobytes())
        self.files["len.i32"].write(lens.tobytes())
        labels = np.array([e.label for e in self._buf], dtype=np.int64)
        self.files["labels.i64"].write(labels.tobytes())
        if self.pair:
            ids2, lens2 = self._pack([e.ids2 for e in self._buf])
            self.files["ids2.u16"].write(ids2.tobytes())
            self.files["len2.i32"].write(lens2.tobytes())
        self.labels.update(labels.tolist())
        self.lengths.append(lens)
        self.n += len(self._buf)
        self._buf = []

    def close(self) -> dict:
        self._flush()
        for f in self.files.values():
            f.close()
        lens = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int32)
        pct = {str(p): float(np.percentile(lens, p)) if len(lens) else 0.0 for p in (0, 50, 90, 99, 100)}
        return {"n": self.n, "label_counts": {str(k): v for k, v in sorted(self.labels.items())},
                "length_percentiles": pct}


def _check_example(reader: TaskReader, ex: Example, split: str, i: int) -> None:
    if not 0 <= ex.label < reader.num_classes:
        raise DataError(
            f"{reader.name} {split} example {i}: label {ex.label} is outside 0..{reader.num_classes - 1}; "
            "the raw data does not match the task (check the source folder and task choice)."
        )
    if reader.pair and ex.ids2 is None:
        raise DataError(f"{reader.name} {split} example {i}: pair task without a second sequence")


def cache_dir(data_dir: Path, reader: TaskReader) -> Path:
    return Path(data_dir) / "cache" / reader.cache_key()


def read_json(path: Path) -> dict | None:
    """A JSON object's content, or None if the file is missing, half-written or not an object."""
    try:
        obj = json.loads(Path(path).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def load_manifest(folder: Path) -> dict | None:
    return read_json(Path(folder) / "manifest.json")


_MANIFEST_KEYS = {"schema": int, "task": str, "settings": dict, "max_len": int, "vocab_size": int,
                  "num_classes": int, "pair": bool, "splits": dict}
_SPLIT_KEYS = {"n": int, "label_counts": dict, "length_percentiles": dict}


def manifest_problem(m: dict) -> str | None:
    """What is wrong with a manifest's keys (missing, wrong type, negative sizes), or None."""
    for key, kind in _MANIFEST_KEYS.items():
        if not isinstance(m.get(key), kind) or (kind is int and isinstance(m.get(key), bool)):
            return f"key '{key}' is {'missing' if key not in m else f'{m[key]!r}, not a {kind.__name__}'}"
    for split in SPLITS:
        info = m["splits"].get(split)
        if not isinstance(info, dict):
            return f"split '{split}' is missing from 'splits'"
        for key, kind in _SPLIT_KEYS.items():
            if not isinstance(info.get(key), kind) or (kind is int and isinstance(info.get(key), bool)):
                return f"key 'splits.{split}.{key}' is missing or not a {kind.__name__}"
        if info["n"] < 0:
            return f"'splits.{split}.n' is {info['n']}"
    return None if m["max_len"] > 0 else f"'max_len' is {m['max_len']}"


def read_manifest(folder: Path) -> dict:
    """The manifest of a prepared cache, checked; DataError naming the file and the fix if it is unusable."""
    path = Path(folder) / "manifest.json"
    m = load_manifest(folder)
    problem = "it is missing, half-written or not a JSON object" if m is None else manifest_problem(m)
    if problem is not None:
        raise DataError(f"cache manifest {path} cannot be used: {problem}. The cache is damaged (half-written or "
                        f"altered): delete {folder} and prepare it again (lra-train rebuilds it from the raw data in "
                        "data_dir; or `lra-data prepare`).")
    return m


def is_fresh(folder: Path, reader: TaskReader, source_fp: dict | None) -> bool:
    """A cache is usable if its manifest is complete, its schema and settings match and (when the source is
    known) the source fingerprint is unchanged."""
    m = load_manifest(folder)
    if m is None or manifest_problem(m) is not None:
        return False
    if m.get("schema") != SCHEMA_VERSION or m.get("settings") != reader.settings():
        return False
    return source_fp is None or m.get("source_fingerprint") == source_fp


@contextmanager
def build_lock(final: Path) -> Iterator[None]:
    """Hold the exclusive lock of cache folder `final` (waiting, and saying so, while another process
    holds it). The lock is an flock on `.<key>.lock` beside the folder; the file stays (removing it would
    let two processes lock two different files)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    path = final.with_name(f".{final.name}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            print(f"waiting for {holder}, which is preparing {final} (lock {path}); this cache is then used",
                  file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            print(f"warning: the file system of {final.parent} has no file locks ({err.strerror}); prepare the "
                  "cache once (`lra-data prepare`) before starting several runs on it", file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def build_cache(reader: TaskReader, source: Path, data_dir: Path, progress: bool = True) -> Path:
    """Tokenize every split of `source` into `data_dir/cache/<key>/` (resumable, atomic)."""
    root = reader.locate(Path(source))
    fp = fingerprint(reader.source_files(root))
    final = cache_dir(data_dir, reader)
    if is_fresh(final, reader, fp):
        return final
    with build_lock(final):
        if is_fresh(final, reader, fp):  # another process built it while we waited
            return final
        return _build_locked(reader, root, Path(source), final, fp, progress)


def _build_locked(reader: TaskReader, root: Path, source: Path, final: Path, fp: dict, progress: bool) -> Path:
    """The build itself; the caller holds the lock of `final`."""
    partial = final.with_name(f".{final.name}.partial")
    partial.mkdir(parents=True, exist_ok=True)
    stamp = {"settings": reader.settings(), "source_fingerprint": fp}
    splits: dict[str, dict] = {}
    for split in SPLITS:
        done = partial / f"{split}.done.json"
        prev = read_json(done)
        if prev is not None and prev.get("stamp") == stamp and isinstance(prev.get("info"), dict) \
                and isinstance(prev["info"].get("n"), int):
            splits[split] = prev["info"]
            continue
        writer = _SplitWriter(partial, split, reader.max_len, reader.pair)
        try:
            for i, ex in enumerate(_progress(reader.read_split(root, split), f"{reader.name}/{split}", progress)):
                _check_example(reader, ex, split, i)
                writer.add(ex)
            info = writer.close()
            if info["n"] == 0:
                raise DataError(f"{reader.name}: split '{split}' under {root} has no examples; check the source data.")
        except BaseException:
            _discard_split(writer, partial)
            raise
        splits[split] = info
        write_json_atomic(done, {"stamp": stamp, "info": info})
    manifest = {
        "schema": SCHEMA_VERSION, "task": reader.name, "settings": reader.settings(),
        "source": str(Path(source).resolve()), "source_fingerprint": fp, "max_len": reader.max_len,
        "vocab_size": reader.vocab_size, "num_classes": reader.num_classes, "pair": reader.pair,
        "splits": splits,
    }
    write_json_atomic(partial / "manifest.json", manifest)
    for split in SPLITS:
        (partial / f"{split}.done.json").unlink()
    if final.exists():
        old = final.with_name(f".{final.name}.old{os.getpid()}")
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, final)
    return final


def _discard_split(writer: _SplitWriter, partial: Path) -> None:
    """After a failed split: delete its half-written arrays, and the partial folder if no split finished
    (finished splits stay, with their done-file, so the next prepare resumes after them)."""
    for f in writer.files.values():
        f.close()
        Path(f.name).unlink(missing_ok=True)
    if not any(partial.glob("*.done.json")):
        shutil.rmtree(partial, ignore_errors=True)


def _progress(it: Iterable, label: str, enabled: bool) -> Iterator:
    if not enabled:
        yield from it
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("preparing {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(label, total=None)
        for x in it:
            yield x
            bar.advance(task)


@dataclass
class CachedSplit:
    """Memory-mapped arrays of one split."""

    ids: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    ids2: np.ndarray | None = None
    lengths2: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


def open_split(folder: Path, split: str) -> CachedSplit:
    if not (Path(folder) / "manifest.json").is_file():
        raise DataError(f"{folder}: no manifest.json; this is not a prepared cache (run `lra-data prepare`).")
    m = read_manifest(folder)
    n, L = m["splits"][split]["n"], m["max_len"]

    def mm(name: str, dtype, shape):
        path = Path(folder) / f"{split}.{name}"
        want = int(np.prod(shape)) * np.dtype(dtype).itemsize
        have = path.stat().st_size if path.is_file() else None
        if have != want:
            raise DataError(f"cache file {path} is {'missing' if have is None else f'{have} bytes, expected {want}'}: "
                            f"the cache is damaged (half-written or altered). Delete {folder} and prepare it again "
                            "(lra-train rebuilds it from the raw data in data_dir; or `lra-data prepare`).")
        return np.memmap(path, dtype=dtype, mode="r", shape=shape)

    out = CachedSplit(mm("ids.u16", np.uint16, (n, L)), mm("len.i32", np.int32, (n,)),
                      mm("labels.i64", np.int64, (n,)))
    if m["pair"]:
        out.ids2, out.lengths2 = mm("ids2.u16", np.uint16, (n, L)), mm("len2.i32", np.int32, (n,))
    return out


def resolve_cache(reader: TaskReader, data_dir: Path, progress: bool = True) -> Path:
    """The cache to train from: a fresh prepared cache under `data_dir`, else one built from raw data
    found in `data_dir` (prepared once, then reused)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir() or not any(data_dir.iterdir()):
        raise DataError(
            f"data_dir '{data_dir}' is missing or empty. For ListOps, generate a set with `lra-data generate "
            f"listops --out {data_dir}` (or `make demo-data`); for the other tasks put the LRA release (or the "
            f"task's raw files) there and run `lra-data prepare {reader.name} --source <raw> --data-dir {data_dir}`, "
            f"or `lra-data download {reader.name}` for where to get them."
        )
    folder = cache_dir(data_dir, reader)
    try:
        root = reader.locate(data_dir)
    except DataError:
        if load_manifest(folder) is not None and is_fresh(folder, reader, None):
            return folder  # a prepared cache without its raw source
        if folder.is_dir():
            raise DataError(
                f"the {reader.name} cache {folder} cannot be used (its manifest.json is missing, half-written, "
                f"incomplete or from another schema version) and data_dir '{data_dir}' holds no raw {reader.name} data to rebuild "
                f"it from. Delete {folder} and prepare the cache again (`lra-data prepare {reader.name} --source "
                f"<raw> --data-dir {data_dir}`)."
            ) from None
        raise
    if is_fresh(folder, reader, fingerprint(reader.source_files(root))):
        return folder
    return build_cache(reader, data_dir, data_dir, progress=progress)
