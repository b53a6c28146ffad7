"""Hostile and damaged tar archives, each built here: `lra-data unpack` and the archive readers must refuse
them with one clear paragraph, write and delete nothing outside the target folder, and leave nothing
half-written inside it. (Link and `..` tricks, CVE-2025-4517's symlink chain, absolute names, cut-off
and corrupt streams, decompression bombs.)"""
from __future__ import annotations

import io
import os
import tarfile
import tracemalloc
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from fixtures_lra import imdb_reviews, write_aclimdb_tar, write_tar
from lra.data import cli, release, text
from lra.data.archive import iter_tar, unpack
from lra.data.cache import DataError
from lra.data.image import ImageReader
from lra.data.text import TextReader

MINE = b"the user's own file"


# -- archive builders ----------------------------------------------------------------------------------
def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size, info.mode = kind, link, size, 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


def tar_bytes(entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> tuple[bytes, list[int]]:
    """An uncompressed tar of `entries` ((name, data) for a file) and the offset after each entry."""
    buf, ends = io.BytesIO(), []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for e in entries:
            if isinstance(e, tuple):
                tar.addfile(_info(e[0], size=len(e[1])), io.BytesIO(e[1]))
            else:
                tar.addfile(e)
            ends.append(tar.offset)
    return buf.getvalue(), ends


def gzip_bytes(data: bytes, finish: bool = True) -> bytes:
    """A gzip stream of `data`; unfinished, it stops exactly after `data` (flushed, no last block, no CRC)."""
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush(zlib.Z_FINISH if finish else zlib.Z_FULL_FLUSH)


def cve_2025_4517_chain(out: Path, victim: str) -> list[tarfile.TarInfo | tuple[str, bytes]]:
    """Folders with 247-character names reached through one-letter symlinks: the lexical names stay short
    while the physical path passes PATH_MAX, where os.path.realpath (and so tarfile's `data` filter on
    Python < 3.11.13) stops resolving links. A link that the filter believes points inside `out` then
    points to its parent, and a file is written through it (`victim` next to `out`)."""
    comp, lex, entries = "d" * 247, "", []
    for step in "abcdefghijklmnop":
        entries += [_info(os.path.join(lex, comp), tarfile.DIRTYPE), _info(os.path.join(lex, step), tarfile.SYMTYPE, comp)]
        lex = os.path.join(lex, step)
    deep = os.path.join(lex, "l" * 254)
    entries += [_info(deep, tarfile.SYMTYPE, "../" * 16), _info("esc", tarfile.SYMTYPE, os.path.join(deep, "..")),
                (f"esc/{victim}", b"written outside --out")]
    return entries


def sparse_member(name: str, claimed: int) -> bytes:
    """A GNU sparse member whose 512 stored bytes expand to `claimed` bytes (mostly a hole)."""
    hdr = bytearray(_info(name, tarfile.GNUTYPE_SPARSE, size=512).tobuf(format=tarfile.GNU_FORMAT))
    hdr[386:410] = b"%011o\0%011o\0" % (claimed - 512, 512)  # one (offset, numbytes) entry
    hdr[483:495] = b"%012o" % claimed  # real size
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    return bytes(hdr) + b"x" * 512


def noise(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(n)  # incompressible: a byte cut is a content cut


# -- the cases: (tmp folder) -> archive path; setup may place the user's files ---------------------------
def _gz(path: Path, entries, finish: bool = True) -> Path:
    path.write_bytes(gzip_bytes(tar_bytes(entries)[0], finish))
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _cut_in_member(t: Path) -> Path:
    data = gzip_bytes(tar_bytes([("ok.bin", noise(50_000)), ("big.bin", noise(200_000, 1))])[0])
    (t / "a.tar.gz").write_bytes(data[: len(data) * 2 // 3])
    return t / "a.tar.gz"


def _cut_on_header(t: Path, compress: bool) -> Path:
    raw, ends = tar_bytes([(f"m{i}.bin", noise(3000, i)) for i in range(6)])
    cut = raw[: ends[3]]  # stops right before member 4's header: looks like a normal end to tarfile
    path = t / ("a.tar.gz" if compress else "a.tar")
    path.write_bytes(gzip_bytes(cut, finish=False) if compress else cut)
    return path


def _bad_crc(t: Path) -> Path:
    data = bytearray(gzip_bytes(tar_bytes([("m.bin", noise(5000))])[0]))
    data[-8] ^= 0xFF  # the CRC32 of the trailer
    (t / "a.tar.gz").write_bytes(bytes(data))
    return t / "a.tar.gz"


def _absolute_cut(t: Path) -> Path:
    """An absolute member naming the user's file, cut off inside that member (issue: the clean-up after
    the cut unlinked `out / name`, which is the absolute path itself)."""
    data = gzip_bytes(tar_bytes([("ok.bin", noise(10_000)), (str(t / "victim.txt"), noise(100_000, 1))])[0])
    (t / "a.tar.gz").write_bytes(data[: len(data) // 2])
    return t / "a.tar.gz"


def _link_in_out(t: Path) -> Path:
    (t / "outside").mkdir()
    (t / "out" / "data").symlink_to(t / "outside")  # a link the user has in --out
    return _gz(t / "a.tar.gz", [("data/x.txt", b"x")])


def _sparse(t: Path) -> Path:
    raw = sparse_member("huge.bin", 60 << 30) + b"\0" * 1024
    (t / "a.tar.gz").write_bytes(gzip_bytes(raw))
    return t / "a.tar.gz"


BAD: dict[str, tuple[Callable[[Path], Path], str]] = {
    "cve_2025_4517_symlink_chain": (lambda t: _gz(t / "a.tar.gz", cve_2025_4517_chain(t / "out", "victim.txt")),
                                    "is a symbolic link"),
    "symlink_to_absolute": (lambda t: _gz(t / "a.tar.gz", [_info("lnk", tarfile.SYMTYPE, "/etc/passwd")]),
                            "is a symbolic link (to '/etc/passwd')"),
    "symlink_then_write_through": (lambda t: _gz(t / "a.tar.gz", [("fine.txt", b"ok"), _info("lnk", tarfile.SYMTYPE, ".."),
                                                                   ("lnk/victim.txt", b"evil")]), "is a symbolic link"),
    "hardlink_absolute": (lambda t: _gz(t / "a.tar.gz", [_info("h", tarfile.LNKTYPE, str(t / "victim.txt"))]),
                          "is a hard link"),
    "hardlink_dotdot": (lambda t: _gz(t / "a.tar.gz", [_info("h", tarfile.LNKTYPE, "../victim.txt")]), "is a hard link"),
    "absolute_name": (lambda t: _gz(t / "a.tar.gz", [("ok.txt", b"ok"), (str(t / "victim.txt"), b"evil")]),
                      "absolute path"),
    "absolute_name_cut_off": (_absolute_cut, "absolute path"),
    "dotdot_name": (lambda t: _gz(t / "a.tar.gz", [("../victim.txt", b"evil")]), "holds '..'"),
    "nested_dotdot_name": (lambda t: _gz(t / "a.tar.gz", [("a/b/../../../victim.txt", b"evil")]), "holds '..'"),
    "character_device": (lambda t: _gz(t / "a.tar.gz", [_info("dev", tarfile.CHRTYPE)]), "special file"),
    "fifo": (lambda t: _gz(t / "a.tar.gz", [_info("fifo", tarfile.FIFOTYPE)]), "special file"),
    "sparse_bomb": (_sparse, "sparse file"),
    "link_inside_out": (_link_in_out, "does not write through links"),
    "cut_inside_a_member": (_cut_in_member, "truncated or corrupt"),
    "gz_cut_on_a_header": (lambda t: _cut_on_header(t, True), "truncated or corrupt"),
    "tar_cut_on_a_header": (lambda t: _cut_on_header(t, False), "end-of-archive block"),
    "bad_gzip_crc": (_bad_crc, "truncated or corrupt"),
    "not_an_archive": (lambda t: _write(t / "a.gz", b"\x1f\x8b\x08 cut short"), "truncated or corrupt"),
    "member_over_the_size_limit": (lambda t: _gz(t / "a.tar.gz", [("big.bin", b"\0" * (3 << 20))]),
                                   "more than the 1.0 MB allowed"),
}


def _tree(root: Path) -> dict[str, bytes | str]:
    """Everything under root (links not followed): path -> content, link target or 'dir'."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            out[str(p)] = f"-> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes()
    return out


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_archive_is_refused_and_nothing_is_touched(tmp_path, capsys, case):
    build, expect = BAD[case]
    t = tmp_path / "t"
    (t / "out").mkdir(parents=True)
    (t / "out" / "mine.txt").write_bytes(MINE)
    (t / "victim.txt").write_bytes(MINE)
    path = build(t)
    before = _tree(tmp_path)
    rc = cli.main(["unpack", str(path), "--out", str(t / "out"), "--quiet", "--max-member-size", "1M"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lra-data: error:")]
    assert rc == 2 and len(lines) == 1 and expect in lines[0] and "Traceback" not in err, err
    assert _tree(tmp_path) == before  # nothing written, deleted or left half-written, inside or outside
    assert (t / "victim.txt").read_bytes() == MINE


def test_the_chain_really_escapes_the_lexical_checks(tmp_path):
    """The CVE archive is dangerous for a reason we guard against: every member name is short, relative and
    without '..' (so only refusing links, and resolving real paths, stops it)."""
    for e in cve_2025_4517_chain(tmp_path / "out", "victim.txt"):
        name = e[0] if isinstance(e, tuple) else e.name
        assert not name.startswith("/") and ".." not in Path(name).parts and len(name) < 4096


def test_unpack_round_trip_folders_modes_and_reunpack(tmp_path):
    entries = [_info("./top", tarfile.DIRTYPE), ("./top/a.txt", b"a" * 1000), ("top/sub/b.bin", noise(7000)),
               _info("top/empty", tarfile.DIRTYPE)]
    path = tmp_path / "ok.tar.gz"
    path.write_bytes(gzip_bytes(tar_bytes(entries)[0]))
    for _ in range(2):  # a second unpack over the first overwrites in place
        assert unpack(path, tmp_path / "out", progress=False) == tmp_path / "out"
    assert (tmp_path / "out/top/a.txt").read_bytes() == b"a" * 1000
    assert (tmp_path / "out/top/sub/b.bin").read_bytes() == noise(7000) and (tmp_path / "out/top/empty").is_dir()
    assert not [p for p in (tmp_path / "out").rglob("*") if ".tmp" in p.name]
    assert (tmp_path / "out/top/a.txt").stat().st_mode & 0o777 == 0o644


def test_unpack_checks_free_space_per_member(tmp_path, monkeypatch, capsys):
    path = _gz(tmp_path / "a.tar.gz", [("small.txt", b"s"), ("big.bin", b"\0" * 400_000)])
    monkeypatch.setattr(release, "free_bytes", lambda folder: 100_000)
    assert cli.main(["unpack", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "unpacking member 'big.bin' needs about 390.6 KB" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(release, "free_bytes", lambda folder: 10)  # less than the archive itself
    assert cli.main(["unpack", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "unpacking a.tar.gz needs about" in capsys.readouterr().err and not (tmp_path / "out").exists()


# -- the archive readers (prepare text / image from the archive, never unpacked) -------------------------
def _acl(tmp_path: Path) -> tuple[Path, bytes]:
    path = write_aclimdb_tar(tmp_path / "raw" / "aclImdb_v1.tar.gz", imdb_reviews(per_class=2))
    return path, path.read_bytes()


def _prepare_text(tmp_path: Path) -> tuple[int, str]:
    import contextlib
    import io as _io

    err = _io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["prepare", "text", "--source", str(tmp_path / "raw"), "--data-dir", str(tmp_path / "d"), "--quiet"])
    return rc, err.getvalue()


@pytest.mark.parametrize("damage", ["gz_cut_on_a_header", "bad_gzip_crc", "trailing_garbage"])
def test_damaged_aclimdb_archive_is_never_prepared(tmp_path, damage):
    """A cut that lands on a tar header used to pass for a shorter archive (198 of 200 reviews, exit 0)."""
    path, data = _acl(tmp_path)
    raw = zlib.decompress(data, 31)
    if damage == "gz_cut_on_a_header":
        offsets = [i.offset for i in tarfile.open(fileobj=io.BytesIO(raw))]
        path.write_bytes(gzip_bytes(raw[: offsets[len(offsets) // 2]], finish=False))
    elif damage == "bad_gzip_crc":
        path.write_bytes(data[:-8] + bytes(b ^ 0xFF for b in data[-8:-4]) + data[-4:])
    else:
        path.write_bytes(data + b"PK\x03\x04 not gzip")
    rc, err = _prepare_text(tmp_path)
    assert rc == 2 and "truncated or corrupt" in err and "nothing read from it was used" in err, err
    assert not list((tmp_path / "d").rglob("*.u16")) and not list((tmp_path / "d").rglob("manifest.json"))


def test_a_huge_review_is_read_in_bounded_memory(tmp_path):
    """A 24 MB review (24 KB compressed) costs text_len bytes, not its size; over the limit it is refused."""
    body = b"  " + b"a" * (24 << 20) + b"\n"
    path = write_tar(tmp_path / "aclImdb_v1.tar.gz", [("aclImdb/train/pos/1_9.txt", body),
                                                      ("aclImdb/train/neg/2_1.txt", b" short \n")])
    reader = TextReader(max_len=64, text_len=50)
    tracemalloc.start()
    try:
        rows = [(ex.label, bytes((ex.ids - 1).astype(np.uint8))) for ex in reader._read_tar(path, "train")]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rows == [(0, b"short"), (1, b"a" * 50)]
    assert peak < 4 << 20, f"peak {peak / 2**20:.1f} MiB of Python memory while reading a 24 MiB member"


def test_review_over_the_member_limit_is_refused_before_reading(tmp_path, monkeypatch):
    path = write_tar(tmp_path / "aclImdb_v1.tar.gz", [("aclImdb/train/pos/1_9.txt", b"a" * (3 << 20))])
    monkeypatch.setattr(text, "MAX_REVIEW_BYTES", 1 << 20)
    with pytest.raises(DataError, match=r"member 'aclImdb/train/pos/1_9.txt' claims 3.0 MB, more than the 1.0 MB"):
        list(TextReader()._read_tar(path, "train"))


def test_sparse_member_is_refused_by_the_readers(tmp_path):
    raw = sparse_member("aclImdb/train/pos/1_9.txt", 60 << 30) + b"\0" * 1024
    (tmp_path / "a.tar.gz").write_bytes(gzip_bytes(raw))
    with pytest.raises(DataError, match="sparse file"):
        list(iter_tar(tmp_path / "a.tar.gz", lambda n: True))


def test_cifar_member_claiming_gigabytes_is_refused_before_reading(tmp_path):
    """The header of data_batch_1 claims 3 GB; the archive holds 1 KB. No byte of it is read."""
    hdr = _info("cifar-10-batches-py/data_batch_1", size=3 << 30).tobuf(format=tarfile.GNU_FORMAT)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(gzip_bytes(hdr + b"\0" * 1024))
    with pytest.raises(DataError, match="claims 3.0 GB"):
        ImageReader()._load(tmp_path / "cifar-10-python.tar.gz", "data_batch_1")



def test_memory_does_not_grow_with_the_number_of_members(tmp_path):
    """tarfile keeps every member's header it has read; the release has millions (the pathfinder images)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(8000):
            tar.addfile(_info(f"lra_release/pathfinder32/curv_baseline/imgs/{i // 1000}/sample_{i % 1000}.png", size=1),
                        io.BytesIO(b"x"))
    (tmp_path / "many.tar.gz").write_bytes(gzip_bytes(buf.getvalue()))
    tracemalloc.start()
    try:
        assert list(iter_tar(tmp_path / "many.tar.gz", lambda n: False)) == []
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, f"peak {peak / 2**20:.1f} MiB over 8,000 members (the 1 MiB read buffer aside)"
