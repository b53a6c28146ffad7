"""`lra-train`: the Hydra app. One run = build data, model, trainer from the config; train with
best-validation checkpointing; test the best checkpoint once; write the result record
(lra/training/run.py wires it; this file is the command line around it).

    lra-train task=listops attention=nystrom data_dir=DIR trainer.max_steps=N
    lra-train -m attention=softmax,nystrom,linformer,performer seed=0,1,2
    lra-train ... precision=bf16-mixed            # 32 (default) | bf16-mixed | 16-mixed
    lra-train ... trainer=ddp trainer.devices=2   # data.batch_size stays the global batch
    lra-train ... logger=wandb +callbacks.es._target_=lightning.pytorch.callbacks.EarlyStopping ...

A run's folder is `<runs_root>/<run_id>/` (config.yaml, checkpoints/, logger output). A run killed at any
moment continues from its `checkpoints/last.ckpt` when the same command is run again (resume=auto):
weights, optimizer, schedule, data position and RNG states are restored, so the result is the one an
uninterrupted run gives. SIGTERM/SIGINT save that checkpoint and exit with 128 + the signal number,
writing no record.
"""
from __future__ import annotations

import os
import signal
import sys

import hydra
from omegaconf import DictConfig

from lra.atomic import write_json_atomic
from lra.config import CONF_DIR
from lra.training.checkpoints import CheckpointError  # noqa: F401 - part of this module's interface
from lra.training.run import build, check_data, is_rank_zero, run  # noqa: F401 - the driver's entry points
from lra.training.schema import ConfigError, check_overrides


def user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message is the whole story (no type name, no traceback hint). Those of modules not
    loaded yet cannot have been raised, so they are not imported (an early error stays cheap)."""
    from hydra.errors import InstantiationException

    from lra.data.cache import DataError

    errs = [DataError, ConfigError, InstantiationException]
    for module, name in (("models.attention", "AttentionConfigError"), ("lra.training.module", "NonFiniteLossError"),
                         ("lra.training.records", "RecordError")):
        if module in sys.modules:
            errs.append(getattr(sys.modules[module], name))
    return tuple(errs)


def mixed_precision_policy(cfg: DictConfig) -> str:
    """What runs in which dtype: the backend's own fp32 islands under autocast, or plain fp32."""
    from models.attention import backend_class, capability

    if cfg.precision == "32-true":
        return "fp32 throughout"
    own = capability(backend_class(cfg.attention._target_, cfg.attention.name), "mixed_precision")
    dtype = "bf16" if cfg.precision.startswith("bf16") else "fp16"
    return f"autocast {dtype}; attention: " + (own or "runs in the autocast dtype (no fp32 island)")


def _fail(cfg: DictConfig, err: BaseException) -> None:
    from lra.training import records

    msg = (str(err).strip().splitlines() or [type(err).__name__])[-1]
    try:
        write_json_atomic(records.record_path(cfg), records.make_record(cfg, "failed", error=msg))
    except Exception:  # noqa: BLE001 - the original error matters more than the record
        pass


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lra.training.errors import RunInterrupted

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    zero = is_rank_zero()
    who = "lra-train" if zero else f"lra-train [process {os.environ.get('LOCAL_RANK')}]"
    try:
        run(cfg)
    except RunInterrupted as stop:  # not a failure: no record; the checkpoint continues it
        if zero:
            print(f"{who}: {stop}", file=sys.stderr)
        sys.exit(128 + int(stop.signum))
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001
        if type(err).__name__ == "SIGTERMException":  # Lightning's: a SIGTERM came before our handler was set
            if zero:
                print(f"{who}: stopped by SIGTERM before training began; the same command starts it again (or "
                      "continues it from its last checkpoint).", file=sys.stderr)
            sys.exit(128 + int(signal.SIGTERM))
        if zero:
            _fail(cfg, err)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        user = isinstance(err, user_errors())
        text = str(err) if user else f"{type(err).__name__}: {err} (set HYDRA_FULL_ERROR=1 for the traceback)"
        print(f"{who}: error: {text}", file=sys.stderr)
        if not multirun:  # a sweep goes on with its next run; the failed record says what happened
            sys.exit(2)


def main() -> None:
    try:  # a misspelt `key=value`: our paragraph (Hydra would only say it cannot override the key)
        check_overrides(sys.argv[1:])
    except ConfigError as err:
        print(f"lra-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    _app()


if __name__ == "__main__":
    main()
