"""ListOps generator and reader: labels re-checked by an independent evaluator, bounds, format, errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lra.data.cache import DataError, build_cache, open_split
from lra.data.listops import VOCAB, VOCAB_SIZE, ListOpsParams, ListOpsReader, generate, generate_files


def independent_eval(source: str) -> tuple[int, int]:
    """Evaluate the on-disk string with a stack machine (no code shared with the generator).
    Returns (value, token length without parentheses)."""
    toks = [t for t in source.split() if t not in ("(", ")")]
    stack: list = []
    for t in toks:
        if t.startswith("["):
            stack.append([t])
        elif t == "]":
            op, *args = stack.pop()
            if op == "[MIN":
                val = min(args)
            elif op == "[MAX":
                val = max(args)
            elif op == "[SM":
                val = sum(args) % 10
            elif op == "[MED":
                s = sorted(args)
                n = len(s)
                val = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2
            else:
                raise AssertionError(op)
            if stack:
                stack[-1].append(val)
            else:
                stack.append(val)
        else:
            stack[-1].append(int(t)) if stack else stack.append(int(t))
    assert len(stack) == 1
    return stack[0], len(toks)


def test_labels_and_length_bounds_lra_settings():
    params = ListOpsParams()  # the LRA defaults: 500 < tokens < 2000
    rows = generate(60, seed=11, params=params)
    assert len({s for s, _ in rows}) == 60
    for source, label in rows:
        value, length = independent_eval(source)
        assert value == label
        assert 500 < length < 2000


def test_generated_files_format_and_determinism(tmp_path: Path):
    p = ListOpsParams(max_depth=4, max_args=5, min_length=8, max_length=80)
    a, b = tmp_path / "a", tmp_path / "b"
    generate_files(a, 300, 50, 50, seed=5, params=p)
    generate_files(b, 300, 50, 50, seed=5, params=p)
    for split, n in (("train", 300), ("val", 50), ("test", 50)):
        raw = (a / f"basic_{split}.tsv").read_bytes()
        assert raw == (b / f"basic_{split}.tsv").read_bytes()
        lines = raw.split(b"\r\n")
        assert lines[0] == b"Source\tTarget" and lines[-1] == b""
        assert len(lines) == n + 2
        for line in lines[1:-1]:
            source, label = line.decode().split("\t")
            assert independent_eval(source)[0] == int(label)
            assert 8 < independent_eval(source)[1] < 80
    sources = [l.split(b"\t")[0] for s in ("train", "val", "test") for l in (a / f"basic_{s}.tsv").read_bytes().split(b"\r\n")[1:-1]]
    assert len(sources) == len(set(sources)), "duplicates across splits"
    c = tmp_path / "c"
    generate_files(c, 300, 50, 50, seed=6, params=p)
    assert (c / "basic_train.tsv").read_bytes() != (a / "basic_train.tsv").read_bytes()


def test_serialization_matches_release_form():
    from lra.data.listops import evaluate, serialize

    tree = ("[MIN", (8, 2, ("[MIN", (8, 6))))
    assert serialize(tree) == "( ( ( ( [MIN 8 ) 2 ) ( ( ( [MIN 8 ) 6 ) ] ) ) ] )"
    assert evaluate(tree) == 2
    assert evaluate(("[MED", (2, 3, 8, 9))) == 5  # truncated mean of the middle two


def test_reader_tokens_crlf_and_lf(tmp_path: Path):
    for name, eol in (("crlf", "\r\n"), ("lf", "\n")):
        d = tmp_path / name
        d.mkdir()
        rows = ["Source\tTarget", "( ( ( [MAX 3 ) 7 ) ] )\t7", "( ( [SM 4 ) ] )\t4"]
        for split in ("train", "val", "test"):
            (d / f"basic_{split}.tsv").write_bytes((eol.join(rows) + eol).encode())
        folder = build_cache(ListOpsReader(max_len=8), d, tmp_path / f"cache-{name}", progress=False)
        s = open_split(folder, "test")
        assert s.labels.tolist() == [7, 4]
        assert s.ids[0].tolist() == [VOCAB["[MAX"], VOCAB["3"], VOCAB["7"], VOCAB["X"], 0, 0, 0, 0]
        assert s.lengths.tolist() == [4, 3]
    assert VOCAB_SIZE == 17 and sorted(VOCAB.values()) == list(range(1, 16))


def test_malformed_row_names_file_and_line(tmp_path: Path):
    for split in ("train", "val", "test"):
        (tmp_path / f"basic_{split}.tsv").write_text("Source\tTarget\n( [MAX 3 ] )\t3\n")
    (tmp_path / "basic_val.tsv").write_text("Source\tTarget\n( [MAX 3 ] )\t3\n( [MIN 3 ] )\n")
    with pytest.raises(DataError, match=r"basic_val\.tsv:3: malformed row"):
        build_cache(ListOpsReader(max_len=8), tmp_path, tmp_path / "c", progress=False)


def test_label_out_of_range_is_rejected(tmp_path: Path):
    for split in ("train", "val", "test"):
        (tmp_path / f"basic_{split}.tsv").write_text("Source\tTarget\n( [MAX 3 ] )\t12\n")
    with pytest.raises(DataError, match="label 12 is outside 0..9"):
        build_cache(ListOpsReader(max_len=8), tmp_path, tmp_path / "c", progress=False)


def test_missing_data_explains_how_to_generate(tmp_path: Path):
    with pytest.raises(DataError, match="lra-data generate listops"):
        ListOpsReader(max_len=8).locate(tmp_path)


def test_release_layout_both_nesting_levels(tmp_path: Path, listops_dir: Path):
    import shutil

    for nest in ("lra_release", "lra_release/lra_release"):
        root = tmp_path / nest.replace("/", "_")
        shutil.copytree(listops_dir, root / nest / "listops-1000")
        assert ListOpsReader(max_len=64).locate(root) == root / nest / "listops-1000"


def test_cache_is_rebuilt_when_source_changes(tmp_path: Path, listops_dir: Path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(listops_dir, src)
    reader = ListOpsReader(max_len=64)
    folder = build_cache(reader, src, tmp_path / "d", progress=False)
    n_before = len(open_split(folder, "test"))
    lines = (src / "basic_test.tsv").read_text().splitlines(keepends=True)
    (src / "basic_test.tsv").write_text("".join(lines[:-1]))  # drop one row
    folder = build_cache(reader, src, tmp_path / "d", progress=False)
    assert len(open_split(folder, "test")) == n_before - 1
    assert np.all(open_split(folder, "test").labels < 10)
