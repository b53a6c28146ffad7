"""Compose-time checks of a run's config, before torch or Lightning is imported.

Hydra already refuses `key=value` for a key the config does not have. What it lets through, and what
this catches with one paragraph naming the key: keys that an experiment/task file or a `+key=` override
adds but nothing reads (`data.batch_szie`), values of the wrong type (`trainer.max_steps=abc`,
`model.dim=x`), `trainer.*` names that `lightning.Trainer` does not take, and group entries (logger,
callbacks) without a `_target_`.

Where the reference comes from (nothing typed here that conf/ already says):
* top-level keys: those of conf/train.yaml; a value's type is that of its default there
  (or `NULLABLE` for keys whose default is null);
* `model.*` and `data.*` keys: the parameters of their `_target_` (build_model, the DataModule), read
  from its source with `ast` (so a new model option needs no edit here), types from the annotations;
* `trainer.*` names: `lightning.Trainer.__init__`'s parameters, read from Lightning's source with `ast`
  (importing Lightning takes seconds); simple annotations (int, bool, float, Optional[...]) are checked.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from lra.config import CONF_DIR


class ConfigError(ValueError):
    """A config value that cannot work (names the key and the fix)."""


# Groups whose content belongs to the object it builds (checked there, or below by name).
OPEN_GROUPS = ("attention", "task", "optimizer", "scheduler", "hydra")
BUILT_GROUPS = ("logger", "callbacks")  # name -> {_target_: ..., ...} or null
# Defaults that are null in conf/train.yaml, and what a value must be when it is set.
NULLABLE = {"threads": int, "run_id": str, "ckpt_root": str, "data.eval_batch_size": int, "data.num_workers": int}
MINIMUM = {"seed": 0, "checkpoint_every": 0, "threads": 1, "data.batch_size": 1, "data.eval_batch_size": 1,
           "data.num_workers": 0, "trainer.max_steps": 1, "trainer.val_check_interval": 1}
# Arguments lra-train passes to what a section's _target_ builds (the task's sizes, the run's data).
SUPPLIED = {"model": ("head", "vocab_size", "num_classes", "attention"),
            "data": ("reader", "data_dir", "seed", "progress", "folder")}
# Trainer arguments lra-train sets itself, and what to use instead.
DRIVER_TRAINER_ARGS = {
    "callbacks": "the callbacks group (callbacks=..., +callbacks.<name>._target_=...)",
    "logger": "the logger group (logger=csv|wandb|none, logger=[csv,wandb])",
    "plugins": "precision= (lra-train adds its checkpoint plugin itself)",
    "default_root_dir": "runs_root=", "enable_progress_bar": "progress=", "num_sanity_val_steps": None,
    "check_val_every_n_epoch": "trainer.val_check_interval=", "use_distributed_sampler": None,
    "enable_model_summary": None, "enable_checkpointing": None,
}
_TYPES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _fail(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"{key}={value} {why}")


def _unknown(key: str, known: list[str], where: str) -> None:
    near = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" Did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{near[0]}?" if near else ""
    raise ConfigError(f"unknown config key '{key}': nothing reads it ({where} takes: {', '.join(sorted(known))})."
                      f"{hint} Fix the spelling on the command line or in the experiment/task file that sets it.")


def _check_type(key: str, value: Any, kind: type) -> None:
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, (str, int, float))}[kind](value)
    if not ok:
        _fail(key, value, f"must be {_TYPES[kind]}.")
    low = MINIMUM.get(key)
    if low is not None and value < low:
        _fail(key, value, f"must be an integer >= {low}.")


def _kind(default: Any) -> type | None:
    for t in (bool, int, float, str):  # bool first: it is an int too
        if isinstance(default, t):
            return t
    return None


def _check_section(cfg: DictConfig, ref: DictConfig, prefix: str, where: str, skip: tuple = ()) -> None:
    """Every key of `cfg` (but `skip`) must be in `ref`; a value whose default has a plain type keeps it."""
    defaults = OmegaConf.to_container(ref, resolve=False)
    known = [str(k) for k in defaults if not str(k).startswith("_") and k not in skip]
    for key in cfg.keys():
        if key in skip:
            continue
        full = f"{prefix}{key}"
        if key not in defaults:
            _unknown(full, known, where)
        default = defaults[key]
        kind = NULLABLE.get(full) or _kind(default)
        if isinstance(default, str) and "${" in default:
            kind = None  # an interpolation: its type is the target's, checked there
        value = OmegaConf.select(cfg, str(key), throw_on_resolution_failure=False)
        if kind is not None and value is not None and not isinstance(value, (DictConfig, ListConfig)):
            _check_type(full, value, kind)
        elif value is None and full in MINIMUM and full not in NULLABLE:
            _fail(full, value, f"must be {_TYPES[int]} >= {MINIMUM[full]}.")


@lru_cache(maxsize=1)
def _train_yaml() -> DictConfig:
    return OmegaConf.load(CONF_DIR / "train.yaml")


@lru_cache(maxsize=1)
def _model_reference() -> DictConfig:
    """The keys of every conf/model/*.yaml (used when the model's _target_ cannot be read)."""
    ref = OmegaConf.create({})
    for path in sorted((CONF_DIR / "model").glob("*.yaml")):
        ref = OmegaConf.merge(ref, OmegaConf.load(path))
    return ref


def _check_target_section(cfg: DictConfig, section: str, fallback: DictConfig) -> None:
    """`cfg.<section>` holds a `_target_` and its arguments: every key must be a parameter of that target
    (read from its source) that lra-train does not supply itself, with the annotated type."""
    node = cfg[section]
    params = target_parameters(str(node.get("_target_", ""))) if "_target_" in node else None
    if params is None:
        _check_section(node, fallback, f"{section}.", section)
        return
    supplied = SUPPLIED.get(section, ())
    target = node._target_
    for key in node.keys():
        full = f"{section}.{key}"
        if str(key).startswith("_"):
            continue
        if key in supplied:
            raise ConfigError(f"{full} is supplied by lra-train (from the task and the run); remove it from the "
                              "config.")
        if key not in params and "**" not in params:
            _unknown(full, [p for p in params if p not in supplied and p != "**"], target)
        value = OmegaConf.select(node, str(key), throw_on_resolution_failure=False)
        kind = int if full in MINIMUM else _annotation_kind(params.get(key))
        if value is not None and kind is not None and not isinstance(value, (DictConfig, ListConfig)):
            _check_type(full, value, kind)
        elif value is None and full in MINIMUM and full not in NULLABLE:
            _fail(full, value, f"must be {_TYPES[int]} >= {MINIMUM[full]}.")


def _module_file(module: str) -> Path | None:
    """The source file of `module`, found without importing it or its packages."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)  # a top-level find_spec imports nothing
    if spec is None:
        return None
    dirs = list(spec.submodule_search_locations or [])
    if not rest:
        return Path(spec.origin) if spec.origin else None
    for d in dirs:
        base = Path(d).joinpath(*rest)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


@lru_cache(maxsize=32)
def target_parameters(target: str) -> dict[str, str | None] | None:
    """`{parameter: annotation source}` of the function or class (its __init__) named by `target`, read
    from its source with `ast` (importing it may take seconds); None if it cannot be read that way.
    A `**kwargs` parameter appears as "**"."""
    module, _, name = target.rpartition(".")
    path = _module_file(module) if module else None
    if path is None:
        return None
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            node = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
            if node is None:
                return None
            skip = 1
        elif isinstance(node, ast.FunctionDef) and node.name == name:
            skip = 0
        else:
            continue
        args = [*node.args.posonlyargs, *node.args.args][skip:] + node.args.kwonlyargs
        out = {a.arg: ast.unparse(a.annotation) if a.annotation else None for a in args}
        if node.args.kwarg is not None:
            out["**"] = None
        return out
    return None


@lru_cache(maxsize=1)
def trainer_parameters() -> dict[str, str | None]:
    """`lightning.Trainer.__init__`'s parameter names -> annotation source, read without importing it."""
    spec = importlib.util.find_spec("lightning")
    source = Path(spec.origin).parent / "pytorch" / "trainer" / "trainer.py"
    tree = ast.parse(source.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "Trainer":
            init = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
            args = [*init.args.args[1:], *init.args.kwonlyargs]
            return {a.arg: ast.unparse(a.annotation) if a.annotation else None for a in args}
    raise RuntimeError(f"no Trainer class in {source}")


def _annotation_kind(text: str | None) -> type | None:
    """int/float/bool/str for `int`, `int | None`, `Optional[int]` and the like; None for anything else."""
    if text is None:
        return None
    t = text.replace(" ", "")
    if t.startswith("Optional[") and t.endswith("]"):
        t = t[len("Optional["):-1]
    parts = [p for p in t.split("|") if p != "None"]
    return {"int": int, "bool": bool, "float": float, "str": str}.get(parts[0]) if len(parts) == 1 else None


def _check_trainer(cfg: DictConfig) -> None:
    params = trainer_parameters()
    for key in cfg.trainer.keys():
        full = f"trainer.{key}"
        if key == "_target_":
            continue
        if key in DRIVER_TRAINER_ARGS:
            use = DRIVER_TRAINER_ARGS[key]
            raise ConfigError(f"{full} is set by lra-train itself" + (f"; use {use} instead." if use else "."))
        if key not in params:
            _unknown(full, [p for p in params if p not in DRIVER_TRAINER_ARGS], "lightning.Trainer")
        value = OmegaConf.select(cfg.trainer, str(key), throw_on_resolution_failure=False)
        kind = _annotation_kind(params[key])
        if full in MINIMUM:
            kind = int
        if value is not None and kind is not None:
            _check_type(full, value, kind)
        elif value is None and full in MINIMUM:
            _fail(full, value, f"must be {_TYPES[int]} >= {MINIMUM[full]}.")


def _check_built(cfg: DictConfig, group: str) -> None:
    section = cfg.get(group)
    if section is None:
        return
    if not isinstance(section, DictConfig):
        raise ConfigError(f"{group} must be a mapping of name -> {{_target_: ..., ...}}; choose one with "
                          f"{group}=<file in conf/{group}/>.")
    for name in section.keys():
        entry = section[name]
        if entry is not None and (not isinstance(entry, DictConfig) or "_target_" not in entry):
            raise ConfigError(f"{group}.{name} has no _target_: each {group} entry is {{_target_: <class>, "
                              f"<its arguments>}} (or null to drop it).")


def validate(cfg: DictConfig) -> None:
    """ConfigError naming the first unknown or mistyped key of `cfg` (a composed lra-train config)."""
    ref = _train_yaml()
    top = {k for k in ref.keys() if k != "defaults"} | {"model", "trainer", *OPEN_GROUPS, *BUILT_GROUPS}
    for key in cfg.keys():
        if key not in top:
            _unknown(str(key), sorted(top - {"hydra"}), "the top level")
    _check_section(cfg, ref, "", "the top level", skip=("defaults", "data", "model", "trainer", *OPEN_GROUPS,
                                                        *BUILT_GROUPS))
    _check_target_section(cfg, "data", ref.data)
    _check_target_section(cfg, "model", _model_reference())
    _check_trainer(cfg)
    for group in BUILT_GROUPS:
        _check_built(cfg, group)
    if cfg.get("run_id") is not None:
        raise ConfigError(f"run_id={cfg.run_id} is set by lra-train from the config (task, backend, seed and a "
                          "hash of the settings); leave it out. To keep runs apart, change runs_root.")


def _section_keys(section: str) -> list[str] | None:
    """The keys `section.<key>=` may set, from the sources above; None when any key may be valid."""
    if section == "trainer":
        return [p for p in trainer_parameters() if p not in DRIVER_TRAINER_ARGS]
    refs = [_train_yaml().data] if section == "data" else \
        [OmegaConf.load(p) for p in sorted((CONF_DIR / "model").glob("*.yaml"))]
    keys: set[str] = set()
    for ref in refs:
        params = target_parameters(str(ref.get("_target_", ""))) if "_target_" in ref else None
        if params is None or "**" in params:
            return None
        keys |= {p for p in params if p not in SUPPLIED.get(section, ())}
    return sorted(keys)


def check_overrides(overrides: list[str]) -> None:
    """ConfigError for a command-line `key=value` whose key is misspelt (Hydra would say only that it cannot
    override it, and suggest appending it with `+`): plain top-level keys and `data.`/`model.`/`trainer.`
    keys are checked against what reads them. Prefixed (`+`, `~`, `++`), `hydra.` and group keys pass."""
    ref = _train_yaml()
    groups = {next(iter(d)) if isinstance(d, dict) else str(d) for d in OmegaConf.to_container(ref.defaults)}
    top = {str(k) for k in ref.keys() if k != "defaults"} | {"model", "trainer", *OPEN_GROUPS, *BUILT_GROUPS} \
        | {g.removeprefix("optional ").split("@")[0] for g in groups if not g.startswith(("override ", "_self_"))}
    for arg in overrides:
        key, eq, _ = arg.partition("=")
        if not eq or arg.startswith(("-", "+", "~")) or "/" in key or "@" in key:
            continue
        head, _, rest = key.partition(".")
        if not rest:
            if key not in top:
                _unknown(key, sorted(top - {"hydra"}), "the top level")
        elif head in ("data", "model", "trainer") and "." not in rest:
            known = _section_keys(head)
            if head == "trainer" and rest in DRIVER_TRAINER_ARGS:
                continue  # validate() says what to use instead
            if known is not None and rest not in known:
                _unknown(key, known, {"data": "data", "model": "model", "trainer": "lightning.Trainer"}[head])
