"""One list of truth: a new backend yaml in conf/attention/ (or a new task yaml) is picked up by the suite,
lra-bench and the Makefile with no edit anywhere else. Checked on a copy of conf/ (LRA_CONF_DIR)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lra.config import CONF_DIR, backend_names, task_names
from lra.testing.contract import CHECKS

ROOT = Path(__file__).resolve().parent.parent


def test_discovery_is_what_conf_holds():
    assert backend_names() == sorted(p.stem for p in (CONF_DIR / "attention").glob("*.yaml"))
    assert task_names() == sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml"))
    out = subprocess.run([sys.executable, "-m", "lra.config", "backends"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split() == backend_names()


@pytest.mark.slow
def test_a_new_backend_yaml_is_tested_without_a_test_edit(tmp_path: Path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "attention" / "zzcopy.yaml").write_text("# a fifth backend: only this file is new\n"
                                                     "_target_: models.attention.softmax.SoftmaxAttention\n")
    env = {**os.environ, "LRA_CONF_DIR": str(conf)}
    listed = subprocess.run([sys.executable, "-m", "lra.config", "backends"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert "zzcopy" in listed.stdout.split()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_attention.py",
                           "-k", "zzcopy"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    passed = int(re.search(r"(\d+) passed", done.stdout).group(1))
    assert passed >= len(CHECKS) + 1, done.stdout[-1000:]  # every contract check, the yaml check, ...
    # the Makefile's discovered loop (mini-lra); reproduce-<protocol> runs the rows of lra/published.py instead
    make = subprocess.run(["make", "--no-print-directory", "-n", "mini-lra", f"STAMP={ROOT / 'pyproject.toml'}",
                           f"BIN={Path(sys.executable).parent}"], cwd=ROOT, env={
                               k: v for k, v in env.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")},
                          capture_output=True, text=True, timeout=120)
    assert "attention=zzcopy" in make.stdout, make.stderr[-1000:]
