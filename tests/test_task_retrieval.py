"""Retrieval (AAN pairs): the release TSVs at either nesting level, exact ids of both documents, bad rows,
one training step through the two-tower head."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from fixtures_lra import smoke_config, write_aan
from lra.data import cli
from lra.data.cache import DataError, open_split
from lra.data.retrieval import FILES, RetrievalReader

TEXTS = [
    b'He said "no" and \'yes\'; a "quoted, comma" field',
    "caf\u00e9 na\u00efve \u2603 unicode".encode("utf-8"),
    b'"starts with a quote',
    b"ends with a quote\"",
    b"x" * 12_000,  # longer than the byte cut and the document length
    bytes(range(32, 127)),
]


def rows(seed: int, n: int):
    rng = np.random.default_rng(seed)
    labels = ["1.0", "0.0", "1", "0"]
    return [(labels[i % 4], f"P{i}-{seed}", f"Q{i}", TEXTS[int(rng.integers(len(TEXTS)))],
             TEXTS[int(rng.integers(len(TEXTS)))]) for i in range(n)]


def write_release(root, crlf_split: str = "train") -> dict:
    """tsv_data/ of the release under root/lra_release/lra_release/; one file with CRLF line ends."""
    data = {"train": rows(0, 9), "val": rows(1, 4), "test": rows(2, 5)}
    folder = root / "lra_release" / "lra_release" / "tsv_data"
    for split, name in FILES.items():
        write_aan(folder / name, data[split], crlf=split == crlf_split)
    with open(folder / FILES["test"], "ab") as f:
        f.write(b"\n")  # a blank line at the end is tolerated
    return data


def ids(text: bytes, cut: int, length: int) -> list[int]:
    return [b + 1 for b in text[:cut][:length]]


@pytest.mark.parametrize("level", ["", "lra_release", "lra_release/lra_release", "lra_release/lra_release/tsv_data"])
def test_release_at_any_level_exact_ids(tmp_path, level, capsys):
    data = write_release(tmp_path / "raw")
    src = tmp_path / "raw" / level if level else tmp_path / "raw"
    assert cli.main(["prepare", "retrieval", "--source", str(src), "--data-dir", str(tmp_path / "d"), "--quiet"]) == 0
    folder = next((tmp_path / "d" / "cache").glob("retrieval-*"))
    for split, want in data.items():
        s = open_split(folder, split)
        assert s.ids.shape == s.ids2.shape == (len(want), 4096)
        for i, (label, _, _, t1, t2) in enumerate(want):
            assert int(s.labels[i]) == int(float(label))
            assert s.ids[i, : s.lengths[i]].tolist() == ids(t1, 10_000, 4000)
            assert s.ids2[i, : s.lengths2[i]].tolist() == ids(t2, 10_000, 4000)
            assert not s.ids[i, s.lengths[i]:].any() and not s.ids2[i, s.lengths2[i]:].any()
    capsys.readouterr()
    assert cli.main(["stats", "retrieval", "--data-dir", str(tmp_path / "d"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["pair"] and {s: v["n"] for s, v in stats["splits"].items()} == {s: len(v) for s, v in data.items()}


def test_byte_cut_then_document_length(tmp_path):
    data = write_release(tmp_path)
    reader = RetrievalReader(max_len=64, doc_len=40, byte_cut=30)
    root = reader.locate(tmp_path)
    got = list(reader.read_split(root, "train"))
    assert [e.ids.tolist() for e in got] == [ids(r[3], 30, 40) for r in data["train"]]
    reader = RetrievalReader(max_len=64, doc_len=20, byte_cut=30)
    assert [e.ids2.tolist() for e in reader.read_split(root, "train")] == [ids(r[4], 30, 20) for r in data["train"]]


def test_crlf_does_not_leak_into_the_second_document(tmp_path):
    write_release(tmp_path, crlf_split="val")
    reader = RetrievalReader()
    for ex in reader.read_split(reader.locate(tmp_path), "val"):
        assert ord("\r") + 1 not in ex.ids2.tolist()


@pytest.mark.parametrize("bad, match", [
    (b"1.0\tA\tB\tonly four columns\n", r"4 tab-separated column\(s\), expected 5"),
    (b"1.0\tA\tB\tone\ttwo\tthree\n", r"6 tab-separated column\(s\), expected 5"),
    (b"2.0\tA\tB\tone\ttwo\n", r"label b'2.0' is not 0 or 1"),
    (b"yes\tA\tB\tone\ttwo\n", r"label b'yes' is not 0 or 1"),
])
def test_bad_rows_name_file_and_line(tmp_path, capsys, bad, match):
    write_release(tmp_path)
    path = tmp_path / "lra_release" / "lra_release" / "tsv_data" / FILES["val"]
    good = path.read_bytes()
    path.write_bytes(good + bad)
    line = good.count(b"\n") + 1
    assert cli.main(["prepare", "retrieval", "--source", str(tmp_path), "--data-dir", str(tmp_path / "d")]) == 2
    msg = capsys.readouterr().err
    assert f"{path}:{line}:" in msg and re.search(match, msg), msg


def test_missing_files(tmp_path, capsys):
    write_release(tmp_path)
    (tmp_path / "lra_release" / "lra_release" / "tsv_data" / FILES["test"]).unlink()
    with pytest.raises(DataError, match="new_aan_pairs.test.tsv") as err:
        RetrievalReader().locate(tmp_path)
    assert "lra-data unpack" in str(err.value)


def test_streaming_does_not_read_the_file_at_once(tmp_path, monkeypatch):
    """The reader yields the first example before the rest of the file is read."""
    write_release(tmp_path)
    reader = RetrievalReader()
    root = reader.locate(tmp_path)
    path = root / FILES["train"]
    it = reader.read_split(root, "train")
    first = next(it)
    assert first.label == 1
    with open(path, "ab") as f:  # appended after the first example was read: still seen
        f.write(b"0\tZ\tZ\tappended\tlate\n")
    assert [e.ids.tolist() for e in it][-1] == ids(b"appended", 10_000, 4000)


def test_one_training_step_two_tower(tmp_path):
    from lra.train import run

    write_release(tmp_path / "data")
    cfg = smoke_config("retrieval", tmp_path / "data", tmp_path)
    assert cfg.task.head == "dual"
    rec = run(cfg)
    assert rec["status"] == "finished" and rec["steps"] == 1 and rec["task"] == "retrieval"
