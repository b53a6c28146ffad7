"""The resumable `last.ckpt`, and the run's config inside every checkpoint.

Checkpoints are written atomically and read weights-only by the run's checkpoint IO plugin
(lra/training/checkpoints.py); these callbacks decide when and what.

`ResumeCheckpoint` writes `last.ckpt` every N optimizer steps and when SIGTERM or SIGINT arrives, always
at a point from which a resumed run repeats the uninterrupted one exactly: right after an optimizer
step, or, at a step that also validates, after that validation (Lightning skips the validation of the
step a checkpoint was taken at when it resumes, so a save before it would lose it).
"""
from __future__ import annotations

import signal
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.trainer.states import TrainerFn

from lra.training.errors import RunInterrupted


class RunConfig(Callback):
    """Puts the run's resolved config (YAML text) into every checkpoint as `lra_config`, so a checkpoint
    says how to rebuild its model (`lra-eval`) wherever it is copied."""

    def __init__(self, config_yaml: str) -> None:
        self.config_yaml = config_yaml

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["lra_config"] = self.config_yaml


def validates_after_this_batch(trainer: L.Trainer) -> bool:
    """Whether the fit loop runs validation right after the current training batch. Lightning has no public
    hook for this: it asks the loop's own predicate (tests/test_checkpoints.py pins that it agrees with the
    validations that actually run)."""
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
        trainer.save_checkpoint(self.path)  # every process calls it; rank 0 writes (atomically)
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
