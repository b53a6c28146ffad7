"""Tiny raw data sets written in exactly the real formats, for the task reader tests.

Each writer takes the content (so the test knows what to expect) and writes it the way the real source
stores it: the aclImdb tree / archive, TFDS folders built by TFDS's own builders (ArrayRecord), CIFAR-10
python pickles, AAN TSVs, the Pathfinder release layout.
"""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from lra.config import compose

# -- IMDb ----------------------------------------------------------------------------------------------
# {split: [(label "pos"/"neg", review id, rating, raw bytes)]}
Reviews = dict[str, list[tuple[str, int, int, bytes]]]


def imdb_reviews(seed: int = 0, per_class: int = 3) -> Reviews:
    """Reviews with multi-byte UTF-8, HTML breaks, quotes, surrounding whitespace, and one longer than
    the tests' text_len."""
    rng = np.random.default_rng(seed)
    words = ["film", "caf\u00e9", "<br />", "\"quoted\"", "na\u00efve", "\u2603", "plot", "it's", "10/10", "\t"]
    out: Reviews = {"train": [], "test": []}
    for split in out:
        for lab in ("neg", "pos"):
            for k in range(per_class):
                n = int(rng.integers(3, 12)) if k else 900  # the first one is longer than 4,000 bytes
                body = " ".join(rng.choice(words, size=n)).encode("utf-8")
                rid = int(rng.integers(0, 12500)) * 10 + k  # distinct, not in file-system order
                out[split].append((lab, rid, int(rng.integers(1, 11)), b"  " + body + b"\n"))
    return out


def _acl_members(reviews: Reviews) -> list[tuple[str, bytes]]:
    members = [("aclImdb/README", b"Large Movie Review Dataset v1.0\n"), ("aclImdb/imdb.vocab", b"the\nand\n")]
    for split, items in reviews.items():
        members.append((f"aclImdb/{split}/urls_pos.txt", b"http://www.imdb.com/title/tt0000001/usercomments\n"))
        for lab, rid, rating, text in items:
            members.append((f"aclImdb/{split}/{lab}/{rid}_{rating}.txt", text))
    members.append(("aclImdb/train/unsup/0_0.txt", b"an unlabelled review"))  # must be ignored
    return members


def write_aclimdb_tree(root: Path, reviews: Reviews) -> Path:
    for name, data in _acl_members(reviews):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root / "aclImdb"


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_aclimdb_tar(path: Path, reviews: Reviews) -> Path:
    return write_tar(path, _acl_members(reviews))


def build_tfds_imdb(data_dir: Path, archive: Path) -> Path:
    """Prepare `imdb_reviews/plain_text` in ArrayRecord format with TFDS's own imdb_reviews builder, fed from
    a local aclImdb archive (the only change: the archive is not downloaded, and is iterated without TF)."""
    from tensorflow_datasets.datasets.imdb_reviews.imdb_reviews_dataset_builder import Builder

    class LocalImdb(Builder, skip_registration=True):
        name = "imdb_reviews"

        @classmethod
        def get_metadata(cls):
            return Builder.get_metadata()

        def _split_generators(self, dl_manager):
            dl_manager.download = lambda url: str(archive)
            dl_manager.iter_archive = _iter_archive
            return super()._split_generators(dl_manager)

    LocalImdb(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return Path(data_dir) / "imdb_reviews" / "plain_text" / "1.0.0"


def _iter_archive(path):
    with tarfile.open(path, "r:gz") as tar:
        for m in tar:
            if m.isfile():
                yield m.name, tar.extractfile(m)


# -- CIFAR-10 ------------------------------------------------------------------------------------------
def cifar_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 32, 32, 3) uint8 images (with pure black/white/primary pixels in the corners) and labels."""
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    imgs[:, 0, 0] = (255, 255, 255)
    imgs[:, 0, 1] = (0, 0, 0)
    imgs[:, 0, 2] = (255, 0, 0)
    imgs[:, 0, 3] = (0, 255, 0)
    imgs[:, 0, 4] = (0, 0, 255)
    return imgs, rng.integers(0, 10, size=n).astype(np.int64)


def cifar_batch_bytes(imgs: np.ndarray, labels: np.ndarray, name: str) -> bytes:
    """A batch pickled as the python version stores it: bytes keys, b'data' (N, 3072) uint8 as R, G, B planes."""
    data = imgs.transpose(0, 3, 1, 2).reshape(len(imgs), 3072).copy()
    d = {b"batch_label": name.encode(), b"labels": [int(y) for y in labels], b"data": data,
         b"filenames": [f"img_{i}.png".encode() for i in range(len(imgs))]}
    return pickle.dumps(d, protocol=2)


def cifar_members(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> list[tuple[str, bytes]]:
    """data_batch_1..5 (the train arrays cut in 5 consecutive parts), test_batch, batches.meta."""
    parts = np.array_split(np.arange(len(train[1])), 5)
    members = [(f"cifar-10-batches-py/data_batch_{i + 1}",
                cifar_batch_bytes(train[0][p], train[1][p], f"batch {i + 1}")) for i, p in enumerate(parts)]
    members.append(("cifar-10-batches-py/test_batch", cifar_batch_bytes(*test, "test")))
    members.append(("cifar-10-batches-py/batches.meta", pickle.dumps({b"label_names": [b"airplane"] * 10}, protocol=2)))
    return members


def write_cifar_dir(root: Path, members: list[tuple[str, bytes]]) -> Path:
    for name, data in members:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root / "cifar-10-batches-py"


def build_tfds_cifar(data_dir: Path, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> Path:
    """Prepare `cifar10` in ArrayRecord format with TFDS's own Cifar10 builder (its features, name and
    version); examples are given as PNG bytes because encoding arrays needs TensorFlow."""
    from tensorflow_datasets.image_classification.cifar import Cifar10

    def gen(prefix, imgs, labels):
        for i, (img, y) in enumerate(zip(imgs, labels)):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            yield i, {"id": f"{prefix}{i:05d}", "image": buf.getvalue(), "label": int(y)}

    class LocalCifar10(Cifar10, skip_registration=True):
        name = "cifar10"

        def _split_generators(self, dl_manager):
            return {"train": gen("train_", *train), "test": gen("test_", *test)}

    LocalCifar10(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return Path(data_dir) / "cifar10" / "3.0.2"


# -- AAN -----------------------------------------------------------------------------------------------
def write_aan(path: Path, rows: list[tuple[str, str, str, bytes, bytes]], crlf: bool = False) -> Path:
    """Rows (label as written, id1, id2, text1, text2) as the release stores them: no header, tabs, no quoting."""
    path.parent.mkdir(parents=True, exist_ok=True)
    end = b"\r\n" if crlf else b"\n"
    with open(path, "wb") as f:
        for label, id1, id2, t1, t2 in rows:
            f.write(b"\t".join([label.encode(), id1.encode(), id2.encode(), t1, t2]) + end)
    return path


# -- Pathfinder ----------------------------------------------------------------------------------------
def write_pathfinder(folder: Path, resolution: int, n_batches: int, per_batch: int, seed: int = 0,
                     empty: tuple[int, int] | None = None, corrupt: tuple[int, int] | None = None) -> dict:
    """`folder/{imgs/<b>/sample_<j>.png, metadata/<b>.npy}` (metadata as text, 11 fields). Returns
    {path: (pixels, label)} of the good images. `empty`/`corrupt` = (b, j) of a 0-byte / garbage PNG."""
    rng = np.random.default_rng(seed)
    good = {}
    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    for b in range(n_batches):
        (folder / "imgs" / str(b)).mkdir(parents=True, exist_ok=True)
        lines = []
        for j in range(per_batch):
            label = int(rng.integers(0, 2))
            path = folder / "imgs" / str(b) / f"sample_{j}.png"
            if (b, j) == empty:
                path.write_bytes(b"")
            elif (b, j) == corrupt:
                path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
            else:
                px = rng.integers(0, 256, size=(resolution, resolution), dtype=np.uint8)
                Image.fromarray(px).save(path)
                good[path] = (px, label)
            lines.append(f"imgs/{b} sample_{j}.png {j} {label} 1.0 14 2 2 1.5 1 1\n")
        (folder / "metadata" / f"{b}.npy").write_text("".join(lines))
    return good


# -- shared helpers ------------------------------------------------------------------------------------
def smoke_config(task: str, data_dir: Path, tmp: Path, *extra: str):
    """The real Hydra config of `task`, shrunk to one training step on `data_dir`."""
    return compose([f"task={task}", f"data_dir={data_dir}", "experiment=smoke", "logger=none", "trainer.max_steps=1",
                    "trainer.val_check_interval=1", "data.batch_size=2", f"results_dir={tmp / 'results'}",
                    f"runs_root={tmp / 'ckpt'}", "progress=false", *extra])
