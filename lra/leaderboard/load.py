"""Reading records for the leaderboard, and deciding each one's honest label.

A record claims a protocol; it is shown under that protocol only when its fingerprint equals the protocol's
preset for its task and backend (lra/training/fingerprint.py). Otherwise it goes to `<protocol> (modified)`
(or `(unverified)` when no preset composes any more), its row labelled with the settings that differ from the
preset; `custom` runs are labelled with what differs from the plain `task=<t> attention=<b>` defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Sequence

from lra.training.fingerprint import UNSET, default_settings, differences, fingerprint_of, preset_settings
from lra.training.records import RecordError, RunRecord

_TASK_ALIASES = {"path-x": "pathx", "path_x": "pathx"}
MODIFIED, UNVERIFIED = "modified", "unverified"
MAX_LABEL_KEYS = 4  # a row label names at most this many differing keys (all of them go to the JSON)


@dataclass(frozen=True)
class Entry:
    """One readable record and where it belongs on the board."""

    path: Path
    record: RunRecord
    section: str  # the protocol as shown: `nystromformer`, `nystromformer (modified)`, `custom`, ...
    variant: tuple[tuple[str, str], ...]  # (key, our value) that differ from the section's reference settings

    @property
    def task(self) -> str:
        task = self.record.task.strip().lower()
        return _TASK_ALIASES.get(task, task)

    @property
    def backend(self) -> str:
        return self.record.attention.strip()

    @property
    def claimed(self) -> str:
        return self.record.protocol.strip()

    @property
    def matches(self) -> bool:
        """True when the run is exactly its protocol's preset (and so may be compared with the paper)."""
        return self.section == self.claimed and self.claimed != "custom"

    @property
    def finished(self) -> bool:
        return self.record.status == "finished"

    @property
    def created(self) -> datetime:
        return self.record.created_at

    @property
    def error(self) -> str | None:
        err = self.record.error
        return err.strip().splitlines()[-1] if err and err.strip() else None


def variant_label(backend: str, variant: Sequence[tuple[str, str]]) -> str:
    """`performer [attention.kernel=relu]`, `linformer [lacks attention.sharing]` (a key the record has no
    value for, e.g. an option added after it was written); long lists are cut, with a stable hash of the whole."""
    if not variant:
        return backend
    names = [f"{k}={v}" for k, v in variant if v != UNSET] + [k for k, v in variant if v == UNSET]
    n_set = sum(v != UNSET for _, v in variant)
    cut = len(names) > MAX_LABEL_KEYS
    shown = names[:MAX_LABEL_KEYS - 1] if cut else names
    parts = shown[:n_set]
    if len(shown) > n_set:
        parts.append("lacks " + ", ".join(shown[n_set:]))
    if cut:
        parts.append(f"+{len(names) - len(shown)} more, #{fingerprint_of(dict(variant))[:6]}")
    return f"{backend} [{', '.join(parts)}]"


def classify(record: RunRecord) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(section, variant) of a record: see the module docstring."""
    claimed = record.protocol.strip()
    task = _TASK_ALIASES.get(record.task.strip().lower(), record.task.strip().lower())
    backend = record.attention.strip()
    settings = record.fingerprint_settings
    if claimed != "custom":
        preset = preset_settings(claimed, task, backend)
        if preset is not None:
            if fingerprint_of(preset) == record.fingerprint:
                return claimed, ()
            return f"{claimed} ({MODIFIED})", differences(settings, preset)
    base = default_settings(task, backend)
    section = "custom" if claimed == "custom" else f"{claimed} ({UNVERIFIED})"
    if base is None:
        return section, (("fingerprint", record.fingerprint or "?"),)
    return section, differences(settings, base)


def load_records(folders: Sequence[Path], exclude: Sequence[Path] = ()) -> tuple[list[Entry], list[tuple[Path, str]]]:
    """All records under `folders` (recursive `*.json`; a folder may also be a single file).

    Returns (entries, skipped) where skipped lists (path, one-line reason). Hidden files, paths in `exclude`
    (our own outputs, the wandb folder) and anything below them are ignored silently.
    """
    excluded = [p.resolve() for p in exclude]
    entries: list[Entry] = []
    skipped: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for folder in folders:
        if not folder.exists():
            skipped.append((folder, "no such file or folder"))
            continue
        files = [folder] if folder.is_file() else sorted(
            p for p in folder.rglob("*.json") if p.is_file() and not p.name.startswith("."))
        for path in files:
            real = path.resolve()
            if real in seen or any(real == e or e in real.parents for e in excluded):
                continue
            seen.add(real)
            try:
                record = RunRecord.from_json(path)
            except RecordError as err:
                skipped.append((path, f"not a result record: {err}"))
                continue
            section, variant = classify(record)
            entries.append(Entry(path, record, section, variant))
    return entries, skipped
