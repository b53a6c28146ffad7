"""Pathfinder and Path-X: the release layout (text metadata, one empty and one corrupt PNG), either
nesting level, the seeded 80/10/10 split, exact pixel tokens, bad metadata, one training step."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from fixtures_lra import smoke_config, write_pathfinder
from lra.data import cli
from lra.data.cache import DataError, open_split
from lra.data.pathfinder import PathfinderReader

HARD = "curv_contour_length_14"


def release(root, resolution: int = 32, outer_decoy: bool = False):
    """A tiny release: 3 batches x 10 images of the hard difficulty (one empty, one corrupt PNG), plus an
    easy-difficulty folder and, optionally, a different outer copy of the resolution folder."""
    inner = root / "lra_release" / "lra_release" / f"pathfinder{resolution}"
    good = write_pathfinder(inner / HARD, resolution, 3, 10, seed=0, empty=(0, 4), corrupt=(2, 7))
    write_pathfinder(inner / "curv_baseline", resolution, 1, 5, seed=9)
    if outer_decoy:
        write_pathfinder(root / "lra_release" / f"pathfinder{resolution}" / HARD, resolution, 1, 4, seed=7)
    return inner / HARD, good


def cached(folder, split, resolution):
    s = open_split(folder, split)
    assert s.ids.shape[1] == resolution ** 2 and (s.lengths == resolution ** 2).all()
    return [(s.ids[i].astype(np.uint8).tobytes(), int(s.labels[i])) for i in range(len(s))]


@pytest.mark.parametrize("level", ["", "lra_release", "lra_release/lra_release", "lra_release/lra_release/pathfinder32",
                                   f"lra_release/lra_release/pathfinder32/{HARD}"])
def test_release_layout_exact_tokens(tmp_path, level, caplog):
    task_dir, good = release(tmp_path / "raw")
    src = tmp_path / "raw" / level if level else tmp_path / "raw"
    with caplog.at_level(logging.WARNING, logger="lra.data.pathfinder"):
        assert cli.main(["prepare", "pathfinder", "--source", str(src), "--data-dir", str(tmp_path / "d"),
                         "--quiet"]) == 0
    assert "sample_4.png" in caplog.text and "imgs/2/sample_7.png" in caplog.text  # counted, named, not fatal
    folder = next((tmp_path / "d" / "cache").glob("pathfinder-*"))
    splits = {s: cached(folder, s, 32) for s in ("train", "val", "test")}
    want = sorted((px.tobytes(), y) for px, y in good.values())
    assert sorted(sum(splits.values(), [])) == want  # every good image exactly once, pixels and label exact
    # 29 listed non-empty images split 23 / 2 / 4, minus the corrupt one wherever it fell
    sizes = tuple(len(v) for v in splits.values())
    assert sizes in {(22, 2, 4), (23, 1, 4), (23, 2, 3)}


def test_split_is_seeded(tmp_path):
    task_dir, _ = release(tmp_path)

    def train_set(seed):
        r = PathfinderReader(seed=seed)
        return {e.ids.tobytes() for e in r.read_split(r.locate(tmp_path), "train")}

    assert train_set(0) == train_set(0)
    assert train_set(0) != train_set(1)
    assert PathfinderReader(seed=0).cache_key() != PathfinderReader(seed=1).cache_key()


def test_difficulty_is_a_parameter(tmp_path):
    release(tmp_path)
    easy = PathfinderReader(difficulty="easy")
    root = easy.locate(tmp_path)
    assert root.name == "curv_baseline"
    assert sum(len(list(easy.read_split(root, s))) for s in ("train", "val", "test")) == 5


def test_too_many_bad_images_is_an_error_naming_them(tmp_path):
    task_dir, _ = release(tmp_path)
    r = PathfinderReader(max_skipped=1)
    root = r.locate(tmp_path)
    with pytest.raises(DataError, match="sample_7.png") as err:
        for s in ("train", "val", "test"):
            list(r.read_split(root, s))
    assert "max_skipped=1" in str(err.value) and "sample_4.png" in str(err.value)


def test_bad_metadata_line(tmp_path, capsys):
    task_dir, _ = release(tmp_path)
    meta = task_dir / "metadata" / "1.npy"
    lines = meta.read_text().splitlines(keepends=True)
    lines[5] = "imgs/1 sample_5.png 5 7 1.0 14 2 2 1.5 1 1\n"
    meta.write_text("".join(lines))
    assert cli.main(["prepare", "pathfinder", "--source", str(tmp_path), "--data-dir", str(tmp_path / "d")]) == 2
    msg = capsys.readouterr().err
    assert f"{meta}:6:" in msg and "label 0/1" in msg


def test_binary_npy_metadata_is_read(tmp_path):
    """The upstream generator's numpy.save form (a string array) reads like the release's text form."""
    task_dir, good = release(tmp_path)
    meta = task_dir / "metadata" / "0.npy"
    rows = [line.split() for line in meta.read_text().splitlines()]
    with open(meta, "wb") as f:
        np.save(f, np.array(rows))
    r = PathfinderReader()
    assert len(r.records(r.locate(tmp_path))) == 29


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=f"pathfinder32/{HARD}") as err:
        PathfinderReader().locate(tmp_path)
    assert "lra-data unpack" in str(err.value) and "lra-data generate pathfinder" in str(err.value)


def test_pathx_reads_the_inner_pathfinder128(tmp_path, capsys):
    """Path-X: 128x128 -> 16,384 tokens; the inner copy of pathfinder128 wins over the outer extra copy."""
    task_dir, good = release(tmp_path / "raw", resolution=128, outer_decoy=True)
    assert cli.main(["prepare", "pathx", "--source", str(tmp_path / "raw"), "--data-dir", str(tmp_path / "d"),
                     "--quiet"]) == 0
    folder = next((tmp_path / "d" / "cache").glob("pathx-*"))
    got = sorted(sum((cached(folder, s, 128) for s in ("train", "val", "test")), []))
    assert got == sorted((px.tobytes(), y) for px, y in good.values())
    capsys.readouterr()
    assert cli.main(["stats", "pathx", "--data-dir", str(tmp_path / "d"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["max_len"] == 16384 and sum(v["n"] for v in stats["splits"].values()) == len(good)


@pytest.mark.parametrize("task, resolution", [("pathfinder", 32), ("pathx", 128)])
def test_one_training_step(tmp_path, task, resolution):
    from lra.train import run

    release(tmp_path / "data", resolution=resolution)
    rec = run(smoke_config(task, tmp_path / "data", tmp_path))
    assert rec["status"] == "finished" and rec["steps"] == 1 and rec["task"] == task
