"""Parent side of lra-bench: machine facts, the idle check, and one worker process per configuration
with a wall-clock timeout. A configuration that times out, runs out of memory or fails is recorded
with that status; the sweep goes on."""
from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import psutil

from lra.bench.workloads import REFERENCE_PACKAGES


def machine_info(device: str) -> dict:
    import torch

    info = {
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "logical_cpus": psutil.cpu_count(),
        "physical_cpus": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def package_versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ["numpy", "psutil", "einops", *(pkg for pkg, _ in REFERENCE_PACKAGES.values())]:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_load(interval: float = 2.0) -> dict:
    """CPU use over `interval` seconds (while no benchmark worker runs) and the load averages.
    `idle` is decided on the CPU use alone: the load average lags by minutes, so right after a
    benchmark it still counts the benchmark's own work."""
    percent = psutil.cpu_percent(interval=interval)
    load1, load5, load15 = os.getloadavg()
    cpus = psutil.cpu_count() or 1
    return {"cpu_percent": percent, "loadavg": [load1, load5, load15], "cpus": cpus, "idle": percent < 10.0}


def run_config(spec: dict, timeout: float) -> dict:
    """Run one configuration in a fresh `python -m lra.bench.worker` process."""
    env = dict(os.environ)
    if spec.get("threads"):
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(spec["threads"])
    with tempfile.TemporaryDirectory(prefix="lra-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "lra.bench.worker", str(spec_path), str(out_path)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return {"status": "timeout", "error": f"no result within the {timeout:g} s per-configuration timeout",
                    "results": [], "wall_s": time.perf_counter() - start}
        wall = time.perf_counter() - start
        if out_path.exists():
            result = json.loads(out_path.read_text())
        elif proc.returncode == -signal.SIGKILL:
            result = {"status": "oom", "error": "worker killed (SIGKILL): most likely the kernel's out-of-memory killer",
                      "results": []}
        else:
            tail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
            result = {"status": "error", "error": f"worker exited with {proc.returncode}: {tail}", "results": []}
        result["wall_s"] = wall
        return result
