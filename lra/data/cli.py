"""`lra-data`: generate synthetic tasks, prepare token caches, print statistics.

    lra-data generate listops --out DIR [--train N --val N --test N --seed S --min-len A --max-len B ...]
    lra-data generate pathfinder --out DIR --resolution 32 --difficulty 14 --batches B --per-batch N ...
    lra-data prepare TASK --source RAW --data-dir DIR [--max-len N] [KEY=VALUE ...]
    lra-data stats TASK --data-dir DIR [--json] [KEY=VALUE ...]
    lra-data download TASK [--out DIR] [--via auto|tfds|original] [--timeout S]
    lra-data unpack ARCHIVE --out DIR [--max-member-size 64G]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lra.data.cache import DataError


def _reader(task: str, overrides: list[str]):
    from hydra.errors import HydraException
    from hydra.utils import instantiate
    from omegaconf.errors import OmegaConfBaseException

    from lra.config import compose, task_names

    if task not in task_names():
        raise DataError(f"unknown task '{task}'; valid tasks: {', '.join(task_names())}.")
    try:
        cfg = compose([f"task={task}", *overrides])
    except (HydraException, OmegaConfBaseException) as err:  # a malformed or unknown KEY=VALUE override
        raise DataError(f"bad override in {' '.join(overrides)}: {' '.join(str(err).split())}") from None
    try:
        return instantiate(cfg.task.reader)
    except Exception as err:  # Hydra wraps the reader's own DataError (a bad option value)
        if isinstance(err.__cause__, DataError):
            raise err.__cause__ from None
        if isinstance(err.__cause__, (TypeError, ValueError)):
            raise DataError(f"bad {task} reader setting in {' '.join(overrides)}: {err.__cause__}") from None
        raise


def _task_overrides(args) -> list[str]:
    out = [f"task.max_len={args.max_len}"] if getattr(args, "max_len", None) else []
    return out + list(getattr(args, "overrides", None) or [])


def cmd_generate_listops(args) -> int:
    from lra.data.listops import ListOpsParams, generate_files

    params = ListOpsParams(max_depth=args.max_depth, max_args=args.max_args,
                           min_length=args.min_len, max_length=args.max_len)
    summary = generate_files(Path(args.out), args.train, args.val, args.test, args.seed, params, crlf=not args.lf)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_prepare(args) -> int:
    from lra.data.cache import build_cache

    reader = _reader(args.task, _task_overrides(args))
    folder = build_cache(reader, Path(args.source), Path(args.data_dir), progress=not args.quiet)
    print(f"prepared {args.task} cache: {folder}")
    return 0


def cmd_check(args) -> int:
    """Exit 0 if `lra-train task=TASK data_dir=DIR` has data to start from, else say how to get it."""
    from lra.data.cache import cache_dir, fingerprint, is_fresh

    reader = _reader(args.task, _task_overrides(args))
    data_dir = Path(args.data_dir)
    folder = cache_dir(data_dir, reader)
    try:
        root = reader.locate(data_dir)
    except DataError as err:
        if is_fresh(folder, reader, None):
            print(f"{args.task}: prepared cache ready ({folder})")
            return 0
        raise DataError(f"{args.task}: no data for it under '{data_dir}'. {err}") from None
    state = "ready" if is_fresh(folder, reader, fingerprint(reader.source_files(root))) else "to be prepared on first use"
    print(f"{args.task}: raw data at {root}; cache {state}")
    return 0


def cmd_stats(args) -> int:
    from lra.data.cache import cache_dir, read_manifest

    reader = _reader(args.task, _task_overrides(args))
    folder = cache_dir(Path(args.data_dir), reader)
    if not (folder / "manifest.json").is_file():
        raise DataError(
            f"no prepared {args.task} cache under '{args.data_dir}' (looked for {folder}); run "
            f"`lra-data prepare {args.task} --source <raw data> --data-dir {args.data_dir}` first."
        )
    manifest = read_manifest(folder)
    stats = {
        "task": manifest["task"], "cache": str(folder), "vocab_size": manifest["vocab_size"],
        "num_classes": manifest["num_classes"], "max_len": manifest["max_len"], "pair": manifest["pair"],
        "splits": {s: {"n": v["n"], "length_percentiles": v["length_percentiles"],
                       "label_counts": v["label_counts"]} for s, v in manifest["splits"].items()},
    }
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        for s, v in stats["splits"].items():
            print(f"{s:5s} n={v['n']:>7d}  median length {v['length_percentiles']['50']:.0f}  labels {v['label_counts']}")
    return 0


def cmd_download(args) -> int:
    from lra.data.download import download

    out = Path(args.out or f"data/{args.task}")
    path = download(args.task, out, via=args.via, timeout=args.timeout, progress=not args.quiet)
    print(f"downloaded {args.task} data: {path}")
    if path.name.endswith(".gz") and path.name.startswith("lra_release"):
        print(f"next: lra-data unpack {path} --out {out} && "
              f"lra-data prepare {args.task} --source {out} --data-dir {out}")
    else:
        print(f"next: lra-data prepare {args.task} --source {out} --data-dir {out}")
    return 0


def cmd_unpack(args) -> int:
    from lra.data.archive import unpack

    out = unpack(Path(args.archive), Path(args.out), progress=not args.quiet,
                 max_member=parse_size(args.max_member_size, "--max-member-size"))
    print(f"unpacked {args.archive} into {out}")
    return 0


def parse_size(text: str, option: str) -> int:
    """'123', '500M', '64G' -> bytes (binary units)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = str(text).strip().upper().removesuffix("B")
    unit = t[-1:] if t[-1:] in units and t[-1:] else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        value = -1.0
    if not value > 0:
        raise DataError(f"{option}={text!r} is not a size; give bytes or a number with K, M, G or T (e.g. 64G).")
    return int(value * units[unit])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lra-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a synthetic task (listops, pathfinder)")
    gsub = gen.add_subparsers(dest="generator", required=True)
    lo = gsub.add_parser("listops", help="LRA ListOps TSVs (basic_{train,val,test}.tsv)")
    lo.add_argument("--out", required=True)
    lo.add_argument("--train", type=int, default=96_000)
    lo.add_argument("--val", type=int, default=2_000)
    lo.add_argument("--test", type=int, default=2_000)
    lo.add_argument("--seed", type=int, default=0)
    lo.add_argument("--min-len", type=int, default=500, help="strict lower bound on tokens (LRA: 500)")
    lo.add_argument("--max-len", type=int, default=2000, help="strict upper bound on tokens (LRA: 2000)")
    lo.add_argument("--max-depth", type=int, default=10)
    lo.add_argument("--max-args", type=int, default=10)
    lo.add_argument("--lf", action="store_true", help="LF line endings instead of the generator's CRLF")
    lo.set_defaults(func=cmd_generate_listops)
    try:
        from lra.data import pathfinder_gen
    except ImportError:  # pragma: no cover - the module ships with the package
        pathfinder_gen = None
    if pathfinder_gen is not None:
        pf = gsub.add_parser("pathfinder", help="Pathfinder / Path-X images in the LRA release layout")
        pathfinder_gen.add_generate_arguments(pf)
        pf.set_defaults(func=pathfinder_gen.run_generate)

    pr = sub.add_parser("prepare", help="tokenize raw data into the cache that lra-train reads")
    pr.add_argument("task")
    pr.add_argument("--source", required=True, help="raw data: the LRA release root (either nesting level) or the task's files")
    pr.add_argument("--data-dir", required=True, help="where the cache goes (pass the same data_dir to lra-train)")
    pr.add_argument("--max-len", type=int, default=None, help="override task.max_len")
    pr.add_argument("--quiet", action="store_true")
    pr.add_argument("overrides", nargs="*", help="config overrides as lra-train takes them (use the same ones there), "
                    "e.g. task.max_len=1024 task.reader.text_len=1000")
    pr.set_defaults(func=cmd_prepare)

    ck = sub.add_parser("check", help="say whether lra-train has data for TASK under --data-dir (and how to get it if not)")
    ck.add_argument("task")
    ck.add_argument("--data-dir", required=True)
    ck.add_argument("--max-len", type=int, default=None)
    ck.add_argument("overrides", nargs="*", help="the config overrides given to lra-train")
    ck.set_defaults(func=cmd_check)

    st = sub.add_parser("stats", help="split sizes, length percentiles, label counts of a prepared cache")
    st.add_argument("task")
    st.add_argument("--data-dir", required=True)
    st.add_argument("--max-len", type=int, default=None)
    st.add_argument("--json", action="store_true")
    st.add_argument("overrides", nargs="*", help="the config overrides given to prepare")
    st.set_defaults(func=cmd_stats)

    dl = sub.add_parser("download", help="fetch a task's raw data (or say at once what to fetch by hand)")
    dl.add_argument("task")
    dl.add_argument("--out", default=None, help="where the raw data goes (default data/<task>, lra-train's data_dir)")
    dl.add_argument("--via", default="auto", choices=["auto", "tfds", "original"],
                    help="text/image: TFDS (needs TensorFlow) or the original archive (auto: TFDS if TF is installed)")
    dl.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the server before giving up")
    dl.add_argument("--quiet", action="store_true")
    dl.set_defaults(func=cmd_download)

    up = sub.add_parser("unpack", help="unpack a (gzipped) tar such as lra_release.gz: regular files and folders "
                        "only, all inside --out; links, absolute names and '..' are refused")
    up.add_argument("archive")
    up.add_argument("--out", required=True)
    up.add_argument("--max-member-size", default="64G",
                    help="refuse members larger than this (bytes, or with K/M/G/T suffix; default 64G)")
    up.add_argument("--quiet", action="store_true")
    up.set_defaults(func=cmd_unpack)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides may also follow the options (argparse only takes them right after TASK)
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*(args.overrides or []), *extra]
    try:
        return args.func(args)
    except DataError as err:
        print(f"lra-data: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - one paragraph, as lra-train does; the traceback on request
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"lra-data: error: {type(err).__name__}: {err} (set HYDRA_FULL_ERROR=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
