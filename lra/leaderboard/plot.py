"""Accuracy against speed and memory (in the style of the LRA paper's Figure 3), and the optional wandb log."""

from __future__ import annotations

import io
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lra.atomic import atomic_write
from lra.leaderboard.table import Leaderboard, title
from lra.published import AVG_TASKS, published_backends

PER_ROW = 3  # panels side by side before wrapping


def _text(label: str, limit: int = 60) -> str:
    """Record text safe for matplotlib: one line, no mathtext (`$`), at most `limit` characters."""
    flat = " ".join(str(label).split()).replace("$", r"\$")
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


@dataclass(frozen=True)
class Point:
    backend: str  # the row label (backend and the settings that differ)
    steps_per_second: float | None  # x; a point without it cannot be placed
    acc: float  # y
    peak_memory_mb: float | None  # marker size


def _short_labels(labels: Sequence[str]) -> dict[str, str]:
    """Point labels: the backend's name, `*` when its settings differ from the preset, numbered (`*1`, `*2`)
    when one panel holds several variants of a backend; the full row label is in the markdown."""
    out: dict[str, str] = {}
    for label in labels:
        backend = label.split(" [", 1)[0]
        variants = [x for x in labels if x.split(" [", 1)[0] == backend and " [" in x]
        star = "" if " [" not in label else "*" if len(variants) == 1 else f"*{variants.index(label) + 1}"
        out[label] = _text(backend, 30) + star
    return out


def panels(board: Leaderboard, protocol: str) -> list[tuple[str, list[Point]]]:
    """One panel of 5-task averages when every row has all five tasks, else one panel per task.

    In the average panel x is the geometric mean of steps/s over the five tasks (their batch sizes and
    lengths differ, so an arithmetic mean would be dominated by the fastest task) and size is the mean peak
    memory.
    """
    backends = board.rows(protocol)
    averaged = [b for b in backends if board.average(protocol, b)[0] is not None]
    if averaged and all(len(board.average(protocol, b)[1]) == len(AVG_TASKS) for b in averaged):
        points = []
        for b in averaged:
            cells = [board.cell(protocol, t, b) for t in AVG_TASKS]
            speeds = [c.cost("steps_per_second") for c in cells]
            mems = [m for c in cells if (m := c.cost("peak_memory_mb")) is not None]
            x = math.exp(statistics.fmean(map(math.log, speeds))) if all(s and s > 0 for s in speeds) else None
            points.append(Point(b.label, x, board.average(protocol, b)[0], statistics.fmean(mems) if mems else None))
        return [("Avg over the 5 LRA tasks", points)]
    out = []
    for t in board.tasks(protocol):
        points = [Point(b.label, c.cost("steps_per_second"), c.mean, c.cost("peak_memory_mb"))
                  for b in backends if (c := board.cell(protocol, t, b)) is not None and c.mean is not None]
        if points:
            out.append((title(t) + (" (val = test)" if t == "text" else ""), points))
    return out


def render_png(board: Leaderboard) -> bytes:
    """The figure as PNG bytes: one row of panels per protocol, one labelled point per backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # One protocol per block of rows, at most PER_ROW panels side by side.
    layout = [[(p, panel) for panel in ps[i:i + PER_ROW]]
              for p in board.sections() for ps in [panels(board, p)] for i in range(0, len(ps), PER_ROW)]
    ncols = max((len(row) for row in layout), default=1)
    fig = Figure(figsize=(4.6 * ncols, 3.8 * max(len(layout), 1)), layout="constrained")
    FigureCanvasAgg(fig)
    if not layout:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no finished runs to plot", ha="center", va="center")
        ax.set_axis_off()
    all_points = [pt for row in layout for _, (_, pts) in row for pt in pts]
    max_mem = max((pt.peak_memory_mb for pt in all_points if pt.peak_memory_mb), default=1.0)
    order = published_backends()
    names = sorted({pt.backend for pt in all_points},
                   key=lambda n: (order.index(n.split(" [")[0]) if n.split(" [")[0] in order else len(order), n))
    colors = {b: f"C{i % 10}" for i, b in enumerate(names)}
    axes = fig.subplots(len(layout), ncols, squeeze=False) if layout else []
    for r, row in enumerate(layout):
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(row):
                ax.set_axis_off()
                continue
            protocol, (name, points) = row[c]
            placed = [pt for pt in points if pt.steps_per_second is not None]
            short = _short_labels([pt.backend for pt in points])
            for pt in placed:
                size = 40 + 500 * (pt.peak_memory_mb or 0) / max_mem
                ax.scatter(pt.steps_per_second, pt.acc, s=size, color=colors[pt.backend], alpha=0.6,
                           edgecolors="black", linewidths=0.5)
                mem = "" if pt.peak_memory_mb is None else f"\n{pt.peak_memory_mb:,.0f} MB"
                label = short[pt.backend]
                ax.annotate(label + mem, (pt.steps_per_second, pt.acc), textcoords="offset points",
                            xytext=(6, 6), fontsize=8)
            unplaced = len(points) - len(placed)
            ax.set_title(f"{_text(protocol, 40)}: {_text(name, 40)}" + (f" ({unplaced} without steps/s)" if unplaced else ""), fontsize=9)
            ax.set_xlabel("training steps/s" + (" (geometric mean)" if name.startswith("Avg") else ""))
            ax.set_ylabel(("avg " if name.startswith("Avg") else "") + "test accuracy (%)")
            ax.margins(0.25)
            ax.grid(alpha=0.3)
    marked = any(" [" in pt.backend for pt in all_points)
    fig.suptitle("Accuracy against training speed (marker area ~ peak memory)" + (
        "\n* = settings differ from the preset (the row labels in LEADERBOARD.md say how)" if marked else ""),
        fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def write_png(board: Leaderboard, path: Path) -> None:
    atomic_write(path, render_png(board))


def wandb_dir(option: Path | None, out_dir: Path) -> Path:
    """Where wandb writes (`<dir>/wandb/...`): --wandb-dir, else $WANDB_DIR, else the markdown's folder."""
    if option is not None:
        return option
    return Path(os.environ["WANDB_DIR"]) if os.environ.get("WANDB_DIR") else out_dir


def log_wandb(table_rows: Sequence[dict], png: Path, project: str, directory: Path) -> Path | None:
    """Log the rows as one `wandb.Table` and the plot as a `wandb.Image` in a single run.

    Offline unless the user set WANDB_MODE, so no API key or network is needed. Returns the run's local
    folder (None when WANDB_MODE=disabled).
    """
    import wandb

    mode = os.environ.get("WANDB_MODE") or "offline"
    directory.mkdir(parents=True, exist_ok=True)
    columns = list(table_rows[0]) if table_rows else ["protocol", "task", "backend"]
    run = wandb.init(project=project, dir=str(directory), mode=mode, job_type="leaderboard", name="leaderboard",
                     config={"rows": len(table_rows)})
    try:
        table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in table_rows])
        run.log({"leaderboard": table, "leaderboard_plot": wandb.Image(str(png))})
        run_dir = None if mode == "disabled" else Path(run.dir).parent
    finally:
        run.finish()
    return run_dir
