"""Where the Hydra configs live and how non-Hydra entry points compose them."""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

CONF_DIR = Path(os.environ.get("LRA_CONF_DIR", Path(__file__).resolve().parent.parent / "conf"))


def compose(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose `conf/<config_name>.yaml` with overrides, outside a Hydra app (CLI tools, tests)."""
    from hydra import compose as _compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return _compose(config_name=config_name, overrides=list(overrides or []))


def task_names() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml"))
