"""Compose-time checks: an unknown or mistyped key stops the run with one paragraph naming it, before
torch or Lightning is loaded; every real lightning.Trainer argument stays accepted; the logger and
callbacks groups build what they name."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lra.config import CONF_DIR, compose
from lra.training.schema import ConfigError, check_overrides, trainer_parameters, validate

BAD = [  # (overrides, phrase of the paragraph)
    (["trainer.max_steps=abc"], "trainer.max_steps=abc must be an integer"),
    (["model.dim=x"], "model.dim=x must be an integer"),
    (["model.dropout=high"], "model.dropout=high must be a number"),
    (["+data.batch_szie=3"], "unknown config key 'data.batch_szie'"),
    (["+model.dimm=3"], "Did you mean model.dim?"),
    (["+data.seed=3"], "data.seed is supplied by lra-train"),
    (["+trainer.max_step=3"], "Did you mean trainer.max_steps?"),
    (["+trainer.logger=false"], "trainer.logger is set by lra-train itself"),
    (["+sede=1"], "unknown config key 'sede'"),
    (["skip_done=maybe"], "skip_done=maybe must be true or false"),
    (["threads=0"], "threads=0 must be an integer >= 1"),
    (["data.batch_size=0"], "data.batch_size=0 must be an integer >= 1"),
    (["+callbacks.bad.patience=3"], "callbacks.bad has no _target_"),
    (["+model.head=pooled"], "model.head is supplied by lra-train"),
    (["run_id=mine"], "run_id=mine is set by lra-train"),
]


@pytest.mark.parametrize("overrides, phrase", BAD)
def test_bad_keys_fail_at_compose_time(overrides: list[str], phrase: str):
    with pytest.raises(ConfigError) as err:
        validate(compose(["experiment=smoke", *overrides]))
    assert phrase in str(err.value)
    assert "\n" not in str(err.value)  # one paragraph


def test_every_shipped_configuration_passes():
    for preset in sorted(p.relative_to(CONF_DIR / "experiment").with_suffix("")
                         for p in (CONF_DIR / "experiment").rglob("*.yaml")):
        for logger in sorted(p.stem for p in (CONF_DIR / "logger").glob("*.yaml")):
            for trainer in sorted(p.stem for p in (CONF_DIR / "trainer").glob("*.yaml")):
                validate(compose([f"experiment={preset}", f"logger={logger}", f"trainer={trainer}"]))


def test_any_lightning_trainer_argument_is_accepted():
    from lightning.pytorch import Trainer

    real = [n for n in inspect.signature(Trainer.__init__).parameters if n != "self"]
    assert list(trainer_parameters()) == real  # read from Lightning's source without importing it
    validate(compose(["+trainer.detect_anomaly=true", "+trainer.benchmark=false", "trainer.gradient_clip_val=0.5",
                      "+trainer.max_time=00:01:00:00", "trainer.limit_val_batches=0.5"]))


def test_errors_come_before_torch_is_imported_and_say_one_paragraph(tmp_path: Path):
    code = ("import sys\nfrom lra.config import compose\nfrom lra.training.schema import validate, ConfigError\n"
            "try:\n    validate(compose(['model.dim=x']))\nexcept ConfigError as e:\n    print(e)\n"
            "print('torch' in sys.modules, 'lightning' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.stdout.splitlines()[-1] == "False False", p.stdout + p.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    p = subprocess.run([str(Path(sys.executable).parent / "lra-train"), "experiment=smoke", "model.dim=x",
                        f"results_dir={tmp_path}/results", f"runs_root={tmp_path}/runs"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    [line] = [l for l in p.stderr.splitlines() if l.startswith("lra-train: error:")]
    assert "model.dim=x must be an integer" in line and "Traceback" not in p.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    # a misspelt key without `+`: Hydra alone would only say it cannot override it
    p = subprocess.run([str(Path(sys.executable).parent / "lra-train"), "experiment=smoke", "data.batch_szie=3"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    [line] = [l for l in p.stderr.splitlines() if l.startswith("lra-train: error:")]
    assert "unknown config key 'data.batch_szie'" in line and "Did you mean data.batch_size?" in line


@pytest.mark.parametrize("args, phrase", [
    (["sede=1"], "Did you mean seed?"), (["model.dimm=2"], "Did you mean model.dim?"),
    (["trainer.max_step=3"], "Did you mean trainer.max_steps?"), (["data.batch_szie=3"], "data.batch_size?")])
def test_misspelt_command_line_keys_are_named_before_hydra_composes(args: list[str], phrase: str):
    with pytest.raises(ConfigError, match=phrase.replace("?", r"\?")):
        check_overrides(args)


def test_valid_command_line_overrides_pass_the_early_check():
    check_overrides(["-m", "seed=1,2", "trainer=ddp", "logger=[csv,wandb]", "model.dim=3", "+trainer.x=1",
                     "hydra/launcher=slurm", "experiment=smoke", "data.batch_size=2", "attention.foo=1",
                     "task.reader.x=1", "callbacks.lr_monitor=null", "hydra.run.dir=x", "~callbacks.lr_monitor",
                     "trainer.max_steps=abc", "precision=bf16-mixed", "runs_root=r"])


def test_logger_and_callback_groups_build_what_they_name(tmp_path: Path):
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from lra.training.run import build_group

    cfg = compose(["logger=[csv,wandb]", f"runs_root={tmp_path}", "+callbacks.es._target_=lightning.pytorch."
                   "callbacks.EarlyStopping", "+callbacks.es.monitor=val/acc", "+callbacks.es.mode=max"])
    cfg.run_id = "r"
    validate_cfg = compose(["logger=[csv,wandb]"])
    validate(validate_cfg)
    loggers = build_group(cfg.logger)
    assert [type(lg) for lg in loggers][0] is CSVLogger and isinstance(loggers[1], WandbLogger)
    assert Path(loggers[0].log_dir) == tmp_path / "r" / "csv"
    callbacks = build_group(cfg.callbacks)
    assert isinstance(callbacks[0], LearningRateMonitor) and type(callbacks[1]).__name__ == "EarlyStopping"
    none = compose(["logger=none"])
    assert build_group(none.logger) == [] and build_group(none.callbacks) == []


def test_the_old_ckpt_root_key_still_names_the_runs_root(tmp_path: Path):
    from lra.training.run import prepare

    cfg = compose(["experiment=smoke", f"ckpt_root={tmp_path}/old", f"results_dir={tmp_path}/results"])
    rid = prepare(cfg)
    assert cfg.runs_root == f"{tmp_path}/old" and cfg.ckpt_root is None
    assert cfg.run_dir == f"{tmp_path}/old/{rid}"
