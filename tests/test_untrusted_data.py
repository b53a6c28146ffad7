"""Bad data files and impossible generator requests, each built here: one clear paragraph naming the file
and line (or option), exit 2 through the CLI, and nothing half-written. (ListOps TSVs and generator sizes,
Pathfinder metadata and generator folders, cache manifests.)"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from fixtures_lra import write_pathfinder
from lra.data import cli
from lra.data.cache import DataError, cache_dir, open_split, resolve_cache
from lra.data.listops import ListOpsReader
from lra.data.pathfinder_gen import SETTINGS_FILE, check_dataset, generate_pathfinder

HARD = "curv_contour_length_14"


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lra-data: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


# -- lra-data generate listops: impossible sizes are refused before anything is written ----------------
IMPOSSIBLE = {
    "negative_count": (["--train", "-5"], "must each be at least 1"),
    "zero_count": (["--val", "0"], "must each be at least 1"),
    "equal_bounds": (["--min-len", "50", "--max-len", "50"], "leave no length"),
    "reversed_bounds": (["--min-len", "60", "--max-len", "50"], "leave no length"),
    "negative_min_len": (["--min-len", "-3"], "--min-len=-3"),
    "one_argument": (["--max-args", "1"], "--max-args=1"),
    "zero_depth": (["--max-depth", "0"], "--max-depth=0"),
    "window_above_the_longest": (["--max-depth", "2", "--max-args", "2", "--min-len", "10", "--max-len", "20"],
                                 "the longest has 4"),
    "window_in_a_gap": (["--min-len", "1", "--max-len", "4"], "no expression"),
    "window_in_a_gap_of_two_argument_trees": (["--max-args", "2", "--max-depth", "3", "--min-len", "7",
                                               "--max-len", "10"], "no expression"),
}


@pytest.mark.parametrize("case", sorted(IMPOSSIBLE))
def test_impossible_listops_request_is_refused_at_once(tmp_path, capsys, case):
    args, expect = IMPOSSIBLE[case]
    t0 = time.monotonic()
    rc = cli.main(["generate", "listops", "--out", str(tmp_path / "out"), "--train", "20", "--val", "5",
                   "--test", "5", "--min-len", "5", "--max-len", "40", *args])
    assert rc == 2 and expect in _one_error(capsys)
    assert time.monotonic() - t0 < 5 and not (tmp_path / "out").exists()


def test_a_window_too_rare_to_fill_stops_early(tmp_path, capsys):
    """Ten distinct one-digit expressions exist at depth 1; asking for 50 stops after a bounded search."""
    rc = cli.main(["generate", "listops", "--out", str(tmp_path / "out"), "--train", "40", "--val", "5",
                   "--test", "5", "--max-depth", "1", "--min-len", "0", "--max-len", "2"])
    assert rc == 2 and "10 distinct expressions" in _one_error(capsys)
    assert not (tmp_path / "out").exists()


# -- ListOps TSVs -------------------------------------------------------------------------------------------
TSV: dict[str, tuple[bytes, str]] = {
    "not_utf8": (b"( [MAX 3 \xff\xfe ] )\t3\n", "basic_val.tsv:3: bytes that are not UTF-8"),
    "superscript_label": ("( [MAX 3 ] )\t\u00b2\n".encode(), "basic_val.tsv:3: malformed row"),
    "arabic_indic_label": ("( [MAX 3 ] )\t\u0663\n".encode(), "basic_val.tsv:3: malformed row"),
    "word_label": (b"( [MAX 3 ] )\tseven\n", "basic_val.tsv:3: malformed row"),
    "empty_expression": (b"  \t3\n", "basic_val.tsv:3: empty expression"),
    "endless_line": (b"( [MAX 3 " + b"4 " * (1 << 20), "basic_val.tsv:3: line longer than"),
}


@pytest.mark.parametrize("case", sorted(TSV))
def test_bad_listops_tsv_names_file_and_line(tmp_path, capsys, case):
    bad, expect = TSV[case]
    for split in ("train", "val", "test"):
        (tmp_path / f"basic_{split}.tsv").write_bytes(b"Source\tTarget\r\n( [MIN 4 2 ] )\t2\r\n")
    (tmp_path / "basic_val.tsv").write_bytes(b"Source\tTarget\r\n( [MIN 4 2 ] )\t2\r\n" + bad)
    rc = cli.main(["prepare", "listops", "--source", str(tmp_path), "--data-dir", str(tmp_path / "d"), "--quiet",
                   "task.max_len=16"])
    assert rc == 2 and expect in _one_error(capsys)
    left = {p.name for p in (tmp_path / "d").rglob("*") if p.is_file() and not p.name.endswith(".lock")}
    assert left == {f"train.{k}" for k in ("ids.u16", "len.i32", "labels.i64", "done.json")}  # val discarded


# -- Pathfinder metadata ----------------------------------------------------------------------------------
def _npy_header(path: Path, shape: tuple[int, ...], dtype: str = "<U20", data: bytes = b"") -> None:
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": shape})
        f.write(data)


METADATA: dict[str, tuple[Callable[[Path], None], str]] = {
    "absolute_image_path": (lambda m: m.write_text("/etc sample_0.png 0 1 x\n"), "outside"),
    "dotdot_image_path": (lambda m: m.write_text("imgs/0/../../../.. victim.png 0 1 x\n"), "outside"),
    "dotdot_in_file_name": (lambda m: m.write_text("imgs/0 ../../../../victim.png 0 1 x\n"), "outside"),
    "npy_claiming_a_billion_rows": (lambda m: _npy_header(m, (10 ** 9, 11)), "header claims"),
    "npy_of_objects": (lambda m: _npy_header(m, (1, 11), "|O"), "not text"),
    "npy_garbage_header": (lambda m: m.write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': oops}  \n"), "unreadable"),
}


@pytest.mark.parametrize("case", sorted(METADATA))
def test_bad_pathfinder_metadata_is_refused(tmp_path, capsys, case):
    write, expect = METADATA[case]
    task = tmp_path / "raw" / "pathfinder32" / HARD
    write_pathfinder(task, 32, 2, 4, seed=1)
    (tmp_path / "victim.png").write_bytes(b"not yours")
    write(task / "metadata" / "1.npy")
    rc = cli.main(["prepare", "pathfinder", "--source", str(tmp_path / "raw"), "--data-dir", str(tmp_path / "d"),
                   "--quiet"])
    msg = _one_error(capsys)
    assert rc == 2 and expect in msg and "1.npy" in msg, msg
    assert not list((tmp_path / "d").rglob("*.u16"))


# -- the Pathfinder generator's folder -------------------------------------------------------------------
def test_generator_refuses_a_folder_it_did_not_make(tmp_path):
    """A release copy (no settings file) is never overwritten, not even partly."""
    ddir = tmp_path / "pathfinder32" / HARD
    write_pathfinder(ddir, 32, 2, 4, seed=3)
    before = _files(tmp_path)
    with pytest.raises(DataError, match="was not made by this generator"):
        generate_pathfinder(tmp_path, 32, "14", 2, 4, seed=0, progress=False)
    assert _files(tmp_path) == before


def test_generator_fills_an_empty_folder_and_resumes_its_own(tmp_path):
    (tmp_path / "pathfinder32" / HARD).mkdir(parents=True)
    ddir = generate_pathfinder(tmp_path, 32, "14", 1, 3, seed=0, progress=False)
    again = generate_pathfinder(tmp_path, 32, "14", 2, 3, seed=0, progress=False)  # same settings: more batches
    assert again == ddir and (ddir / "metadata" / "1.npy").is_file()


@pytest.mark.parametrize("content, expect", [(b"{not json", "not JSON"), (b"[1, 2]", "not a JSON object"),
                                             (b'{"seed": 0}', "lacks 'generator_version'"),
                                             (b"\xff\xfe", "not JSON")])
def test_corrupt_generator_settings_are_one_clear_error(tmp_path, content, expect):
    ddir = generate_pathfinder(tmp_path, 32, "14", 1, 3, seed=0, progress=False)
    (ddir / SETTINGS_FILE).write_bytes(content)
    before = _files(tmp_path)
    with pytest.raises(DataError, match=expect):
        generate_pathfinder(tmp_path, 32, "14", 1, 3, seed=0, progress=False)
    with pytest.raises(DataError, match=expect):
        check_dataset(ddir)
    assert _files(tmp_path) == before


def test_generator_cli_reports_a_foreign_folder(tmp_path, capsys):
    write_pathfinder(tmp_path / "pathfinder32" / HARD, 32, 1, 2, seed=3)
    assert cli.main(["generate", "pathfinder", "--out", str(tmp_path), "--batches", "1", "--per-batch", "2",
                     "--no-progress"]) == 2
    assert "was not made by this generator" in _one_error(capsys)


# -- cache manifests -------------------------------------------------------------------------------------
def _prepared(tmp_path: Path, listops_dir: Path) -> Path:
    assert cli.main(["prepare", "listops", "--source", str(listops_dir), "--data-dir", str(tmp_path), "--quiet",
                     "task.max_len=40"]) == 0
    return cache_dir(tmp_path, ListOpsReader(40))


@pytest.mark.parametrize("drop", ["splits", "max_len", "pair", "splits.val", "splits.train.n"])
def test_manifest_with_missing_keys_is_one_clear_error(tmp_path, listops_dir, capsys, drop):
    folder = _prepared(tmp_path, listops_dir)
    m = json.loads((folder / "manifest.json").read_text())
    *parents, last = drop.split(".")
    inner = m
    for key in parents:
        inner = inner[key]
    del inner[last]
    (folder / "manifest.json").write_text(json.dumps(m))
    assert cli.main(["stats", "listops", "--data-dir", str(tmp_path), "task.max_len=40"]) == 2
    assert f"'{drop if drop != 'splits.val' else 'val'}'" in _one_error(capsys)
    with pytest.raises(DataError, match="cannot be used"):
        open_split(folder, "train")
    with pytest.raises(DataError, match="cannot be used"):  # no raw data beside it: not rebuilt, not trusted
        resolve_cache(ListOpsReader(40), tmp_path, progress=False)


def test_incomplete_manifest_next_to_raw_data_is_rebuilt(tmp_path, listops_dir):
    for split in ("train", "val", "test"):
        (tmp_path / f"basic_{split}.tsv").write_bytes((listops_dir / f"basic_{split}.tsv").read_bytes())
    folder = resolve_cache(ListOpsReader(40), tmp_path, progress=False)
    m = json.loads((folder / "manifest.json").read_text())
    del m["splits"]
    (folder / "manifest.json").write_text(json.dumps(m))
    assert resolve_cache(ListOpsReader(40), tmp_path, progress=False) == folder
    assert len(open_split(folder, "train")) == 200


def test_retrieval_line_without_end_is_bounded(tmp_path, monkeypatch):
    from lra.data import retrieval

    monkeypatch.setattr(retrieval, "MAX_LINE", 1 << 16)
    for name in retrieval.FILES.values():
        (tmp_path / name).write_bytes(b"1\ta\tb\tx\ty\n")
    (tmp_path / retrieval.FILES["val"]).write_bytes(b"1\ta\tb\tx\ty\n0\ta\tb\t" + b"z" * (1 << 17))
    with pytest.raises(DataError, match=r"new_aan_pairs\.eval\.tsv:2: line longer than 65536 bytes"):
        list(retrieval.RetrievalReader().read_split(tmp_path, "val"))
