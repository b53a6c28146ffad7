"""Data loading alone: how long the task's DataModule takes to hand the trainer one training batch, at
the task's protocol size, to put beside the training step's time (`lra-bench --data`).

No raw data is needed: the cache is written with the task reader's shape (max_len, pair or not, vocab
size, classes) through the one cache writer every task uses, filled with seeded random tokens and real
lengths drawn between half and all of max_len. Reading a cache does not depend on what the tokens
mean, so this times exactly the code path a real run takes (memory-mapped arrays -> batches).
"""
from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from lra.bench.workloads import Workload
from lra.data.cache import SCHEMA_VERSION, Example, _SplitWriter

SPLITS = ("train", "val", "test")


def write_synthetic_cache(folder: Path, *, max_len: int, vocab_size: int, num_classes: int, pair: bool,
                          n: int, seed: int = 0) -> Path:
    """A cache of `n` examples per split in the shape of a task; returns the cache folder."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split in SPLITS:
        writer = _SplitWriter(folder, split, max_len, pair)
        for _ in range(n):
            lengths = rng.integers(max_len // 2, max_len + 1, size=2)
            ids = [rng.integers(1, vocab_size, size=int(m), dtype=np.uint16) for m in lengths]
            writer.add(Example(ids[0], int(rng.integers(num_classes)), ids[1] if pair else None))
        splits[split] = writer.close()
    manifest = {"schema": SCHEMA_VERSION, "task": "synthetic", "max_len": max_len, "pair": pair, "splits": splits,
                "settings": {"synthetic": True}, "vocab_size": vocab_size, "num_classes": num_classes}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def data_workload(spec: dict) -> Workload:
    """Fetching the next training batch from the task's DataModule (protocol batch and length)."""
    from hydra.utils import instantiate

    from lra.config import compose
    from lra.data.datamodule import LRADataModule

    overrides = [f"task={spec['task']}"]
    if spec.get("model_length"):
        overrides.append(f"task.max_len={spec['model_length']}")
    cfg = compose(overrides)
    reader = instantiate(cfg.task.reader)  # reads nothing: the cache below is handed to the DataModule
    max_len = int(cfg.task.max_len)
    batch = int(spec.get("model_batch") or cfg.data.batch_size)
    workers = int(spec.get("num_workers") or 0)
    tmp = tempfile.mkdtemp(prefix="lra-bench-data-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # the worker process is the cache's only user
    folder = write_synthetic_cache(Path(tmp) / "cache", max_len=max_len, vocab_size=reader.vocab_size,
                                   num_classes=int(cfg.task.num_classes), pair=bool(reader.pair),
                                   n=batch * int(spec.get("data_batches", 20)))
    dm = LRADataModule(reader, tmp, batch_size=batch, num_workers=workers, seed=0,
                       progress=False, folder=folder)
    dm.setup("fit")
    state = {"it": iter(dm.train_dataloader())}

    def next_batch() -> None:
        try:
            next(state["it"])
        except StopIteration:  # an epoch ends: the next iterator starts the next one, as in training
            state["it"] = iter(dm.train_dataloader())
            next(state["it"])

    docs = 2 if reader.pair else 1
    return Workload(next_batch, next_batch, batch * max_len * docs, batch, max_len)
