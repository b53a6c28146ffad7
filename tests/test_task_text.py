"""Text (IMDb bytes): aclImdb tree and archive, a TFDS ArrayRecord folder, bad input, one training step."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from fixtures_lra import build_tfds_imdb, imdb_reviews, smoke_config, write_aclimdb_tar, write_aclimdb_tree
from lra.data import cli
from lra.data.cache import DataError, build_cache, load_manifest, open_split
from lra.data.text import TextReader

LABEL = {"neg": 0, "pos": 1}


def expected(reviews, split: str, text_len: int = 4000) -> list[tuple[int, list[int]]]:
    """(label, ids) in the reader's documented order for aclImdb: neg then pos, by review id."""
    rows = sorted(reviews[split], key=lambda r: (LABEL[r[0]], r[1]))
    return [(LABEL[lab], [b + 1 for b in text.strip()[:text_len]]) for lab, _, _, text in rows]


def cached_rows(folder, split: str, width: int = 4096) -> list[tuple[int, list[int]]]:
    s = open_split(folder, split)
    assert s.ids.shape[1] == width
    for i in range(len(s)):
        assert not s.ids[i, s.lengths[i]:].any(), "padding must be 0"
    return [(int(s.labels[i]), s.ids[i, : s.lengths[i]].tolist()) for i in range(len(s))]


def prepare(source, data_dir, *overrides) -> object:
    argv = ["prepare", "text", "--source", str(source), "--data-dir", str(data_dir), "--quiet", *overrides]
    assert cli.main(argv) == 0
    return next((data_dir / "cache").glob("text-*"))


@pytest.fixture(scope="module")
def reviews():
    return imdb_reviews()


@pytest.mark.parametrize("kind", ["tree", "tar"])
def test_aclimdb_exact_tokens(tmp_path, reviews, kind):
    raw = tmp_path / "raw"
    src = write_aclimdb_tree(raw, reviews) if kind == "tree" else write_aclimdb_tar(raw / "aclImdb_v1.tar.gz", reviews)
    folder = prepare(src if kind == "tree" else raw, tmp_path / "data")
    for split, from_ in (("train", "train"), ("val", "test"), ("test", "test")):
        assert cached_rows(folder, split) == expected(reviews, from_), split
    longest = max(len(t.strip()) for _, _, _, t in reviews["train"])
    assert longest > 4000 and load_manifest(folder)["splits"]["train"]["length_percentiles"]["100"] == 4000


def test_lra_length_option_changes_the_cache(tmp_path, reviews):
    write_aclimdb_tree(tmp_path / "raw", reviews)
    assert cli.main(["prepare", "text", "--source", str(tmp_path / "raw"), "--data-dir", str(tmp_path / "d"),
                     "--quiet", "task.max_len=1024", "task.reader.text_len=1000"]) == 0
    folder = next((tmp_path / "d" / "cache").glob("text-*"))
    assert cached_rows(folder, "test", width=1024) == expected(reviews, "test", 1000)
    assert open_split(folder, "test").lengths.max() == 1000


def test_tfds_arrayrecord_folder(tmp_path, reviews):
    """A TFDS folder prepared by TFDS's imdb_reviews builder (ArrayRecord) is read without TensorFlow; it
    holds the same reviews as the archive, in TFDS's stored order; auto picks it over the aclImdb tree."""
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("array_record")
    archive = write_aclimdb_tar(tmp_path / "aclImdb_v1.tar.gz", reviews)
    version_dir = build_tfds_imdb(tmp_path / "tfds", archive)
    write_aclimdb_tree(tmp_path / "tfds", reviews)  # both kinds in one folder: auto must take TFDS
    assert TextReader().locate(tmp_path / "tfds") == version_dir
    assert TextReader(source_format="aclimdb").locate(tmp_path / "tfds") == tmp_path / "tfds" / "aclImdb"
    folder = prepare(tmp_path / "tfds", tmp_path / "data")
    for split, from_ in (("train", "train"), ("val", "test"), ("test", "test")):
        assert sorted(cached_rows(folder, split)) == sorted(expected(reviews, from_)), split
    stored = tfds.builder_from_directory(str(version_dir)).as_data_source(split="test")
    assert [r[1] for r in cached_rows(folder, "test")] == [[b + 1 for b in stored[i]["text"][:4000]]
                                                           for i in range(len(stored))]


def test_tfrecord_folder_without_tensorflow_is_a_clear_error(tmp_path, reviews):
    """A TFDS folder whose shards are TFRecord (TFDS's default; only TensorFlow reads it). TFRecord cannot be
    written here without TF, so the ArrayRecord folder is relabelled: the reader must refuse before reading."""
    pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("array_record")
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed: TFRecord folders are readable")
    version_dir = build_tfds_imdb(tmp_path / "tfds", write_aclimdb_tar(tmp_path / "a.tar.gz", reviews))
    info_path = version_dir / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    for f in version_dir.glob("*.array_record-*"):
        f.rename(f.with_name(f.name.replace("array_record", "tfrecord")))
    with pytest.raises(DataError, match="TensorFlow is not installed") as err:
        list(TextReader().read_split(version_dir, "train"))
    assert str(version_dir) in str(err.value) and "array_record" in str(err.value).lower()


def test_missing_folder_and_missing_source(tmp_path, reviews, capsys):
    root = write_aclimdb_tree(tmp_path / "raw", reviews)
    for f in (root / "test" / "neg").iterdir():
        f.unlink()
    (root / "test" / "neg").rmdir()
    assert cli.main(["prepare", "text", "--source", str(tmp_path / "raw"), "--data-dir", str(tmp_path / "d")]) == 2
    msg = capsys.readouterr().err
    assert str(root / "test" / "neg") in msg and "aclImdb" in msg
    assert cli.main(["prepare", "text", "--source", str(tmp_path / "empty"), "--data-dir", str(tmp_path / "d")]) == 2
    msg = capsys.readouterr().err
    assert "no IMDb reviews" in msg and "lra-data download text" in msg


def test_truncated_archive_names_the_member(tmp_path, reviews, capsys):
    archive = write_aclimdb_tar(tmp_path / "raw" / "aclImdb_v1.tar.gz", reviews)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) * 2 // 3])
    assert cli.main(["prepare", "text", "--source", str(tmp_path / "raw"), "--data-dir", str(tmp_path / "d")]) == 2
    msg = capsys.readouterr().err
    assert "truncated" in msg and "member 'aclImdb/" in msg and str(archive) in msg


def test_failed_prepare_keeps_the_previous_cache(tmp_path, reviews):
    root = write_aclimdb_tree(tmp_path / "raw", reviews)
    folder = prepare(tmp_path / "raw", tmp_path / "data")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    (root / "train" / "pos" / "99999_9.txt").write_bytes(b"new review")  # the source changed: a rebuild starts
    for f in (root / "test" / "neg").iterdir():  # ... writes train, then fails on val (test/neg is gone)
        f.unlink()
    (root / "test" / "neg").rmdir()
    with pytest.raises(DataError, match="test/neg' is missing"):
        build_cache(TextReader(), tmp_path / "raw", tmp_path / "data", progress=False)
    assert (folder.parent / f".{folder.name}.partial" / "train.done.json").is_file()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_one_training_step_from_raw_data(tmp_path, reviews, capsys):
    from lra.train import run

    write_aclimdb_tar(tmp_path / "data" / "aclImdb_v1.tar.gz", reviews)
    rec = run(smoke_config("text", tmp_path / "data", tmp_path))
    assert rec["status"] == "finished" and rec["steps"] == 1 and rec["task"] == "text"
    assert "text's validation set is its test set" in capsys.readouterr().out  # said wherever Text accuracy is
    assert os.path.isdir(tmp_path / "data" / "cache")
