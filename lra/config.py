"""Where the Hydra configs live, how non-Hydra entry points compose them, and what they define.

The configs ship inside the package (`lra.conf`, mapped from the top-level conf/ at build time), so an
installed wheel finds them from any folder; a source checkout uses its conf/ directly.

Users add config folders with Hydra's own `hydra.searchpath=[file:///DIR]` on the command line, or with
the shortcut `LRA_CONFIG_PATH=DIR[:DIR...]` (read by every entry point through train.yaml's
`hydra.searchpath: ${lra_searchpath:}`; an explicit `hydra.searchpath=` on the command line replaces it).
A folder there may hold `attention/<name>.yaml` and `task/<name>.yaml`: discovery (`backend_names`,
`task_names`) sees them beside ours, and `attention=<name>` / `task=<name>` picks them.

    python -m lra.config backends      # the discovered backends, one line
    python -m lra.config backends --protocol nystromformer   # the ones a protocol's table compares (Makefile)
    python -m lra.config tasks
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

SEARCHPATH_ENV = "LRA_CONFIG_PATH"
# Config groups whose file name is the `name` of what they define (records, run ids, tables).
NAMED_GROUPS = ("attention", "task")
NOUN = {"attention": "backend", "task": "task"}


class ConfigPathError(ValueError):
    """The configs, or a folder on the searchpath, cannot be found (names the folder and the fix)."""


class ConfigNameError(ValueError):
    """`attention.name` / `task.name` set to something other than the chosen file's name."""


def _conf_dir() -> Path:
    env = os.environ.get("LRA_CONF_DIR")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "conf" / "train.yaml").is_file():
        return root / "conf"  # a source checkout (or an editable install of one)
    installed = Path(__file__).resolve().parent / "conf"  # an installed wheel: conf/ shipped as lra/conf/
    if not (installed / "train.yaml").is_file():
        raise ConfigPathError(f"lra's configs are missing: no {installed}/train.yaml (nor a source checkout's "
                              "conf/). Reinstall the package (pip install lra / pip install -e .).")
    return installed


CONF_DIR = _conf_dir()


def user_searchpath() -> list[str]:
    """The searchpath entries LRA_CONFIG_PATH asks for, as Hydra URLs (file:///abs/dir or pkg://...)."""
    out = []
    for entry in filter(None, os.environ.get(SEARCHPATH_ENV, "").split(os.pathsep)):
        if "://" in entry:
            out.append(entry)
            continue
        path = Path(entry).expanduser().resolve()
        if not path.is_dir():
            raise ConfigPathError(f"{SEARCHPATH_ENV} names '{entry}', which is not a folder; fix or remove it "
                                  f"({SEARCHPATH_ENV}=DIR[{os.pathsep}DIR...], each holding attention/ or task/).")
        check_no_shadowing(path)
        out.append(f"file://{path}")
    return out


def check_no_shadowing(folder: Path) -> None:
    """ConfigPathError if a user config folder holds a file named like one of ours: Hydra would silently
    use ours (conf/ comes first on the searchpath), so the user's would never run."""
    for group in NAMED_GROUPS:
        clash = sorted(p.name for p in (Path(folder) / group).glob("*.yaml") if (CONF_DIR / group / p.name).is_file())
        if clash:
            raise ConfigPathError(
                f"{folder}/{group}/{clash[0]} has the name of a built-in {NOUN[group]} (conf/{group}/{clash[0]}), "
                "which Hydra would use instead of yours; rename your file (its name is the "
                f"{NOUN[group]}'s name).")


if not OmegaConf.has_resolver("lra_searchpath"):
    OmegaConf.register_new_resolver("lra_searchpath", user_searchpath)


def name_groups(cfg: DictConfig, choices: dict) -> DictConfig:
    """Fill `<group>.name` from the chosen file name where train.yaml left it to Hydra's choices, so the
    config stays complete outside a Hydra app (no `${hydra:...}` left to resolve)."""
    with open_dict(cfg):
        for group in NAMED_GROUPS:
            node = cfg.get(group)
            if isinstance(node, DictConfig) and OmegaConf.to_container(node).get("name") == \
                    f"${{hydra:runtime.choices.{group}}}":
                node.name = choices[group]
    return cfg


def error_text(err: BaseException) -> str:
    """One line for a config error: our own message when a resolver raised it (OmegaConf wraps it), else
    the first line of the error."""
    seen = err
    while seen is not None:
        if isinstance(seen, (ConfigPathError, ConfigNameError)):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def name_mismatch(cfg: DictConfig, choices: dict | None = None) -> str | None:
    """A message if `<group>.name` differs from the file chosen for that group (e.g. `attention.name=x`
    on the command line, which would label one backend's run with another name), else None. Inside a
    Hydra app the choices come from HydraConfig."""
    if choices is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        choices = HydraConfig.get().runtime.choices
    for group in NAMED_GROUPS:
        chosen, name = choices.get(group), OmegaConf.select(cfg, f"{group}.name")
        if chosen is not None and name != chosen:
            return (f"{group}.name={name} but the {group} config is {group}/{chosen}.yaml: a {NOUN[group]}'s name is "
                    f"its file name and cannot be set (drop `name:` from that yaml, or {group}.name= from the "
                    "command line). Pick another with {group}=<name> (`python -m lra.config "
                    f"{'backends' if group == 'attention' else 'tasks'}` lists them), or copy {chosen}.yaml under "
                    f"the new name into a folder on the searchpath ({SEARCHPATH_ENV}=DIR, DIR/{group}/<name>.yaml).")
    return None


def compose(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose `conf/<config_name>.yaml` with overrides, outside a Hydra app (CLI tools, tests)."""
    from hydra import compose as _compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = _compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    cfg = name_groups(cfg, choices)
    bad = name_mismatch(cfg, choices)
    if bad:
        raise ConfigNameError(bad)
    return cfg


def group_options(group: str, overrides: list[str] | None = None) -> list[str]:
    """The config files of `group` on the whole searchpath (ours, LRA_CONFIG_PATH, a `hydra.searchpath=`
    override), by name; files in subfolders come as 'sub/name'."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        return sorted(set(loader.get_group_options(group, config_name="train", overrides=list(overrides or []))))


def backend_names(overrides: list[str] | None = None) -> list[str]:
    """Every attention backend: the `attention/*.yaml` files on the searchpath."""
    return [n for n in group_options("attention", overrides) if "/" not in n]


def task_names(overrides: list[str] | None = None) -> list[str]:
    """Every task: the `task/*.yaml` files on the searchpath."""
    return [n for n in group_options("task", overrides) if "/" not in n]


def protocol_backends(protocol: str, overrides: list[str] | None = None) -> list[str]:
    """The backends with protocol options of their own under `protocol`: the files of
    `protocol_attention/<protocol>/` when it has any, else every backend. (Used by the long-range check
    and mini-lra. The backends a paper's table reports are another list: `lra.published.protocol_backends`,
    which the reproduce targets loop over; a reported backend without a file runs its yaml defaults.)"""
    own = [n for n in group_options(f"protocol_attention/{protocol}", overrides) if "/" not in n]
    return own or backend_names(overrides)


def attention_spec(name: str, overrides: list[str] | None = None) -> dict:
    """Backend `name`'s composed settings: {"_target_", "name", **options} (overrides: `attention.k=v`...)."""
    cfg = compose([f"attention={name}", *(overrides or [])])
    return OmegaConf.to_container(cfg.attention, resolve=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m lra.config", description="List what the configs define.")
    p.add_argument("what", choices=["backends", "tasks", "conf-dir", "searchpath"])
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. hydra.searchpath=[file:///DIR]")
    p.add_argument("--protocol", help="backends: the ones protocol PROTOCOL compares (conf/protocol_attention/)")
    args = p.parse_args(argv)
    try:
        if args.what == "conf-dir":
            print(CONF_DIR)
        elif args.what == "searchpath":
            print("\n".join([f"file://{CONF_DIR}", *user_searchpath()]))
        else:
            if args.what == "tasks":
                names = task_names(args.overrides)
            elif args.protocol:
                names = protocol_backends(args.protocol, args.overrides)
            else:
                names = backend_names(args.overrides)
            print(" ".join(names))
    except Exception as err:  # noqa: BLE001 - a config problem: one line, no traceback
        print(f"python -m lra.config: error: {error_text(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
