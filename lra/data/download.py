"""`lra-data download TASK`: fetch a task's raw data, or say within seconds what to fetch by hand.

ListOps, Retrieval, Pathfinder and Path-X come from the LRA release archive; Text and Image from TFDS
(`imdb_reviews`, `cifar10`; preparing them through TFDS needs TensorFlow) or from the original archives
(aclImdb_v1.tar.gz, cifar-10-python.tar.gz), which the readers take as they are. The server is probed
first with a short timeout, so that without a network the command fails at once with instructions
instead of retrying for minutes.
"""
from __future__ import annotations

import importlib.util
import os
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from lra.data.cache import DataError
from lra.data.image import CIFAR_URL
from lra.data.release import RELEASE_URL, ByteBar, ensure_free_space, human_size
from lra.data.text import ACLIMDB_URL

RELEASE_TASKS = ("listops", "retrieval", "pathfinder", "pathx")
TFDS_NAMES = {"text": "imdb_reviews/plain_text", "image": "cifar10"}
ORIGINAL = {"text": ACLIMDB_URL, "image": CIFAR_URL}
SIZES = {RELEASE_URL: "~7.7 GB", ACLIMDB_URL: "~80 MB", CIFAR_URL: "~160 MB"}


@dataclass
class Plan:
    task: str
    via: str  # release | tfds | original
    url: str  # what is probed (and fetched unless via == tfds)
    target: Path  # where the file or TFDS folder goes


def plan(task: str, out: Path, via: str = "auto") -> Plan:
    out = Path(out)
    if task in RELEASE_TASKS:
        return Plan(task, "release", RELEASE_URL, out / "lra_release.gz")
    if task not in TFDS_NAMES:
        raise DataError(f"unknown task '{task}' for download; valid: {', '.join([*RELEASE_TASKS, *TFDS_NAMES])}.")
    if via not in ("auto", "tfds", "original"):
        raise DataError(f"--via must be auto, tfds or original, not '{via}'.")
    has_tf = importlib.util.find_spec("tensorflow") is not None
    if via == "tfds" and not has_tf:
        raise DataError(f"preparing {TFDS_NAMES[task]} through TFDS needs TensorFlow, which is not installed; use "
                        "`--via original` (the original archive, read as it is) or `pip install tensorflow`.")
    if via == "tfds" or (via == "auto" and has_tf):
        return Plan(task, "tfds", ORIGINAL[task], out / "tensorflow_datasets")
    return Plan(task, "original", ORIGINAL[task], out / Path(urlparse(ORIGINAL[task]).path).name)


def probe(url: str, timeout: float) -> str | None:
    """None if `url`'s server answers (any HTTP status) within `timeout` seconds, else the reason.
    Name resolution runs in a thread too, so the whole probe is bounded by `timeout`."""
    result: list[str | None] = []

    def attempt() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            result.append(None)
        except urllib.error.HTTPError:
            result.append(None)  # the server answered
        except Exception as err:  # noqa: BLE001 - any failure means "not reachable"
            result.append(f"{type(err).__name__}: {getattr(err, 'reason', err)}")

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else f"no answer within {timeout:g} s"


def manual_steps(p: Plan, out: Path, data_dir: Path) -> str:
    if p.via == "release":
        return (f"download {p.url} ({SIZES.get(p.url, 'size unknown')}) by hand, put it at {p.target}, then run "
                f"`lra-data unpack {p.target} --out {out}` and `lra-data prepare {p.task} --source {out} "
                f"--data-dir {data_dir}`.")
    name = Path(urlparse(p.url).path).name
    return (f"download {p.url} ({SIZES.get(p.url, 'size unknown')}) by hand and put it at {Path(out) / name} "
            "(as it is, or unpacked), "
            f"or copy a TFDS folder prepared elsewhere ({TFDS_NAMES[p.task]}/<version>/ from ~/tensorflow_datasets) "
            f"into {Path(out) / 'tensorflow_datasets'}; then run `lra-data prepare {p.task} --source {out} "
            f"--data-dir {data_dir}`.")


def download(task: str, out: Path, via: str = "auto", timeout: float = 5.0, progress: bool = True) -> Path:
    """Fetch `task`'s raw data into `out`; returns the file or TFDS folder written."""
    out = Path(out)
    p = plan(task, out, via)
    reason = probe(p.url, timeout)
    if reason is not None:
        host = urlparse(p.url).hostname
        raise DataError(f"cannot reach {host} ({reason}); no network, or a proxy (HTTPS_PROXY) is needed. "
                        f"To get the {task} data without this command: {manual_steps(p, out, out)}")
    out.mkdir(parents=True, exist_ok=True)
    if p.via == "tfds":
        import tensorflow_datasets as tfds

        builder = tfds.builder(TFDS_NAMES[task], data_dir=str(p.target), file_format="array_record")
        builder.download_and_prepare()
        return p.target
    return fetch(p.url, p.target, progress=progress)


def fetch(url: str, target: Path, progress: bool = True, read_timeout: float = 60.0) -> Path:
    """Stream `url` to `target` through `<target>.part`, resuming a previous partial download; `target` is
    only created (renamed) once complete, so an existing one is kept."""
    target = Path(target)
    if target.is_file():
        return target  # only a finished download is renamed to its final name
    part = target.with_name(target.name + ".part")
    done = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        with urllib.request.urlopen(req, timeout=read_timeout) as resp:
            if done and resp.status != 206:  # the server ignored the range: start over
                done = 0
            total = done + int(resp.headers.get("Content-Length", 0) or 0)
            ensure_free_space(target.parent, total - done, f"downloading {url}")
            with open(part, "ab" if done else "wb") as f, ByteBar(f"downloading {target.name}", total, progress) as bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    bar.update(done)
    except (urllib.error.URLError, OSError) as err:
        raise DataError(f"downloading {url} stopped after {human_size(done)} ({err}); run the same command again "
                        f"to resume from {part}.") from err
    if total and done != total:
        raise DataError(f"downloading {url}: got {human_size(done)} of {human_size(total)}; run the same command "
                        f"again to resume from {part}.")
    os.replace(part, target)
    return target
