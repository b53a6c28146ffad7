"""What a run trained and evaluated, as a hash: the fingerprint, and the presets it is compared with.

A record's fingerprint is a sha256 over its *fingerprinted settings*: the resolved config flattened to dotted
keys, minus the keys below, which say where things go, how a run is watched or on what it runs, never what is
computed. Everything else counts (a key nobody listed is identity by default), in particular:

    backend (the attention yaml's name) and every `attention.*` option; `model.*`; `task.*` (name, max_len,
    reader options: the data); `data.batch_size`; `optimizer.*`; `scheduler.*`; `trainer.max_steps`,
    `trainer.val_check_interval`, `trainer.limit_val_batches`/`limit_test_batches`, gradient clipping and
    accumulation; `precision` (and `trainer.precision`).

Left out: `seed` (a cell averages seeds), `protocol` (the label is decided by the fingerprint, not claimed),
paths (`data_dir`, `results_dir`, `ckpt_root`, `run_dir`), logging (`logger`, `progress`,
`trainer.log_every_n_steps`...), `threads`, `compile`, `resume`, `skip_done`, `checkpoint_every`, `data.num_workers`,
`data.eval_batch_size` (padding never changes outputs at real positions, so it changes speed only), the
devices (`trainer.accelerator/devices/num_nodes/strategy`: `data.batch_size` is the global batch, so N
processes see the examples one does), `trainer.deterministic`, and `attention._target_`/`attention.name`
(replaced by `backend`, the yaml's file name, so records from before `_target_` existed compare equal), and
likewise the `_target_`/`_partial_` of `model`, `data` and `trainer` (the objects lra-train builds); the run
folder (`runs_root`, `run_id`) and `callbacks` (like the logger).

A run claims protocol P; it is labelled P only when its fingerprint equals the fingerprint of the preset
composed for it: `experiment=P/<task> attention=<backend>` (or `experiment=P` when P is one file).
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
from typing import Any

# Top-level keys that never change what is trained or evaluated.
EXCLUDED_TOP = frozenset({"seed", "protocol", "data_dir", "results_dir", "ckpt_root", "runs_root", "run_id",
                          "run_dir", "logger", "callbacks", "progress", "resume", "skip_done", "checkpoint_every",
                          "threads", "compile", "hydra"})
# Keys inside a section that never change what is trained or evaluated.
EXCLUDED_SUB = {
    "data": frozenset({"num_workers", "eval_batch_size", "_target_", "_partial_"}),
    "model": frozenset({"_target_", "_partial_"}),
    "trainer": frozenset({"_target_", "accelerator", "devices", "num_nodes", "strategy", "log_every_n_steps",
                          "enable_progress_bar", "enable_model_summary", "enable_checkpointing", "logger",
                          "callbacks", "default_root_dir", "deterministic", "benchmark", "profiler"}),
    "attention": frozenset({"name", "_target_"}),
}
# A name that may be passed to Hydra as a config choice (records are hostile: no paths, no override syntax).
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
UNSET = "(unset)"  # how a key that one side lacks is shown in a difference


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, dict) and node:
        for key in sorted(node, key=str):
            _flatten(node[key], f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = node


def fingerprint_settings(config: dict, backend: str | None = None) -> dict[str, Any]:
    """The fingerprinted settings of a resolved config (a plain dict), as {dotted key: value}.

    `backend` defaults to `config["attention"]["name"]`.
    """
    if backend is None:
        att = config.get("attention")
        backend = att.get("name") if isinstance(att, dict) else None
    out: dict[str, Any] = {"backend": backend}
    for key, value in config.items():
        if key in EXCLUDED_TOP:
            continue
        if isinstance(value, dict) and key in EXCLUDED_SUB:
            value = {k: v for k, v in value.items() if k not in EXCLUDED_SUB[key]}
        _flatten(value, str(key), out)
    return out


def fingerprint_of(settings: dict[str, Any]) -> str:
    """16 hex digits of the sha256 of the settings (sorted keys, canonical JSON)."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def differences(ours: dict[str, Any], reference: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The keys whose values differ, as sorted (key, our value as text); a key we lack shows `(unset)`."""
    def text(d: dict[str, Any], k: str) -> str:
        return json.dumps(d[k], sort_keys=True, default=str) if k in d else UNSET

    def shown(k: str) -> str:
        return ours[k] if k in ours and isinstance(ours[k], str) else text(ours, k)

    return tuple((k, shown(k)) for k in sorted(set(ours) | set(reference)) if text(ours, k) != text(reference, k))


def _compose_resolved(overrides: tuple[str, ...]) -> dict:
    """Compose train.yaml with `overrides` and resolve it to a dict (names filled from Hydra's choices).

    Inside a running Hydra app (lra-train writing its record) the app's own Hydra instance composes, so its
    searchpath applies and its global state is left alone; elsewhere `lra.config.compose` does.
    """
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    gh = GlobalHydra.instance()
    if not gh.is_initialized():
        from lra.config import compose

        return OmegaConf.to_container(compose(list(overrides)), resolve=True)
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    extra = []
    if HydraConfig.initialized():
        extra = [o for o in HydraConfig.get().overrides.hydra if o.startswith("hydra.searchpath")]
    cfg = gh.hydra.compose_config("train", list(overrides) + extra, run_mode=RunMode.RUN, from_shell=False)
    from lra.config import name_groups

    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return OmegaConf.to_container(name_groups(cfg, choices), resolve=True)


@functools.lru_cache(maxsize=None)
def preset_config(protocol: str, task: str, backend: str) -> dict | None:
    """The resolved config of protocol `protocol`'s preset for (task, backend); None when none composes.

    `custom` has no preset. The preset is `experiment=<protocol>/<task>`, or `experiment=<protocol>` when the
    protocol is one file (it must then select `task`). Cached per process: treat the result as read-only.
    """
    if protocol == "custom" or not all(isinstance(x, str) and _NAME.fullmatch(x) for x in (protocol, task, backend)):
        return None
    for overrides in ((f"experiment={protocol}/{task}", f"attention={backend}"),
                      (f"experiment={protocol}", f"task={task}", f"attention={backend}")):
        try:
            config = _compose_resolved(overrides)
        except Exception:  # noqa: BLE001 - no such preset / backend: nothing to compare with
            continue
        if config.get("protocol") == protocol and (config.get("task") or {}).get("name") == task:
            return config
    return None


@functools.lru_cache(maxsize=None)
def preset_settings(protocol: str, task: str, backend: str) -> dict[str, Any] | None:
    """Fingerprinted settings of `preset_config(protocol, task, backend)`; None when there is no preset."""
    config = preset_config(protocol, task, backend)
    return None if config is None else fingerprint_settings(config, backend)


@functools.lru_cache(maxsize=None)
def default_settings(task: str, backend: str) -> dict[str, Any] | None:
    """Fingerprinted settings of plain `task=<task> attention=<backend>` (what `custom` runs differ from)."""
    if not all(isinstance(x, str) and _NAME.fullmatch(x) for x in (task, backend)):
        return None
    try:
        return fingerprint_settings(_compose_resolved((f"task={task}", f"attention={backend}")), backend)
    except Exception:  # noqa: BLE001 - an unknown task or backend has no defaults
        return None
