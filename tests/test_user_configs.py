"""Bring your own backend and task, no fork: a class in a package of the user's (here a temporary one on
PYTHONPATH) plus a config folder on the searchpath (`hydra.searchpath=[file:///DIR]` or LRA_CONFIG_PATH)
is discovered, checked by the contract, trained by the real CLI and shown by the leaderboard."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lra.config import backend_names, compose, task_names
from lra.testing.contract import CHECKS, backend_spec, run_checks

BIN = Path(sys.executable).parent
PKG = "lra_user_zoo"  # the temporary package; a name no installed package uses

BACKEND_SRC = '''
import torch
import torch.nn.functional as F
from torch import nn


class EluLinearAttention(nn.Module):
    """Linear attention with the elu+1 feature map; a plain nn.Module, no lra base class."""

    def __init__(self, num_heads, head_dim, max_len=None, eps=1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, q, k, v, key_padding_mask=None):
        fq, fk = F.elu(q) + 1, F.elu(k) + 1  # (B, H, L, Dh)
        if key_padding_mask is not None:
            fk = fk * key_padding_mask[:, None, :, None]  # padded keys carry nothing
        kv = fk.transpose(-1, -2) @ v  # (B, H, Dh, Dh)
        z = fq @ fk.sum(-2)[..., None]  # (B, H, L, 1)
        return fq @ kv / (z + self.eps)


class IgnoresMask(EluLinearAttention):
    def forward(self, q, k, v, key_padding_mask=None):
        return super().forward(q, k, v, None)
'''

READER_SRC = '''
from pathlib import Path

import numpy as np

from lra.data.cache import DataError, Example, TaskReader


class ParityReader(TaskReader):
    """`{train,val,test}.txt`, one example a line: space-separated bits, a tab, the parity label."""

    name = "parity"
    num_classes = 2
    vocab_size = 3  # 0 = padding, 1 = bit 0, 2 = bit 1

    def locate(self, source):
        if all((Path(source) / f"{s}.txt").is_file() for s in ("train", "val", "test")):
            return Path(source)
        raise DataError(f"no parity data under {source}: expected train.txt, val.txt, test.txt")

    def read_split(self, root, split):
        for line in (Path(root) / f"{split}.txt").read_text().splitlines():
            bits, label = line.split("\\t")
            yield Example(ids=np.array([int(b) + 1 for b in bits.split()]), label=int(label))
'''


@pytest.fixture
def user(tmp_path: Path):
    """A user's package (pkg/) and config folder (cfg/) outside the repository (a fresh import each test)."""
    for name in [m for m in sys.modules if m == PKG or m.startswith(f"{PKG}.")]:
        del sys.modules[name]
    pkg = tmp_path / "pkg" / PKG
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "attention.py").write_text(BACKEND_SRC)
    (pkg / "parity.py").write_text(READER_SRC)
    cfg = tmp_path / "cfg"
    (cfg / "attention").mkdir(parents=True)
    (cfg / "task").mkdir()
    (cfg / "attention" / "mine.yaml").write_text(f"_target_: {PKG}.attention.EluLinearAttention\neps: 1.0e-6\n")
    (cfg / "attention" / "nomask.yaml").write_text(f"_target_: {PKG}.attention.IgnoresMask\n")
    (cfg / "task" / "parity.yaml").write_text(textwrap.dedent(f"""\
        # @package _global_
        task:
          max_len: 24
          num_classes: 2
          head: pooled
          reader:
            _target_: {PKG}.parity.ParityReader
            max_len: ${{task.max_len}}
        """))
    yield {"pkg": tmp_path / "pkg", "cfg": cfg, "root": tmp_path}
    for name in [m for m in sys.modules if m == PKG or m.startswith(f"{PKG}.")]:
        del sys.modules[name]


def _env(user: dict, **extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(user["pkg"]), "OMP_NUM_THREADS": "1", **extra}
    env.pop("LRA_CONFIG_PATH", None)
    env.update(extra)
    return env


def test_user_configs_are_discovered_beside_ours(user, monkeypatch):
    ours = backend_names()
    assert "mine" not in ours
    monkeypatch.setenv("LRA_CONFIG_PATH", str(user["cfg"]))
    assert set(backend_names()) == {*ours, "mine", "nomask"} and "parity" in task_names()
    monkeypatch.delenv("LRA_CONFIG_PATH")
    assert "mine" in backend_names([f"hydra.searchpath=[file://{user['cfg']}]"])  # Hydra's own way


def test_user_backend_passes_the_contract_and_a_broken_one_does_not(user, monkeypatch):
    monkeypatch.setenv("LRA_CONFIG_PATH", str(user["cfg"]))
    monkeypatch.syspath_prepend(str(user["pkg"]))
    spec = backend_spec("mine", ["attention.eps=1e-5"])
    assert spec == {"_target_": f"{PKG}.attention.EluLinearAttention", "name": "mine", "eps": 1e-5}
    assert [problem for _, problem in run_checks(spec)] == [None] * len(CHECKS)
    failed = dict(run_checks(backend_spec("nomask")))
    assert failed["check_padding_invariance"] and "real positions changed" in failed["check_padding_invariance"]


@pytest.mark.slow
def test_check_attention_cli(user):
    cli = [str(BIN / "lra-check-attention"), "mine", "--config-dir", str(user["cfg"])]
    ok = subprocess.run(cli, env=_env(user), capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"{len(CHECKS)}/{len(CHECKS)} contract checks passed" in ok.stdout
    bad = subprocess.run([*cli[:1], "nomask", *cli[2:]], env=_env(user), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "FAIL padding_invariance" in bad.stdout.replace("check_", ""), bad.stdout
    typo = subprocess.run([*cli[:1], "mine", *cli[2:]], env=_env(user, PYTHONPATH=""), capture_output=True, text=True,
                          timeout=120)
    assert typo.returncode == 2 and f"cannot import module '{PKG}.attention'" in typo.stderr
    assert "Traceback" not in typo.stderr


@pytest.mark.slow
def test_user_backend_trains_through_the_cli_and_reaches_the_leaderboard(user, listops_dir):
    root = user["root"]
    train = subprocess.run(
        [str(BIN / "lra-train"), "-m", f"hydra.searchpath=[file://{user['cfg']}]", "attention=mine", "attention.eps=1e-5",
         "experiment=smoke", f"data_dir={listops_dir}", "task.max_len=40", "results_dir=records", "runs_root=runs",
         "logger=none", "threads=1"],
        cwd=root, env=_env(user), capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    [record] = [json.loads(p.read_text()) for p in (root / "records").glob("*.json")]  # a sweep (-m) of one run
    assert record["status"] == "finished" and record["attention"] == "mine" and record["run_id"].startswith("listops-mine-")
    assert record["config"]["attention"] == {"name": "mine", "_target_": f"{PKG}.attention.EluLinearAttention", "eps": 1e-5}
    board = subprocess.run([str(BIN / "lra-leaderboard"), "records", "--out", "board/LEADERBOARD.md"], cwd=root,
                           env=_env(user), capture_output=True, text=True, timeout=120)
    assert board.returncode == 0, board.stderr[-2000:]
    rows = [line for line in (root / "board" / "LEADERBOARD.md").read_text().splitlines()
            if line.startswith(("| mine |", "| mine ["))]  # [...]: the options that differ from its yaml
    assert rows and f"{record['test_acc']:.2f}" in rows[0]


@pytest.mark.slow
def test_user_task_prepares_and_trains(user, monkeypatch, tmp_path):
    from lra.data import cli
    from lra.train import run

    import random

    rng = random.Random(0)
    raw = tmp_path / "raw"
    raw.mkdir()
    for split, n in (("train", 64), ("val", 16), ("test", 16)):
        lines = []
        for _ in range(n):
            bits = [rng.randint(0, 1) for _ in range(rng.randint(4, 20))]
            lines.append(" ".join(map(str, bits)) + f"\t{sum(bits) % 2}")
        (raw / f"{split}.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("LRA_CONFIG_PATH", str(user["cfg"]))
    monkeypatch.syspath_prepend(str(user["pkg"]))
    assert cli.main(["prepare", "parity", "--source", str(raw), "--data-dir", str(tmp_path / "data"), "--quiet"]) == 0
    cfg = compose(["task=parity", "attention=softmax", "experiment=smoke", f"data_dir={tmp_path / 'data'}",
                   f"results_dir={tmp_path}/records", f"runs_root={tmp_path}/runs", "logger=none"])
    assert cfg.task.name == "parity"  # the file name; the yaml has no name key
    record = run(cfg)
    assert record["status"] == "finished" and record["task"] == "parity" and record["run_id"].startswith("parity-softmax-")


def test_config_folder_mistakes_are_one_clear_line(user, monkeypatch, tmp_path):
    from lra.config import ConfigNameError, error_text
    from models.attention import AttentionConfigError, build_attention

    monkeypatch.setenv("LRA_CONFIG_PATH", str(tmp_path / "nope"))
    with pytest.raises(Exception) as err:
        backend_names()
    assert error_text(err.value).startswith(f"LRA_CONFIG_PATH names '{tmp_path / 'nope'}', which is not a folder")
    (tmp_path / "shadow" / "attention").mkdir(parents=True)
    (tmp_path / "shadow" / "attention" / "softmax.yaml").write_text(f"_target_: {PKG}.attention.EluLinearAttention\n")
    monkeypatch.setenv("LRA_CONFIG_PATH", str(tmp_path / "shadow"))
    with pytest.raises(Exception) as err:
        backend_names()
    assert "softmax.yaml has the name of a built-in backend" in error_text(err.value)

    monkeypatch.setenv("LRA_CONFIG_PATH", str(user["cfg"]))
    monkeypatch.syspath_prepend(str(user["pkg"]))
    (user["cfg"] / "attention" / "named.yaml").write_text(f"_target_: {PKG}.attention.EluLinearAttention\nname: elu\n")
    with pytest.raises(ConfigNameError, match=r"attention.name=elu but the attention config is attention/named.yaml.*"
                                              r"drop `name:`"):
        compose(["attention=named"])
    (user["pkg"] / PKG / "broken.py").write_text("def broken(:\n")
    (user["cfg"] / "attention" / "broken.yaml").write_text(f"_target_: {PKG}.broken.Anything\n")
    with pytest.raises(AttentionConfigError, match=rf"attention/broken.yaml.*importing module '{PKG}.broken' failed: "
                                                   "SyntaxError"):
        build_attention(backend_spec("broken"), num_heads=2, head_dim=8)
