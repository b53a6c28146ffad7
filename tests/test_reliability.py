"""Reliability: a run killed at any moment resumes to the very result of an uninterrupted one; SIGTERM
saves and exits without a record; mixed precision on every backend; a NaN loss fails the run; DDP on
CPU matches a single process with the same global batch; the resumable data order itself."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lra.config import attention_spec, backend_names, compose
from lra.data.datamodule import ResumableBatchSampler, ShardedEvalSampler, epoch_permutation
from lra.train import run
from lra.training.checkpoint_io import RunCheckpointIO
from lra.training.records import run_id
from models.attention import backend_class, capability
from models.classifier import build_model

BACKENDS = backend_names()
# 60 steps of a tiny model with dropout (so the RNG state matters) over 25 batches per epoch (200 / 8):
# resumes land mid-epoch, on epoch ends and on validation steps.
RESUME_ARGS = ["attention=nystrom", "experiment=smoke", "logger=none", "task.max_len=40", "trainer.max_steps=60",
               "trainer.val_check_interval=10", "trainer.limit_val_batches=null", "model.dropout=0.1",
               "optimizer.lr=3e-3"]
SAME = ("val_acc", "test_acc", "majority_acc", "best_step", "steps", "final_train_loss", "val_history")
TRICKY_STEPS = (10, 25, 37)  # a validation step (saved after it), the last batch of epoch 0, mid-epoch 1


def _exe(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def _records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def _step_of(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, listops_dir):
    """One uninterrupted run (last.ckpt every step), with copies of its checkpoint folder at TRICKY_STEPS."""
    root = tmp_path_factory.mktemp("reference")
    original = RunCheckpointIO.save_checkpoint

    def keep_copies(self, checkpoint, path, storage_options=None):
        original(self, checkpoint, path, storage_options)
        if Path(path).name == "last.ckpt" and checkpoint["global_step"] in TRICKY_STEPS:
            shutil.copytree(Path(path).parent, root / "snap" / str(checkpoint["global_step"]), dirs_exist_ok=True)

    RunCheckpointIO.save_checkpoint = keep_copies
    try:
        rec = run(compose([*RESUME_ARGS, f"data_dir={listops_dir}", f"results_dir={root}/runs",
                           f"runs_root={root}/ckpt", "checkpoint_every=1"]))
    finally:
        RunCheckpointIO.save_checkpoint = original
    final = root / "final.ckpt"  # the weights after the last step
    shutil.copy(root / "ckpt" / rec["run_id"] / "checkpoints" / "last.ckpt", final)
    return {"record": rec, "root": root, "final": final}


def _assert_same_result(rec: dict, ref: dict, final_ckpt: Path, ref_ckpt: Path) -> None:
    assert rec["status"] == "finished"
    for key in SAME:
        assert rec[key] == ref[key], f"{key}: resumed {rec[key]!r} != uninterrupted {ref[key]!r}"
    mine, theirs = _weights(final_ckpt), _weights(ref_ckpt)
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs), "final weights differ"


@pytest.mark.parametrize("step", TRICKY_STEPS)
def test_resume_from_a_checkpoint_repeats_the_uninterrupted_run(tmp_path: Path, listops_dir: Path, reference,
                                                                 step: int):
    cfg = compose([*RESUME_ARGS, f"data_dir={listops_dir}", f"results_dir={tmp_path}/runs",
                   f"runs_root={reference['root']}/ckpt", "checkpoint_every=60"])
    rid = run_id(cfg)
    assert rid == reference["record"]["run_id"]
    # the run's folder as it was right after last.ckpt of `step` was written (same path: Lightning
    # restores the best-checkpoint bookkeeping only into the folder it was saved in)
    folder = reference["root"] / "ckpt" / rid / "checkpoints"
    shutil.rmtree(folder)
    shutil.copytree(reference["root"] / "snap" / str(step), folder)
    rec = run(cfg)
    assert rec["resumed_from_step"] == step
    _assert_same_result(rec, reference["record"], folder / "last.ckpt", reference["final"])


def test_resume_refuses_a_checkpoint_written_for_other_data(tmp_path: Path, reference):
    """data_dir is not part of the run's identity: a regenerated set of another size must not be resumed into."""
    from lra.data.cache import DataError
    from lra.data.listops import ListOpsParams, generate_files

    generate_files(tmp_path / "other", 160, 40, 40, seed=3,
                   params=ListOpsParams(max_depth=3, max_args=4, min_length=5, max_length=40))
    cfg = compose([*RESUME_ARGS, f"data_dir={tmp_path}/other", f"results_dir={tmp_path}/runs",
                   f"runs_root={reference['root']}/ckpt"])
    folder = reference["root"] / "ckpt" / run_id(cfg) / "checkpoints"
    shutil.rmtree(folder)
    shutil.copytree(reference["root"] / "snap" / str(TRICKY_STEPS[-1]), folder)
    with pytest.raises(DataError, match="train_size 200 -> 160"):
        run(cfg)
    assert not list((tmp_path / "runs").glob("*.json"))


def _new_checkpoint(proc: subprocess.Popen, path: Path, seen, timeout: float = 120.0):
    """Poll until `path` is replaced by a new file (another inode or mtime); None if the process ended."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            st = path.stat()
            key = (st.st_ino, st.st_mtime_ns)
            if key != seen:
                return key
        except FileNotFoundError:
            pass
        time.sleep(0.003)
    return None


@pytest.mark.slow
def test_run_killed_repeatedly_resumes_to_the_identical_result(tmp_path: Path, listops_dir: Path, reference):
    """Two SIGKILLs at whatever moment follows a fresh checkpoint, then a SIGINT and a SIGTERM (each saves,
    says how to continue, exits 128 + signal, writes no record), then a run to the end: the final
    metrics, validation history and weights equal the uninterrupted run's to the last bit."""
    args = [_exe("lra-train"), *RESUME_ARGS, f"data_dir={listops_dir}", f"results_dir={tmp_path}/runs",
            f"runs_root={tmp_path}/ckpt", "checkpoint_every=3"]
    last = tmp_path / "ckpt" / reference["record"]["run_id"] / "checkpoints" / "last.ckpt"
    seen, steps = None, []
    for sig in (signal.SIGKILL, signal.SIGKILL, signal.SIGINT, signal.SIGTERM):
        proc = subprocess.Popen(args, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        seen = _new_checkpoint(proc, last, seen)
        assert seen is not None, f"no new checkpoint before the run ended: {proc.communicate()[1][-2000:]}"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
        else:  # saved at the next resumable point, said how to continue, wrote no record
            assert proc.returncode == 128 + sig, err[-2000:]
            assert f"stopped by {sig.name}" in err and "continues it" in err and "Traceback" not in err
        assert not list((tmp_path / "runs").glob("*.json")), "an interrupted run wrote a record"
        seen = (last.stat().st_ino, last.stat().st_mtime_ns)
        steps.append(_step_of(last))
    print(f"last.ckpt step after each stop (KILL, KILL, INT, TERM): {steps}")
    assert steps == sorted(set(steps)) and steps[-1] < 60, f"checkpoint steps after each stop: {steps}"
    done = subprocess.run(args, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"(step {steps[-1]})" in done.stdout
    [rec] = _records(tmp_path / "runs")
    assert rec["resumed_from_step"] == steps[-1]
    _assert_same_result(rec, reference["record"], last, reference["final"])
    assert not list(tmp_path.rglob("*.tmp*")), "partial files left behind"


def test_bf16_mixed_runs_every_backend(tmp_path: Path, listops_dir: Path):
    for name in BACKENDS:
        rec = run(compose([f"attention={name}", "experiment=smoke", f"data_dir={listops_dir}", "logger=none",
                           f"results_dir={tmp_path}/runs", f"runs_root={tmp_path}/ckpt", "task.max_len=40",
                           "precision=bf16-mixed", "trainer.max_steps=2"]))
        assert rec["status"] == "finished" and rec["precision"] == "bf16-mixed", name
        assert math.isfinite(rec["final_train_loss"]), name
        own = capability(backend_class(rec["config"]["attention"]["_target_"]), "mixed_precision")
        assert rec["mixed_precision_policy"].startswith("autocast bf16")
        assert own is None or own in rec["mixed_precision_policy"], name


def test_precision_modes_on_cpu_are_what_they_say(tmp_path: Path, listops_dir: Path):
    def loss(precision: str) -> dict:
        return run(compose(["attention=softmax", "experiment=smoke", f"data_dir={listops_dir}", "logger=none",
                            f"results_dir={tmp_path}/{precision}", f"runs_root={tmp_path}/ckpt", "task.max_len=40",
                            f"precision={precision}", "trainer.max_steps=2"]))

    fp32, bf16, fp16 = loss("32"), loss("bf16-mixed"), loss("16-mixed")
    assert fp32["precision"] == "32-true" and fp32["mixed_precision_policy"] == "fp32 throughout"
    assert fp32["run_id"] == run_id(compose(["attention=softmax", "experiment=smoke", "task.max_len=40",
                                             "precision=32-true", "trainer.max_steps=2"]))  # 32 is an alias
    assert fp16["precision"] == "16-mixed"  # real fp16 autocast with a CPU GradScaler, not a silent bf16
    losses = [fp32["final_train_loss"], bf16["final_train_loss"], fp16["final_train_loss"]]
    assert all(math.isfinite(x) for x in losses)
    assert len(set(losses)) == 3, f"the three precisions computed identical losses {losses}: autocast is not on"
    assert all(abs(x - losses[0]) < 0.05 for x in losses)


def test_nonfinite_loss_fails_the_run_with_a_failed_record(tmp_path: Path, listops_dir: Path):
    p = subprocess.run([_exe("lra-train"), "experiment=smoke", f"data_dir={listops_dir}", "logger=none",
                        f"results_dir={tmp_path}/runs", f"runs_root={tmp_path}/ckpt", "task.max_len=40",
                        "optimizer.lr=1e30"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 2, p.stderr[-2000:]
    [line] = [l for l in p.stderr.splitlines() if l.startswith("lra-train: error:")]
    assert "training loss is nan" in line or "training loss is inf" in line
    assert "Traceback" not in p.stderr
    [rec] = _records(tmp_path / "runs")
    assert rec["status"] == "failed" and rec["test_acc"] is None and rec["val_acc"] is None
    assert "training loss is" in rec["error"]


@pytest.mark.slow
def test_ddp_on_cpu_matches_one_process_with_the_same_global_batch(tmp_path: Path, listops_dir: Path):
    common = ["attention=nystrom", "experiment=smoke", f"data_dir={listops_dir}", "logger=none", "task.max_len=40",
              "trainer.max_steps=30", "trainer.val_check_interval=10", "trainer.limit_val_batches=null",
              "trainer.limit_test_batches=null", "data.batch_size=16", "optimizer.lr=3e-3", "checkpoint_every=10"]
    p = subprocess.run([_exe("lra-train"), *common, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                        f"results_dir={tmp_path}/ddp", f"runs_root={tmp_path}/ddp-ckpt"],
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    [ddp] = _records(tmp_path / "ddp")  # exactly one record: rank 0's
    one = run(compose([*common, f"results_dir={tmp_path}/one", f"runs_root={tmp_path}/one-ckpt"]))
    assert ddp["world_size"] == 2 and one["world_size"] == 1 and ddp["steps"] == one["steps"] == 30
    assert ddp["config"]["data"]["batch_size"] == one["config"]["data"]["batch_size"] == 16  # the global batch
    gap = abs(ddp["final_train_loss"] - one["final_train_loss"])
    print(f"DDP vs one process: final train loss gap {gap:.3g}, val {ddp['val_history']} vs {one['val_history']}, "
          f"test {ddp['test_acc']} vs {one['test_acc']}")
    assert gap < 1e-4
    assert [s for s, _ in ddp["val_history"]] == [10, 20, 30]
    for (_, a), (_, b) in zip(ddp["val_history"], one["val_history"]):
        assert abs(a - b) <= 100 / 40 + 1e-6  # at most one of the 40 validation examples apart
    assert abs(ddp["test_acc"] - one["test_acc"]) <= 100 / 40 + 1e-6
    files = sorted(f.name for f in (tmp_path / "ddp-ckpt" / ddp["run_id"] / "checkpoints").iterdir())
    assert files == sorted([f"best-step={ddp['best_step']}.ckpt", "last.ckpt"]), files
    assert not [line for line in p.stderr.splitlines() if "error:" in line], p.stderr[-2000:]


# -- the data order, without a trainer -------------------------------------------------------------------
def test_training_order_is_resumable_and_split_across_processes():
    n, batch, seed = 103, 12, 7
    one = ResumableBatchSampler(n, batch, seed)
    stream = [b for _ in range(3) for b in one]  # three epochs, 8 batches each (the tail of 7 dropped)
    assert len(one) == 8 and len(stream) == 24 and all(len(b) == batch for b in stream)
    assert sorted(sum(stream[:8], [])) == sorted(epoch_permutation(n, seed, 0)[:96].tolist())
    assert stream[:8] != stream[8:16]  # a new order each epoch
    for start in (0, 5, 8, 13):  # a resumed sampler continues the same stream, mid-epoch or not
        resumed = ResumableBatchSampler(n, batch, seed, start=start)
        assert [b for _ in range(3) for b in resumed][: 24 - start] == stream[start:]
    halves = [ResumableBatchSampler(n, batch, seed, rank=r, world_size=2) for r in (0, 1)]
    for (a, b), whole in zip(zip(*halves), stream):  # two processes together see the single process's batch
        assert len(a) == len(b) == batch // 2 and a + b == whole
    assert [b for b in ResumableBatchSampler(n, batch, seed + 1)] != stream[:8]


def test_evaluation_shards_count_every_example_once():
    for n, world in ((40, 2), (41, 2), (10, 3), (5, 4)):
        shards = [sum(ShardedEvalSampler(n, 3, r, world), []) for r in range(world)]
        assert len({len(s) for s in shards}) == 1  # every process runs the same number of batches
        real = sorted(i for s in shards for i in s if i >= 0)
        assert real == list(range(n))


@pytest.mark.parametrize("name", BACKENDS)
def test_every_parameter_gets_a_gradient(name: str):
    """DDP (find_unused_parameters=False) needs every parameter to take part in each step."""
    opts = {"nystrom": {"num_landmarks": 8, "conv_kernel": 3}, "linformer": {"proj_dim": 8},
            "performer": {"num_features": 16}}.get(name, {})
    net = build_model(head="pooled", vocab_size=20, num_classes=10, max_len=40, attention=attention_spec(name) | opts,
                      dim=16, depth=1, heads=2, head_dim=8, ffn_dim=32)
    ids = torch.randint(1, 20, (4, 40))
    mask = torch.arange(40)[None, :] < torch.tensor([40, 30, 20, 10])[:, None]
    net({"input_ids": ids, "mask": mask}).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
