"""`lra-eval`: a finished run's best checkpoint, evaluated again, gives exactly the recorded accuracies;
a model setting that differs from the checkpoint's is refused; the record is written on request."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lra.config import compose
from lra.eval import evaluate
from lra.train import run
from lra.training.schema import ConfigError


@pytest.fixture(scope="module")
def finished(tmp_path_factory, listops_dir):
    tmp = tmp_path_factory.mktemp("eval")
    rec = run(compose(["attention=nystrom", "experiment=smoke", "logger=none", "task.max_len=40",
                       "trainer.max_steps=6", f"data_dir={listops_dir}", f"results_dir={tmp}/results",
                       f"runs_root={tmp}/runs"]))
    [best] = (Path(rec["run_dir"]) / "checkpoints").glob("best-step=*.ckpt")
    return rec, best


def test_eval_reproduces_the_recorded_accuracies(finished):
    rec, best = finished
    out = evaluate(str(best), split="both")
    assert out["test_acc"] == rec["test_acc"] and out["val_acc"] == rec["val_acc"]
    assert out["run_id"] == rec["run_id"] and out["majority_acc"] == rec["majority_acc"]


def test_eval_refuses_other_model_settings(finished):
    _, best = finished
    with pytest.raises(ConfigError, match=r"model\.dim: checkpoint 16, given 32"):
        evaluate(str(best), overrides=["model.dim=32"])
    with pytest.raises(ConfigError, match=r"attention\.num_landmarks"):
        evaluate(str(best), overrides=["attention.num_landmarks=3"])


def _eval_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([str(Path(sys.executable).parent / "lra-eval"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


def test_eval_cli_prints_writes_the_record_and_says_errors_in_one_paragraph(finished, tmp_path: Path):
    rec, best = finished
    p = _eval_cli(f"ckpt_path={best}", "split=test", "record=true", "threads=1", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"test acc {rec['test_acc']:.2f}%" in p.stdout
    written = json.loads((Path(rec["run_dir"]) / f"eval-{best.stem}.json").read_text())
    assert written["test_acc"] == rec["test_acc"] and written["run_id"] == rec["run_id"]
    assert written["evaluation"]["ckpt_path"] == str(best) and written["evaluation"]["split"] == "test"
    bad = _eval_cli(f"ckpt_path={best}", "model.depth=3", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    [line] = [l for l in bad.stderr.splitlines() if l.startswith("lra-eval: error:")]
    assert "model.depth: checkpoint 1, given 3" in line
    url = _eval_cli("ckpt_path=http://127.0.0.1:9/x.ckpt", cwd=tmp_path)
    assert url.returncode == 2 and "a remote location" in url.stderr
