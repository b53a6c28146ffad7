"""Image (CIFAR-10 in grayscale, one token per pixel; LRA_FACTS.md §1, GENERATORS.md §3).

Sources, chosen by `source_format` (auto tries them in this order):
  tfds     a prepared TFDS `cifar10/<version>/` folder (ArrayRecord: no TensorFlow needed)
  pickles  the original `cifar-10-batches-py/` (data_batch_1..5, test_batch), as a folder or as the
           `cifar-10-python.tar.gz` archive (streamed, never unpacked)
Splits (LRA): train = train[:90%], val = train[90%:], test = test. For TFDS that is TFDS's stored
order (as in LRA); for the pickles, the batch order data_batch_1..5, so the two sources hold the same
images but split them differently.
Tokens: LRA's grayscale (TensorFlow's rgb_to_grayscale on uint8, reproduced in float32 below), 1,024
pixels row-major, id = gray level 0..255 (vocab 256). Every position is a real token (length 1,024):
LRA's quirk of masking black pixels as padding is NOT reproduced.
"""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from lra.data import tfds_source
from lra.data.cache import DataError, Example, TaskReader
from lra.data.archive import iter_tar

SOURCE_FORMATS = ("auto", "tfds", "pickles")
TFDS_NAME = "cifar10"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
TFDS_SPLITS = {"train": "train[:90%]", "val": "train[90%:]", "test": "test"}
MAX_BATCH_BYTES = 256 << 20  # a CIFAR-10 python batch is ~31 MB
LUMA = np.array([0.2989, 0.5870, 0.1140], dtype=np.float32)


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB -> (...) uint8 gray, as tf.image.rgb_to_grayscale on uint8 computes it:
    x/255 in float32, the luma weights, then x * 255.5 truncated (GENERATORS.md §3)."""
    x = rgb.astype(np.float32) * np.float32(1.0 / 255.0)
    y = x[..., 0] * LUMA[0] + x[..., 1] * LUMA[1] + x[..., 2] * LUMA[2]
    return (y * np.float32(255.5)).astype(np.uint8)


def train_size(n: int) -> int:
    """Size of train[:90%] of n examples, rounded as TFDS rounds percent slices (closest)."""
    return int(round(n * 90 / 100))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch dicts only: numpy arrays and plain containers; no other class can be built,
    so a malicious file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            if module.startswith("numpy.core.") and hasattr(np, "_core"):
                module = "numpy._core." + module[len("numpy.core."):]  # numpy 2 moved it; same function
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")


def load_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32, 32, 3) uint8 RGB images and (N,) labels of one pickled batch (`where` names it in errors)."""
    try:
        d = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
        raw, labels = d[b"data"], np.asarray(d[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise DataError(
            f"{where}: not a readable CIFAR-10 python batch ({type(err).__name__}: {err}); expected a pickled "
            f"dict with b'data' (N, 3072) uint8 and b'labels'. Download {CIFAR_URL} again."
        ) from err
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] != 3072 or len(labels) != len(raw):
        raise DataError(f"{where}: b'data' has shape {raw.shape} {raw.dtype} and {len(labels)} labels; expected "
                        f"(N, 3072) uint8 with N labels. Download {CIFAR_URL} again.")
    return raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


class ImageReader(TaskReader):
    name = "image"
    num_classes = 10
    vocab_size = 256
    fixed_length = True  # one token per pixel of a fixed-size image

    def __init__(self, max_len: int = 1024, source_format: str = "auto") -> None:
        super().__init__(max_len)
        if source_format not in SOURCE_FORMATS:
            raise DataError(f"image: source_format '{source_format}' is not one of {', '.join(SOURCE_FORMATS)}.")
        if max_len < 1024:
            raise DataError(f"image: task.max_len={max_len} is shorter than the 1,024 pixels of an image.")
        self.source_format = source_format

    def locate(self, source: Path) -> Path:
        source = Path(source)
        if self.source_format in ("auto", "tfds"):
            found = tfds_source.find_prepared(source, TFDS_NAME)
            if found is not None:
                return found
        if self.source_format in ("auto", "pickles"):
            found = _find_pickles(source)
            if found is not None:
                return found
        raise DataError(
            f"no CIFAR-10 under '{source}' (source_format={self.source_format}): expected a prepared TFDS folder "
            f"({TFDS_NAME}/<version>/ with dataset_info.json, as under ~/tensorflow_datasets), a {BATCH_DIR}/ folder "
            "(data_batch_1..5, test_batch) or the cifar-10-python.tar.gz archive. Get one with "
            f"`lra-data download image --out {source}` (or by hand from {CIFAR_URL})."
        )

    def source_files(self, root: Path) -> list[Path]:
        root = Path(root)
        if root.is_file() or (root / "dataset_info.json").is_file():
            return super().source_files(root)
        return [root / b for b in (*TRAIN_BATCHES, TEST_BATCH)]

    def read_split(self, root: Path, split: str) -> Iterator[Example]:
        root = Path(root)
        if (root / "dataset_info.json").is_file():
            for i, ex in enumerate(tfds_source.iter_split(root, TFDS_SPLITS[split])):
                img = np.asarray(ex["image"])
                if img.shape != (32, 32, 3):
                    raise DataError(f"{root} split '{TFDS_SPLITS[split]}' record {i}: image shape {img.shape}, "
                                    "expected (32, 32, 3); this is not the cifar10 dataset.")
                yield Example(ids=to_gray(img).reshape(-1).astype(np.uint16), label=int(ex["label"]))
            return
        images, labels = self._load(root, TEST_BATCH if split == "test" else TRAIN_BATCHES)
        if split != "test":
            k = train_size(len(labels))
            images, labels = (images[:k], labels[:k]) if split == "train" else (images[k:], labels[k:])
        gray = to_gray(images).reshape(len(images), -1).astype(np.uint16)
        for ids, y in zip(gray, labels):
            yield Example(ids=ids, label=int(y))

    def _load(self, root: Path, names: str | tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        names = (names,) if isinstance(names, str) else names
        blobs: dict[str, tuple[bytes, str]] = {}
        if root.is_file():
            pattern = re.compile(rf"(?:^|/){re.escape(BATCH_DIR)}/({'|'.join(names)})$")
            for member, data in iter_tar(root, lambda n: pattern.search(n) is not None, max_member=MAX_BATCH_BYTES):
                blobs[pattern.search(member).group(1)] = (data, f"{root} member '{member}'")
        else:
            for n in names:
                if (root / n).is_file():
                    if (root / n).stat().st_size > MAX_BATCH_BYTES:
                        raise DataError(f"{root / n} is {(root / n).stat().st_size} bytes, far more than a CIFAR-10 "
                                        f"batch (~31 MB); it is not one. Download {CIFAR_URL} again.")
                    blobs[n] = ((root / n).read_bytes(), str(root / n))
        missing = [n for n in names if n not in blobs]
        if missing:
            raise DataError(f"'{root}' lacks the CIFAR-10 batch(es) {', '.join(missing)} ({BATCH_DIR}/ must hold "
                            f"data_batch_1..5 and test_batch). Download {CIFAR_URL} again.")
        parts = [load_batch(*blobs[n]) for n in names]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _find_pickles(source: Path) -> Path | None:
    for cand in (source, source / BATCH_DIR):
        if (cand / TEST_BATCH).is_file() and (cand / TRAIN_BATCHES[0]).is_file():
            return cand
    if source.is_file():
        return source  # an archive; a damaged one is reported when it is read
    for pattern in ("cifar-10-python.tar.gz", "cifar-10*.tar.gz", "cifar-10*.tgz"):
        for cand in sorted(source.glob(pattern)):
            if cand.is_file():
                return cand
    return None
