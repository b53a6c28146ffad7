"""lra-bench's data-loading rows: the synthetic cache is one the real DataModule reads, in the task's
shape, and the table puts the loader beside the step of the same task."""
from __future__ import annotations

import pytest

from lra.bench import report
from lra.bench.data import data_workload
from lra.config import task_names


@pytest.mark.parametrize("task", task_names())
def test_data_workload_serves_batches_of_the_task_shape(task, monkeypatch):
    import lra.data.datamodule as dm_mod

    seen = []
    real_collate = dm_mod.collate

    def spy(items):
        batch = real_collate(items)
        seen.append(batch)
        return batch

    monkeypatch.setattr(dm_mod, "collate", spy)
    load = data_workload({"task": task, "model_batch": 4, "data_batches": 2})  # the task's own length
    for _ in range(3):  # crosses the end of an epoch (2 batches): the next epoch starts like training
        load.forward()
    assert len(seen) == 3
    b, n = seen[-1], load.n
    assert b["input_ids"].shape == (4, n) and b["mask"].shape == (4, n)
    assert b["mask"].sum(1).min() >= n // 2  # real lengths between half and all of max_len
    assert ("input_ids2" in b) == (load.tokens == 2 * 4 * n)


def test_data_table_gives_the_share_of_the_fastest_step():
    def entry(workload, backend, ms, task="listops"):
        return {"workload": workload, "impl": "ours", "backend": backend, "task": task, "n": 2048, "batch": 32,
                "status": "ok", "options": {"num_workers": 0}, "fwd": {"median_ms": ms, "iqr_ms": 0.0},
                "fwdbwd": {"median_ms": ms, "iqr_ms": 0.0}}

    record = {"results": [entry("model", "softmax", 2000.0), entry("model", "nystrom", 1000.0),
                          entry("data", "data", 5.0)]}
    table = report.data_table(record)
    assert "1000.0 (nystrom)" in table and "0.50 %" in table


@pytest.mark.parametrize("cuda,cores,expect", [(False, 2, 0), (False, 16, 0), (True, 2, 0), (True, 16, 4), (True, 64, 4)])
def test_default_num_workers(monkeypatch, cuda, cores, expect):
    import os

    import torch

    from lra.data.datamodule import default_num_workers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert default_num_workers() == expect
