"""Result records: one JSON per run (`results_dir/<run_id>.json`, written atomically), one type for both sides.

`RunRecord` is what `lra-train` writes (through `make_record`) and what `lra-leaderboard` reads (through
`RunRecord.from_json`); docs/CONTRACTS.md lists its fields. Reading treats the file as hostile: it must be a
JSON object of the right field types (no NaN/inf, no integer beyond 2**63, no nesting deeper than 64, costs
and steps not negative, accuracies in [0, 100]); anything else raises `RecordError` with one clear reason.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lra.training.fingerprint import fingerprint_of, fingerprint_settings, preset_settings

SCHEMA = 2  # 2 added fingerprint, fingerprint_settings, protocol_matches, attention_stats, run_dir
READABLE_SCHEMAS = (1, 2)  # schema 1 records get their fingerprint computed from their stored config
MAX_DEPTH = 64
MAX_INT = 2 ** 63
MAX_BYTES = 64 * 2 ** 20

# Keys that say where things go or how a run is watched, not what is computed: excluded from config_hash
# (which names the run: it includes the seed, unlike the fingerprint).
NON_IDENTITY_KEYS = ("data_dir", "results_dir", "ckpt_root", "runs_root", "run_id", "run_dir", "logger", "callbacks",
                     "progress", "resume", "skip_done", "checkpoint_every", "threads", "compile", "hydra")
NON_IDENTITY_SUBKEYS = {"data": ("num_workers",)}


class RecordError(ValueError):
    """A file or dict that is not a valid result record; the message says why."""


@dataclass
class RunRecord:
    """One run's result record (docs/CONTRACTS.md). Percentages are 0..100; costs are per process 0."""

    run_id: str
    status: str  # "finished" | "failed"
    task: str
    attention: str  # the backend: its conf/attention/<name>.yaml
    protocol: str  # the protocol the run *claims* (its experiment preset); `protocol_matches` checks it
    seed: int
    created: str  # ISO 8601
    config: dict  # the resolved Hydra config
    schema: int = SCHEMA
    error: str | None = None
    val_acc: float | None = None
    test_acc: float | None = None
    majority_acc: float | None = None
    best_step: int | None = None
    steps: int | None = None
    train_seconds: float | None = None
    steps_per_second: float | None = None
    peak_memory_mb: float | None = None
    params: int | None = None
    final_train_loss: float | None = None
    val_history: list | None = None  # [[step, val acc %], ...]
    precision: str | None = None
    mixed_precision_policy: str | None = None
    world_size: int | None = None
    resumed_from_step: int | None = None
    config_hash: str | None = None
    fingerprint: str | None = None  # sha256[:16] of fingerprint_settings (lra/training/fingerprint.py); a
    # reader recomputes both from `config`, so they always follow today's definition
    fingerprint_settings: dict = field(default_factory=dict)  # {dotted key: value} that define what ran
    protocol_matches: bool | None = None  # fingerprint == the claimed protocol's preset (None: no preset)
    attention_stats: dict = field(default_factory=dict)  # backend statistics the driver measured (may be {})
    run_dir: str | None = None  # the run's folder (checkpoints, logs), if any
    git_sha: str | None = None
    versions: dict = field(default_factory=dict)
    hardware: dict = field(default_factory=dict)
    command: str | None = None
    extra: dict = field(default_factory=dict)  # unknown fields of a newer writer, kept as read

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(out.pop("extra"))
        return out

    @property
    def created_at(self) -> datetime:
        """`created` as a timezone-aware time (a naive one is taken as UTC)."""
        t = datetime.fromisoformat(self.created)
        return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)

    @classmethod
    def from_dict(cls, data: Any) -> RunRecord:
        """Validate a decoded JSON document; raise RecordError naming the first bad field."""
        if not isinstance(data, dict):
            raise RecordError(f"top level is a {_json_type(data)}, not an object")
        if "schema" not in data:
            raise RecordError("no 'schema' field")
        if data["schema"] not in READABLE_SCHEMAS or isinstance(data["schema"], bool):
            raise RecordError(f"unsupported schema {_short(data['schema'])} (this version reads "
                              f"{', '.join(map(str, READABLE_SCHEMAS))})")
        check_json_tree(data)
        known = {f.name for f in dataclass_fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        missing = [k for k in ("run_id", "status", "task", "attention", "protocol", "seed", "created")
                   if values.get(k) is None]
        if missing:
            raise RecordError(f"lacks field(s) {', '.join(missing)}")
        values.setdefault("config", {})
        for k in ("fingerprint_settings", "attention_stats", "versions", "hardware"):
            if values.get(k) is None:
                values.pop(k, None)
        rec = cls(**values, extra={k: v for k, v in data.items() if k not in known})
        rec.validate()
        # Always recomputed from the stored config with today's definition: a record written before the
        # definition changed (or with an edited fingerprint) is still compared by what it ran.
        rec.fingerprint_settings = fingerprint_settings(rec.config, rec.attention)
        rec.fingerprint = fingerprint_of(rec.fingerprint_settings)
        return rec

    @classmethod
    def from_json(cls, path: str | Path) -> RunRecord:
        """Read and validate one record file; RecordError (one line, without the path) if it is not one."""
        return cls.from_dict(read_json(path))

    def validate(self) -> None:
        """Raise RecordError unless every field has its type and range."""
        for name in ("run_id", "task", "attention", "protocol", "created"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise RecordError(f"field '{name}' is {_short(value)}, not a non-empty string")
        if self.status not in ("finished", "failed"):
            raise RecordError(f"status {_short(self.status)} is neither 'finished' nor 'failed'")
        _check(self, "seed", int)
        for name in ("error", "precision", "mixed_precision_policy", "config_hash", "fingerprint", "run_dir",
                     "git_sha", "command"):
            _check(self, name, str, optional=True)
        for name in ("config", "fingerprint_settings", "attention_stats", "versions", "hardware"):
            _check(self, name, dict)
        _check(self, "protocol_matches", bool, optional=True)
        for name in ("val_acc", "test_acc", "majority_acc"):
            _check(self, name, float, optional=True, low=0.0, high=100.0, unit="a percentage")
        for name in ("train_seconds", "steps_per_second", "peak_memory_mb"):
            _check(self, name, float, optional=True, low=0.0, unit="a cost")
        for name in ("best_step", "steps", "params", "resumed_from_step"):
            _check(self, name, int, optional=True, low=0, unit="a count")
        _check(self, "world_size", int, optional=True, low=1, unit="a process count")
        _check(self, "final_train_loss", float, optional=True)
        if self.val_history is not None and not (
                isinstance(self.val_history, list) and all(
                    isinstance(p, list) and len(p) == 2 and all(_is_number(x) for x in p) for p in self.val_history)):
            raise RecordError("field 'val_history' is not a list of [step, accuracy] pairs")
        if self.status == "finished" and self.test_acc is None:
            raise RecordError("finished run without a test_acc")
        try:
            self.created_at
        except ValueError:
            raise RecordError(f"created {_short(self.created)} is not an ISO 8601 time") from None


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _json_type(x: object) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(x), "number" if _is_number(x) else type(x).__name__)


def _short(x: object) -> str:
    text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."


def _check(rec: RunRecord, name: str, kind: type, optional: bool = False, low: float | None = None,
           high: float | None = None, unit: str = "") -> None:
    value = getattr(rec, name)
    if value is None and optional:
        return
    ok = (_is_number(value) and (kind is float or isinstance(value, int))) if kind in (int, float) else \
        isinstance(value, kind)
    if not ok:
        want = {int: "an integer", float: "a number", str: "a string", dict: "an object", bool: "true/false"}[kind]
        raise RecordError(f"field '{name}' is {_short(value)}, not {want}" + (" or null" if optional else ""))
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"[{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise RecordError(f"field '{name}' is {value!r}, not {unit} {span}")


def check_json_tree(doc: Any) -> None:
    """Reject nesting deeper than MAX_DEPTH, integers beyond 2**63 and non-finite numbers (iteratively)."""
    stack = [(doc, 1, "")]
    while stack:
        node, depth, where = stack.pop()
        if depth > MAX_DEPTH:
            raise RecordError(f"nested deeper than {MAX_DEPTH} levels (at {where or 'top'})")
        if isinstance(node, dict):
            stack.extend((v, depth + 1, f"{where}.{k}" if where else str(k)) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, depth + 1, f"{where}[{i}]") for i, v in enumerate(node))
        elif isinstance(node, bool) or node is None or isinstance(node, str):
            continue
        elif isinstance(node, int) and abs(node) > MAX_INT:
            raise RecordError(f"integer at '{where}' has {len(str(abs(node)))} digits (more than 2**63)")
        elif isinstance(node, float) and not math.isfinite(node):
            raise RecordError(f"non-finite number {node} at '{where}'")


def _no_constants(name: str) -> float:
    raise RecordError(f"non-finite number {name} (JSON has no NaN/Infinity)")


def read_json(path: str | Path) -> Any:
    """Decode a JSON file defensively; RecordError for unreadable, oversized, invalid or too deep input."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise RecordError(f"{path.stat().st_size:,} bytes, larger than any record ({MAX_BYTES:,})")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecordError(f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise RecordError(f"unreadable ({err.__class__.__name__}: {err.strerror or err})") from None
    try:
        return json.loads(text, parse_constant=_no_constants)
    except json.JSONDecodeError as err:
        raise RecordError(f"not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except RecursionError:
        raise RecordError("JSON nested too deeply to read") from None
    except ValueError as err:  # an integer literal beyond Python's digit limit
        raise RecordError(f"not a usable JSON document ({str(err).splitlines()[0]})") from None


# ---- the writer's side ------------------------------------------------------------------------------------

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
    """The record at `path` as a dict; None if there is no file. A file that is not a valid record raises
    RecordError (a paragraph naming the file and the fix): lra-train never overwrites what it cannot read."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return RunRecord.from_json(path).to_dict()
    except RecordError as err:
        raise RecordError(
            f"{path} is where this run's result record goes, but it is not a valid record: {err}. lra-train "
            "will not overwrite a file it cannot read; move or delete it (or choose another results_dir=), "
            "then run the same command again.") from None


def protocol_matches(protocol: str, task: str, backend: str, settings: dict) -> bool | None:
    """Whether settings equal the claimed protocol's preset for (task, backend); None if it has none."""
    preset = preset_settings(protocol, task, backend)
    return None if preset is None else fingerprint_of(preset) == fingerprint_of(settings)


def make_record(cfg: DictConfig, status: str, **fields: Any) -> dict:
    """The run's record as a dict (a RunRecord's fields; `fields` set the results, unknown names raise).

    Raises RecordError when `record_path(cfg)` already holds something that is not a record, so that a
    failing run never writes over it.
    """
    load_record(record_path(cfg))
    config = OmegaConf.to_container(cfg, resolve=True)
    task, backend, protocol = cfg.task.name, cfg.attention.name, cfg.protocol
    settings = fingerprint_settings(config, backend)
    try:
        matches = protocol_matches(protocol, task, backend, settings)
    except Exception:  # noqa: BLE001 - a record must still be written; the leaderboard checks again
        matches = None
    rec = RunRecord(
        run_id=run_id(cfg), status=status, task=task, attention=backend, protocol=protocol, seed=int(cfg.seed),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), config=config,
        config_hash=config_hash(cfg), fingerprint=fingerprint_of(settings), fingerprint_settings=settings,
        protocol_matches=matches, git_sha=git_sha(), versions=versions(), hardware=hardware(),
        command=" ".join(sys.argv),
    )
    known = {f.name for f in dataclass_fields(RunRecord)} - {"extra"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(f"make_record: unknown record field(s) {', '.join(unknown)} (RunRecord in "
                        "lra/training/records.py lists them; add a field there first)")
    for k, v in fields.items():
        setattr(rec, k, v)
    return rec.to_dict()
