"""The release helpers and `lra-data download` / `unpack`: nesting levels, safe and truncated archives,
failing fast and helpfully without a network."""
from __future__ import annotations

import io
import re
import tarfile
import time

import numpy as np
import pytest

from fixtures_lra import write_tar
from lra.data import cli, download
from lra.data.cache import DataError
from lra.data.archive import iter_tar, unpack
from lra.data.release import find_in_release, release_candidates

# TEST-NET-1 (RFC 5737): never routed, so a connection attempt can only time out or fail.
UNREACHABLE = "https://192.0.2.1/long-range-arena/lra_release.gz"


def test_inner_release_copy_wins(tmp_path):
    for nest in ("lra_release/lra_release/pathfinder128", "lra_release/pathfinder128"):
        (tmp_path / nest).mkdir(parents=True)
    assert find_in_release(tmp_path, "pathfinder128") == tmp_path / "lra_release/lra_release/pathfinder128"
    outer = tmp_path / "lra_release"
    assert find_in_release(outer, "pathfinder128") == outer / "lra_release" / "pathfinder128"
    assert find_in_release(outer / "lra_release", "pathfinder128") == outer / "lra_release" / "pathfinder128"
    assert find_in_release(tmp_path, "tsv_data") is None
    assert release_candidates(tmp_path, "x")[-1] == tmp_path / "x"


def release_members() -> list[tuple[str, bytes]]:
    return [(f"lra_release/lra_release/tsv_data/part_{i}.tsv", bytes([65 + i % 26]) * 50_000) for i in range(12)]


def test_unpack_round_trip(tmp_path):
    archive = write_tar(tmp_path / "lra_release.gz", release_members())
    assert cli.main(["unpack", str(archive), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    for name, data in release_members():
        assert (tmp_path / "out" / name).read_bytes() == data


@pytest.mark.parametrize("name", ["../escape.txt", "a/../../escape.txt"])
def test_unpack_refuses_path_traversal(tmp_path, name, capsys):
    archive = write_tar(tmp_path / "evil.tar.gz", [("ok.txt", b"fine"), (name, b"evil")])
    assert cli.main(["unpack", str(archive), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert f"member '{name}' was refused" in capsys.readouterr().err
    assert not (tmp_path / "escape.txt").exists()


def test_unpack_refuses_absolute_names(tmp_path):
    target = tmp_path / "elsewhere" / "x.txt"
    archive = write_tar(tmp_path / "abs.tar.gz", [("ok.txt", b"fine"), (str(target), b"x")])
    with pytest.raises(DataError, match="its name is an absolute path"):
        unpack(archive, tmp_path / "out", progress=False)
    assert not target.exists() and not (tmp_path / "out").exists()  # all or nothing: ok.txt went again


def test_unpack_refuses_links_out(tmp_path):
    path = tmp_path / "links.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("lnk")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(DataError, match="member 'lnk' was refused"):
        unpack(path, tmp_path / "out", progress=False)


def test_truncated_archive_names_the_member(tmp_path, capsys):
    noise = np.random.default_rng(0)  # incompressible, so that half the archive is half the members
    members = {n: noise.bytes(len(d)) for n, d in release_members()}
    archive = write_tar(tmp_path / "lra_release.gz", list(members.items()))
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    assert cli.main(["unpack", str(archive), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    msg = capsys.readouterr().err
    m = re.search(r"truncated or corrupt: reading stopped in member '([^']+)'", msg)
    assert m and m.group(1) in members and "download it again" in msg and "nothing of it was kept" in msg, msg
    assert not (tmp_path / "out").exists()  # all or nothing: what this run created is gone again
    with pytest.raises(DataError, match="member 'lra_release/"):
        list(iter_tar(archive, lambda n: True))


def test_unpack_missing_archive(tmp_path, capsys):
    assert cli.main(["unpack", str(tmp_path / "nope.gz"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["listops", "retrieval", "pathfinder", "pathx"])
def test_download_offline_fails_fast_with_instructions(tmp_path, monkeypatch, capsys, task):
    monkeypatch.setattr(download, "RELEASE_URL", UNREACHABLE)
    t0 = time.monotonic()
    assert cli.main(["download", task, "--out", str(tmp_path / "raw"), "--timeout", "3", "--quiet"]) == 2
    assert time.monotonic() - t0 < 30
    msg = capsys.readouterr().err
    assert "cannot reach 192.0.2.1" in msg and "by hand" in msg and UNREACHABLE in msg
    assert str(tmp_path / "raw" / "lra_release.gz") in msg and "lra-data unpack" in msg
    assert not (tmp_path / "raw" / "lra_release.gz").exists()


@pytest.mark.parametrize("task, name", [("text", "aclImdb_v1.tar.gz"), ("image", "cifar-10-python.tar.gz")])
def test_download_original_archive_offline(tmp_path, monkeypatch, capsys, task, name):
    monkeypatch.setitem(download.ORIGINAL, task, f"https://192.0.2.1/x/{name}")
    t0 = time.monotonic()
    assert cli.main(["download", task, "--out", str(tmp_path), "--via", "original", "--timeout", "3"]) == 2
    assert time.monotonic() - t0 < 30
    msg = capsys.readouterr().err
    assert f"put it at {tmp_path / name}" in msg and "tensorflow_datasets" in msg and f"lra-data prepare {task}" in msg


def test_download_unknown_task(tmp_path, capsys):
    assert cli.main(["download", "mnist", "--out", str(tmp_path)]) == 2
    assert "unknown task 'mnist'" in capsys.readouterr().err


def test_fetch_resumes_and_only_renames_when_complete(tmp_path, monkeypatch):
    """`fetch` against a local HTTP server: a partial file is resumed with a Range request."""
    import http.server
    import threading

    payload = bytes(range(256)) * 400
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "blob.gz").write_bytes(payload)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(tmp_path / "srv"), **k)

        def log_message(self, *a):
            pass

        def send_head(self):
            rng = self.headers.get("Range")
            if not rng:
                return super().send_head()
            start = int(rng.split("=")[1].rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Length", str(len(payload) - start))
            self.end_headers()
            return io.BytesIO(payload[start:])

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/blob.gz"
        target = tmp_path / "out" / "blob.gz"
        target.parent.mkdir()
        (tmp_path / "out" / "blob.gz.part").write_bytes(payload[:1000])
        assert download.probe(url, 3) is None
        assert download.fetch(url, target, progress=False) == target
        assert target.read_bytes() == payload and not (tmp_path / "out" / "blob.gz.part").exists()
    finally:
        server.shutdown()
