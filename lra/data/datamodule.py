"""The one DataModule for every task: find or build the token cache, then serve padded batches.

Batches are dicts: `input_ids` (B, L) long, `mask` (B, L) bool (True = real token), `label` (B,),
and for pair tasks `input_ids2`, `mask2`. Training order is a seeded permutation per epoch.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lra.data.cache import (
    CachedSplit, DataError, TaskReader, build_cache, cache_dir, fingerprint, is_fresh, load_manifest, open_split,
)


class TokenDataset(Dataset):
    def __init__(self, split: CachedSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.split
        item = {
            "input_ids": torch.from_numpy(s.ids[i].astype(np.int64)),
            "length": torch.tensor(int(s.lengths[i])),
            "label": torch.tensor(int(s.labels[i])),
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


def resolve_cache(reader: TaskReader, data_dir: Path, progress: bool = True) -> Path:
    """The cache to train from: a fresh prepared cache under `data_dir`, else one built from raw data
    found in `data_dir` (prepared once, then reused)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir() or not any(data_dir.iterdir()):
        raise DataError(
            f"data_dir '{data_dir}' is missing or empty. For ListOps, generate a set with `lra-data generate "
            f"listops --out {data_dir}` (or `make demo-data`); for the other tasks put the LRA release (or the "
            f"task's raw files) there and run `lra-data prepare {reader.name} --source <raw> --data-dir {data_dir}`, "
            f"or `lra-data download {reader.name}` for where to get them."
        )
    folder = cache_dir(data_dir, reader)
    try:
        root = reader.locate(data_dir)
    except DataError:
        if load_manifest(folder) is not None and is_fresh(folder, reader, None):
            return folder  # a prepared cache without its raw source
        raise
    if is_fresh(folder, reader, fingerprint(reader.source_files(root))):
        return folder
    return build_cache(reader, data_dir, data_dir, progress=progress)


class LRADataModule(L.LightningDataModule):
    def __init__(self, reader: TaskReader, data_dir: str | Path, batch_size: int = 32,
                 eval_batch_size: int | None = None, num_workers: int = 0, seed: int = 0,
                 progress: bool = True) -> None:
        super().__init__()
        self.reader, self.data_dir = reader, Path(data_dir)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed, self.progress = num_workers, seed, progress
        self.folder: Path | None = None
        self.splits: dict[str, CachedSplit] = {}

    def prepare_data(self) -> None:
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

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            TokenDataset(self.splits[split]), batch_size=self.batch_size if shuffle else self.eval_batch_size,
            shuffle=shuffle, generator=gen, collate_fn=collate, num_workers=self.num_workers,
            drop_last=shuffle and len(self.splits[split]) > self.batch_size,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
