"""Several processes preparing the same cache at once (a sweep, the ranks of a DDP job, two `lra-data prepare`):
one builds, the others wait and then use the finished cache; never a success over a broken one."""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lra.data.cache import SPLITS, _build_locked, build_cache, build_lock, cache_dir, fingerprint, open_split, resolve_cache
from lra.data.listops import ListOpsParams, ListOpsReader, generate_files

MAX_LEN = 64
ROUNDS = 6


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """Big enough that a build takes a noticeable moment (so two builds overlap), small enough to be quick."""
    out = tmp_path_factory.mktemp("raw")
    generate_files(out, 1500, 300, 300, seed=5, params=ListOpsParams(max_depth=4, max_args=5, min_length=5,
                                                                     max_length=MAX_LEN), crlf=False)
    return out


def _arrays(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.name.split(".")[-1] in ("u16", "i32", "i64")}


def _worker(data_dir: str, how: str, barrier) -> tuple[str, str, dict]:
    """One 'process of the sweep': the `lra-data prepare` path or the lra-train (resolve_cache) path."""
    reader = ListOpsReader(MAX_LEN)
    barrier.wait()
    try:
        if how == "prepare":
            folder = build_cache(reader, Path(data_dir), Path(data_dir), progress=False)
        else:
            folder = resolve_cache(reader, Path(data_dir), progress=False)
        return "ok", str(folder), {s: len(open_split(folder, s)) for s in SPLITS}
    except BaseException as err:  # noqa: BLE001 - reported to the test
        return "error", f"{type(err).__name__}: {err}", {}


def test_two_prepares_at_once_build_one_complete_cache(raw, tmp_path):
    ref_dir = tmp_path / "ref"
    shutil.copytree(raw, ref_dir)
    reference = _arrays(build_cache(ListOpsReader(MAX_LEN), ref_dir, ref_dir, progress=False))
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(2) as pool:
        barrier = manager.Barrier(2)
        for r in range(ROUNDS):
            data_dir = tmp_path / f"round{r}"
            shutil.copytree(raw, data_dir)  # lra-train's way: raw data and its cache in one data_dir
            hows = [("prepare", "prepare"), ("train", "train"), ("prepare", "train")][r % 3]
            results = pool.starmap(_worker, [(str(data_dir), how, barrier) for how in hows])
            assert [res[0] for res in results] == ["ok", "ok"], results
            folder = cache_dir(data_dir, ListOpsReader(MAX_LEN))
            assert {res[1] for res in results} == {str(folder)}
            assert all(res[2] == {"train": 1500, "val": 300, "test": 300} for res in results)
            assert _arrays(folder) == reference, f"round {r}: the cache differs from one built alone"
            leftovers = [p.name for p in (data_dir / "cache").iterdir() if p != folder and not p.name.endswith(".lock")]
            assert not leftovers, leftovers


def test_two_cli_prepares_at_once(raw, tmp_path):
    exe = str(Path(sys.executable).parent / "lra-data")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [exe, "prepare", "listops", "--source", str(raw), "--data-dir", str(tmp_path / "d"), "--quiet",
           f"task.max_len={MAX_LEN}"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("prepared listops cache" in o for o, _ in outs)
    folder = cache_dir(tmp_path / "d", ListOpsReader(MAX_LEN))
    assert [len(open_split(folder, s)) for s in SPLITS] == [1500, 300, 300]


class _Counting(ListOpsReader):
    reads = 0

    def read_split(self, root, split):
        type(self).reads += 1
        return super().read_split(root, split)


def test_a_waiting_prepare_reuses_the_cache_built_meanwhile(raw, tmp_path, capfd):
    reader = _Counting(MAX_LEN)
    final = cache_dir(tmp_path, reader)
    done: list = []
    with build_lock(final):  # "another process" holds the lock (a second open file: flock conflicts)
        waiter = threading.Thread(target=lambda: done.append(build_cache(reader, raw, tmp_path, progress=False)))
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive() and not done, "the second prepare did not wait"
        _build_locked(reader, reader.locate(raw), raw, final, fingerprint(reader.source_files(raw)), False)
        assert _Counting.reads == 3
    waiter.join(30)
    assert done == [final] and _Counting.reads == 3, "the waiting prepare built the cache again"
    assert "waiting for pid" in capfd.readouterr().err


def test_a_lock_held_by_a_killed_process_does_not_block(raw, tmp_path):
    final = cache_dir(tmp_path, ListOpsReader(MAX_LEN))
    final.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(final.with_name('.' + final.name + '.lock'))!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)\n")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait(10)
    t0 = time.monotonic()
    folder = build_cache(ListOpsReader(MAX_LEN), raw, tmp_path, progress=False)
    assert time.monotonic() - t0 < 20 and [len(open_split(folder, s)) for s in SPLITS] == [1500, 300, 300]
    assert np.asarray(open_split(folder, "test").labels).max() <= 9
