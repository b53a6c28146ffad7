"""Checkpoint safety. Every checkpoint this harness writes or reads goes through `RunCheckpointIO`
(lra/training/checkpoint_io.py, Lightning's public CheckpointIO plugin hook), which

* writes atomically: serialised in memory, written to `.<name>.tmp<pid>` beside the target, flushed and
  renamed (lra/atomic.py), so a kill or a full disk mid-write never leaves a file a later run would trust;
* loads with `torch.load(weights_only=True)` only: a checkpoint cannot run code when it is read;
* touches only files inside its run's checkpoint folder: a remote (`scheme://`) path, or a path that
  leaves the folder (absolute elsewhere, `../`, a symlink out), is refused with CheckpointError before
  anything is opened, fetched or deleted.

A checkpoint's own bookkeeping is never trusted either: `check_resume_checkpoint` reads `last.ckpt`
(weights only) and refuses one whose checkpoint-callback state names a file outside the folder, and
`checked_best_path` refuses such a best-model path before the test pass.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

from lra.training.schema import ConfigError

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Checkpoint-callback state entries that hold file paths (Lightning's ModelCheckpoint.state_dict).
PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (names the file and the fix)."""


def inside(path: str | os.PathLike, folder: Path) -> Path:
    """`path` as an absolute local path inside `folder` (symlinks resolved), or CheckpointError."""
    text = os.fspath(path)
    if _SCHEME.match(text):
        raise CheckpointError(f"refused checkpoint path '{text}': a remote location (this harness reads "
                              f"checkpoints only from the run's own folder {folder}).")
    real, root = Path(text).resolve(), Path(folder).resolve()
    if real.parent != root:
        raise CheckpointError(f"refused checkpoint path '{text}': it is not a file inside this run's checkpoint "
                              f"folder {root}. A checkpoint that names such a path was written by something "
                              "else or tampered with; delete it (or pass resume=never) to start the run over.")
    return real


def load_failure(err: BaseException) -> str:
    """Why a weights-only load failed, in one line (torch's own text suggests turning the check off)."""
    text = str(err).strip()
    if "Weights only load failed" in text or type(err).__name__ == "UnpicklingError":
        return "it holds objects other than tensors and plain values, which are refused: unpickling them could run code"
    return (text.splitlines() or [type(err).__name__])[0][:160]


def _torch_load(path: Path, **kwargs) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True, **kwargs)


def load_weights_only(path: str | os.PathLike, folder: Path) -> dict:
    """The checkpoint at `path` (which must lie in `folder`), loaded with weights_only=True."""
    return _torch_load(inside(path, folder))


def remove_partial_checkpoints(folder: Path) -> list[Path]:
    """Delete leftovers of interrupted checkpoint writes (`*.tmp*`) in `folder`; returns what was removed."""
    gone = sorted(p for p in Path(folder).glob("*.tmp*") if p.is_file()) if Path(folder).is_dir() else []
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def _recorded_paths(ckpt: dict, folder: Path) -> list[str]:
    """Every file path that a checkpoint callback's saved state names and Lightning would reuse: those of
    states saved for this folder (Lightning ignores a state whose dirpath is another folder)."""
    out: list[str] = []
    for state in (ckpt.get("callbacks") or {}).values():
        if not isinstance(state, dict):
            continue
        if isinstance(state.get("dirpath"), str) and state["dirpath"] != os.path.realpath(folder):
            continue
        out += [str(state[k]) for k in PATH_KEYS if state.get(k)]
        out += [str(k) for k in (state.get("best_k_models") or {})]
    return out


def check_resume_checkpoint(path: Path, module, folder: Path) -> int:
    """The global step of the resume checkpoint `path`; CheckpointError if it cannot be resumed from: not a
    complete checkpoint of this harness, another model, or bookkeeping naming files outside `folder`."""
    fix = (f"Delete {path} to start this run over, or pass resume=never (which discards this run's "
           "checkpoints).")
    try:
        ckpt = _torch_load(inside(path, folder), mmap=True)
        step, state = int(ckpt["global_step"]), ckpt["state_dict"]
        for key in ("loops", "optimizer_states", "lra_process_states"):
            ckpt[key]
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure means the file cannot be trusted
        reason = load_failure(err)
        if isinstance(err, KeyError):
            reason = f"no {err} entry"
        raise CheckpointError(f"cannot resume from {path}: it is not a complete checkpoint of this harness "
                              f"({reason}); it was damaged or written by something else (this harness writes "
                              f"checkpoints under a temporary name and renames them when complete). {fix}") from None
    for named in _recorded_paths(ckpt, folder):
        try:
            inside(named, folder)
        except CheckpointError:
            raise CheckpointError(f"cannot resume from {path}: its checkpoint bookkeeping names '{named}', which "
                                  f"is not a file inside this run's checkpoint folder {folder}; the file was "
                                  f"tampered with or written elsewhere. {fix}") from None
    mine, theirs = set(module.state_dict()), set(state)
    if mine != theirs:
        diff = sorted(mine ^ theirs)
        raise CheckpointError(f"cannot resume from {path}: it holds a different model ({len(diff)} parameter "
                              f"names differ, e.g. '{diff[0]}'); the code changed since it was written. {fix}")
    return step


def checked_best_path(best: str | None, folder: Path) -> str | None:
    """The best-validation checkpoint to test, checked: an existing file inside `folder`, or CheckpointError."""
    if not best:
        return None
    path = inside(best, folder)
    if not path.is_file():
        raise CheckpointError(f"the best checkpoint {path} is missing; the run folder was changed while it ran. "
                              "Rerun with resume=never to start over.")
    return str(path)
