"""`lra-train`: the Hydra app. One run = build data, model, trainer from the config; train with
best-validation checkpointing; test the best checkpoint once; write the result record.

    lra-train task=listops attention=nystrom data_dir=DIR trainer.max_steps=N
    lra-train -m attention=softmax,nystrom,linformer,performer seed=0,1,2
    lra-train ... precision=bf16-mixed            # 32 (default) | bf16-mixed | 16-mixed
    lra-train ... trainer=ddp trainer.devices=2   # data.batch_size stays the global batch

A run killed at any moment continues from `<ckpt_root>/<run_id>/last.ckpt` when the same command is
run again (resume=auto): weights, optimizer, schedule, data position and RNG states are restored, so
the result is the one an uninterrupted run gives. SIGTERM/SIGINT save that checkpoint and exit with
128 + the signal number, writing no record.
"""
from __future__ import annotations

import os
import re
import resource
import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from lra.atomic import write_json_atomic
from lra.config import CONF_DIR

# `precision=` values and what Lightning calls them; 16-mixed on a CPU runs fp16 autocast with a CPU
# GradScaler (Lightning alone would silently switch to bf16).
PRECISIONS = {"32": "32-true", "32-true": "32-true", "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed",
              "16": "16-mixed", "16-mixed": "16-mixed"}
RESUME_MODES = ("auto", "never")
INTEGER_KEYS = {"seed": 0, "trainer.max_steps": 1, "trainer.val_check_interval": 1, "data.batch_size": 1,
                "checkpoint_every": 0}  # checkpoint_every 0: last.ckpt only on SIGTERM/SIGINT


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message is the whole story (no type name, no traceback hint). Those of modules not
    loaded yet cannot have been raised, so they are not imported (an early error stays cheap)."""
    from hydra.errors import InstantiationException

    from lra.data.cache import DataError

    errs = [DataError, ConfigError, InstantiationException]
    for module, name in (("models.attention", "AttentionConfigError"), ("lra.training.module", "NonFiniteLossError")):
        if module in sys.modules:
            errs.append(getattr(sys.modules[module], name))
    return tuple(errs)


class ConfigError(ValueError):
    """A config value that cannot work (names the key and the fix)."""


class CheckpointError(ConfigError):
    """A resume checkpoint that cannot be used (names the file and the fix)."""


def _is_rank_zero() -> bool:
    """From the environment, before (or without) a Trainer: Lightning's DDP workers get LOCAL_RANK >= 1."""
    if "RANK" in os.environ:
        return os.environ["RANK"] == "0"
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def _check_writable(folder: str, key: str) -> None:
    """Fail before training, not after it, when results or checkpoints could not be written."""
    path = Path(folder)
    probe = path / f".lra-write-probe-{os.getpid()}.tmp"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
    except OSError as err:
        raise ConfigError(f"{key}='{folder}' cannot be written to ({err.strerror or err}); pass {key}=<a writable "
                          "folder>.") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def _preflight(cfg: DictConfig) -> None:
    """Cheap checks of the run's settings, before torch is imported; normalises `precision`."""
    raw = cfg.trainer.precision  # ${precision} unless trainer.precision was overridden itself
    p = PRECISIONS.get(str(raw))
    if p is None:
        raise ConfigError(f"precision={raw} is not supported; valid: 32 (32-true), bf16-mixed, 16-mixed.")
    cfg.precision = p
    cfg.trainer.precision = "${precision}"
    if cfg.resume not in RESUME_MODES:
        raise ConfigError(f"resume={cfg.resume} is not a mode; valid: auto (continue from last.ckpt if there is "
                          "one), never (discard this run's checkpoints and start over).")
    for key, low in INTEGER_KEYS.items():
        v = OmegaConf.select(cfg, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"{key}={v} must be an integer >= {low}.")
    _check_writable(cfg.results_dir, "results_dir")
    _check_writable(cfg.ckpt_root, "ckpt_root")


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _logger(cfg: DictConfig, rid: str):
    kind = cfg.logger.kind
    if kind == "none":
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=cfg.logger.save_dir, name=rid, version="")
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_MODE", cfg.logger.mode)
        Path(cfg.logger.save_dir).mkdir(parents=True, exist_ok=True)
        return WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity, name=rid, id=rid,
                           save_dir=cfg.logger.save_dir, mode=os.environ["WANDB_MODE"],
                           config=OmegaConf.to_container(cfg, resolve=True))
    raise ConfigError(f"unknown logger.kind '{kind}'; valid: none, csv, wandb (choose with logger=<name>).")


def _log_result_table(logger, record: dict) -> None:
    if type(logger).__name__ != "WandbLogger":
        return
    import wandb

    cols = ["run_id", "task", "attention", "protocol", "seed", "val_acc", "test_acc", "majority_acc",
            "steps", "steps_per_second", "peak_memory_mb", "params", "status"]
    logger.experiment.log({"result": wandb.Table(columns=cols, data=[[record.get(c) for c in cols]])})
    logger.experiment.summary.update({k: record[k] for k in ("val_acc", "test_acc", "majority_acc")})


def _seed_everything(seed: int) -> None:
    """What Lightning's seed_everything(seed, workers=True) does, without loading Lightning (early errors
    stay cheap): seed python, numpy and torch (every device), and tell Lightning to seed loader workers."""
    import random

    import numpy as np
    import torch

    if not 0 <= seed <= np.iinfo(np.uint32).max:
        raise ConfigError(f"seed={seed} is out of range; valid: 0..{np.iinfo(np.uint32).max}.")
    os.environ["PL_GLOBAL_SEED"], os.environ["PL_SEED_WORKERS"] = str(seed), "1"
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_data(cfg: DictConfig) -> Path:
    """Find (or build) the task's cache and check it: every array present and of its size, a train split
    of at least one batch. Needs no torch, so bad data fails in a second, before the heavy imports."""
    from hydra.utils import instantiate

    from lra.data.cache import DataError, load_manifest, open_split, resolve_cache

    reader = instantiate(cfg.task.reader)
    folder = resolve_cache(reader, cfg.data_dir, progress=cfg.progress and _is_rank_zero())
    for split in ("train", "val", "test"):
        open_split(folder, split)
    n_train = load_manifest(folder)["splits"]["train"]["n"]
    if n_train < cfg.data.batch_size:
        raise DataError(f"the train split has {n_train} examples, fewer than one batch of {cfg.data.batch_size}; "
                        "lower data.batch_size.")
    return folder


def build(cfg: DictConfig, folder: Path | None = None):
    """Instantiate (datamodule, LightningModule) from the config; `folder`: the cache if check_data found it
    (else the datamodule finds it in prepare_data). Config and backend errors come before Lightning loads."""
    from hydra.utils import instantiate

    reader = instantiate(cfg.task.reader)
    if reader.num_classes != cfg.task.num_classes:
        raise ConfigError(f"task.num_classes={cfg.task.num_classes} but the {reader.name} reader has "
                          f"{reader.num_classes} classes; fix conf/task/{cfg.task.name}.yaml.")
    m = cfg.model
    if m.max_len < reader.max_len:
        raise ConfigError(f"model.max_len={m.max_len} is shorter than the task's sequences ({reader.max_len}); "
                          "set model.max_len >= task.max_len.")
    _seed_everything(cfg.seed)  # the initial weights
    from models.classifier import build_model

    net = build_model(head=cfg.task.head, vocab_size=reader.vocab_size, num_classes=reader.num_classes,
                      max_len=m.max_len, attention=OmegaConf.to_container(cfg.attention, resolve=True),
                      dim=m.dim, depth=m.depth, heads=m.heads, head_dim=m.head_dim, ffn_dim=m.ffn_dim,
                      dropout=m.dropout, pooling=m.pooling)

    from lra.data.datamodule import LRADataModule
    from lra.training.module import LRAModule

    dm = LRADataModule(reader, cfg.data_dir, batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size,
                       num_workers=cfg.data.num_workers, seed=cfg.seed, progress=cfg.progress, folder=folder)
    module = LRAModule(net, reader.num_classes, instantiate(cfg.optimizer), instantiate(cfg.scheduler))
    return dm, module


def mixed_precision_policy(cfg: DictConfig) -> str:
    """What runs in which dtype: the backend's own fp32 islands under autocast, or plain fp32."""
    from models.attention import ATTENTION_BACKENDS

    if cfg.precision == "32-true":
        return "fp32 throughout"
    own = getattr(ATTENTION_BACKENDS.get(cfg.attention.name), "mixed_precision", None)
    dtype = "bf16" if cfg.precision.startswith("bf16") else "fp16"
    return f"autocast {dtype}; attention: " + (own or "runs in the autocast dtype (no fp32 island)")


def _precision_args(cfg: DictConfig) -> dict:
    import torch

    accel = cfg.trainer.accelerator
    on_cpu = accel == "cpu" or (accel == "auto" and not torch.cuda.is_available()
                                and not torch.backends.mps.is_available())
    if cfg.precision == "16-mixed" and on_cpu:
        from lightning.pytorch.plugins.precision import MixedPrecision

        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    return {"precision": cfg.precision}


def _trainer(cfg: DictConfig, rid: str, ckpt_dir: Path):
    import lightning as L
    from lightning.pytorch.callbacks import RichProgressBar

    from lra.training.callbacks import AtomicModelCheckpoint, ResumeCheckpoint

    best = AtomicModelCheckpoint(dirpath=ckpt_dir, filename="best-{step}", monitor="val/acc", mode="max",
                                 save_top_k=1, enable_version_counter=False)
    last = ResumeCheckpoint(ckpt_dir / "last.ckpt", every=cfg.checkpoint_every)
    callbacks = [best, last]  # both Checkpoints: Lightning runs them last, in this order
    if cfg.progress:
        callbacks.append(RichProgressBar(leave=True))
    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    t.pop("precision")
    # validation every val_check_interval optimizer steps (Lightning counts batches)
    accumulate = int(t["accumulate_grad_batches"])
    t["val_check_interval"] = min(int(t["val_check_interval"]), int(t["max_steps"])) * accumulate
    trainer = L.Trainer(**t, **_precision_args(cfg), check_val_every_n_epoch=None, callbacks=callbacks,
                        logger=_logger(cfg, rid), enable_progress_bar=bool(cfg.progress), enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=str(ckpt_dir), use_distributed_sampler=False)
    return trainer, best, last


def _checked_step(path: Path, module) -> int:
    """The global step of the resume checkpoint `path`; CheckpointError if it cannot be resumed from."""
    import torch

    fix = (f"Delete {path} to start this run over, or pass resume=never (which discards this run's "
           "checkpoints).")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        step, state = int(ckpt["global_step"]), ckpt["state_dict"]
        for key in ("loops", "optimizer_states", "lra_process_states"):
            ckpt[key]
    except Exception as err:  # noqa: BLE001 - any failure means the file cannot be trusted
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        if isinstance(err, KeyError):
            reason = f"no {err} entry"
        raise CheckpointError(f"cannot resume from {path}: it is not a complete checkpoint of this harness "
                              f"({reason}); it was damaged or written by something else (this harness writes "
                              f"checkpoints under a temporary name and renames them when complete). {fix}") from None
    mine, theirs = set(module.state_dict()), set(state)
    if mine != theirs:
        diff = sorted(mine ^ theirs)
        raise CheckpointError(f"cannot resume from {path}: it holds a different model ({len(diff)} parameter "
                              f"names differ, e.g. '{diff[0]}'); the code changed since it was written. {fix}")
    return step


def _resume_point(cfg: DictConfig, ckpt_dir: Path, module, rank_zero: bool, rid: str) -> tuple[str | None, int]:
    """(checkpoint to resume from or None, its step). Rank 0 also cleans the folder: partial writes always,
    everything with resume=never."""
    from lra.training.callbacks import remove_partial_checkpoints

    say = print if rank_zero else (lambda *a, **k: None)
    if rank_zero:
        for p in remove_partial_checkpoints(ckpt_dir):
            say(f"[lra] removed {p}: a checkpoint write that never finished (never used)")
    last = ckpt_dir / "last.ckpt"
    if cfg.resume == "never":
        old = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
        if old and rank_zero:
            for p in old:
                p.unlink()
            say(f"[lra] resume=never: discarded {len(old)} checkpoint(s) of {rid} in {ckpt_dir}; starting over")
        return None, 0
    if not last.is_file():
        say(f"[lra] starting {rid} from step 0 (no checkpoint in {ckpt_dir})")
        return None, 0
    step = _checked_step(last, module)
    say(f"[lra] resuming {rid} from {last} (step {step})")
    return str(last), step


def _final_train_loss(trainer, module) -> float | None:
    """The loss of the last optimizer step over the whole global batch (averaged over processes)."""
    loss = module.last_train_loss
    if loss is None:
        return None
    if trainer.world_size > 1:
        loss = trainer.strategy.reduce(loss.to(trainer.strategy.root_device).float(), reduce_op="mean")
    return float(loss)


def run(cfg: DictConfig) -> dict:
    """Train, test and record one run; returns the record (also written to results_dir by rank 0)."""
    from hydra.core.hydra_config import HydraConfig

    from lra.training import records

    _preflight(cfg)
    rid = records.run_id(cfg)
    out = records.record_path(cfg)
    if _is_rank_zero():  # a record write killed before its rename: never read, removed here
        for p in out.parent.glob(f".{out.name}.tmp*"):
            p.unlink(missing_ok=True)
    prev = records.load_record(out)
    if cfg.skip_done and prev is not None and prev.get("status") == "finished":
        print(f"[lra] {rid}: finished record exists, skipping ({out}); pass skip_done=false to rerun.")
        return prev

    if cfg.get("threads"):
        import torch

        torch.set_num_threads(int(cfg.threads))
    dm, module = build(cfg, check_data(cfg))
    ckpt_dir = Path(cfg.ckpt_root).resolve() / rid  # absolute, as Lightning reports checkpoint paths
    trainer, best, last = _trainer(cfg, rid, ckpt_dir)
    zero = trainer.is_global_zero
    if trainer.world_size > 1 and HydraConfig.initialized() \
            and getattr(HydraConfig.get().mode, "name", None) == "MULTIRUN":
        raise ConfigError(f"a -m sweep cannot run multi-process jobs ({trainer.world_size} processes): Lightning "
                          "starts its worker processes once per Python process. Run the jobs one at a time "
                          "(one lra-train command each, e.g. in a shell loop).")
    ckpt_path, start_step = _resume_point(cfg, ckpt_dir, module, zero, rid)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    # read before test(): loading the best checkpoint restores the module's and callbacks' state as of then
    train_seconds, val_history = last.train_seconds, list(last.val_history)
    final_loss = _final_train_loss(trainer, module)
    val_acc = float(best.best_model_score) * 100 if best.best_model_score is not None else None
    if zero:  # best-*.ckpt files from before a crash that the restored state no longer points at
        keep = Path(best.best_model_path).resolve() if best.best_model_path else None
        for p in ckpt_dir.glob("best-*.ckpt"):
            if p.resolve() != keep:
                p.unlink(missing_ok=True)
    test = trainer.test(module, datamodule=dm, ckpt_path=best.best_model_path or None, verbose=False)
    m = re.search(r"step=(\d+)", best.best_model_path or "")
    steps = int(trainer.global_step)
    rec = records.make_record(
        cfg, "finished", val_acc=val_acc, test_acc=float(test[0]["test/acc"]) * 100,
        majority_acc=dm.majority_rate("test"), best_step=int(m.group(1)) if m else steps, steps=steps,
        final_train_loss=final_loss, val_history=val_history, precision=cfg.precision,
        mixed_precision_policy=mixed_precision_policy(cfg),
        world_size=trainer.world_size, resumed_from_step=start_step if ckpt_path else None,
        train_seconds=round(train_seconds, 2), steps_per_second=round(steps / max(train_seconds, 1e-9), 4),
        peak_memory_mb=round(_peak_memory_mb(), 1), params=sum(p.numel() for p in module.net.parameters()),
    )
    if not zero:
        return rec
    write_json_atomic(out, rec)
    _log_result_table(trainer.logger, rec)
    if trainer.logger and hasattr(trainer.logger, "experiment") and type(trainer.logger).__name__ == "WandbLogger":
        trainer.logger.experiment.finish()
    print(f"[lra] {rid}: val acc {rec['val_acc']:.2f}%  test acc {rec['test_acc']:.2f}%  "
          f"(majority class {rec['majority_acc']:.2f}%)  record: {out}")
    return rec


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
    zero = _is_rank_zero()
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
        user = isinstance(err, _user_errors())
        text = str(err) if user else f"{type(err).__name__}: {err} (set HYDRA_FULL_ERROR=1 for the traceback)"
        print(f"{who}: error: {text}", file=sys.stderr)
        if not multirun:  # a sweep goes on with its next run; the failed record says what happened
            sys.exit(2)


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
