"""Text (IMDb reviews, byte level; LRA_FACTS.md §1, GENERATORS.md §4).

Sources, chosen by `source_format` (auto tries them in this order):
  tfds     a prepared TFDS `imdb_reviews/plain_text/<version>/` folder (ArrayRecord: no TensorFlow needed)
  aclimdb  the original `aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt` tree, as a folder or as the
           `aclImdb_v1.tar.gz` archive (streamed, never unpacked)
Tokens: UTF-8 bytes + 1 (0 = padding, vocab 257), truncated to `text_len` bytes. The review text is
stripped of surrounding whitespace as TFDS does, so both sources give the same tokens. The test set is
also the validation set (LRA). Order: TFDS's stored order; for aclImdb, neg then pos by review id.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from lra.data import tfds_source
from lra.data.cache import DataError, Example, TaskReader
from lra.data.archive import iter_tar

LABELS = {"neg": 0, "pos": 1}  # TFDS ClassLabel(names=["neg", "pos"])
SOURCE_FORMATS = ("auto", "tfds", "aclimdb")
TFDS_NAME, TFDS_CONFIG = "imdb_reviews", "plain_text"
ACLIMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
# The split folder each LRA split reads: the test set doubles as validation set.
SPLIT_DIRS = {"train": "train", "val": "test", "test": "test"}
MAX_REVIEW_BYTES = 64 << 20  # IMDb reviews are < 15 KB; an archive member this large is not a review
_REVIEW = re.compile(r"(?:^|/)aclImdb/(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")


def stripped_prefix(f: IO[bytes], n: int, chunk: int = 1 << 16) -> bytes:
    """`f.read().strip()[:n]` in memory bounded by n + chunk, however long the file."""
    head = b""
    while not head:  # skip leading whitespace
        block = f.read(chunk)
        if not block:
            return b""
        head = block.lstrip()
    while len(head) < n:
        block = f.read(chunk)
        if not block:  # the whole text is here: strip its end
            return head.rstrip()[:n]
        head += block
    kept, rest = head[:n], head[n:]
    while not rest.strip():  # does the text go on after the cut? If only whitespace follows, strip it
        rest = f.read(chunk)
        if not rest:
            return kept.rstrip()
    return kept


def encode_bytes(data: bytes, length: int) -> np.ndarray:
    """Byte-level ids: the first `length` bytes, each + 1 (0 stays free for padding)."""
    return np.frombuffer(data[:length], dtype=np.uint8).astype(np.uint16) + 1


class TextReader(TaskReader):
    name = "text"
    num_classes = 2
    vocab_size = 257
    val_is_test = True  # LRA's Text has no validation split: the test reviews pick the checkpoint too

    def __init__(self, max_len: int = 4096, text_len: int = 4000, source_format: str = "auto") -> None:
        super().__init__(max_len)
        if source_format not in SOURCE_FORMATS:
            raise DataError(f"text: source_format '{source_format}' is not one of {', '.join(SOURCE_FORMATS)}.")
        if not 0 < text_len <= max_len:
            raise DataError(f"text: text_len={text_len} must be in 1..task.max_len ({max_len}); raise "
                            "task.max_len or lower task.reader.text_len.")
        self.text_len, self.source_format = int(text_len), source_format

    def settings(self) -> dict:
        return {**super().settings(), "text_len": self.text_len}

    # -- finding the data ---------------------------------------------------------------------------
    def locate(self, source: Path) -> Path:
        source = Path(source)
        if self.source_format in ("auto", "tfds"):
            found = tfds_source.find_prepared(source, TFDS_NAME, TFDS_CONFIG)
            if found is not None:
                return found
        if self.source_format in ("auto", "aclimdb"):
            found = _find_aclimdb(source)
            if found is not None:
                return found
        raise DataError(
            f"no IMDb reviews under '{source}' (source_format={self.source_format}): expected a prepared TFDS "
            f"folder ({TFDS_NAME}/{TFDS_CONFIG}/<version>/ with dataset_info.json, as under ~/tensorflow_datasets), "
            "an aclImdb/ folder with train/ and test/ (each with pos/ and neg/), or the aclImdb_v1.tar.gz "
            f"archive. Get one with `lra-data download text --out {source}` (or by hand from {ACLIMDB_URL})."
        )

    def source_files(self, root: Path) -> list[Path]:
        root = Path(root)
        if root.is_file() or (root / "dataset_info.json").is_file():
            return super().source_files(root)
        return sorted(p for s in ("train", "test") for lab in LABELS for p in (root / s / lab).glob("*.txt"))

    # -- reading --------------------------------------------------------------------------------------
    def read_split(self, root: Path, split: str) -> Iterator[Example]:
        root = Path(root)
        if (root / "dataset_info.json").is_file():
            yield from self._read_tfds(root, split)
        elif root.is_file():
            yield from self._read_tar(root, split)
        else:
            yield from self._read_tree(root, split)

    def _read_tfds(self, root: Path, split: str) -> Iterator[Example]:
        for i, ex in enumerate(tfds_source.iter_split(root, SPLIT_DIRS[split])):
            text = ex["text"] if isinstance(ex["text"], bytes) else str(ex["text"]).encode("utf-8")
            label = int(ex["label"])
            if label not in (0, 1):
                raise DataError(f"{root} split '{SPLIT_DIRS[split]}' record {i}: label {label} is not 0/1; "
                                "this is not the imdb_reviews plain_text dataset.")
            yield Example(ids=encode_bytes(text, self.text_len), label=label)

    def _read_tree(self, root: Path, split: str) -> Iterator[Example]:
        sub = SPLIT_DIRS[split]
        items = []
        for lab, y in LABELS.items():
            folder = root / sub / lab
            if not folder.is_dir():
                raise DataError(f"aclImdb folder '{folder}' is missing; the tree must hold train/ and test/, each "
                                f"with pos/ and neg/. Unpack {ACLIMDB_URL} again.")
            items += [(y, _review_id(p.name), p) for p in folder.glob("*.txt")]
        for y, _, path in sorted(items, key=lambda t: (t[0], t[1])):
            with open(path, "rb") as f:
                text = stripped_prefix(f, self.text_len)
            yield Example(ids=encode_bytes(text, self.text_len), label=y)

    def _read_tar(self, archive: Path, split: str) -> Iterator[Example]:
        sub = SPLIT_DIRS[split]
        items = []  # (label, id, first bytes): at most text_len bytes per review are kept
        accept = lambda n: (m := _REVIEW.search(n)) is not None and m.group(1) == sub  # noqa: E731
        for name, text in iter_tar(archive, accept, read=lambda f: stripped_prefix(f, self.text_len),
                                   max_member=MAX_REVIEW_BYTES):
            m = _REVIEW.search(name)
            items.append((LABELS[m.group(2)], int(m.group(3)), text))
        if not items:
            raise DataError(f"archive '{archive}' holds no aclImdb/{sub}/{{pos,neg}}/*.txt reviews; it is not the "
                            f"aclImdb_v1.tar.gz archive from {ACLIMDB_URL}.")
        for y, _, text in sorted(items, key=lambda t: (t[0], t[1])):
            yield Example(ids=encode_bytes(text, self.text_len), label=y)


def _review_id(filename: str) -> int:
    m = re.fullmatch(r"(\d+)_\d+\.txt", filename)
    return int(m.group(1)) if m else -1


def _find_aclimdb(source: Path) -> Path | None:
    """An aclImdb tree (the folder itself or `source/aclImdb`) or archive (the file, or a file named
    aclImdb*.tar.gz / .tgz in `source`)."""
    for cand in (source, source / "aclImdb"):
        if (cand / "train").is_dir() and (cand / "test").is_dir() and (cand / "test" / "pos").is_dir():
            return cand
    if source.is_file():
        return source  # an archive; a damaged one is reported when it is read
    for pattern in ("aclImdb*.tar.gz", "aclImdb*.tgz", "aclImdb*.tar"):
        for cand in sorted(source.glob(pattern)):
            if cand.is_file():
                return cand
    return None
