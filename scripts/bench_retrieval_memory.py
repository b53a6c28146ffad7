"""Peak memory of preparing Retrieval: the reader must stream the ~8 GB train TSV in bounded memory.

Writes AAN pair files in the release format (no header, 5 tab columns, literal quotes; documents of
random length around the real mean of ~27 KB), then runs `lra-data prepare retrieval` in a fresh
process for a small and a large train file and reports each one's peak RSS. Bounded memory means the
two peaks are about equal although the files differ 5x in size.

    python scripts/bench_retrieval_memory.py --mb 300 [--out DIR] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FILES = {"train": "new_aan_pairs.train.tsv", "val": "new_aan_pairs.eval.tsv", "test": "new_aan_pairs.test.tsv"}
MEAN_DOC = 27_000  # bytes: the real train file is ~8 GB for 147,086 pairs


def text_pool(rng: np.random.Generator, size: int = 4 << 20) -> bytes:
    """Printable ASCII with spaces, literal quote characters and some multi-byte UTF-8; no tab/newline."""
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz    ETAOIN.,;\"'()-0123456789", dtype=np.uint8)
    pool = alphabet[rng.integers(0, len(alphabet), size)].tobytes()
    return pool.replace(b"xq", "\u00e9\u2603".encode("utf-8"))


def write_tsv(path: Path, target_bytes: int, rng: np.random.Generator, pool: bytes) -> int:
    """Rows until the file reaches `target_bytes`; returns the row count."""
    n = written = 0
    with open(path, "wb") as f:
        while written < target_bytes:
            docs = []
            for _ in range(2):
                length = int(rng.integers(MEAN_DOC // 4, MEAN_DOC * 7 // 4))
                start = int(rng.integers(0, len(pool) - length))
                docs.append(pool[start:start + length])
            line = b"\t".join([b"%.1f" % (n % 2), b"aan-%d" % n, b"aan-%d" % (n + 1), *docs]) + b"\n"
            f.write(line)
            written += len(line)
            n += 1
    return n


def prepare_peak(source: Path, data_dir: Path) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of `lra-data prepare retrieval` in a fresh process (os.wait4 gives that
    child's own resource usage)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lra.data.cli", "prepare", "retrieval", "--source", str(source),
                             "--data-dir", str(data_dir), "--quiet"])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"lra-data prepare failed with exit code {proc.returncode}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0  # ru_maxrss is in KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=300, help="size of the large train file in MB")
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    args = p.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="lra-retrieval-bench-"))
    rng = np.random.default_rng(0)
    pool = text_pool(rng)
    results = []
    try:
        for label, mb in (("small", max(1, args.mb // 5)), ("large", args.mb)):
            src = work / label / "lra_release" / "lra_release" / "tsv_data"
            src.mkdir(parents=True, exist_ok=True)
            rows = write_tsv(src / FILES["train"], mb << 20, rng, pool)
            for split in ("val", "test"):
                write_tsv(src / FILES[split], 2 << 20, rng, pool)
            peak, seconds = prepare_peak(work / label, work / label / "data")
            size = (src / FILES["train"]).stat().st_size / 2**20
            results.append({"case": label, "train_file_mb": round(size, 1), "train_rows": rows,
                            "peak_rss_mib": round(peak, 1), "prepare_seconds": round(seconds, 1),
                            "mb_per_second": round(size / seconds, 1)})
            print(json.dumps(results[-1]))
        small, large = results
        print(f"peak RSS: {small['peak_rss_mib']} MiB for {small['train_file_mb']} MB, "
              f"{large['peak_rss_mib']} MiB for {large['train_file_mb']} MB "
              f"(growth {large['peak_rss_mib'] - small['peak_rss_mib']:+.1f} MiB)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
