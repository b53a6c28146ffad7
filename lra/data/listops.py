"""ListOps: the LRA generator (seeded, deterministic) and the reader of `basic_{train,val,test}.tsv`.

Generator semantics follow the LRA release (Tay et al. 2020) as specified in shared/GENERATORS.md §1:
operators MIN/MAX/MED/SM, leaf probability 0.25, depth <= 10, 2..10 arguments, strict length window
500 < tokens < 2000, deduplicated, 96k/2k/2k split after a seeded shuffle, `Source\\tTarget` header, CRLF.
"""
from __future__ import annotations

import csv
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import numpy as np

from lra.data.cache import DataError, Example, TaskReader

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
# Fixed vocabulary (LRA built it from a Python set, so its ids changed run to run): 0 = pad,
# 1..15 = the tokens below, 16 = out-of-vocabulary. vocab_size = 17 as in LRA.
TOKENS = (*OPERATORS, "X", *[str(d) for d in range(10)])
VOCAB = {tok: i + 1 for i, tok in enumerate(TOKENS)}
OOV_ID = len(TOKENS) + 1
VOCAB_SIZE = OOV_ID + 1

Tree = Union[int, tuple]  # a leaf digit, or (operator, [children])


@dataclass(frozen=True)
class ListOpsParams:
    max_depth: int = 10
    max_args: int = 10
    value_p: float = 0.25
    min_length: int = 500  # strict lower bound on tokens
    max_length: int = 2000  # strict upper bound on tokens


def _gen(rng: random.Random, depth: int, p: ListOpsParams) -> tuple[Tree, int]:
    """One random tree and its token length (operator + closing bracket + children)."""
    r = rng.random() if depth < p.max_depth else 1.0
    if r > p.value_p:
        return rng.randint(0, 9), 1
    k = rng.randint(2, p.max_args)
    children, length = [], 2
    for _ in range(k):
        child, n = _gen(rng, depth + 1, p)
        children.append(child)
        length += n
    return (rng.choice(OPERATORS), tuple(children)), length


def evaluate(tree: Tree) -> int:
    if isinstance(tree, int):
        return tree
    op, children = tree
    vals = [evaluate(c) for c in children]
    if op == "[MIN":
        return min(vals)
    if op == "[MAX":
        return max(vals)
    if op == "[MED":
        return int(np.median(vals))
    if op == "[SM":
        return sum(vals) % 10
    raise ValueError(f"unknown operator {op}")


def serialize(tree: Tree) -> str:
    """The release's left-nested pair form: `( ( ( [MIN 8 ) 2 ) ] )` for [MIN 8 2 ]."""
    if isinstance(tree, int):
        return str(tree)
    op, children = tree
    s = op
    for c in children:
        s = f"( {s} {serialize(c)} )"
    return f"( {s} {END} )"


def generate(n: int, seed: int, params: ListOpsParams = ListOpsParams()) -> list[tuple[str, int]]:
    """`n` distinct accepted expressions as (source string, label), in a seeded shuffled order."""
    rng = random.Random(seed)
    seen: dict[str, int] = {}
    tries = 0
    while len(seen) < n:
        tree, length = _gen(rng, 1, params)
        tries += 1
        if params.min_length < length < params.max_length:
            seen.setdefault(serialize(tree), evaluate(tree))
        if tries > 1000 * n + 100_000 and len(seen) < n:
            raise DataError(
                f"ListOps generator: only {len(seen)} distinct expressions after {tries} tries with "
                f"length window ({params.min_length}, {params.max_length}); widen the window or lower n."
            )
    items = sorted(seen.items())
    random.Random(seed + 1).shuffle(items)
    return items


def write_tsv(path: Path, rows: list[tuple[str, int]], crlf: bool = True) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\r\n" if crlf else "\n")
        w.writerow(["Source", "Target"])
        w.writerows(rows)
    tmp.replace(path)


def generate_files(out: Path, n_train: int = 96_000, n_val: int = 2_000, n_test: int = 2_000, seed: int = 0,
                   params: ListOpsParams = ListOpsParams(), crlf: bool = True) -> dict:
    """Write `out/basic_{train,val,test}.tsv`; returns summary statistics."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = generate(n_train + n_val + n_test, seed, params)
    parts = {"train": rows[:n_train], "val": rows[n_train:n_train + n_val], "test": rows[n_train + n_val:]}
    for split, part in parts.items():
        write_tsv(out / f"basic_{split}.tsv", part, crlf)
    lengths = [len(tokenize(s)) for s, _ in rows]
    labels = [y for _, y in rows]
    return {
        "out": str(out), "sizes": {k: len(v) for k, v in parts.items()},
        "length": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)},
        "label_share": {d: round(labels.count(d) / len(labels), 4) for d in range(10)},
    }


def tokenize(source: str) -> list[str]:
    """LRA's rewrite: `]` -> `X`, parentheses dropped, whitespace split."""
    return [("X" if t == END else t) for t in source.split() if t not in ("(", ")")]


def encode(source: str) -> np.ndarray:
    return np.array([VOCAB.get(t, OOV_ID) for t in tokenize(source)], dtype=np.int64)


class ListOpsReader(TaskReader):
    """Reads `basic_{train,val,test}.tsv` (header `Source\\tTarget`, CRLF or LF) from a folder that is the
    release's `listops-1000/`, or holds it at either nesting level of `lra_release/`."""

    name = "listops"
    num_classes = 10
    vocab_size = VOCAB_SIZE
    FILES = {"train": "basic_train.tsv", "val": "basic_val.tsv", "test": "basic_test.tsv"}

    def locate(self, source: Path) -> Path:
        source = Path(source)
        for cand in (source, source / "listops-1000", source / "lra_release" / "listops-1000",
                     source / "lra_release" / "lra_release" / "listops-1000"):
            if all((cand / f).is_file() for f in self.FILES.values()):
                return cand
        raise DataError(
            f"no ListOps data under '{source}': expected basic_train.tsv, basic_val.tsv and basic_test.tsv "
            "there or in listops-1000/ of the LRA release. Generate a set with `lra-data generate listops "
            f"--out {source}` or put the release's listops-1000/ folder there."
        )

    def source_files(self, root: Path) -> list[Path]:
        return [Path(root) / f for f in self.FILES.values()]

    def read_split(self, root: Path, split: str) -> Iterator[Example]:
        path = Path(root) / self.FILES[split]
        with open(path, newline="") as f:
            for lineno, line in enumerate(f, start=1):
                line = line.rstrip("\r\n")
                if lineno == 1:
                    if line.split("\t") != ["Source", "Target"]:
                        raise DataError(f"{path}:1: expected the header 'Source<TAB>Target', got {line[:60]!r}.")
                    continue
                if not line:
                    continue
                cols = line.split("\t")
                if len(cols) != 2 or not cols[1].strip().isdigit():
                    raise DataError(
                        f"{path}:{lineno}: malformed row (expected '<expression><TAB><label 0-9>', got "
                        f"{len(cols)} column(s): {line[:60]!r}); regenerate the file or fix that line."
                    )
                yield Example(ids=encode(cols[0]), label=int(cols[1]))
