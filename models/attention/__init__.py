"""Attention backends, built from a spec: no registry.

A backend is any importable `nn.Module` class that follows the contract in `models.attention.base`
(`__init__(num_heads, head_dim, max_len=None, **options)`, `forward(q, k, v, key_padding_mask)`). The
harness names it by a config file, `attention/<name>.yaml`, whose `_target_` is the class and whose
other keys are constructor options; the file name is the backend's name. Ours live in conf/attention/,
a user's in any folder on Hydra's searchpath. Model code only sees the resulting spec:

    {"_target_": "models.attention.nystrom.NystromAttention", "name": "nystrom", "num_landmarks": 64}

`name` (filled in by the config, never a constructor option) is only used in messages.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from models.attention.base import AttentionBackend, AttentionConfigError



def _where(name: str | None, target: str) -> str:
    return f"attention backend '{name}' (attention/{name}.yaml, _target_: {target})" if name else \
        f"attention backend _target_: {target}"


def backend_class(target: str | type, name: str | None = None) -> type[nn.Module]:
    """The class a `_target_` names ('package.module.Class'), or AttentionConfigError saying why not."""
    if isinstance(target, type):
        cls = target
    else:
        module_name, _, attr = str(target).rpartition(".")
        if not module_name:
            raise AttentionConfigError(
                f"{_where(name, target)}: `_target_` must be a dotted path 'package.module.Class'; fix the "
                "`_target_` key of that yaml.")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise AttentionConfigError(
                f"{_where(name, target)}: cannot import module '{module_name}' ({err}). Install the package "
                "that holds it or put its folder on PYTHONPATH, or fix the `_target_` key of that yaml."
            ) from None
        except Exception as err:  # noqa: BLE001 - the user's module itself is broken (syntax, its own imports)
            raise AttentionConfigError(
                f"{_where(name, target)}: importing module '{module_name}' failed: {type(err).__name__}: {err}"
            ) from err
        cls = getattr(module, attr, None)
        if cls is None:
            raise AttentionConfigError(
                f"{_where(name, target)}: module '{module_name}' has no '{attr}'; fix the `_target_` key of "
                "that yaml.")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise AttentionConfigError(
            f"{_where(name, getattr(cls, '__name__', target))}: `_target_` must name a torch.nn.Module "
            f"subclass, got {cls!r}.")
    return cls


def capability(backend: nn.Module | type, flag: str) -> Any:
    """A capability flag of a backend class or instance; one it does not set (a plain nn.Module) has the
    default AttentionBackend declares, so the defaults are written once, in base.py."""
    return getattr(backend, flag, getattr(AttentionBackend, flag))


def split_spec(spec: Mapping[str, Any]) -> tuple[str | None, Any, dict[str, Any]]:
    """{"_target_", "name", **options} -> (name, target, options)."""
    options = dict(spec)
    name = options.pop("name", None)
    if "_target_" not in options:
        where = f"attention/{name}.yaml" if name else "the attention settings"
        raise AttentionConfigError(
            f"{where} has no `_target_` key; add `_target_: package.module.Class` naming the backend class.")
    return name, options.pop("_target_"), options


def build_attention(
    spec: Mapping[str, Any],
    *,
    num_heads: int,
    head_dim: int,
    max_len: int | None = None,
) -> nn.Module:
    """Build the backend `spec` describes: `spec["_target_"](num_heads, head_dim, max_len, **options)`.

    Every problem (class cannot be imported, not a module, an option it does not take, a missing one)
    is an AttentionConfigError that names the yaml and the key."""
    name, target, options = split_spec(spec)
    cls = backend_class(target, name)
    where = _where(name, target if isinstance(target, str) else cls.__qualname__)
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):  # a C-implemented __init__: let the call speak
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if params and not takes_any:
        missing = [k for k in ("num_heads", "head_dim", "max_len") if k not in params]
        if missing:
            raise AttentionConfigError(
                f"{where}: {cls.__qualname__}.__init__ does not take {', '.join(missing)}; a backend's "
                "constructor is __init__(num_heads, head_dim, max_len=None, **options) (docs/CONTRACTS.md).")
        allowed = [k for k in params if k not in ("self", "num_heads", "head_dim", "max_len")]
        unknown = [k for k in options if k not in allowed]
        if unknown:
            raise AttentionConfigError(
                f"{where}: option {', '.join(repr(k) for k in unknown)} is not a constructor argument of "
                f"{cls.__qualname__} (its options: {', '.join(allowed) or 'none'}); remove that key from the "
                "yaml or fix its spelling (on the command line: attention.<option>=...).")
    required = [k for k, p in params.items() if k not in ("self", "num_heads", "head_dim", "max_len")
                and p.default is inspect.Parameter.empty
                and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
                and k not in options]
    if required:
        raise AttentionConfigError(
            f"{where}: option {', '.join(repr(k) for k in required)} has no default in {cls.__qualname__}; add "
            "it to the yaml (or attention.<option>=... on the command line).")
    if capability(cls, "needs_max_len") and not max_len:
        raise AttentionConfigError(
            f"{where} needs a maximum sequence length (max_len) when it is built; the model passes the "
            "task's max_len, so set task.max_len (or model.max_len).")
    try:
        backend = cls(num_heads=num_heads, head_dim=head_dim, max_len=max_len, **options)
    except AttentionConfigError as err:
        raise AttentionConfigError(f"{where}: {err}") from None
    except TypeError as err:
        raise AttentionConfigError(f"{where}: bad options {sorted(options)}: {err}") from None
    return backend


__all__ = ["AttentionBackend", "AttentionConfigError", "backend_class", "build_attention",
           "capability", "split_spec"]
