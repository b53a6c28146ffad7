"""Result records for the leaderboard tests, built from the real presets (so their fingerprints are honest)."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

from lra.training.fingerprint import _compose_resolved, fingerprint_of, fingerprint_settings, preset_config


@functools.lru_cache(maxsize=None)
def _config(protocol: str, task: str, backend: str, overrides: tuple[str, ...]) -> dict:
    """The resolved config of a run: the protocol's preset (custom: the defaults) plus `overrides`; {} when
    the backend or task is not defined in conf/ (a record with nothing to check)."""
    if not overrides and protocol != "custom":
        return preset_config(protocol, task, backend) or {}
    head = (f"task={task}",) if protocol == "custom" else (f"experiment={protocol}/{task}",)
    try:
        return _compose_resolved(head + (f"attention={backend}",) + overrides)
    except Exception:  # noqa: BLE001 - an unknown backend: the record keeps an empty config
        return {}


def record(task: str, attention: str, seed: int, acc: float | None, *, protocol: str = "nystromformer",
           overrides: tuple[str, ...] = (), created: str = "2026-03-01T12:00:00+00:00", **fields) -> dict:
    """A schema-2 record as lra-train writes it (docs/CONTRACTS.md); acc=None makes a failed run."""
    failed = acc is None
    config = copy.deepcopy(_config(protocol, task, attention, tuple(overrides)))
    settings = fingerprint_settings(config, attention)
    rec = {"schema": 2, "run_id": f"{task}-{attention}-s{seed}-0123456789",
           "status": "failed" if failed else "finished",
           "error": "RuntimeError: out of memory" if failed else None, "task": task, "attention": attention,
           "protocol": protocol, "seed": seed, "val_acc": None if failed else acc, "test_acc": acc,
           "majority_acc": None if failed else 50.0, "best_step": 100, "steps": 200, "train_seconds": 100.0,
           "steps_per_second": None if failed else 2.0, "peak_memory_mb": None if failed else 500.0,
           "params": None if failed else 1000, "config_hash": "0123456789abcdef", "config": config,
           "fingerprint": fingerprint_of(settings), "fingerprint_settings": settings, "protocol_matches": None,
           "attention_stats": {}, "run_dir": None, "git_sha": "deadbeef", "versions": {}, "hardware": {},
           "command": "lra-train", "created": created}
    rec.update(fields)
    return rec


def write_record(folder: Path, task: str, attention: str, seed: int, acc: float | None, *,
                 name: str | None = None, **kwargs) -> Path:
    rec = record(task, attention, seed, acc, **kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    tag = abs(hash((rec["protocol"], tuple(kwargs.get("overrides", ())), rec["created"]))) % 10 ** 8
    path = folder / (name or f"{rec['run_id']}-{tag}.json")
    path.write_text(json.dumps(rec))
    return path


def md_tables(text: str) -> dict[tuple[str, str], list[dict[str, str]]]:
    """Markdown tables keyed by (protocol section, ### heading); blank leading cells inherit the row above.
    A row with another number of cells than its header fails the test (a broken table)."""
    tables: dict[tuple[str, str], list[dict[str, str]]] = {}
    protocol = heading = ""
    header: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("## "):
            protocol = line.split("`")[1] if line.startswith("## Protocol") else line[3:]
        elif line.startswith("### "):
            heading, header = line[4:], None
        elif line.startswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in _split_row(line)]
            if header is None:
                header = cells
                tables[(protocol, heading)] = []
            elif not set(line) <= set("|-"):
                assert len(cells) == len(header), f"broken table row: {line!r}"
                rows = tables[(protocol, heading)]
                if rows and cells[0] == "":
                    cells[0] = rows[-1][header[0]]
                rows.append(dict(zip(header, cells)))
    return tables


def _split_row(line: str) -> list[str]:
    """Cells of a markdown table row; `\\|` is a pipe inside a cell."""
    cells, cur, i, body = [], "", 0, line.strip()[1:-1]
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            cur += body[i:i + 2]
            i += 2
            continue
        if body[i] == "|":
            cells.append(cur)
            cur = ""
        else:
            cur += body[i]
        i += 1
    return cells + [cur]


def acc_table(text: str, protocol: str = "nystromformer") -> dict[str, dict[str, str]]:
    return {r["Backend"]: r for r in md_tables(text)[(protocol, "Test accuracy (%)")]}
