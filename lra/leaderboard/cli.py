"""`lra-leaderboard`: result records (docs/CONTRACTS.md) -> LRA-style tables, CSV/JSON and a plot.

Records are read recursively from one or more folders; a file that is not a valid record is skipped with a
one-line warning naming it. Import direction of the package: load -> table -> markdown / export -> plot -> cli.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from lra.leaderboard import export, markdown, plot
from lra.leaderboard.load import load_records
from lra.leaderboard.table import build_leaderboard


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="lra-leaderboard",
        description="Build the LRA leaderboard (markdown, CSV, JSON, PNG; optionally a wandb table) "
        "from result records (*.json, searched recursively).")
    ap.add_argument("folders", nargs="*", type=Path, default=[Path("results/runs")],
                    help="record folders or files (default: results/runs, lra-train's results_dir)")
    ap.add_argument("--out", type=Path, default=Path("results/LEADERBOARD.md"),
                    help="markdown output (default: results/LEADERBOARD.md)")
    ap.add_argument("--png", type=Path, help="plot output (default: leaderboard.png beside --out)")
    ap.add_argument("--csv", type=Path, help="CSV output (default: leaderboard.csv beside --out)")
    ap.add_argument("--json", type=Path, help="JSON output (default: leaderboard.json beside --out)")
    ap.add_argument("--wandb", action="store_true",
                    help="also log the table and plot to one wandb run (offline unless WANDB_MODE is set)")
    ap.add_argument("--wandb-project", default="lra", help="wandb project (default: lra)")
    ap.add_argument("--wandb-dir", type=Path,
                    help="folder for wandb files (default: $WANDB_DIR, else the folder of --out)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `lra-leaderboard`; returns the exit status (1 when no record could be read)."""
    args = _parser().parse_args(argv)
    out_dir = args.out.parent
    png = args.png or out_dir / "leaderboard.png"
    csv_path = args.csv or out_dir / "leaderboard.csv"
    json_path = args.json or out_dir / "leaderboard.json"
    wandb_dir = plot.wandb_dir(args.wandb_dir, out_dir)
    entries, skipped = load_records(args.folders, exclude=[args.out, png, csv_path, json_path, wandb_dir / "wandb"])
    for path, reason in skipped:
        print(f"warning: skipped {path}: {reason}", file=sys.stderr)
    if not entries:
        print(f"error: no result records found in {', '.join(map(str, args.folders))}; nothing written",
              file=sys.stderr)
        return 1
    board = build_leaderboard(entries, skipped)
    sources = [str(f) for f in args.folders]
    plot.write_png(board, png)
    markdown.write_markdown(board, args.out, sources=sources, png=png)
    rows = export.rows(board)
    export.write_csv(rows, csv_path)
    export.write_json(board, rows, json_path, sources=sources)
    written = [args.out, csv_path, json_path, png]
    if args.wandb:
        run_dir = plot.log_wandb(rows, png, project=args.wandb_project, directory=wandb_dir)
        written.append(run_dir or "wandb (disabled)")
    n_dup = sum(len(v) for v in board.duplicates.values())
    print(f"leaderboard: {board.n_records} run(s) in {len(board.sections())} section(s), {n_dup} duplicate(s) "
          f"ignored, {len(skipped)} file(s) skipped -> {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
