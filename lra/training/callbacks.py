"""Checkpoints that never leave a half-written file, and the resumable `last.ckpt`.

Every checkpoint is written to `<name>.tmp`, flushed to disk, then renamed: a kill or a full disk
mid-write leaves the previous file intact, and a `.tmp` file is never read (the run deletes leftovers).

`ResumeCheckpoint` writes `last.ckpt` every N optimizer steps and when SIGTERM or SIGINT arrives, always
at a point from which a resumed run repeats the uninterrupted one exactly: right after an optimizer
step, or, at a step that also validates, after that validation (Lightning skips the validation of the
step a checkpoint was taken at when it resumes, so a save before it would lose it).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from weakref import proxy

import lightning as L
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from lra.training.errors import RunInterrupted


def _fsync(path: str | Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(trainer: L.Trainer, path: str | Path, weights_only: bool = False) -> None:
    """`trainer.save_checkpoint` (every process must call it) to `path` through `path.tmp` and a rename."""
    path = str(path)
    tmp = f"{path}.tmp"
    try:
        trainer.save_checkpoint(tmp, weights_only)
        if trainer.is_global_zero:
            _fsync(tmp)
            os.replace(tmp, path)
            _fsync(os.path.dirname(path) or ".", directory=True)
    except BaseException:
        if trainer.is_global_zero and os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_partial_checkpoints(folder: Path) -> list[Path]:
    """Delete `*.tmp` leftovers of interrupted writes in `folder`; returns what was removed."""
    gone = sorted(Path(folder).glob("*.tmp")) if Path(folder).is_dir() else []
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


class AtomicModelCheckpoint(ModelCheckpoint):
    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        save_atomic(trainer, filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:  # what ModelCheckpoint._save_checkpoint does after writing
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


def validates_after_this_batch(trainer: L.Trainer) -> bool:
    """Whether the fit loop runs validation right after the current training batch."""
    loop = trainer.fit_loop
    return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))


class ResumeCheckpoint(Checkpoint):
    """`path` (last.ckpt) every `every` optimizer steps (0 = never) and on SIGTERM/SIGINT; after a signal
    it saves at the next resumable point and raises RunInterrupted. With several processes the signal
    (which may reach rank 0 only) is agreed on collectively, so all of them save and stop together.
    A second SIGINT interrupts at once (KeyboardInterrupt)."""

    def __init__(self, path: Path, every: int) -> None:
        self.path, self.every = Path(path), int(every or 0)
        self.received: int | None = None
        self._pending: bool = False  # a save deferred to the end of this step's validation
        self._step_at_start = -1
        self._previous: dict[int, object] = {}
        self.prior_seconds, self._segment_start = 0.0, None  # training time, summed over resumes
        self.val_history: list[list] = []  # [step, val acc %] of every validation, over resumes

    @property
    def train_seconds(self) -> float:
        """Seconds spent training (on_train_start..on_train_end), over this run and the ones it resumes."""
        now = time.perf_counter()
        return self.prior_seconds + (now - self._segment_start if self._segment_start is not None else 0.0)

    def state_dict(self) -> dict:
        return {"train_seconds": self.train_seconds, "val_history": self.val_history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.prior_seconds = float(state_dict.get("train_seconds", 0.0))
        self.val_history = [list(v) for v in state_dict.get("val_history", [])]

    # -- signals ----------------------------------------------------------------------------------------
    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def _signalled(self, trainer: L.Trainer) -> bool:
        got = self.received is not None
        if trainer.world_size > 1:
            got = bool(trainer.strategy.reduce_boolean_decision(got, all=False))
            if got and self.received is None:
                self.received = signal.SIGTERM  # another process got it
        return got

    def _restore_handlers(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def on_train_start(self, trainer, pl_module) -> None:
        self._segment_start = time.perf_counter()
        if getattr(trainer, "received_sigterm", False):  # caught by Lightning's handler before ours was set
            self.received = signal.SIGTERM
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass

    def on_train_end(self, trainer, pl_module) -> None:
        self.prior_seconds, self._segment_start = self.train_seconds, None
        self._restore_handlers()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_handlers()

    # -- saving -----------------------------------------------------------------------------------------
    def _save_and_maybe_stop(self, trainer: L.Trainer, stop: bool) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(trainer, self.path)
        if stop:
            raise RunInterrupted(self.received or signal.SIGTERM, trainer.global_step, self.path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step_at_start:  # accumulating gradients: no optimizer step yet
            return
        stop = self._signalled(trainer)
        due = self.every > 0 and trainer.global_step % self.every == 0
        if not (stop or due):
            return
        if validates_after_this_batch(trainer):
            self._pending = True  # saved in on_validation_end, once this step's validation is done
            return
        self._save_and_maybe_stop(trainer, stop)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        acc = trainer.callback_metrics.get("val/acc")
        self.val_history.append([trainer.global_step, None if acc is None else float(acc) * 100])
        stop = self._signalled(trainer)
        if self._pending or stop:
            self._pending = False
            self._save_and_maybe_stop(trainer, stop)
