"""Atomic writes: a file is written under a temporary name beside its target, flushed to disk, then
renamed over it, so a kill mid-write never leaves a half-written file that a later run would trust.
The temporary name is `.<name>.tmp<pid>`: callers may sweep leftovers with the glob `.<name>.tmp*`."""
from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write(path: str | Path, data: bytes | str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: dict) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str))
