"""`lra-leaderboard`: result records -> LRA tables (markdown, CSV, JSON), a plot and an optional wandb log.

Modules, each importing only those before it: `load` (records and their honest labels) -> `table` (cells of
one fingerprint) -> `markdown`, `export` (CSV/JSON) -> `plot` (PNG, wandb) -> `cli`. This file imports none
of them, so `lra.leaderboard:main` (the console script) loads the package only when it runs.
"""

from __future__ import annotations

from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """`lra-leaderboard` (see lra.leaderboard.cli)."""
    from lra.leaderboard.cli import main as cli_main

    return cli_main(argv)
