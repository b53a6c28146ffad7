"""Lightning's checkpoint IO plugin for one run folder (see lra/training/checkpoints.py for the rules)."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Callable

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lra.atomic import atomic_write
from lra.training.checkpoints import CheckpointError, inside, load_failure


class RunCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO for one run folder: atomic writes, weights-only loads, no path outside."""

    def __init__(self, folder: str | os.PathLike) -> None:
        super().__init__()
        self.folder = Path(folder).resolve()

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        import torch

        if storage_options is not None:
            raise TypeError("RunCheckpointIO takes no storage_options")
        target = inside(path, self.folder)
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        atomic_write(target, buf.getbuffer())

    def load_checkpoint(self, path, map_location: Callable | None = None, weights_only: bool | None = None) -> dict:
        import torch

        target = inside(path, self.folder)
        if not target.is_file():
            raise CheckpointError(f"checkpoint {target} does not exist.")
        try:  # weights_only whatever the caller asked: a checkpoint is data, never code
            return torch.load(target, map_location=map_location or "cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - unpickling refused or a damaged file: say which
            raise CheckpointError(f"cannot load checkpoint {target}: {load_failure(err)}. It was damaged, "
                                  "tampered with or written by something else.") from None

    def remove_checkpoint(self, path) -> None:
        inside(path, self.folder).unlink(missing_ok=True)
