"""Checkpoint safety (a tampered run folder must not make lra-train fetch, unpickle, write or delete
anything), atomic writes through the checkpoint IO plugin, and the one Lightning internal the resume
callback relies on. The bad inputs are built here, from a real finished run's checkpoints."""
from __future__ import annotations

import pickle
import shutil
import socket
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lra.config import compose
from lra.train import run
from lra.training.callbacks import validates_after_this_batch
from lra.training.checkpoint_io import RunCheckpointIO
from lra.training.checkpoints import CheckpointError, checked_best_path, inside

ARGS = ["attention=softmax", "experiment=smoke", "logger=none", "task.max_len=40", "checkpoint_every=2"]


class Payload:
    """Unpickling this (without weights_only) runs open(marker, "w"): the marker proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _config(tmp: Path, data: Path, *extra: str):
    return compose([*ARGS, f"data_dir={data}", f"results_dir={tmp}/results", f"runs_root={tmp}/runs", *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, listops_dir):
    """A finished smoke run: its run folder, to copy and tamper with."""
    tmp = tmp_path_factory.mktemp("finished")
    rec = run(_config(tmp, listops_dir))
    return {"record": rec, "folder": Path(rec["run_dir"])}


def _fresh_copy(finished, tmp: Path, data: Path):
    """A copy of the finished run under `tmp` (same run id), its bookkeeping moved along with it (as if it
    had run there), to be rerun with skip_done=false."""
    cfg = _config(tmp, data, "skip_done=false")
    folder = tmp / "runs" / finished["record"]["run_id"]
    shutil.copytree(finished["folder"], folder)
    ckpt_dir = folder / "checkpoints"
    [best] = ckpt_dir.glob("best-step=*.ckpt")
    _tamper_best(ckpt_dir / "last.ckpt", str(best.resolve()))
    return cfg, ckpt_dir


def _tamper_best(last: Path, best: str) -> None:
    """Point the ModelCheckpoint bookkeeping in `last` at `best`, for this folder (so Lightning trusts it)."""
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    states = [s for s in ckpt["callbacks"].values() if isinstance(s, dict) and "best_model_path" in s]
    assert states, "no ModelCheckpoint state in last.ckpt"
    for state in states:
        state["dirpath"] = str(last.parent.resolve())
        state["best_model_path"] = state["kth_best_model_path"] = best
        state["best_k_models"] = {best: state["best_model_score"]}
    torch.save(ckpt, last)


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and skip not in p.parents}


@pytest.fixture
def no_network(monkeypatch):
    """Every outgoing connection is recorded and refused."""
    attempts: list = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


@pytest.mark.parametrize("kind", ["url", "absolute_outside", "dotdot", "malicious_last", "malicious_best"])
def test_tampered_checkpoints_are_refused(tmp_path: Path, listops_dir: Path, finished, no_network, kind: str):
    cfg, ckpt_dir = _fresh_copy(finished, tmp_path, listops_dir)
    last = ckpt_dir / "last.ckpt"
    [best] = ckpt_dir.glob("best-step=*.ckpt")
    marker = tmp_path / "code-ran.marker"
    outside = tmp_path / "elsewhere" / "x.ckpt"
    outside.parent.mkdir()
    shutil.copy(best, outside)  # a genuine checkpoint, but not this run's: must be neither read nor deleted
    if kind == "url":
        _tamper_best(last, "http://127.0.0.1:9/x.ckpt")
    elif kind == "absolute_outside":
        _tamper_best(last, str(outside))
    elif kind == "dotdot":
        _tamper_best(last, str(ckpt_dir / ".." / ".." / "elsewhere" / "x.ckpt"))
    else:  # a pickle that creates the marker when fully unpickled: as last.ckpt, or as the best checkpoint
        target = last if kind == "malicious_last" else best
        probe = tmp_path / "probe.pkl"  # the payload is real: full unpickling does run it
        torch.save({"x": Payload(tmp_path / "probe.marker")}, probe)
        torch.load(probe, weights_only=False)
        assert (tmp_path / "probe.marker").exists()
        torch.save({"global_step": 4, "state_dict": {}, "evil": Payload(marker)}, target)
    before_outside = _snapshot(tmp_path, ckpt_dir.parent)
    before_ckpts = sorted(p.name for p in ckpt_dir.iterdir())

    with pytest.raises(CheckpointError) as err:
        run(cfg)
    text = str(err.value)
    print(kind, "->", text)
    if kind == "malicious_best":
        assert "cannot load checkpoint" in text and best.name in text
    elif kind == "malicious_last":
        assert f"cannot resume from {last}" in text
    else:
        assert "cannot resume from" in text and "not a file inside this run's checkpoint folder" in text
        assert "resume=never" in text
    assert not marker.exists(), "unpickling ran code"
    assert no_network == [], f"network attempted: {no_network}"
    assert _snapshot(tmp_path, ckpt_dir.parent) == before_outside, "something outside the run folder changed"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == before_ckpts, "checkpoints written or deleted"
    assert not list(tmp_path.rglob("*.tmp*")), "partial file left behind"
    assert not list((tmp_path / "results").glob("*.json")), "a record was written"


def test_checkpoint_io_refuses_remote_and_outside_paths(tmp_path: Path, no_network):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    io = RunCheckpointIO(folder)
    (tmp_path / "victim.ckpt").write_bytes(b"keep me")
    for bad in ("http://127.0.0.1:9/x.ckpt", "s3://bucket/x.ckpt", str(tmp_path / "victim.ckpt"),
                str(folder / ".." / ".." / "victim.ckpt"), str(folder / "sub" / "x.ckpt")):
        for call in (lambda p: io.load_checkpoint(p), lambda p: io.remove_checkpoint(p),
                     lambda p: io.save_checkpoint({"a": 1}, p)):
            with pytest.raises(CheckpointError, match="refused checkpoint path"):
                call(bad)
        with pytest.raises(CheckpointError):
            checked_best_path(bad, folder)
    assert (tmp_path / "victim.ckpt").read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["victim.ckpt"]
    assert no_network == []
    link = folder / "link.ckpt"  # a symlink inside that points out is outside
    link.symlink_to(tmp_path / "victim.ckpt")
    with pytest.raises(CheckpointError):
        inside(link, folder)


def test_checkpoint_io_writes_atomically_and_loads_weights_only(tmp_path: Path, monkeypatch):
    io = RunCheckpointIO(tmp_path)
    io.save_checkpoint({"w": torch.ones(3), "step": 7}, tmp_path / "a.ckpt")
    assert io.load_checkpoint(tmp_path / "a.ckpt")["step"] == 7
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("weights_only")) or real(*a, **k))
    io.load_checkpoint(tmp_path / "a.ckpt", weights_only=False)  # asked for full unpickling: still weights only
    assert calls == [True]

    def cut(*a, **k):  # a write that dies midway leaves the previous file and no partial one
        raise OSError("disk full")

    monkeypatch.setattr("lra.atomic.os.replace", cut)
    with pytest.raises(OSError):
        io.save_checkpoint({"w": torch.zeros(3), "step": 8}, tmp_path / "a.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt"]
    assert io.load_checkpoint(tmp_path / "a.ckpt")["step"] == 7
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        (tmp_path / "b.ckpt").write_bytes(pickle.dumps(Payload(tmp_path / "m")))
        io.load_checkpoint(tmp_path / "b.ckpt")
    assert not (tmp_path / "m").exists()


class ValidationProbe(Callback):
    """A user callback added by override; records what `validates_after_this_batch` predicts and when
    validation really runs (it pins the Lightning internal that the resume callback asks)."""

    predicted: list[int] = []
    ran: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if validates_after_this_batch(trainer):
            self.predicted.append(trainer.global_step)

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.ran.append(trainer.global_step)


def test_validation_prediction_matches_lightning_and_user_callbacks_are_added(tmp_path: Path, listops_dir: Path):
    ValidationProbe.predicted.clear(), ValidationProbe.ran.clear()
    rec = run(_config(tmp_path, listops_dir, "trainer.max_steps=30", "trainer.val_check_interval=7",
                      f"+callbacks.probe._target_={__name__}.ValidationProbe"))
    assert rec["status"] == "finished"
    assert ValidationProbe.ran[:4] == [7, 14, 21, 28]
    assert ValidationProbe.predicted == ValidationProbe.ran
