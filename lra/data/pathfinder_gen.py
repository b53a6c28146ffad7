"""Pathfinder / Path-X datasets in the LRA release layout (GENERATORS.md §2.7), with self-checks and a preview.

    out/pathfinder<res>/curv_<baseline|contour_length_9|contour_length_14>/
        imgs/<b>/sample_<j>.png     8-bit grayscale
        metadata/<b>.npy            PLAIN TEXT, one 11-field line per image, each ending in "\\n"

Batch b draws its images from one RNG seeded by SeedSequence(seed, resolution, contour length, b), so the
output is byte-identical for any --workers. A batch counts as finished once its metadata file exists (written
last, via a temp file and a rename) and all its PNGs are there; reruns skip finished batches and redo others.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import queue
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lra.data.cache import DataError
from lra.atomic import atomic_write
from lra.data.pathfinder_draw import (DIFFICULTIES, RESOLUTIONS, PathfinderParams, make_params,
                                      normalize_difficulty, render_sample)

GENERATOR_VERSION = 1
SETTINGS_FILE = ".pathfinder_gen.json"  # hidden: release readers only list imgs/ and metadata/
_SEED_TAG = 0x50415448  # "PATH": keeps these streams apart from other generators fed the same seed

# §2.9 reference statistics: (resolution, contour length, distractor budget) -> (pixel mean of 0..255,
# nonzero fraction, source).
# Gating uses the faithful-emulation [SIM] figures; the real-release figures are reported next to them.
CALIBRATION: dict[tuple[int, int, int], tuple[float, float, str]] = {
    (32, 14, 20): (19.2, 0.34, "sim"), (32, 9, 20): (15.1, 0.27, "sim"), (32, 6, 20): (12.7, 0.23, "sim"),
    (128, 14, 70): (10.2, 0.20, "sim"), (128, 14, 35): (7.9, 0.14, "sim"),
}
REAL_RELEASE: dict[tuple[int, int], tuple[float, float]] = {(128, 14): (9.4, 0.16), (64, 14): (16.2, 0.27)}
CALIBRATION_TOLERANCE = 0.25  # relative; the references come from 8-300 images each
HIST_EDGES = (1, 8, 16, 32, 64, 96, 128, 160, 192, 224, 232, 240, 250, 256)  # §2.9 histogram bins


def difficulty_dir(out: Path, resolution: int, difficulty: str) -> Path:
    """`out/pathfinder<res>/curv_...` for a difficulty (baseline|9|14)."""
    return Path(out) / f"pathfinder{resolution}" / DIFFICULTIES[normalize_difficulty(difficulty)][0]


def batch_seed(seed: int, params: PathfinderParams, batch: int) -> np.random.SeedSequence:
    """The SeedSequence of one batch, from (seed, resolution, contour length, batch)."""
    return np.random.SeedSequence([seed, _SEED_TAG, params.resolution, params.contour_length, batch])


def metadata_line(batch: int, j: int, label: int, margin: int, params: PathfinderParams) -> str:
    """One release metadata line (11 space-separated fields, newline-terminated)."""
    return " ".join([f"imgs/{batch}", f"sample_{j}.png", str(j), str(label), *params.metadata_fields(margin)]) + "\n"


def batch_finished(ddir: Path, batch: int, per_batch: int) -> bool:
    """True if metadata/<b>.npy holds `per_batch` complete lines and every PNG of the batch is non-empty."""
    meta = ddir / "metadata" / f"{batch}.npy"
    try:
        text = meta.read_text()
        if not text.endswith("\n") or text.count("\n") != per_batch:
            return False
        return all((ddir / "imgs" / str(batch) / f"sample_{j}.png").stat().st_size > 0 for j in range(per_batch))
    except OSError:
        return False


def generate_batch(ddir: Path, params: PathfinderParams, batch: int, per_batch: int, seed: int,
                   report=None) -> int:
    """Write one batch (PNGs, then its metadata atomically); returns the number of positive labels."""
    rng = np.random.Generator(np.random.PCG64(batch_seed(seed, params, batch)))
    imgs = ddir / "imgs" / str(batch)
    imgs.mkdir(parents=True, exist_ok=True)
    (ddir / "metadata").mkdir(exist_ok=True)
    lines, done, last = [], 0, time.monotonic()
    for j in range(per_batch):
        sample = render_sample(rng, params)
        Image.fromarray(sample.image).save(imgs / f"sample_{j}.png")
        lines.append(metadata_line(batch, j, sample.label, sample.margin, params))
        done += 1
        if report is not None and (time.monotonic() - last > 0.25 or j == per_batch - 1):
            report(done)
            done, last = 0, time.monotonic()
    tmp = ddir / f".{batch}.npy.tmp"  # outside metadata/, which readers list
    tmp.write_text("".join(lines))
    os.replace(tmp, ddir / "metadata" / f"{batch}.npy")
    return sum(int(line.split(" ")[3]) for line in lines)


_QUEUE = None


def _init_worker(q) -> None:
    global _QUEUE
    _QUEUE = q


def _worker(job: tuple) -> int:
    return generate_batch(*job, report=_QUEUE.put)


_SETTINGS_KEYS = ("generator_version", "resolution", "difficulty", "seed", "per_batch", "distractor_budget")


def _settings(params: PathfinderParams, seed: int, per_batch: int, difficulty: str) -> dict:
    return {"generator_version": GENERATOR_VERSION, "resolution": params.resolution, "difficulty": difficulty,
            "seed": seed, "per_batch": per_batch, "distractor_budget": params.distractor_budget}


def read_settings(ddir: Path) -> dict | None:
    """The generator's settings file of a folder (None if there is none); DataError if it is damaged."""
    path = Path(ddir) / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        why = f"not JSON ({err})"
    else:
        missing = [k for k in _SETTINGS_KEYS if k not in old] if isinstance(old, dict) else None
        if missing == []:
            return old
        why = "not a JSON object" if missing is None else f"it lacks {', '.join(repr(k) for k in missing)}"
    raise DataError(f"{path}: the generator's settings file is unusable: {why}. It says which settings made the "
                    f"images in {ddir}; without it they cannot be resumed or checked. Delete {ddir} and generate it "
                    "again (or generate into another --out).")


def _claim_dir(ddir: Path, settings: dict) -> None:
    """Record the settings of this folder, or refuse to mix batches made with other settings, or to write into
    a folder this generator did not make (a release copy, say)."""
    old = read_settings(ddir)
    if old is not None:
        if old != settings:
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            raise DataError(f"{ddir} was generated with other settings {diff} (old, new); use another --out "
                            f"or delete the folder")
        return
    if ddir.is_dir():
        for p in ddir.glob(f".{SETTINGS_FILE}.tmp*"):  # our own settings write, cut by a kill
            p.unlink()
        if any(ddir.iterdir()):
            raise DataError(f"{ddir} already holds files but no {SETTINGS_FILE}: it was not made by this generator "
                            "(a copy of the release?), and writing into it would replace its images. Generate into "
                            "another --out, or empty that folder first.")
    atomic_write(ddir / SETTINGS_FILE, json.dumps(settings, indent=1) + "\n")


def generate_pathfinder(out: Path, resolution: int, difficulty: str, batches: int, per_batch: int, seed: int,
                        workers: int = 1, distractor_budget: int | None = None, progress: bool = True) -> Path:
    """Generate (or finish) `batches` × `per_batch` images; returns the difficulty folder."""
    if batches < 1 or per_batch < 1 or workers < 1 or seed < 0:
        raise DataError("batches, per_batch and workers must be >= 1 and seed >= 0")
    difficulty = normalize_difficulty(difficulty)
    params = make_params(resolution, difficulty, distractor_budget)
    ddir = difficulty_dir(Path(out), resolution, difficulty)
    _claim_dir(ddir, _settings(params, seed, per_batch, difficulty))
    todo = [b for b in range(batches) if not batch_finished(ddir, b, per_batch)]
    jobs = [(ddir, params, b, per_batch, seed) for b in todo]
    bar = _Bar(f"pathfinder{resolution} {DIFFICULTIES[difficulty][0]}", len(todo) * per_batch,
               skipped=batches - len(todo), enabled=progress)
    with bar:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                generate_batch(*job, report=bar.advance)
        else:
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            with ctx.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(q,)) as pool:
                pending = [pool.apply_async(_worker, (job,)) for job in jobs]
                while pending:
                    try:
                        bar.advance(q.get(timeout=0.2))
                    except queue.Empty:
                        pass
                    for res in [r for r in pending if r.ready()]:
                        res.get()  # re-raises a worker's exception
                        pending.remove(res)
                while True:  # drain the last reports
                    try:
                        bar.advance(q.get_nowait())
                    except queue.Empty:
                        break
    return ddir


class _Bar:
    """A rich progress bar (images, rate, ETA) or nothing."""

    def __init__(self, title: str, total: int, skipped: int, enabled: bool) -> None:
        self.enabled, self.title, self.total = enabled and total > 0, title, total
        if skipped and enabled:
            print(f"{title}: {skipped} finished batch(es) kept", file=sys.stderr)

    def __enter__(self) -> "_Bar":
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[rate]}"),
                                      TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.title, total=self.total, rate="")
            self._start, self._done = time.monotonic(), 0
        return self

    def advance(self, n: int) -> None:
        if self.enabled:
            self._done += n
            rate = self._done / max(time.monotonic() - self._start, 1e-9)
            self._progress.update(self._task, advance=n, rate=f"{rate:7.1f} img/s")

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._progress.__exit__(*exc)


# ---- self-checks and preview --------------------------------------------------------------------------------
def read_metadata(ddir: Path) -> tuple[list[list[str]], list[str]]:
    """All metadata rows (batches in numeric order, lines in file order) and the format problems found."""
    rows, problems, files = [], [], []
    for f in (Path(ddir) / "metadata").glob("*.npy"):
        if f.stem.isdigit():
            files.append(f)
        else:
            problems.append(f"metadata/{f.name}: not a <batch>.npy name")
    files.sort(key=lambda f: int(f.stem))
    for f in files:
        text = f.read_text()
        if text and not text.endswith("\n"):
            problems.append(f"{f.name}: last line has no trailing newline")
        for k, line in enumerate(text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")):
            fields = line.split(" ")
            if len(fields) != 11 or fields[0] != f"imgs/{f.stem}" or not fields[2].isascii() \
                    or not fields[2].isdigit() or fields[1] != f"sample_{fields[2]}.png" or fields[3] not in ("0", "1"):
                problems.append(f"{f.name}:{k + 1}: malformed line {line!r}")
                continue
            rows.append(fields)
    return rows, problems


def check_dataset(ddir: Path, max_images: int | None = None) -> dict:
    """Validate a difficulty folder (format, PNG decode/size/max, label balance, §2.9 calibration); stats dict."""
    ddir = Path(ddir)
    rows, problems = read_metadata(ddir)
    parent = ddir.resolve().parent.name
    res = int(parent[len("pathfinder"):]) if parent.startswith("pathfinder") and parent[10:].isdigit() else None
    step = max(1, math.ceil(len(rows) / max_images)) if max_images else 1
    hist = np.zeros(256, dtype=np.int64)
    checked = 0
    for fields in rows[::step]:
        path = ddir / fields[0] / fields[1]
        try:
            with Image.open(path) as im:
                im.load()
                mode, size, arr = im.mode, im.size, np.asarray(im)
        except Exception as err:  # missing, empty or corrupt
            problems.append(f"{fields[0]}/{fields[1]}: unreadable ({type(err).__name__})")
            continue
        res = res or size[0]
        if mode != "L" or size != (res, res):
            problems.append(f"{fields[0]}/{fields[1]}: mode {mode} size {size}, expected L {res}x{res}")
            continue
        if arr.max() != 255:
            problems.append(f"{fields[0]}/{fields[1]}: max {arr.max()} != 255")
        hist += np.bincount(arr.ravel(), minlength=256)
        checked += 1
    labels = np.array([int(f[3]) for f in rows])
    total = max(int(hist.sum()), 1)
    values = np.arange(256)
    mean = float((hist * values).sum() / total)
    stats: dict = {
        "dir": str(ddir), "resolution": res, "images": len(rows), "checked_images": checked,
        "batches": len({f[0] for f in rows}), "label_mean": float(labels.mean()) if len(rows) else None,
        "pixel_mean": round(mean, 3), "pixel_std": round(float(np.sqrt((hist * (values - mean) ** 2).sum() / total)), 3),
        "nonzero_fraction": round(1.0 - float(hist[0]) / total, 4),
        "hist_per_mille": {f"[{a},{b})": round(1000.0 * float(hist[a:b].sum()) / total, 2)
                           for a, b in zip(HIST_EDGES[:-1], HIST_EDGES[1:])},
    }
    if len(rows) >= 1000:  # 4 standard errors, but never tighter than the ±0.02 of GENERATORS.md §7.3
        tol = max(0.02, 2.0 / math.sqrt(len(rows)))
        if abs(stats["label_mean"] - 0.5) > tol:
            problems.append(f"label mean {stats['label_mean']:.4f} outside 0.5 ± {tol:.3f}")
    cl = int(rows[0][5]) if rows else None
    settings = read_settings(ddir)
    budget = settings["distractor_budget"] if settings is not None else None
    if budget is None and res in RESOLUTIONS and cl:
        budget = make_params(res, str(cl)).distractor_budget
    ref = CALIBRATION.get((res, cl, budget))
    if ref is not None:
        lo, hi = 1 - CALIBRATION_TOLERANCE, 1 + CALIBRATION_TOLERANCE
        cal = {"reference": ref[2], "target_mean": ref[0], "target_nonzero": ref[1], "tolerance": CALIBRATION_TOLERANCE,
               "mean_ratio": round(mean / ref[0], 3), "nonzero_ratio": round(stats["nonzero_fraction"] / ref[1], 3)}
        if (res, cl) in REAL_RELEASE:
            cal["real_release_mean"], cal["real_release_nonzero"] = REAL_RELEASE[(res, cl)]
        stats["calibration"] = cal
        if checked >= 200 and not (lo <= cal["mean_ratio"] <= hi and lo <= cal["nonzero_ratio"] <= hi):
            problems.append(f"pixel statistics off the §2.9 {ref[2]} reference by more than ±25%: {cal}")
    stats["problems"], stats["ok"] = problems[:50], not problems and bool(rows)
    stats["num_problems"] = len(problems)
    return stats


def find_difficulty_dir(path: Path) -> Path:
    """`path` itself if it holds metadata/, else the first curv_* folder below it (or below pathfinder*/)."""
    path = Path(path)
    if (path / "metadata").is_dir():
        return path
    found = sorted(path.glob("curv_*/metadata")) + sorted(path.glob("pathfinder*/curv_*/metadata"))
    if not found:
        raise DataError(f"no Pathfinder difficulty folder (with metadata/) under {path}")
    return found[0].parent


def write_preview(root_or_difficulty_dir: Path, out_png: Path, n: int = 16) -> Path:
    """Save a grid of the first `n` images with their labels (1 = markers on one path) as a PNG."""
    ddir = find_difficulty_dir(root_or_difficulty_dir)
    rows = read_metadata(ddir)[0][:n]
    if not rows:
        raise DataError(f"no images listed in {ddir}/metadata")
    tiles = [np.asarray(Image.open(ddir / f[0] / f[1]).convert("L")) for f in rows]
    side = tiles[0].shape[0] * max(1, 128 // tiles[0].shape[0])
    cols = math.ceil(math.sqrt(len(tiles)))
    grid_rows = math.ceil(len(tiles) / cols)
    cell_h, gap = side + 16, 4
    sheet = Image.new("L", (cols * (side + gap) + gap, grid_rows * (cell_h + gap) + gap), 40)
    draw = ImageDraw.Draw(sheet)
    for k, (fields, tile) in enumerate(zip(rows, tiles)):
        x, y = gap + (k % cols) * (side + gap), gap + (k // cols) * (cell_h + gap)
        sheet.paste(Image.fromarray(tile).resize((side, side), Image.Resampling.NEAREST), (x, y))
        text = f"{fields[0][5:]}/{fields[2]}  label {fields[3]}" + (" (same path)" if fields[3] == "1" else "")
        draw.text((x + 2, y + side + 2), text, fill=255)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png


# ---- command line -----------------------------------------------------------------------------------------
def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lra-data generate pathfinder`."""
    parser.add_argument("--out", required=True, help="root folder; images go to OUT/pathfinder<res>/curv_*/")
    parser.add_argument("--resolution", type=int, default=32, choices=RESOLUTIONS, help="32 = Pathfinder, 128 = Path-X")
    parser.add_argument("--difficulty", default="14", choices=list(DIFFICULTIES),
                        help="contour length: baseline (6), 9 or 14 (the 'hard' split LRA reports)")
    parser.add_argument("--batches", type=int, default=200, help="metadata files / image folders (release: 200)")
    parser.add_argument("--per-batch", type=int, default=1000, help="images per batch (release: 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="processes (output does not depend on it)")
    parser.add_argument("--distractor-budget", type=int, default=None,
                        help="distractor dashes D (ND = D // DL); default 20/22/70/30 by resolution (Path-X: 35 documented)")
    parser.add_argument("--preview", default=None, metavar="PNG", help="also write a grid of 16 labelled samples")
    parser.add_argument("--check-images", type=int, default=None, metavar="N",
                        help="decode only ~N images in the final self-check (default: all)")
    parser.add_argument("--no-progress", action="store_true")


def run_generate(args: argparse.Namespace) -> int:
    """Generate, self-check (stats printed as JSON), optionally preview; exit status 1 if a check fails."""
    t0 = time.monotonic()
    ddir = generate_pathfinder(Path(args.out), args.resolution, args.difficulty, args.batches, args.per_batch,
                               args.seed, workers=args.workers, distractor_budget=args.distractor_budget,
                               progress=not args.no_progress)
    seconds = time.monotonic() - t0
    stats = check_dataset(ddir, max_images=args.check_images)
    stats["generate_seconds"] = round(seconds, 1)
    if args.preview:
        stats["preview"] = str(write_preview(ddir, Path(args.preview)))
    print(json.dumps(stats, indent=2))
    if not stats["ok"]:
        print(f"pathfinder self-check failed: {stats['num_problems']} problem(s)", file=sys.stderr)
    return 0 if stats["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lra.data.pathfinder_gen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generate_arguments(parser)
    try:
        return run_generate(parser.parse_args(argv))
    except (DataError, ValueError) as err:
        print(f"pathfinder_gen: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
