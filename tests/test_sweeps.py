"""Protocol presets, sweeps (interrupted and resumed; failures recorded, sweep goes on), the W&B
offline run, and the SLURM launcher config."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.utils import instantiate

from lra.config import CONF_DIR, backend_names, compose
from lra.published import protocol_backends
from lra.train import build, run
from models.attention import AttentionConfigError, backend_class, capability

PRESETS = sorted(str(p.relative_to(CONF_DIR / "experiment").with_suffix(""))
                 for p in (CONF_DIR / "experiment").rglob("*.yaml"))
LRA_TASKS = ("listops", "text", "retrieval", "image", "pathfinder")


@pytest.mark.parametrize("attention", backend_names())
@pytest.mark.parametrize("preset", PRESETS)
def test_every_experiment_preset_composes(preset: str, attention: str):
    cfg = compose([f"experiment={preset}", f"attention={attention}"])
    try:
        dm, module = build(cfg)  # reader, model (backend options included), optimizer and scheduler factories
    except AttentionConfigError as err:  # the contract lets a length-bound backend refuse a length at build
        assert capability(backend_class(cfg.attention._target_), "needs_max_len"), err
        assert f"max_len={cfg.model.max_len}" in str(err) or str(cfg.model.max_len) in str(err), err
        return
    assert dm.reader.max_len <= cfg.model.max_len
    module.configure_optimizers()
    if "/" in preset:
        assert cfg.protocol == preset.split("/")[0]
        # the file names its task, optionally followed by the padded length of a variant (check/listops512)
        assert re.fullmatch(rf"{re.escape(cfg.task.name)}(\d+)?", preset.split("/")[1]), preset
        if preset.split("/")[1] != cfg.task.name:
            assert preset.split("/")[1] == f"{cfg.task.name}{cfg.task.max_len}", preset


def test_protocol_presets_cover_the_tasks():
    assert {p for p in PRESETS if p.startswith("nystromformer/")} == {f"nystromformer/{t}" for t in LRA_TASKS}
    assert {p for p in PRESETS if p.startswith("lra/")} == {f"lra/{t}" for t in (*LRA_TASKS, "pathx")}
    c = compose(["experiment=lra/image"])
    assert (c.model.depth, c.model.dim, c.model.heads, c.model.ffn_dim, c.model.dropout) == (1, 128, 8, 128, 0.3)


def test_slurm_launcher_config_composes():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                            return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.launcher.gpus_per_node == 1


def _lra_train(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen([str(Path(sys.executable).parent / "lra-train"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sweep_interrupted_and_resumed_skips_finished_runs(tmp_path: Path, listops_dir: Path):
    runs = tmp_path / "runs"
    # 300 steps per run (a few seconds) so the kill reliably lands while the second run trains
    args = ["-m", "seed=1,2", "attention=softmax", "experiment=smoke", f"data_dir={listops_dir}",
            f"results_dir={runs}", f"runs_root={tmp_path}/ckpt", "logger=none", "task.max_len=40",
            "trainer.max_steps=300", "trainer.val_check_interval=100"]
    p = _lra_train(args, tmp_path)
    deadline = time.time() + 180
    while time.time() < deadline and not list(runs.glob("*.json")):
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)  # interrupt the sweep once the first run has its record
    p.wait()
    first = {f.name: json.loads(f.read_text()) for f in runs.glob("*.json")}
    assert len(first) == 1, "the sweep should have been interrupted after its first run"
    p = _lra_train(args, tmp_path)
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out[-2000:]
    assert out.count("finished record exists, skipping") == 1
    recs = {f.name: json.loads(f.read_text()) for f in runs.glob("*.json")}
    assert len(recs) == 2 and {r["seed"] for r in recs.values()} == {1, 2}
    name, rec = next(iter(first.items()))
    assert recs[name]["created"] == rec["created"], "the finished run was rerun"


def test_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path: Path, listops_dir: Path):
    runs = tmp_path / "runs"
    p = _lra_train(["-m", "model.max_len=20,40", "attention=linformer", "experiment=smoke",
                    f"data_dir={listops_dir}", f"results_dir={runs}", f"runs_root={tmp_path}/ckpt",
                    "logger=none", "task.max_len=40"], tmp_path)
    out, _ = p.communicate(timeout=240)
    recs = sorted((json.loads(f.read_text()) for f in runs.glob("*.json")), key=lambda r: r["config"]["model"]["max_len"])
    assert [r["status"] for r in recs] == ["failed", "finished"], out[-2000:]
    assert "model.max_len=20 is shorter" in recs[0]["error"] and recs[0]["test_acc"] is None
    assert recs[1]["test_acc"] is not None


def test_wandb_offline_run_holds_the_result_table(tmp_path: Path, listops_dir: Path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = compose(["attention=nystrom", "experiment=smoke", f"data_dir={listops_dir}", f"results_dir={tmp_path}/runs",
                   f"runs_root={tmp_path}/rf", "logger=wandb", "task.max_len=40"])
    rec = run(cfg)
    run_dirs = list((tmp_path / "rf" / rec["run_id"] / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    assert list(run_dirs[0].glob("*.wandb"))
    tables = list(run_dirs[0].glob("files/media/table/result_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    row = dict(zip(table["columns"], table["data"][0]))
    assert row["run_id"] == rec["run_id"] and row["test_acc"] == pytest.approx(rec["test_acc"])
    # wandb 0.31 keeps an offline run's config, metrics and summary in the binary .wandb log (protobuf
    # records, keys stored as plain bytes): the resolved config and the split metrics must be in it.
    # wandb's service process flushes that log shortly after finish(): wait for it (bounded).
    wanted = (b"num_landmarks", b"pinv_iterations", b"train/loss", b"val/acc", b"test/acc", b"majority_acc")
    deadline = time.time() + 30
    while True:
        log = next(run_dirs[0].glob("*.wandb")).read_bytes()
        if all(k in log for k in wanted) or time.time() > deadline:
            break
        time.sleep(0.5)
    for key in wanted:
        assert key in log, key


def test_make_reproduce_prints_the_exact_commands():
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}  # under `make test`
    out = subprocess.run(["make", "--no-print-directory", "-n", "reproduce-nystromformer", f"STAMP={root / 'pyproject.toml'}"],
                         cwd=root, capture_output=True, text=True, timeout=60, env=env).stdout
    trains = [l for l in out.splitlines() if "lra-train -m" in l]
    backends = protocol_backends("nystromformer")  # the paper's rows (lra/published.py), not a Makefile list
    assert len(trains) == len(LRA_TASKS) * len(backends)
    for task in LRA_TASKS:
        assert f"lra-data check {task} --data-dir data/{task}" in out
        assert sum(f"experiment=nystromformer/{task} " in l for l in trains) == len(backends)
    assert not any(" attention." in l or " model." in l for l in trains)  # options live in the presets
    assert "lra-leaderboard" in out.splitlines()[-1]


def _wandb_log(run_dir: Path, wanted: tuple[bytes, ...], timeout: float = 30) -> bytes:
    """The run's binary .wandb log once it holds every key of `wanted` (wandb flushes it shortly after
    finish), or as it is after `timeout` seconds."""
    deadline = time.time() + timeout
    while True:
        log = b"".join(p.read_bytes() for p in run_dir.glob("*.wandb"))
        if all(k in log for k in wanted) or time.time() > deadline:
            return log
        time.sleep(0.5)


def test_sweep_with_a_failing_run_keeps_every_wandb_run_separate(tmp_path: Path, listops_dir: Path):
    """The middle job's loss turns NaN mid-training (its W&B run is open by then): it must be finished,
    so the third job gets its own W&B run instead of writing into the failed one."""
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    p = subprocess.run([str(Path(sys.executable).parent / "lra-train"), "-m", "optimizer.lr=1e-3,1e30,2e-3",
                        "attention=softmax", "experiment=smoke", f"data_dir={listops_dir}", "logger=wandb",
                        f"results_dir={tmp_path}/results", f"runs_root={tmp_path}/runs", "task.max_len=40"],
                       cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = {json.loads(f.read_text())["config"]["optimizer"]["lr"]: json.loads(f.read_text())
            for f in (tmp_path / "results").glob("*.json")}
    assert [recs[lr]["status"] for lr in (1e-3, 1e30, 2e-3)] == ["finished", "failed", "finished"]
    for lr, rec in recs.items():
        [wandb_run] = (tmp_path / "runs" / rec["run_id"] / "wandb").glob("offline-run-*")
        assert wandb_run.name.endswith(rec["run_id"])  # its own W&B run, named by its run id
        if rec["status"] == "finished":
            log = _wandb_log(wandb_run, (b"test/acc", b"train/loss"))
            assert b"test/acc" in log and b"train/loss" in log, lr
        else:
            log = _wandb_log(wandb_run, (b"train/loss",))
            assert b"test/acc" not in log, "the failed run's W&B log holds another run's test metrics"
    assert len(list((tmp_path / "runs").glob("*/wandb/offline-run-*"))) == 3
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


@pytest.mark.parametrize("respect_env", [False, True])
def test_logger_mode_wins_over_an_inherited_wandb_mode(tmp_path: Path, listops_dir: Path, respect_env: bool):
    """The process inherits WANDB_MODE=disabled; the config says offline (the default)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    p = subprocess.run([str(Path(sys.executable).parent / "lra-train"), "attention=softmax", "experiment=smoke",
                        f"data_dir={listops_dir}", "logger=wandb", f"logger.wandb.respect_env={str(respect_env).lower()}",
                        f"results_dir={tmp_path}/runs", f"runs_root={tmp_path}/rf", "task.max_len=40",
                        "trainer.max_steps=2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    [rec] = [json.loads(f.read_text()) for f in (tmp_path / "runs").glob("*.json")]
    made = list((tmp_path / "rf" / rec["run_id"] / "wandb").glob("offline-run-*"))
    assert len(made) == (0 if respect_env else 1)  # offline (the config) unless told to take the environment
