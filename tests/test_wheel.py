"""The built wheel works on its own: configs inside it, every entry point runs from a folder that is not
the repository, and the installed copy (not this checkout) is what runs.

The scratch venv reuses this environment's packages (torch, Lightning, Hydra) through a .pth line, which
adds their folder as a plain path: the editable install's finder hooks in it are not run, so `lra` and
`models` can only come from the wheel. Offline and a few seconds apart from the tiny training."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from lra.config import backend_names, task_names

ROOT = Path(__file__).resolve().parent.parent
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "lra", "models", "conf")


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} -> {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:  # a clean copy: the build never writes build/ or *.egg-info into the checkout
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(
            ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LRA_CONFIG_PATH", "LRA_CONF_DIR")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", src],
         cwd=tmp, env=env)
    [wheel] = (tmp / "dist").glob("lra-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp, env=env)
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env).stdout.strip())
    (site / "outer_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co., not their .pth hooks
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel], cwd=tmp, env=env)
    work = tmp / "elsewhere"  # not the repository, no conf/ here
    work.mkdir()
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return {"wheel": wheel, "venv": venv, "py": py, "site": site, "work": work, "env": env}


@pytest.mark.slow
def test_wheel_holds_the_configs(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    conf = sorted(str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml"))
    assert conf and all(f"lra/conf/{c}" in names for c in conf), sorted(n for n in names if "conf" in n)[:20]
    assert not any(n.startswith(("conf/", "tests/")) for n in names)


@pytest.mark.slow
def test_installed_copy_runs_from_any_folder(installed, listops_dir):
    py, work, env, bin_ = installed["py"], installed["work"], installed["env"], installed["venv"] / "bin"
    where = _run([py, "-c", "import lra, models, lra.config as c; print(lra.__file__); print(models.__file__); "
                  "print(c.CONF_DIR)"], work, env).stdout.split()
    assert all(Path(p).is_relative_to(installed["site"]) for p in where), where  # the wheel's copy, not this checkout
    listed = _run([py, "-m", "lra.config", "backends"], work, env).stdout.split()
    assert listed == backend_names() and _run([py, "-m", "lra.config", "tasks"], work, env).stdout.split() == task_names()
    scripts = [line.split("=")[0].strip() for line in zipfile.ZipFile(installed["wheel"]).read(
        next(n for n in zipfile.ZipFile(installed["wheel"]).namelist() if n.endswith("entry_points.txt"))).decode().splitlines()
        if "=" in line]
    assert {"lra-train", "lra-data", "lra-bench", "lra-leaderboard", "lra-check-attention"} <= set(scripts)
    for script in scripts:  # every entry point starts (lra-train --help composes the whole config)
        _run([bin_ / script, "--help"], work, env, timeout=120)
    _run([bin_ / "lra-data", "generate", "listops", "--out", "lo", "--train", "200", "--val", "40", "--test", "40",
          "--max-depth", "3", "--max-args", "4", "--min-len", "5", "--max-len", "40"], work, env)
    _run([bin_ / "lra-train", "experiment=smoke", "attention=softmax", "data_dir=lo", "task.max_len=40",
          "results_dir=records", "runs_root=runs", "logger=none", "threads=1"], work, env)
    [record] = list((work / "records").glob("listops-softmax-*.json"))
    _run([bin_ / "lra-leaderboard", "records", "--out", "board/LEADERBOARD.md"], work, env)
    assert "| softmax " in (work / "board" / "LEADERBOARD.md").read_text()
    _run([bin_ / "lra-check-attention", "softmax"], work, env)
    assert record.is_file() and not (work / "conf").exists()
