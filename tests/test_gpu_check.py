"""scripts/gpu_check.sh: fails fast where there is no CUDA device, and its whole path (kernels, training
runs through lra-train, the table) works at toy sizes on a CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lra.config import backend_names

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": ""}


def test_gpu_check_refuses_a_machine_without_cuda(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--out", str(tmp_path / "g.json")],
                          capture_output=True, text=True, env={**_env(), "PYTHON": sys.executable}, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "nothing was measured" in proc.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_at_toy_sizes_on_a_cpu(tmp_path):
    backends = backend_names()[:2]
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--tiny", "--allow-cpu",
                           "--backends", ",".join(backends), "--out", str(out)],
                          capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert {(r["backend"], r["dtype"], r["n"]) for r in record["kernels"]} == {
        (b, d, n) for b in backends for d in ("float32", "bfloat16") for n in (64, 128)}
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in record["kernels"])
    assert [r["backend"] for r in record["training"]] == backends
    assert all(r["status"] == "ok" and r["steps_per_second"] > 0 for r in record["training"])
    table = out.with_suffix(".md").read_text()
    assert all(f"| {b} |" in table for b in backends)
