"""One training run, wired from instantiated objects: check the config, build data and model, train with
best-validation checkpointing, test the best checkpoint once, write the result record.

Everything of a run lives in its folder `<runs_root>/<run_id>/`: `config.yaml` (the resolved config),
`checkpoints/` (`last.ckpt`, `best-step=N.ckpt`), and what the loggers write (`csv/`, `wandb/`). The
result record goes to `results_dir`. Rerunning the same command continues from `checkpoints/last.ckpt`.
"""
from __future__ import annotations

import os
import re
import resource
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lra.atomic import atomic_write, write_json_atomic
from lra.config import name_mismatch
from lra.training.schema import ConfigError, validate

# `precision=` values and what Lightning calls them; 16-mixed on a CPU runs fp16 autocast with a CPU
# GradScaler (Lightning alone would silently switch to bf16).
PRECISIONS = {"32": "32-true", "32-true": "32-true", "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed",
              "16": "16-mixed", "16-mixed": "16-mixed"}
RESUME_MODES = ("auto", "never")


def is_rank_zero() -> bool:
    """From the environment, before (or without) a Trainer: Lightning's DDP workers get LOCAL_RANK >= 1."""
    if "RANK" in os.environ:
        return os.environ["RANK"] == "0"
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def _say(*args) -> None:
    if is_rank_zero():
        print(*args, flush=True)


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


def prepare(cfg: DictConfig) -> str:
    """Check the composed config (unknown/mistyped keys, precision, resume mode, writable folders) before
    torch is imported; normalise `precision`; fill in `run_id`. Returns the run id."""
    from lra.training import records

    validate(cfg)
    if cfg.get("ckpt_root") is not None:  # the old name of runs_root
        _say(f"[lra] ckpt_root= is now runs_root= (a run's checkpoints, logs and config live together in "
             f"<runs_root>/<run_id>/); using runs_root={cfg.ckpt_root}")
        cfg.runs_root, cfg.ckpt_root = cfg.ckpt_root, None
    raw = cfg.trainer.precision  # ${precision} unless trainer.precision was overridden itself
    p = PRECISIONS.get(str(raw))
    if p is None:
        raise ConfigError(f"precision={raw} is not supported; valid: 32 (32-true), bf16-mixed, 16-mixed.")
    cfg.precision = p
    cfg.trainer.precision = "${precision}"
    if cfg.resume not in RESUME_MODES:
        raise ConfigError(f"resume={cfg.resume} is not a mode; valid: auto (continue from last.ckpt if there is "
                          "one), never (discard this run's checkpoints and start over).")
    _check_writable(cfg.results_dir, "results_dir")
    _check_writable(cfg.runs_root, "runs_root")
    if (bad := name_mismatch(cfg)) is not None:  # a run labelled with another backend's or task's name
        raise ConfigError(bad)
    cfg.run_id = records.run_id(cfg)
    return cfg.run_id


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
    folder = resolve_cache(reader, cfg.data_dir, progress=cfg.progress and is_rank_zero())
    for split in ("train", "val", "test"):
        open_split(folder, split)
    n_train = load_manifest(folder)["splits"]["train"]["n"]
    if n_train < cfg.data.batch_size:
        raise DataError(f"the train split has {n_train} examples, fewer than one batch of {cfg.data.batch_size}; "
                        "lower data.batch_size.")
    return folder


def build_net(cfg: DictConfig, vocab_size: int, num_classes: int):
    """The network: `cfg.model` (a `_partial_` of its `_target_`, every model argument in the config) called
    with what the task and the attention group supply."""
    from hydra.utils import instantiate

    return instantiate(cfg.model)(head=cfg.task.head, vocab_size=vocab_size, num_classes=num_classes,
                                  attention=OmegaConf.to_container(cfg.attention, resolve=True))


def build(cfg: DictConfig, folder: Path | None = None):
    """(datamodule, LightningModule), each instantiated from its config; the task supplies the reader and
    the sizes the model needs. `folder`: the cache if check_data found it (else the datamodule finds it).
    Config and backend errors come before Lightning loads."""
    from hydra.utils import instantiate

    reader = instantiate(cfg.task.reader)
    if reader.num_classes != cfg.task.num_classes:
        raise ConfigError(f"task.num_classes={cfg.task.num_classes} but the {reader.name} reader has "
                          f"{reader.num_classes} classes; fix conf/task/{cfg.task.name}.yaml.")
    if cfg.model.max_len < reader.max_len:
        raise ConfigError(f"model.max_len={cfg.model.max_len} is shorter than the task's sequences "
                          f"({reader.max_len}); set model.max_len >= task.max_len.")
    _seed_everything(cfg.seed)  # the initial weights
    net = build_net(cfg, reader.vocab_size, reader.num_classes)
    if cfg.get("compile"):
        net.compile()  # in place: parameter names, checkpoints and resume are those of the eager network

    from lra.training.module import LRAModule

    dm = instantiate(cfg.data)(reader=reader, data_dir=cfg.data_dir, seed=cfg.seed, progress=cfg.progress,
                               folder=folder)
    module = LRAModule(net, reader.num_classes, instantiate(cfg.optimizer), instantiate(cfg.scheduler))
    return dm, module


def _precision_args(cfg: DictConfig) -> dict:
    import torch

    accel = cfg.trainer.accelerator
    on_cpu = accel == "cpu" or (accel == "auto" and not torch.cuda.is_available()
                                and not torch.backends.mps.is_available())
    if cfg.precision == "16-mixed" and on_cpu:
        from lightning.pytorch.plugins.precision import MixedPrecision

        return {"precision": None, "plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    return {"precision": cfg.precision, "plugins": []}


def build_group(section: DictConfig | None) -> list:
    """Instantiate every non-null `{_target_: ...}` entry of a group (logger, callbacks), in order."""
    from hydra.utils import instantiate

    return [instantiate(entry) for entry in (section or {}).values() if entry is not None]


def make_trainer(cfg: DictConfig, ckpt_dir: Path, loggers: list, callbacks: list, **overrides):
    """lightning.Trainer from `cfg.trainer` (its _target_), with this run's checkpoint IO, loggers and
    callbacks. Validation runs every val_check_interval optimizer steps (Lightning counts batches)."""
    from hydra.utils import instantiate

    from lra.training.checkpoint_io import RunCheckpointIO

    precision = _precision_args(cfg)
    accumulate = int(cfg.trainer.accumulate_grad_batches)
    every = min(int(cfg.trainer.val_check_interval), int(cfg.trainer.max_steps)) * accumulate
    args = dict(precision=precision["precision"], plugins=[RunCheckpointIO(ckpt_dir), *precision["plugins"]],
                val_check_interval=every, check_val_every_n_epoch=None, callbacks=callbacks, logger=loggers or False,
                enable_progress_bar=bool(cfg.progress), enable_model_summary=False, num_sanity_val_steps=0,
                default_root_dir=str(ckpt_dir.parent), use_distributed_sampler=False)
    args.update(overrides)
    # a partial of the config's arguments, then called with the objects: Hydra would otherwise wrap the
    # callback/logger/plugin lists into ListConfigs, which Lightning 2.4 does not take for lists
    return instantiate(cfg.trainer, _partial_=True)(**args)


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _final_train_loss(trainer, module) -> float | None:
    """The loss of the last optimizer step over the whole global batch (averaged over processes)."""
    loss = module.last_train_loss
    if loss is None:
        return None
    if trainer.world_size > 1:
        loss = trainer.strategy.reduce(loss.to(trainer.strategy.root_device).float(), reduce_op="mean")
    return float(loss)


def attention_stats(net) -> dict[str, float]:
    """The mean, over the network's modules that define `attention_stats() -> dict[str, float]`, of each
    statistic they report (empty when none does)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for m in net.modules():
        fn = getattr(m, "attention_stats", None)
        if not callable(fn):
            continue
        for key, value in (fn() or {}).items():
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1
    return {k: sums[k] / counts[k] for k in sorted(sums)}


def _resume_point(cfg: DictConfig, ckpt_dir: Path, module, rank_zero: bool, rid: str) -> tuple[str | None, int]:
    """(checkpoint to resume from or None, its step). Rank 0 also cleans the folder: partial writes always,
    everything with resume=never."""
    from lra.training.checkpoints import check_resume_checkpoint, remove_partial_checkpoints

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
    step = check_resume_checkpoint(last, module, ckpt_dir)
    say(f"[lra] resuming {rid} from {last} (step {step})")
    return str(last), step


def _forbid_ddp_in_sweep(trainer) -> None:
    from hydra.core.hydra_config import HydraConfig

    if trainer.world_size > 1 and HydraConfig.initialized() \
            and getattr(HydraConfig.get().mode, "name", None) == "MULTIRUN":
        raise ConfigError(f"a -m sweep cannot run multi-process jobs ({trainer.world_size} processes): Lightning "
                          "starts its worker processes once per Python process. Run the jobs one at a time "
                          "(one lra-train command each, e.g. in a shell loop).")


def run(cfg: DictConfig) -> dict:
    """Train, test and record one run; returns the record (also written to results_dir by rank 0)."""
    from lra.training import records

    rid = prepare(cfg)
    out = records.record_path(cfg)
    if is_rank_zero():  # a record write killed before its rename: never read, removed here
        for p in out.parent.glob(f".{out.name}.tmp*"):
            p.unlink(missing_ok=True)
    prev = records.load_record(out)
    if cfg.skip_done and prev is not None and prev.get("status") == "finished":
        _say(f"[lra] {rid}: finished record exists, skipping ({out}); pass skip_done=false to rerun.")
        return prev
    if cfg.get("threads"):
        import torch

        torch.set_num_threads(int(cfg.threads))
    from lra.training.allocator import tune_allocator

    tune_allocator()  # large activations keep their memory between steps (LRA_MALLOC_TUNING=0: glibc's defaults)
    dm, module = build(cfg, check_data(cfg))
    run_dir = Path(cfg.run_dir).resolve()
    ckpt_dir = run_dir / "checkpoints"  # absolute, as Lightning reports checkpoint paths
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    if is_rank_zero():
        atomic_write(run_dir / "config.yaml", resolved)
    loggers, ok = build_group(cfg.get("logger")), False
    try:
        rec = _fit_and_test(cfg, dm, module, run_dir, ckpt_dir, loggers, resolved)
        ok = True
    finally:  # close every logger's outside run, failure included: a sweep's next run gets its own
        for lg in loggers:
            if callable(getattr(lg, "finish", None)):
                lg.finish(ok)
    return rec


def _fit_and_test(cfg: DictConfig, dm, module, run_dir: Path, ckpt_dir: Path, loggers: list, resolved: str) -> dict:
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

    from lra.train import mixed_precision_policy
    from lra.training import records
    from lra.training.callbacks import ResumeCheckpoint, RunConfig
    from lra.training.checkpoints import checked_best_path

    rid = cfg.run_id
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best-{step}", monitor="val/acc", mode="max", save_top_k=1,
                           enable_version_counter=False)
    last = ResumeCheckpoint(ckpt_dir / "last.ckpt", every=cfg.checkpoint_every)
    callbacks = [*build_group(cfg.get("callbacks")), RunConfig(resolved)]
    if cfg.progress:
        callbacks.append(RichProgressBar(leave=True))
    trainer = make_trainer(cfg, ckpt_dir, loggers, [*callbacks, best, last])  # Checkpoints run last, in order
    _forbid_ddp_in_sweep(trainer)
    zero = trainer.is_global_zero
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(OmegaConf.create(resolved)))
    ckpt_path, start_step = _resume_point(cfg, ckpt_dir, module, zero, rid)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    # read before test(): loading the best checkpoint restores the module's and callbacks' state as of then
    train_seconds, val_history = last.train_seconds, list(last.val_history)
    final_loss = _final_train_loss(trainer, module)
    val_acc = float(best.best_model_score) * 100 if best.best_model_score is not None else None
    best_path = checked_best_path(best.best_model_path, ckpt_dir)  # before anything is deleted or loaded
    if zero:  # best-*.ckpt files from before a crash that the restored state no longer points at
        for p in ckpt_dir.glob("best-*.ckpt"):
            if str(p.resolve()) != best_path:
                p.unlink(missing_ok=True)
    test = trainer.test(module, datamodule=dm, ckpt_path=best_path, verbose=False)
    m = re.search(r"step=(\d+)", best_path or "")
    steps = int(trainer.global_step)
    rec = records.make_record(
        cfg, "finished", val_acc=val_acc, test_acc=float(test[0]["test/acc"]) * 100,
        majority_acc=dm.majority_rate("test"), best_step=int(m.group(1)) if m else steps, steps=steps,
        final_train_loss=final_loss, val_history=val_history, precision=cfg.precision,
        mixed_precision_policy=mixed_precision_policy(cfg), attention_stats=attention_stats(module.net),
        world_size=trainer.world_size, resumed_from_step=start_step if ckpt_path else None,
        train_seconds=round(train_seconds, 2), steps_per_second=round(steps / max(train_seconds, 1e-9), 4),
        peak_memory_mb=round(_peak_memory_mb(), 1), params=sum(p.numel() for p in module.net.parameters()),
        run_dir=str(run_dir),
    )
    if not zero:
        return rec
    out = records.record_path(cfg)
    write_json_atomic(out, rec)
    for lg in loggers:
        if callable(getattr(lg, "log_record", None)):
            lg.log_record(rec)
    same = getattr(dm.reader, "val_is_test", False)
    print(f"[lra] {rid}: val acc {rec['val_acc']:.2f}%  test acc {rec['test_acc']:.2f}%  "
          f"(majority class {rec['majority_acc']:.2f}%)  record: {out}  run folder: {run_dir}"
          + (f"\n[lra] note: {dm.reader.name}'s validation set is its test set (as in LRA): the test accuracy "
             "comes from the split that picked the checkpoint, so it is not a held-out figure." if same else ""))
    return rec
