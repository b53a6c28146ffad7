"""`lra-train`: the Hydra app. One run = build data, model, trainer from the config; train with
best-validation checkpointing; test the best checkpoint once; write the result record.

    lra-train task=listops attention=nystrom data_dir=DIR trainer.max_steps=N
    lra-train -m attention=softmax,nystrom,linformer,performer seed=0,1,2
"""
from __future__ import annotations

import os
import re
import resource
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from lra.config import CONF_DIR

def _user_errors() -> tuple[type[Exception], ...]:
    from hydra.errors import InstantiationException

    from lra.data.cache import DataError
    from lra.training.module import NonFiniteLossError
    from models.attention import AttentionConfigError

    return (DataError, AttentionConfigError, NonFiniteLossError, ConfigError, InstantiationException)


class ConfigError(ValueError):
    """A config value that cannot work (names the key and the fix)."""


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


def build(cfg: DictConfig):
    """Instantiate (datamodule, LightningModule) from the config."""
    from hydra.utils import instantiate

    from lra.data.datamodule import LRADataModule
    from lra.training.module import LRAModule
    from models.classifier import build_model

    reader = instantiate(cfg.task.reader)
    if reader.num_classes != cfg.task.num_classes:
        raise ConfigError(f"task.num_classes={cfg.task.num_classes} but the {reader.name} reader has "
                          f"{reader.num_classes} classes; fix conf/task/{cfg.task.name}.yaml.")
    dm = LRADataModule(reader, cfg.data_dir, batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size,
                       num_workers=cfg.data.num_workers, seed=cfg.seed, progress=cfg.progress)
    m = cfg.model
    net = build_model(head=cfg.task.head, vocab_size=reader.vocab_size, num_classes=reader.num_classes,
                      max_len=m.max_len, attention=OmegaConf.to_container(cfg.attention, resolve=True),
                      dim=m.dim, depth=m.depth, heads=m.heads, head_dim=m.head_dim, ffn_dim=m.ffn_dim,
                      dropout=m.dropout, pooling=m.pooling)
    if m.max_len < reader.max_len:
        raise ConfigError(f"model.max_len={m.max_len} is shorter than the task's sequences ({reader.max_len}); "
                          "set model.max_len >= task.max_len.")
    module = LRAModule(net, reader.num_classes, instantiate(cfg.optimizer), instantiate(cfg.scheduler))
    return dm, module


def _trainer(cfg: DictConfig, rid: str, ckpt_dir: Path):
    import lightning as L
    from lightning.pytorch.callbacks import RichProgressBar

    from lra.training.callbacks import AtomicModelCheckpoint, CheckpointOnSignal

    best = AtomicModelCheckpoint(dirpath=ckpt_dir, filename="best-{step}", monitor="val/acc", mode="max",
                                 save_top_k=1, enable_version_counter=False)
    last = AtomicModelCheckpoint(dirpath=ckpt_dir, save_top_k=0, save_last=True, enable_version_counter=False,
                                 every_n_train_steps=cfg.checkpoint_every)
    stop = CheckpointOnSignal(ckpt_dir / "last.ckpt")
    callbacks = [best, last, stop]
    if cfg.progress:
        callbacks.append(RichProgressBar(leave=True))
    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    t["val_check_interval"] = min(int(t["val_check_interval"]), int(t["max_steps"]))
    trainer = L.Trainer(**t, check_val_every_n_epoch=None, callbacks=callbacks, logger=_logger(cfg, rid),
                        enable_progress_bar=bool(cfg.progress), enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=str(ckpt_dir))
    return trainer, best, stop


def run(cfg: DictConfig) -> dict:
    """Train, test and record one run; returns the record (also written to results_dir)."""
    import lightning as L

    from lra.training import records

    rid = records.run_id(cfg)
    out = records.record_path(cfg)
    prev = records.load_record(out)
    if cfg.skip_done and prev is not None and prev.get("status") == "finished":
        print(f"[lra] {rid}: finished record exists, skipping ({out}); pass skip_done=false to rerun.")
        return prev
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm, module = build(cfg)
    ckpt_dir = Path(cfg.ckpt_root) / rid
    trainer, best, stop = _trainer(cfg, rid, ckpt_dir)
    resume = ckpt_dir / "last.ckpt"
    ckpt_path = str(resume) if cfg.resume == "auto" and resume.is_file() else None
    if ckpt_path:
        print(f"[lra] resuming {rid} from {resume}")
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    train_seconds = time.perf_counter() - t0
    if stop.received is not None or trainer.interrupted:
        raise KeyboardInterrupt(f"run {rid} stopped by a signal at step {trainer.global_step}; its checkpoint is "
                                f"{ckpt_dir / 'last.ckpt'} and the same command (resume=auto) continues it.")
    val_acc = float(best.best_model_score) * 100 if best.best_model_score is not None else None
    test = trainer.test(module, datamodule=dm, ckpt_path=best.best_model_path or None, verbose=False)
    m = re.search(r"step=(\d+)", best.best_model_path or "")
    steps = int(trainer.global_step)
    rec = records.make_record(
        cfg, "finished", val_acc=val_acc, test_acc=float(test[0]["test/acc"]) * 100,
        majority_acc=dm.majority_rate("test"), best_step=int(m.group(1)) if m else steps, steps=steps,
        train_seconds=round(train_seconds, 2), steps_per_second=round(steps / max(train_seconds, 1e-9), 4),
        peak_memory_mb=round(_peak_memory_mb(), 1), params=sum(p.numel() for p in module.net.parameters()),
    )
    records.write_json_atomic(out, rec)
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
        records.write_json_atomic(records.record_path(cfg), records.make_record(cfg, "failed", error=msg))
    except Exception:  # noqa: BLE001 - the original error matters more than the record
        pass


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        run(cfg)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001
        _fail(cfg, err)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        user = isinstance(err, _user_errors())
        text = str(err) if user else f"{type(err).__name__}: {err} (set HYDRA_FULL_ERROR=1 for the traceback)"
        print(f"lra-train: error: {text}", file=sys.stderr)
        if not multirun:  # a sweep goes on with its next run; the failed record says what happened
            sys.exit(2)


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
