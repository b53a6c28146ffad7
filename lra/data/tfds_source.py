"""Read an already prepared TensorFlow Datasets (TFDS) folder, without TensorFlow when possible.

TFDS prepares a dataset into `<data_dir>/<name>/[<config>/]<version>/` (`dataset_info.json`,
`features.json` and the record shards). Shards in ArrayRecord format are read through TFDS's random
access data source (`as_data_source`), which needs `tensorflow-datasets` and `array_record` but not
TensorFlow. TFRecord shards can only be read through `as_dataset`, which needs TensorFlow.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Iterator

from lra.data.cache import DataError

RANDOM_ACCESS_FORMATS = ("array_record", "parquet")


def _version_key(p: Path) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", p.name))


def find_prepared(source: Path, name: str, config: str | None = None) -> Path | None:
    """The newest prepared version folder of TFDS dataset `name` at or under `source`.

    `source` may be the version folder itself, the dataset's folder, or a TFDS data_dir (also one level
    deeper as `<source>/tensorflow_datasets/`)."""
    source = Path(source)
    if _is_version_dir(source, name):
        return source
    bases = [source / name, source / "tensorflow_datasets" / name]
    if source.name == name:
        bases.insert(0, source)
    for base in bases:
        parent = base / config if config and (base / config).is_dir() else base
        versions = sorted((v for v in parent.glob("*") if _is_version_dir(v, name)), key=_version_key)
        if versions:
            return versions[-1]
    return None


def _is_version_dir(path: Path, name: str) -> bool:
    info = path / "dataset_info.json"
    if not info.is_file():
        return False
    try:
        return json.loads(info.read_text()).get("name") == name
    except (json.JSONDecodeError, OSError):
        return False


def file_formats(version_dir: Path) -> set[str]:
    """The shard formats present, from `dataset_info.json` (TFDS's default is tfrecord)."""
    info = json.loads((Path(version_dir) / "dataset_info.json").read_text())
    return {info.get("fileFormat") or "tfrecord", *info.get("alternativeFileFormats", [])}


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise DataError(
            "reading a prepared TFDS folder needs tensorflow-datasets and array_record: install them with "
            "`pip install -e '.[tfds]'` (TensorFlow itself is not needed for ArrayRecord data)."
        ) from err
    return tfds


def iter_split(version_dir: Path, split: str) -> Iterator[dict[str, Any]]:
    """Decoded examples (dicts of numpy values / bytes) of `split` (TFDS split syntax, e.g.
    `train[:90%]`) in TFDS's stored order."""
    version_dir = Path(version_dir)
    formats = file_formats(version_dir)
    have_tf = importlib.util.find_spec("tensorflow") is not None
    if not formats & set(RANDOM_ACCESS_FORMATS) and not have_tf:
        raise DataError(
            f"the TFDS folder '{version_dir}' was prepared in {', '.join(sorted(formats))} format, which only "
            "TensorFlow can read, and TensorFlow is not installed. Either `pip install tensorflow`, or prepare "
            "the dataset again in ArrayRecord format (`lra-data download <task>` does this; by hand: "
            "`builder.download_and_prepare(file_format='array_record')`), or use the original archive "
            "(see `lra-data download <task>`)."
        )
    tfds = _tfds()
    try:
        builder = tfds.builder_from_directory(str(version_dir))
        if formats & set(RANDOM_ACCESS_FORMATS):
            source = builder.as_data_source(split=split)
            for i in range(len(source)):
                yield source[i]
        else:  # TFRecord with TensorFlow installed
            yield from tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
    except DataError:
        raise
    except (ValueError, KeyError, OSError, NotImplementedError) as err:
        raise DataError(
            f"could not read split '{split}' of the TFDS folder '{version_dir}': {err}. The folder may be "
            "incomplete; delete it and prepare it again (`lra-data download <task>`)."
        ) from err
