"""Pathfinder and Path-X (one token per pixel; LRA_FACTS.md §1, GENERATORS.md §2.7-2.8).

Layout (the LRA release, or `lra-data generate pathfinder`):
    pathfinder<resolution>/<difficulty>/imgs/<b>/sample_<j>.png     8-bit grayscale, resolution^2 pixels
    pathfinder<resolution>/<difficulty>/metadata/<b>.npy            PLAIN TEXT despite the name
A metadata line is space-separated: field 0 = sub-path (`imgs/<b>`), 1 = file name, 3 = label (0/1).
Files are read in numeric batch order; missing, empty or undecodable images are skipped and counted
(a warning names them; more than `max_skipped` is an error). The remaining examples are split 80/10/10
after a permutation seeded by `seed`. Tokens: pixel values 0..255 row-major (vocab 256); every
position is a real token (no black-pixel masking).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
from PIL import Image

from lra.data.cache import DataError, Example, TaskReader
from lra.data.pathfinder_draw import DIFFICULTIES, normalize_difficulty
from lra.data.release import RELEASE_URL, find_in_release

log = logging.getLogger(__name__)
FOLDERS = frozenset(folder for folder, _ in DIFFICULTIES.values())  # curv_baseline, curv_contour_length_9, _14
FRACTIONS = (0.8, 0.1)  # train, val; test is the rest
MAX_METADATA_BYTES = 64 << 20  # a release metadata file is ~60 KB (1,000 lines)
MAX_METADATA_ROWS = 10_000_000


def difficulty_folder(difficulty: str | int) -> str:
    """`curv_contour_length_14` from itself, `hard` or `14` (the generator's names and aliases); any other
    value is taken as a folder name."""
    d = str(difficulty)
    try:
        return DIFFICULTIES[normalize_difficulty(d)][0]
    except ValueError:
        return d


def _is_task_dir(p: Path) -> bool:
    return (p / "metadata").is_dir() and (p / "imgs").is_dir()


def read_metadata(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of a metadata file: text (the release), or a NumPy array of strings as
    `numpy.save` writes it (the upstream generator's code). Sizes are checked before anything is loaded."""
    size = path.stat().st_size
    if size > MAX_METADATA_BYTES:
        raise DataError(f"{path} is {size} bytes; a metadata file of the release is ~60 KB. The folder is damaged or "
                        "not a Pathfinder release: take it again.")
    raw = path.read_bytes()
    if raw.startswith(b"\x93NUMPY"):
        return _read_npy(path, size)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not text metadata ({err}); take the file again from the release.") from err
    return [(i + 1, line.split()) for i, line in enumerate(text.splitlines()) if line.strip()]


def _read_npy(path: Path, size: int) -> list[tuple[int, list[str]]]:
    """A binary .npy of strings, its header checked against the file's size first (a header may claim 10^9
    rows that the file does not hold: NumPy would try to allocate them)."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            major, _ = fmt.read_magic(f)
            read_header = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
            shape, _, dtype = read_header(f)
            start = f.tell()
    except (ValueError, OSError, SyntaxError, TypeError) as err:
        raise DataError(f"{path}: a binary .npy whose header is unreadable ({err}); regenerate the metadata as text "
                        "(the LRA release format).") from err
    if dtype.kind not in "US":
        raise DataError(f"{path}: a binary .npy of {dtype}, not text; regenerate the metadata as text (the LRA "
                        "release format).")
    count = int(np.prod(shape, dtype=object))
    if count * dtype.itemsize != size - start or count > MAX_METADATA_ROWS * 11:
        raise DataError(f"{path}: its .npy header claims shape {tuple(shape)} of {dtype} ({count * dtype.itemsize} "
                        f"bytes) but the file holds {size - start} bytes of data; the file is damaged: take it "
                        "again or regenerate it.")
    rows = np.load(path, allow_pickle=False)
    return [(i + 1, [str(x) for x in np.atleast_1d(r)]) for i, r in enumerate(rows)]


def image_path(root: Path, meta: Path, lineno: int, folder: str, name: str) -> Path:
    """`root/folder/name` for a metadata row; DataError if the row names a file outside `root`."""
    rel = PurePosixPath(folder) / name
    if rel.is_absolute() or ".." in rel.parts or "\\" in str(rel):
        raise DataError(f"{meta}:{lineno}: the row names the image '{rel}', outside {root} (an absolute path or "
                        "'..'); the metadata is damaged or hostile: take it again from the release.")
    return root / rel


class PathfinderReader(TaskReader):
    name = "pathfinder"
    num_classes = 2
    vocab_size = 256
    fixed_length = True  # one token per pixel of a fixed-size image

    def __init__(self, max_len: int = 1024, resolution: int = 32, difficulty: str | int = "curv_contour_length_14",
                 seed: int = 0, max_skipped: int = 100, name: str = "pathfinder") -> None:
        super().__init__(max_len)
        self.resolution, self.difficulty = int(resolution), difficulty_folder(difficulty)
        self.seed, self.max_skipped, self.name = int(seed), int(max_skipped), name
        if self.resolution ** 2 > self.max_len:
            raise DataError(f"{name}: a {self.resolution}x{self.resolution} image has {self.resolution ** 2} pixels "
                            f"but task.max_len is {self.max_len}; raise task.max_len.")
        self.skipped: dict[str, list[str]] = {}  # reason -> files, filled while reading
        self._records: tuple[Path, list[tuple[Path, int]]] | None = None

    def settings(self) -> dict:
        return {**super().settings(), "resolution": self.resolution, "difficulty": self.difficulty,
                "seed": self.seed, "fractions": list(FRACTIONS)}

    def locate(self, source: Path) -> Path:
        source = Path(source)
        folder = f"pathfinder{self.resolution}"
        found = (source / self.difficulty if _is_task_dir(source / self.difficulty) else None) \
            or find_in_release(source, folder, self.difficulty, accept=_is_task_dir) \
            or (source if self._is_this_folder(source) else None)
        if found is not None:
            return found
        raise DataError(
            f"no {self.name} data under '{source}': expected {folder}/{self.difficulty}/ with imgs/ and metadata/ "
            "(there, or in lra_release/ or lra_release/lra_release/ of the LRA release). Download the release "
            f"({RELEASE_URL}, ~7.7 GB) and unpack it with `lra-data unpack lra_release.gz --out {source}`, or "
            f"generate a set with `lra-data generate pathfinder --out {source} --resolution {self.resolution}`."
        )

    def _is_this_folder(self, p: Path) -> bool:
        """`p` is a task folder itself, not one of another difficulty or resolution."""
        other_difficulty = p.name in FOLDERS and p.name != self.difficulty
        parent = p.parent.name
        other_resolution = re.fullmatch(r"pathfinder\d+", parent) and parent != f"pathfinder{self.resolution}"
        return _is_task_dir(p) and not other_difficulty and not other_resolution

    def source_files(self, root: Path) -> list[Path]:
        root = Path(root)
        return sorted(root.glob("metadata/*.npy")) + sorted(root.glob("imgs/*/*.png"))

    # -- records and splits ---------------------------------------------------------------------------
    def records(self, root: Path) -> list[tuple[Path, int]]:
        """(image path, label) of every listed, non-empty image, in numeric metadata order (cached)."""
        root = Path(root)
        if self._records is not None and self._records[0] == root:
            return self._records[1]
        files = sorted(root.glob("metadata/*.npy"), key=_batch_order)
        if not files:
            raise DataError(f"'{root / 'metadata'}' holds no <batch>.npy metadata files; the {self.name} folder is "
                            "incomplete: unpack or generate it again.")
        out, empty = [], []
        for meta in files:
            for lineno, fields in read_metadata(meta):
                if len(fields) < 4 or not re.fullmatch(r"[01]", fields[3]):
                    raise DataError(
                        f"{meta}:{lineno}: expected space-separated fields '<imgs/b> <sample_j.png> <j> <label 0/1> "
                        f"...', got {' '.join(fields)[:80]!r}. Take the metadata again from the release.")
                path = image_path(root, meta, lineno, fields[0], fields[1])
                if not path.is_file() or path.stat().st_size == 0:
                    empty.append(str(path))
                    continue
                out.append((path, int(fields[3])))
        self.skipped = {"missing or empty": empty}
        self._check_skipped()
        if empty:
            log.warning("%s: skipped %d missing or empty image(s) listed in the metadata: %s", self.name,
                        len(empty), _some(empty))
        self._records = (root, out)
        return out

    def split_indices(self, n: int) -> dict[str, np.ndarray]:
        perm = np.random.default_rng(self.seed).permutation(n)
        a, b = int(n * FRACTIONS[0]), int(n * FRACTIONS[0]) + int(n * FRACTIONS[1])
        return {"train": perm[:a], "val": perm[a:b], "test": perm[b:]}

    def read_split(self, root: Path, split: str) -> Iterator[Example]:
        recs = self.records(root)
        bad = self.skipped.setdefault(f"undecodable ({split})", [])
        bad.clear()
        for i in np.sort(self.split_indices(len(recs))[split]):
            path, label = recs[i]
            ids = self._decode(path)
            if ids is None:
                bad.append(str(path))
                self._check_skipped()
                continue
            yield Example(ids=ids, label=label)
        if bad:
            log.warning("%s: skipped %d undecodable image(s) in split '%s': %s", self.name, len(bad), split,
                        _some(bad))

    def _decode(self, path: Path) -> np.ndarray | None:
        try:
            with Image.open(path) as im:
                arr = np.asarray(im if im.mode == "L" else im.convert("L"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return None
        if arr.shape != (self.resolution, self.resolution):
            return None
        return arr.reshape(-1).astype(np.uint16)

    def _check_skipped(self) -> None:
        files = [f for v in self.skipped.values() for f in v]
        if len(files) > self.max_skipped:
            raise DataError(
                f"{self.name}: {len(files)} images are missing, empty or undecodable (more than max_skipped="
                f"{self.max_skipped}): {_some(files, 3)}. The folder is damaged or was not written completely: "
                "unpack or generate it again (or raise task.reader.max_skipped)."
            )


def _batch_order(p: Path) -> tuple:
    """Numeric batch order (`2.npy` before `10.npy`); other names after, alphabetically."""
    return (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.name)


def _some(names: list[str], k: int = 5) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")
