"""Training through the real Hydra configs: composition of every task x backend, a smoke run per
backend, the result record, a sweep, and the errors a user sees."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate

from lra.config import backend_names, compose, task_names
from lra.train import run
from lra.training.run import build_net
from models.attention import AttentionConfigError, backend_class, capability

BACKENDS = backend_names()
TASKS = task_names()
RECORD_FIELDS = {"task", "attention", "seed", "val_acc", "test_acc", "steps", "train_seconds", "peak_memory_mb",
                 "params", "config", "git_sha", "versions", "status", "config_hash", "protocol", "best_step",
                 "hardware", "majority_acc", "final_train_loss", "val_history", "precision", "mixed_precision_policy",
                 "world_size", "resumed_from_step"}


def smoke_overrides(tmp: Path, data_dir: Path, attention: str, *extra: str) -> list[str]:
    return [f"attention={attention}", "experiment=smoke", f"data_dir={data_dir}", f"results_dir={tmp}/runs",
            f"runs_root={tmp}/rf", "logger=none", "task.max_len=40", *extra]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("attention", BACKENDS)
def test_every_task_and_backend_composes_and_builds(task: str, attention: str):
    cfg = compose([f"task={task}", f"attention={attention}", "model.depth=1"])
    reader = instantiate(cfg.task.reader)
    assert reader.num_classes == cfg.task.num_classes
    try:
        net = build_net(cfg, reader.vocab_size, reader.num_classes)  # the driver's own builder
    except AttentionConfigError as err:  # the contract lets a length-bound backend refuse a length at build
        assert capability(backend_class(cfg.attention._target_), "needs_max_len"), err
        assert str(cfg.model.max_len) in str(err), err
        return
    assert sum(p.numel() for p in net.parameters()) > 0


@pytest.mark.parametrize("attention", BACKENDS)
def test_smoke_training_run_writes_record(tmp_path: Path, listops_dir: Path, attention: str):
    cfg = compose(smoke_overrides(tmp_path, listops_dir, attention))
    rec = run(cfg)
    assert RECORD_FIELDS <= set(rec)
    assert rec["status"] == "finished" and rec["steps"] == 4 and rec["attention"] == attention
    assert 0 <= rec["test_acc"] <= 100 and 0 <= rec["val_acc"] <= 100
    assert all(isinstance(v, float) for v in rec["attention_stats"].values())  # {} for a backend without any
    folder = Path(rec["run_dir"])
    assert folder == (tmp_path / "rf" / rec["run_id"]).resolve() and (folder / "config.yaml").is_file()
    on_disk = json.loads((tmp_path / "runs" / f"{rec['run_id']}.json").read_text())
    assert on_disk["test_acc"] == rec["test_acc"] and on_disk["config"]["attention"]["name"] == attention
    assert not list((tmp_path / "runs").glob(".*tmp*")), "temporary files left behind"
    # a second identical run is recognised by its config hash and skipped
    again = run(compose(smoke_overrides(tmp_path, listops_dir, attention)))
    assert again["created"] == rec["created"]


def test_relative_output_paths(tmp_path: Path, listops_dir: Path, monkeypatch):
    """Relative results_dir/ckpt_root (the defaults are relative) resolve against the working folder,
    and the best checkpoint survives to be tested."""
    monkeypatch.chdir(tmp_path)
    cfg = compose(["attention=softmax", "experiment=smoke", f"data_dir={listops_dir}", "results_dir=rel/runs",
                   "runs_root=rel/rf", "logger=none", "task.max_len=40"])
    rec = run(cfg)
    assert rec["status"] == "finished" and rec["best_step"] in (2, 4)
    assert (tmp_path / "rel" / "runs" / f"{rec['run_id']}.json").is_file()
    assert list((tmp_path / "rel" / "rf" / rec["run_id"] / "checkpoints").glob("best-step=*.ckpt"))


def test_seeded_runs_are_identical_and_seeds_differ(tmp_path: Path, listops_dir: Path):
    def result(seed: int, sub: str) -> dict:
        return run(compose(smoke_overrides(tmp_path / sub, listops_dir, "nystrom", f"seed={seed}")))

    a, b, c = result(1, "a"), result(1, "b"), result(2, "c")
    ignore = {"train_seconds", "steps_per_second", "peak_memory_mb", "created", "config", "command", "run_dir"}
    assert {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}
    assert a["config_hash"] != c["config_hash"]
    # a different seed computes something else, not just another hash: other weights, other losses
    assert a["final_train_loss"] != c["final_train_loss"]
    assert len(a["val_history"]) == len(c["val_history"]) == 2  # validation at steps 2 and 4


def _cli(*args: str, cwd: Path, env_extra: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    exe = Path(sys.executable).parent / "lra-train"
    return subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_run_and_sweep(tmp_path: Path, listops_dir: Path):
    common = [f"data_dir={listops_dir}", f"results_dir={tmp_path}/runs", f"runs_root={tmp_path}/rf",
              "experiment=smoke", "logger=csv", "task.max_len=40"]
    p = _cli("-m", "attention=softmax,linformer", *common, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    recs = sorted(json.loads(f.read_text())["attention"] for f in (tmp_path / "runs").glob("*.json"))
    assert recs == ["linformer", "softmax"]
    assert len(list((tmp_path / "rf").glob("*/csv/metrics.csv"))) == 2
    assert len(list((tmp_path / "rf").glob("*/config.yaml"))) == 2
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


@pytest.mark.parametrize(
    "overrides, expect",
    [
        (["data_dir={tmp}/nothing-here"], "lra-data generate listops"),
        (["attention.name=flash9"], "attention.name=flash9 but the attention config is attention/nystrom.yaml"),
        (["attention=linformer", "model.max_len=20"], "model.max_len=20 is shorter"),
        (["attention=nystrom", "attention.conv_kernel=4"], "conv_kernel"),
    ],
)
def test_cli_errors_are_one_paragraph(tmp_path: Path, listops_dir: Path, overrides: list[str], expect: str):
    args = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    p = _cli(f"data_dir={listops_dir}", f"results_dir={tmp_path}/runs", f"runs_root={tmp_path}/rf",
             "experiment=smoke", "logger=none", "task.max_len=40", *args, cwd=tmp_path)
    assert p.returncode == 2, p.stdout[-1500:] + p.stderr[-1500:]
    assert expect in p.stderr
    assert "Traceback" not in p.stderr
    err_lines = [l for l in p.stderr.splitlines() if l.startswith("lra-train: error:")]
    assert len(err_lines) == 1
    # a failed run leaves a failed record, never a finished one
    recs = [json.loads(f.read_text()) for f in (tmp_path / "runs").glob("*.json")]
    assert all(r["status"] == "failed" and r["test_acc"] is None for r in recs)


def test_unknown_backend_group_lists_options(tmp_path: Path):
    p = _cli("attention=flash9", cwd=tmp_path, timeout=60)
    assert p.returncode != 0
    assert "nystrom" in p.stderr and "softmax" in p.stderr


def test_attention_stats_are_averaged_over_the_modules_that_report_them():
    from torch import nn

    from lra.training.run import attention_stats

    class Reports(nn.Module):
        def __init__(self, stats: dict):
            super().__init__()
            self.stats = stats

        def attention_stats(self) -> dict[str, float]:
            return self.stats

    net = nn.Sequential(nn.Linear(2, 2), Reports({"a": 1.0, "b": 4.0}), nn.Sequential(Reports({"a": 3.0})),
                        Reports({}))
    assert attention_stats(net) == {"a": 2.0, "b": 4.0}
    assert attention_stats(nn.Linear(2, 2)) == {}
