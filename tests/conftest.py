"""Shared test setup: one torch thread (tests use tiny tensors; on a shared 2-core machine several
threads only fight), offline W&B, and a small generated ListOps set."""
from __future__ import annotations

import os

os.environ.pop("LRA_CONFIG_PATH", None)  # the suite tests conf/ (tests that need a user folder set their own)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def listops_dir(tmp_path_factory):
    """A small ListOps set in the release format (short expressions so models train in seconds)."""
    from lra.data.listops import ListOpsParams, generate_files

    out = tmp_path_factory.mktemp("listops")
    generate_files(out, 200, 40, 40, seed=3, params=ListOpsParams(max_depth=3, max_args=4, min_length=5, max_length=40))
    return out
