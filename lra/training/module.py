"""A small LightningModule: it receives the network, the optimizer and scheduler factories.

Besides the weights, its checkpoint part holds what an exact resume needs and Lightning does not save:
the RNG states of every process (dropout, Performer redraws) and the last training loss.
"""
from __future__ import annotations

import random
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lra.data.datamodule import IGNORE_LABEL


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def rng_states() -> dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, numpy, python) in types that a checkpoint loaded
    with `torch.load(weights_only=True)`, Lightning's default, accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                        has_gauss, gauss),
              "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


class LRAModule(L.LightningModule):
    def __init__(self, net: nn.Module, num_classes: int, optimizer: Callable, scheduler: Callable | None = None):
        super().__init__()
        self.net, self.optimizer_factory, self.scheduler_factory = net, optimizer, scheduler
        # ModuleDict keys must not shadow nn.Module attributes (`train`), hence the suffix. Padding items of
        # a sharded evaluation split carry IGNORE_LABEL and count for nothing.
        self.acc = nn.ModuleDict({f"{s}_acc": MulticlassAccuracy(num_classes, average="micro",
                                                                  ignore_index=IGNORE_LABEL)
                                  for s in ("train", "val", "test")})
        self.last_train_loss: torch.Tensor | None = None  # this process's loss at the last optimizer step
        self._rng_to_restore: dict | None = None

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(batch)

    def _step(self, batch: dict[str, torch.Tensor], split: str) -> torch.Tensor:
        logits = self(batch)
        labels = batch["label"]
        n = int((labels != IGNORE_LABEL).sum()) if split != "train" else len(labels)
        loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_LABEL)
        self.acc[f"{split}_acc"](logits.argmax(-1), labels)
        on_step = split == "train"
        if n:  # an all-padding evaluation batch has no loss to log
            self.log(f"{split}/loss", loss, on_step=on_step, on_epoch=not on_step, prog_bar=on_step,
                     batch_size=n, sync_dist=not on_step)
        self.log(f"{split}/acc", self.acc[f"{split}_acc"], on_step=False, on_epoch=True, prog_bar=split == "val",
                 batch_size=max(n, 1))
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train")
        bad = not torch.isfinite(loss)
        if _distributed():  # every process must stop together, or the others hang in the gradient all-reduce
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at step {self.global_step}; the run is stopped (no result "
                "is reported). Lower the learning rate, use precision=32, or check the data."
            )
        self.last_train_loss = loss.detach()
        return loss

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"}}

    # -- exact resume ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        loss = self.last_train_loss
        mine = {"rng": rng_states(), "last_train_loss": None if loss is None else float(loss)}
        if _distributed():  # every process's own part, indexed by global rank (only rank 0 writes the file)
            parts: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, mine)
        else:
            parts = [mine]
        checkpoint["lra_process_states"] = parts

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # RNG states are applied just before the next training batch: whatever runs in between (setup,
        # a validation the loop skips, building loaders) then cannot shift the stream of random numbers
        parts = checkpoint.get("lra_process_states")
        if not parts:
            return
        mine = parts[self.global_rank % len(parts)]
        self._rng_to_restore = mine["rng"]
        loss = mine["last_train_loss"]
        self.last_train_loss = None if loss is None else torch.tensor(loss)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None
