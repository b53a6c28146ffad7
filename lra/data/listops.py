"""ListOps: the LRA generator (seeded, deterministic) and the reader of `basic_{train,val,test}.tsv`.

Generator semantics follow the LRA release (Tay et al. 2020) as specified in shared/GENERATORS.md §1:
operators MIN/MAX/MED/SM, leaf probability 0.25, depth <= 10, 2..10 arguments, strict length window
500 < tokens < 2000, deduplicated, 96k/2k/2k split after a seeded shuffle, `Source\\tTarget` header, CRLF.
"""
from __future__ import annotations

import csv
import random
import re
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


def _longest(p: ListOpsParams) -> int:
    """Token count of the longest expression the generator can draw."""
    n = 1
    for _ in range(max(p.max_depth - 1, 0)):
        n = 2 + p.max_args * n
    return n


def _reachable(p: ListOpsParams) -> int | None:
    """Bit set of the token counts below max_length that some expression has (None if too costly to know).
    A node of depth d < max_depth is a digit (1 token) or an operator, its bracket and 2..max_args nodes."""
    L = p.max_length
    if L * p.max_args * min(p.max_depth, L) > 5_000_000:
        return None
    mask = (1 << L) - 1
    level = 1 << 1  # at max_depth: digits only
    for _ in range(min(p.max_depth - 1, L)):
        sums, total = level, 0
        for k in range(2, p.max_args + 1):
            nxt, bits = 0, level
            while bits:  # sums of k children = (sums of k-1) + one more child
                low = bits & -bits
                nxt |= sums << (low.bit_length() - 1)
                bits ^= low
            sums = nxt & mask
            total |= sums
            if not sums:
                break
        new = (1 << 1) | ((total << 2) & mask)
        if new == level:
            break
        level = new
    return level


def check_request(sizes: dict[str, int], p: ListOpsParams) -> None:
    """DataError, before anything is generated, for counts or bounds no ListOps set can satisfy."""
    if any(n < 1 for n in sizes.values()):
        raise DataError(f"ListOps generator: the split sizes must each be at least 1 (got "
                        f"{', '.join(f'--{k} {v}' for k, v in sizes.items())}).")
    for opt, value, low in (("--max-depth", p.max_depth, 1), ("--max-args", p.max_args, 2), ("--min-len", p.min_length, 0)):
        if value < low:
            raise DataError(f"ListOps generator: {opt}={value} is below its minimum {low}.")
    if p.max_length - p.min_length < 2:
        raise DataError(f"ListOps generator: --min-len {p.min_length} and --max-len {p.max_length} leave no length "
                        "(both bounds are strict: --max-len must be at least --min-len + 2).")
    longest = _longest(p)
    if longest <= p.min_length:
        raise DataError(f"ListOps generator: no expression has more than --min-len {p.min_length} tokens with "
                        f"--max-depth {p.max_depth} and --max-args {p.max_args}: the longest has {longest}. Raise "
                        "those or lower --min-len.")
    reach = _reachable(p)
    if reach is not None and not reach >> (p.min_length + 1):
        raise DataError(f"ListOps generator: no expression with --max-depth {p.max_depth} and --max-args "
                        f"{p.max_args} has strictly between {p.min_length} and {p.max_length} tokens (lengths "
                        "2 and 3 never occur, and small settings leave more gaps); widen the window.")


def generate(n: int, seed: int, params: ListOpsParams = ListOpsParams()) -> list[tuple[str, int]]:
    """`n` distinct accepted expressions as (source string, label), in a seeded shuffled order."""
    rng = random.Random(seed)
    seen: dict[str, int] = {}
    tries, budget = 0, 1000 * n + 100_000
    while len(seen) < n:
        tree, length = _gen(rng, 1, params)
        tries += 1
        if params.min_length < length < params.max_length:
            seen.setdefault(serialize(tree), evaluate(tree))
        if tries % 10_000 == 0 and len(seen) < n and (tries >= budget or (
                tries >= 100_000 and tries * n > 2 * budget * max(len(seen), 1 / n))):
            raise DataError(
                f"ListOps generator: only {len(seen)} distinct expressions after {tries} tries with length window "
                f"({params.min_length}, {params.max_length}), --max-depth {params.max_depth}, --max-args "
                f"{params.max_args}; {n} would take far more. Widen the window, raise the depth or arguments, or "
                "ask for fewer expressions."
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
    check_request({"train": n_train, "val": n_val, "test": n_test}, params)
    rows = generate(n_train + n_val + n_test, seed, params)
    out.mkdir(parents=True, exist_ok=True)
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
        for lineno, line in _lines(path):
            if lineno == 1:
                if line.split("\t") != ["Source", "Target"]:
                    raise DataError(f"{path}:1: expected the header 'Source<TAB>Target', got {line[:60]!r}.")
                continue
            if not line:
                continue
            cols = line.split("\t")
            if len(cols) != 2 or not _LABEL.fullmatch(cols[1].strip()):
                raise DataError(
                    f"{path}:{lineno}: malformed row (expected '<expression><TAB><label 0-9>', got "
                    f"{len(cols)} column(s): {line[:60]!r}); regenerate the file or fix that line."
                )
            if not cols[0].strip():
                raise DataError(f"{path}:{lineno}: empty expression before the label {cols[1]!r}; regenerate the "
                                "file or fix that line.")
            yield Example(ids=encode(cols[0]), label=int(cols[1]))


_LABEL = re.compile(r"[0-9]+")  # ASCII digits only (str.isdigit also takes '²' and other scripts' digits)
MAX_LINE = 1 << 20  # bytes; the longest LRA expression is ~10 KB


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text without its CR/LF) of a UTF-8 file, each line bounded; DataError naming the line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(iter(lambda: f.readline(MAX_LINE + 1), b""), start=1):
            if len(raw) > MAX_LINE:
                raise DataError(f"{path}:{lineno}: line longer than {MAX_LINE} bytes; the file is damaged or not a "
                                "ListOps TSV: regenerate it or take it again from the release.")
            try:
                yield lineno, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{lineno}: bytes that are not UTF-8 ({err.reason} at byte {err.start + 1} "
                                "of the line); the file is damaged or not a ListOps TSV: regenerate it or take it "
                                "again from the release.") from None
