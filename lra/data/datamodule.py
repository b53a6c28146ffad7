"""The one DataModule for every task: find or build the token cache, then serve padded batches.

Batches are dicts: `input_ids` (B, L) long, `mask` (B, L) bool (True = real token), `label` (B,),
and for pair tasks `input_ids2`, `mask2`.

Training order is a pure function of (seed, epoch): global batch j of epoch e is the j-th slice of
`batch_size` indices of a permutation drawn from a generator seeded by (seed, e). With N processes
(DDP) each takes an equal, contiguous part of every global batch, so the examples seen per optimizer
step do not depend on N. The position in that stream (batches consumed so far) is saved in every
checkpoint (`state_dict`), and a resumed run continues with the very next batch, mid-epoch included.

`batch_size` is the GLOBAL batch (what the protocols call the batch size); each of N processes takes
batch_size / N. Evaluation splits are dealt round-robin to the processes and padded to equal length
with examples whose label is IGNORE_LABEL (skipped by the loss and the accuracy), so every example
counts exactly once and every process runs the same number of batches.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lra.data.cache import CachedSplit, DataError, TaskReader, load_manifest, open_split, resolve_cache

IGNORE_LABEL = -100  # F.cross_entropy's default ignore_index; also the accuracy metrics' ignore_index
_EPOCH_STRIDE = 1_000_003  # keeps (seed, epoch) pairs apart when combined into one generator seed


class TokenDataset(Dataset):
    """Items of one cached split; index -1 is a padding item (example 0 with label IGNORE_LABEL)."""

    def __init__(self, split: CachedSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s, pad = self.split, i < 0
        i = 0 if pad else i
        item = {
            "input_ids": torch.from_numpy(s.ids[i].astype(np.int64)),
            "length": torch.tensor(int(s.lengths[i])),
            "label": torch.tensor(IGNORE_LABEL if pad else int(s.labels[i])),
        }
        if s.ids2 is not None:
            item["input_ids2"] = torch.from_numpy(s.ids2[i].astype(np.int64))
            item["length2"] = torch.tensor(int(s.lengths2[i]))
        return item


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    L_ = batch["input_ids"].shape[1]
    batch["mask"] = torch.arange(L_)[None, :] < batch.pop("length")[:, None]
    if "length2" in batch:
        batch["mask2"] = torch.arange(L_)[None, :] < batch.pop("length2")[:, None]
    return batch


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of `epoch`: the same on every process, machine and restart."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * _EPOCH_STRIDE + epoch))


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields this process's part of each global training batch, starting `start` global batches in.

    Epoch e visits `epoch_permutation(n, seed, e)` in global batches of `global_batch` (the incomplete
    tail is dropped); process `rank` of `world_size` takes the rank-th of world_size equal slices.
    The first iterator starts at global batch `start` (total batches consumed before a resume); each
    later iterator starts the next epoch, so Lightning's one-iterator-per-epoch use needs no set_epoch.
    """

    def __init__(self, n: int, global_batch: int, seed: int, start: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        if n < global_batch:
            raise DataError(f"the train split has {n} examples, fewer than one batch of {global_batch}; "
                            "lower data.batch_size.")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank, self.world_size, self.per_rank = rank, world_size, global_batch // world_size
        self.per_epoch = n // global_batch
        self.next_batch = int(start)  # global batch counter where the next iterator starts

    def __len__(self) -> int:
        return self.per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        epoch, first = divmod(self.next_batch, self.per_epoch)
        self.next_batch = (epoch + 1) * self.per_epoch  # a later iterator starts the next epoch
        perm = epoch_permutation(self.n, self.seed, epoch)
        for j in range(first, self.per_epoch):
            lo = j * self.global_batch + self.rank * self.per_rank
            yield perm[lo: lo + self.per_rank].tolist()


class ShardedEvalSampler(Sampler[list[int]]):
    """Evaluation batches of process `rank`: examples rank, rank + N, ... in order, padded with -1
    (a padding item) to ceil(n / N) so every process runs the same number of batches."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        per_rank = -(-n // world_size)
        idx = list(range(rank, n, world_size))
        self.indices = idx + [-1] * (per_rank - len(idx))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for lo in range(0, len(self.indices), self.batch_size):
            yield self.indices[lo: lo + self.batch_size]


class ResumableLoader(DataLoader):
    """The training loader. Its position is restored by `LRADataModule.load_state_dict` before Lightning
    builds it (the sampler starts at the saved batch); these methods tell Lightning it is resumable."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def default_num_workers() -> int:
    """Loader processes when `data.num_workers` is null: none on a CPU-only machine (the training step runs
    on the same cores and a batch is a few memory-mapped rows: `lra-bench` measures the loader at well
    under 1 % of a CPU step), and a quarter of the cores, at most 4, where a GPU trains (4 on a 16-core
    GPU box), so that collating never waits on the GPU's much shorter step."""
    import os

    if not torch.cuda.is_available():
        return 0
    return min(4, (os.cpu_count() or 1) // 4)


class LRADataModule(L.LightningDataModule):
    """`folder`: the cache, when the caller has resolved it already (else prepare_data finds or builds it)."""

    def __init__(self, reader: TaskReader, data_dir: str | Path, batch_size: int = 32,
                 eval_batch_size: int | None = None, num_workers: int | None = None, seed: int = 0,
                 progress: bool = True, folder: Path | None = None) -> None:
        super().__init__()
        self.reader, self.data_dir = reader, Path(data_dir)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.pin_memory = torch.cuda.is_available()
        self.seed, self.progress = seed, progress
        self.folder: Path | None = folder
        self.splits: dict[str, CachedSplit] = {}
        self.batches_consumed = 0  # global training batches done; restored from a checkpoint

    def prepare_data(self) -> None:
        if self.folder is None:
            self.folder = resolve_cache(self.reader, self.data_dir, self.progress)

    def setup(self, stage: str | None = None) -> None:
        if self.folder is None:
            self.folder = resolve_cache(self.reader, self.data_dir, progress=False)
        if not self.splits:
            self.splits = {s: open_split(self.folder, s) for s in ("train", "val", "test")}

    @property
    def manifest(self) -> dict:
        return load_manifest(self.folder)

    def majority_rate(self, split: str = "test") -> float:
        """Accuracy (%) of always predicting the most frequent training label on `split`."""
        counts = self.manifest["splits"]
        train = counts["train"]["label_counts"]
        top = max(train, key=lambda k: (train[k], -int(k)))
        target = counts[split]
        return 100.0 * target["label_counts"].get(top, 0) / target["n"]

    # -- where the training stream stands: saved in every checkpoint, restored before the loader is built --
    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def state_dict(self) -> dict:
        t = self.trainer
        if t is not None:  # training batches whose step has run (the loop's own counter, exact at save points)
            self.batches_consumed = int(t.fit_loop.epoch_loop.batch_progress.total.processed)
        return {"batches_consumed": self.batches_consumed, "seed": self.seed, "batch_size": self.batch_size,
                "train_size": len(self.splits["train"]) if self.splits else None}

    def load_state_dict(self, state: dict) -> None:
        now = {"seed": self.seed, "batch_size": self.batch_size,
               "train_size": len(self.splits["train"]) if self.splits else state.get("train_size")}
        changed = [f"{k} {state[k]} -> {v}" for k, v in now.items() if state.get(k) is not None and state[k] != v]
        if changed:
            raise DataError(f"the checkpoint being resumed was written for other training data ({', '.join(changed)}): "
                            "the data under data_dir changed since. Resume with the data it was written for, or "
                            "pass resume=never to start this run over.")
        self.batches_consumed = int(state.get("batches_consumed", 0))

    def _generator(self) -> torch.Generator:
        # a private generator: building a loader's iterator must not draw from the global RNG (dropout's)
        return torch.Generator().manual_seed(self.seed)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        if self.batch_size % world:
            raise DataError(f"data.batch_size={self.batch_size} is the global batch and must be divisible by "
                            f"the {world} processes (trainer.devices); pick a multiple of {world}.")
        split = self.splits["train"]
        sampler = ResumableBatchSampler(len(split), self.batch_size, self.seed, start=self.batches_consumed,
                                        rank=rank, world_size=world)
        return ResumableLoader(TokenDataset(split), batch_sampler=sampler, collate_fn=collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0, pin_memory=self.pin_memory,
                          generator=self._generator())

    def _eval_loader(self, split: str) -> DataLoader:
        rank, world = self._rank_world()
        data = self.splits[split]
        sampler = ShardedEvalSampler(len(data), -(-self.eval_batch_size // world), rank, world)
        return DataLoader(TokenDataset(data), batch_sampler=sampler, collate_fn=collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0, pin_memory=self.pin_memory,
                          generator=self._generator())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
