"""Image (grayscale CIFAR-10): the LRA grayscale, CIFAR python pickles (folder and archive), a TFDS
ArrayRecord folder, the 90/10 split, bad batches, one training step."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from fixtures_lra import build_tfds_cifar, cifar_arrays, cifar_members, smoke_config, write_cifar_dir, write_tar
from lra.data import cli
from lra.data.cache import DataError, open_split
from lra.data.image import ImageReader, to_gray

N_TRAIN, N_TEST = 20, 6


@pytest.fixture(scope="module")
def cifar():
    return cifar_arrays(N_TRAIN, seed=0), cifar_arrays(N_TEST, seed=1)


def exact_gray(rgb: np.ndarray) -> np.ndarray:
    """trunc(255.5 * Y / 255), Y = 0.2989 R + 0.587 G + 0.114 B, in exact rational arithmetic (float64)."""
    y = rgb[..., 0] * 0.2989 + rgb[..., 1] * 0.5870 + rgb[..., 2] * 0.1140
    return np.floor(255.5 * y / 255.0)


def test_grayscale_matches_lra():
    rgb = np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]], np.uint8)
    # By hand: 255.5*0.9999 = 255.47; 255.5*0.2989 = 76.37; 255.5*0.587 = 149.98; 255.5*0.114 = 29.13;
    # 128/255*255.5*0.9999 = 128.24.
    assert to_gray(rgb).tolist() == [255, 0, 76, 149, 29, 128]
    every = np.random.default_rng(0).integers(0, 256, size=(200_000, 3), dtype=np.uint8)
    exact = exact_gray(every.astype(np.float64))
    value = 255.5 * (every @ np.array([0.2989, 0.587, 0.114])) / 255
    close_to_integer = np.abs(value - np.round(value)) < 1e-4  # float32 rounding may fall either side
    assert close_to_integer.mean() < 0.01
    got = to_gray(every).astype(np.float64)
    assert np.array_equal(got[~close_to_integer], exact[~close_to_integer])
    # PIL's integer luma (S4's conversion) differs by at most one level.
    pil = np.asarray(Image.fromarray(every.reshape(400, 500, 3)).convert("L")).reshape(-1)
    assert np.abs(pil.astype(int) - got.astype(int)).max() <= 1


def check_split(folder, split, imgs, labels):
    s = open_split(folder, split)
    assert s.ids.shape == (len(labels), 1024) and (s.lengths == 1024).all()  # every pixel is a real token
    assert np.array_equal(s.ids, to_gray(imgs).reshape(len(imgs), -1))
    assert s.labels.tolist() == labels.tolist()


@pytest.mark.parametrize("kind", ["folder", "archive"])
def test_pickles_exact_tokens_and_split(tmp_path, cifar, kind):
    (tr_x, tr_y), (te_x, te_y) = cifar
    members = cifar_members((tr_x, tr_y), (te_x, te_y))
    if kind == "folder":
        src = write_cifar_dir(tmp_path / "raw", members)
    else:
        src = write_tar(tmp_path / "raw" / "cifar-10-python.tar.gz", members).parent
    assert cli.main(["prepare", "image", "--source", str(src), "--data-dir", str(tmp_path / "d"), "--quiet"]) == 0
    folder = next((tmp_path / "d" / "cache").glob("image-*"))
    k = 18  # train[:90%] of 20
    check_split(folder, "train", tr_x[:k], tr_y[:k])
    check_split(folder, "val", tr_x[k:], tr_y[k:])
    check_split(folder, "test", te_x, te_y)
    # the fixture's first five pixels are white, black, red, green, blue (values worked out by hand above)
    assert (open_split(folder, "test").ids[:, :5] == [255, 0, 76, 149, 29]).all()


def test_tfds_arrayrecord_folder(tmp_path, cifar):
    """A cifar10 folder prepared with TFDS's Cifar10 builder (ArrayRecord) is read without TensorFlow;
    train/val are TFDS's train[:90%] / train[90%:] in its stored order."""
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("array_record")

    (tr_x, tr_y), test = cifar
    version_dir = build_tfds_cifar(tmp_path / "tfds", (tr_x, tr_y), test)
    assert cli.main(["prepare", "image", "--source", str(tmp_path / "tfds"), "--data-dir", str(tmp_path / "d"),
                     "--quiet"]) == 0
    folder = next((tmp_path / "d" / "cache").glob("image-*"))
    by_id = {f"train_{i:05d}": i for i in range(N_TRAIN)}
    seen = []
    for split, spec in (("train", "train[:90%]"), ("val", "train[90%:]")):
        stored = tfds.builder_from_directory(str(version_dir)).as_data_source(split=spec)
        order = [by_id[stored[i]["id"].decode()] for i in range(len(stored))]
        check_split(folder, split, tr_x[order], tr_y[order])
        seen += order
    assert sorted(seen) == list(range(N_TRAIN)) and len(open_split(folder, "train")) == 18
    assert sorted(open_split(folder, "test").labels.tolist()) == sorted(test[1].tolist())


def test_bad_batches_name_the_file(tmp_path, cifar, capsys):
    members = dict(cifar_members(*cifar))
    root = write_cifar_dir(tmp_path / "raw", list(members.items()))
    d = pickle.loads(members["cifar-10-batches-py/data_batch_3"], encoding="bytes")
    d[b"data"] = d[b"data"][:, :1000]
    (root / "data_batch_3").write_bytes(pickle.dumps(d, protocol=2))
    assert cli.main(["prepare", "image", "--source", str(root), "--data-dir", str(tmp_path / "d")]) == 2
    msg = capsys.readouterr().err
    assert str(root / "data_batch_3") in msg and "(N, 3072) uint8" in msg

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    (root / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(DataError, match="data_batch_3.*not a readable CIFAR-10 python batch"):
        list(ImageReader().read_split(root, "train"))
    assert not (tmp_path / "pwned").exists()

    (root / "test_batch").unlink()
    (root / "data_batch_3").write_bytes(members["cifar-10-batches-py/data_batch_3"])
    assert cli.main(["prepare", "image", "--source", str(root), "--data-dir", str(tmp_path / "d")]) == 2
    msg = capsys.readouterr().err
    assert "no CIFAR-10" in msg and "lra-data download image" in msg


def test_truncated_archive(tmp_path, cifar, capsys):
    archive = write_tar(tmp_path / "raw" / "cifar-10-python.tar.gz", cifar_members(*cifar))
    archive.write_bytes(archive.read_bytes()[:-2000])
    assert cli.main(["prepare", "image", "--source", str(tmp_path / "raw"), "--data-dir", str(tmp_path / "d")]) == 2
    msg = capsys.readouterr().err
    assert "truncated" in msg and "member 'cifar-10-batches-py/" in msg and "download it again" in msg


def test_one_training_step(tmp_path, cifar):
    from lra.train import run

    write_tar(tmp_path / "data" / "cifar-10-python.tar.gz", cifar_members(*cifar))
    rec = run(smoke_config("image", tmp_path / "data", tmp_path))
    assert rec["status"] == "finished" and rec["steps"] == 1 and rec["task"] == "image"
