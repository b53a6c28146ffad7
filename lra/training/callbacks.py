"""Checkpointing that never leaves a half-written file, and a checkpoint on SIGTERM/SIGINT."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


def save_atomic(trainer: L.Trainer, path: str | Path, weights_only: bool = False) -> None:
    """Write a checkpoint under a temporary name, then rename it: a kill mid-write leaves the previous
    checkpoint intact and no file a later run would trust."""
    path = str(path)
    tmp = f"{path}.tmp"
    trainer.save_checkpoint(tmp, weights_only)
    if trainer.is_global_zero:
        os.replace(tmp, path)


class AtomicModelCheckpoint(ModelCheckpoint):
    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, f"{filepath}.tmp")
        if trainer.is_global_zero:
            os.replace(f"{filepath}.tmp", filepath)
        self._last_checkpoint_saved = filepath


class CheckpointOnSignal(L.Callback):
    """On SIGTERM or SIGINT, finish the current step, save `path` (resumable) and stop training."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.received is not None and not trainer.should_stop:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save_atomic(trainer, self.path)
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()
