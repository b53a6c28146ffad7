"""Retrieval (ACL Anthology Network document pairs, byte level; LRA_FACTS.md §1, GENERATORS.md §5).

Files: `tsv_data/new_aan_pairs.{train,eval,test}.tsv` of the LRA release (either nesting level). No
header; five tab-separated columns `label id1 id2 text1 text2`; quote characters are literal; the label
is read as a float and cast to int; CRLF line ends are tolerated. Each document: its first `byte_cut`
(10,000) bytes, + 1 per byte (0 = padding, vocab 257), then its first `doc_len` (4,000) ids.
The files are streamed line by line (the train file is ~8 GB): memory does not grow with the file.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np

from lra.data.cache import DataError, Example, TaskReader
from lra.data.release import RELEASE_URL, find_in_release
from lra.data.text import encode_bytes

FILES = {"train": "new_aan_pairs.train.tsv", "val": "new_aan_pairs.eval.tsv", "test": "new_aan_pairs.test.tsv"}
COLUMNS = 5
MAX_LINE = 64 << 20  # bytes; the AAN pairs' lines are far shorter


def _has_files(folder: Path) -> bool:
    return all((folder / f).is_file() for f in FILES.values())


class RetrievalReader(TaskReader):
    name = "retrieval"
    num_classes = 2
    vocab_size = 257
    pair = True

    def __init__(self, max_len: int = 4096, doc_len: int = 4000, byte_cut: int = 10_000) -> None:
        super().__init__(max_len)
        if not 0 < doc_len <= max_len:
            raise DataError(f"retrieval: doc_len={doc_len} must be in 1..task.max_len ({max_len}); raise "
                            "task.max_len or lower task.reader.doc_len.")
        self.doc_len, self.byte_cut = int(doc_len), int(byte_cut)

    def settings(self) -> dict:
        return {**super().settings(), "doc_len": self.doc_len, "byte_cut": self.byte_cut}

    def locate(self, source: Path) -> Path:
        source = Path(source)
        if _has_files(source):
            return source
        found = find_in_release(source, "tsv_data", accept=_has_files)
        if found is not None:
            return found
        raise DataError(
            f"no Retrieval data under '{source}': expected {', '.join(FILES.values())} there or in tsv_data/ of "
            f"the LRA release (lra_release/ or lra_release/lra_release/). Download the release ({RELEASE_URL}, "
            f"~7.7 GB) and unpack it into '{source}' with `lra-data unpack lra_release.gz --out {source}`."
        )

    def source_files(self, root: Path) -> list[Path]:
        return [Path(root) / f for f in FILES.values()]

    def _doc(self, text: bytes) -> np.ndarray:
        return encode_bytes(text[: self.byte_cut], self.doc_len)

    def read_split(self, root: Path, split: str) -> Iterator[Example]:
        path = Path(root) / FILES[split]
        with open(path, "rb") as f:
            for lineno, line in enumerate(iter(lambda: f.readline(MAX_LINE + 1), b""), start=1):
                if len(line) > MAX_LINE:
                    raise DataError(f"{path}:{lineno}: line longer than {MAX_LINE} bytes; the file is damaged or not "
                                    "an LRA AAN pairs file: take it again from the LRA release.")
                if line.endswith(b"\n"):
                    line = line[:-1]
                if line.endswith(b"\r"):
                    line = line[:-1]
                if not line:
                    continue
                cols = line.split(b"\t")
                if len(cols) != COLUMNS:
                    raise DataError(
                        f"{path}:{lineno}: {len(cols)} tab-separated column(s), expected {COLUMNS} "
                        f"(label, id1, id2, text1, text2); the line starts {line[:60]!r}. The file is damaged or "
                        "not an LRA AAN pairs file: take it again from the LRA release."
                    )
                yield Example(ids=self._doc(cols[3]), label=self._label(cols[0], path, lineno),
                              ids2=self._doc(cols[4]))

    def _label(self, raw: bytes, path: Path, lineno: int) -> int:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or not 0 <= int(value) < self.num_classes:
            raise DataError(
                f"{path}:{lineno}: label {raw[:20]!r} is not 0 or 1 (the first column must be the label, read as "
                "a float). The file is damaged or its columns are in another order: take it again from the LRA "
                "release."
            )
        return int(value)
