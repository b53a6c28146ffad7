"""Logger hooks the driver calls on every logger that defines them (it names no logger class):

* `log_record(record)`: the finished run's result record;
* `finish(ok)`: close whatever outside run the logger holds, in a `finally`, failure included, so the
  next run of a `-m` sweep (same process) never writes into it.

`WandbLogger` is Lightning's with those two hooks and one rule: `mode` (offline by default) wins over an
inherited WANDB_MODE unless `respect_env=true`.
"""
from __future__ import annotations

import os

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

# WANDB_MODE as the process inherited it (this module sets the variable itself for each run).
INHERITED_WANDB_MODE = os.environ.get("WANDB_MODE")
RESULT_COLUMNS = ("run_id", "task", "attention", "protocol", "seed", "val_acc", "test_acc", "majority_acc",
                  "steps", "steps_per_second", "peak_memory_mb", "params", "status")


class WandbLogger(_LightningWandbLogger):
    """`mode`: online | offline | disabled. Other keyword arguments are Lightning's WandbLogger's (and
    through it wandb.init's)."""

    def __init__(self, mode: str = "offline", respect_env: bool = False, **kwargs) -> None:
        if respect_env and INHERITED_WANDB_MODE:
            mode = INHERITED_WANDB_MODE
        os.environ["WANDB_MODE"] = mode  # wandb also reads the environment: make both say the same
        super().__init__(mode=mode, **kwargs)

    def log_record(self, record: dict) -> None:
        import wandb

        row = [[record.get(c) for c in RESULT_COLUMNS]]
        self.experiment.log({"result": wandb.Table(columns=list(RESULT_COLUMNS), data=row)})
        self.experiment.summary.update({k: record.get(k) for k in ("val_acc", "test_acc", "majority_acc")})

    def finish(self, ok: bool) -> None:
        finish_wandb(ok)


def finish_wandb(ok: bool) -> None:
    """Finish the process's open W&B run, if any (wandb keeps one global current run)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.run.finish(exit_code=0 if ok else 1)
