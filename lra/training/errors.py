"""Exceptions the entry point handles without importing the training stack."""
from __future__ import annotations

import signal
from pathlib import Path


class RunInterrupted(Exception):
    """Training stopped on a signal after saving a resumable checkpoint (not a failure: no record)."""

    def __init__(self, signum: int, step: int, path: Path) -> None:
        self.signum, self.step, self.path = int(signum), int(step), Path(path)
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} at step {step}; the checkpoint {path} holds the run and running "
                         "the same command again (resume=auto, the default) continues it exactly from there.")
