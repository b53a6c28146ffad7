"""Result records: one JSON per run, written atomically, identified by a hash of the config."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# Keys that say where things go or how a run is watched, not what is computed: excluded from the hash.
NON_IDENTITY_KEYS = ("data_dir", "results_dir", "ckpt_root", "logger", "progress", "resume", "skip_done",
                     "checkpoint_every", "threads", "hydra")
NON_IDENTITY_SUBKEYS = {"data": ("num_workers",)}


def config_hash(cfg: DictConfig) -> str:
    c = OmegaConf.to_container(cfg, resolve=True)
    for k in NON_IDENTITY_KEYS:
        c.pop(k, None)
    for k, subs in NON_IDENTITY_SUBKEYS.items():
        for s in subs:
            c.get(k, {}).pop(s, None)
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()


def run_id(cfg: DictConfig) -> str:
    return f"{cfg.task.name}-{cfg.attention.name}-s{cfg.seed}-{config_hash(cfg)[:10]}"


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import lra

    def of(pkg: str) -> str | None:  # from the installed metadata: no need to import torch or lightning
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": of("torch"), "lightning": of("lightning"),
            "lra": lra.__version__}


def hardware() -> dict:
    """The machine. A record of a run that failed before torch was loaded has no device fields (null)."""
    out = {"device": None, "gpu": None, "cpu": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "torch_threads": None, "platform": platform.platform()}
    torch = sys.modules.get("torch")
    if torch is not None:
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        out.update(device="cuda" if gpu else "cpu", gpu=gpu, torch_threads=torch.get_num_threads())
    return out


def record_path(cfg: DictConfig) -> Path:
    return Path(cfg.results_dir) / f"{run_id(cfg)}.json"


def load_record(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def make_record(cfg: DictConfig, status: str, **fields) -> dict:
    rec = {
        "schema": 1, "run_id": run_id(cfg), "status": status, "error": None,
        "task": cfg.task.name, "attention": cfg.attention.name, "protocol": cfg.protocol, "seed": int(cfg.seed),
        "val_acc": None, "test_acc": None, "majority_acc": None, "best_step": None, "steps": None,
        "train_seconds": None, "steps_per_second": None, "peak_memory_mb": None, "params": None,
        "config_hash": config_hash(cfg), "config": OmegaConf.to_container(cfg, resolve=True),
        "git_sha": git_sha(), "versions": versions(), "hardware": hardware(),
        "command": " ".join(sys.argv), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    rec.update(fields)
    return rec
