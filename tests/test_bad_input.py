"""Every kind of bad input we know, fed through the real CLIs (`lra-train`, `lra-data`) as subprocesses.

Each must end in one clear paragraph on stderr (no traceback unless HYDRA_FULL_ERROR=1), a non-zero exit,
and no partial files: no `*.tmp*`, no `.partial` cache folder, no finished record, no checkpoint a later
run would trust. The commands of all cases run up front, a few at a time (most of their time is imports).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from lra.config import compose
from lra.training.records import run_id

SMOKE = ["experiment=smoke", "logger=none", "task.max_len=40"]


@dataclass
class Case:
    tool: str  # lra-train | lra-data
    args: Callable[[Path, Path], list[str]]  # (case folder, ListOps raw folder) -> arguments
    expect: str  # a phrase of the error paragraph
    setup: Callable[[Path, Path], None] = lambda case, raw: None
    rc: int = 2
    env: dict = field(default_factory=dict)
    result: subprocess.CompletedProcess | None = None
    seconds: float = 0.0


def _raw_copy(raw: Path, dest: Path, edit: Callable[[list[str]], list[str]] | None = None, split: str = "val") -> None:
    """The ListOps TSVs of `raw` in `dest`; `edit` rewrites the lines of basic_<split>.tsv."""
    dest.mkdir(parents=True, exist_ok=True)
    for s in ("train", "val", "test"):
        shutil.copy(raw / f"basic_{s}.tsv", dest)
    if edit:
        path = dest / f"basic_{split}.tsv"
        path.write_text("".join(edit(path.read_text().splitlines(keepends=True))))


def _train_args(case: Path, data: Path | str, *extra: str) -> list[str]:
    return [f"data_dir={data}", f"results_dir={case}/runs", f"runs_root={case}/ckpt", *SMOKE, *extra]


def _ckpt_folder(case: Path, raw: Path, *extra: str) -> Path:
    return case / "ckpt" / run_id(compose(_train_args(case, raw, *extra))) / "checkpoints"


def _garbage_checkpoint(case: Path, raw: Path) -> None:
    folder = _ckpt_folder(case, raw)
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"PK\x03\x04 this is not a checkpoint" * 50)


def _foreign_checkpoint(case: Path, raw: Path) -> None:
    folder = _ckpt_folder(case, raw)
    folder.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, folder / "last.ckpt")


def _leftover_tmp(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "last.ckpt.tmp").write_bytes(b"half a checkpoint, cut by a kill")


def _prepared_cache_without_raw(case: Path, raw: Path, damage: Callable[[Path], None]) -> None:
    _raw_copy(raw, case / "raw")
    subprocess.run([_exe("lra-data"), "prepare", "listops", "--source", str(case / "raw"), "--data-dir",
                    str(case / "data"), "--quiet", "task.max_len=40"], check=True, capture_output=True, env=_env())
    [folder] = [p for p in (case / "data" / "cache").iterdir() if not p.name.startswith(".")]  # not the lock
    damage(folder)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _half_partial_prepare(case: Path, raw: Path) -> None:
    """What a prepare killed mid-split leaves: a partial folder with half a split and no done-file."""
    _raw_copy(raw, case / "raw")
    from lra.data.cache import cache_dir
    from lra.data.listops import ListOpsReader

    final = cache_dir(case / "data", ListOpsReader(40))
    partial = final.with_name(f".{final.name}.partial")
    partial.mkdir(parents=True)
    (partial / "train.ids.u16").write_bytes(b"\x01\x02" * 999)
    (partial / "train.labels.i64").write_bytes(b"\x07" * 13)


def _label(value: str) -> Callable[[list[str]], list[str]]:
    return lambda lines: lines[:3] + [f"( [MAX 2 3 ] )\t{value}\r\n"] + lines[3:]


CASES: dict[str, Case] = {
    # -- lra-train: data -----------------------------------------------------------------------------------
    "train_missing_data_dir": Case("lra-train", lambda c, r: _train_args(c, c / "nothing"), "is missing or empty"),
    "train_empty_data_dir": Case("lra-train", lambda c, r: _train_args(c, c / "empty"), "is missing or empty",
                                 setup=lambda c, r: (c / "empty").mkdir()),
    "train_data_dir_without_task_files": Case(
        "lra-train", lambda c, r: _train_args(c, c / "other"), "no ListOps data under",
        setup=lambda c, r: ((c / "other").mkdir(), (c / "other" / "notes.txt").write_text("hello"))),
    "train_malformed_row": Case(
        "lra-train", lambda c, r: _train_args(c, c / "raw"), "basic_val.tsv:4: malformed row",
        setup=lambda c, r: _raw_copy(r, c / "raw", lambda ls: ls[:3] + ["[MAX 2 3 ]\t4\textra\r\n"] + ls[3:])),
    "train_bad_header": Case(
        "lra-train", lambda c, r: _train_args(c, c / "raw"), "expected the header",
        setup=lambda c, r: _raw_copy(r, c / "raw", lambda ls: ["expr\tlabel\r\n"] + ls[1:], split="train")),
    "train_label_out_of_range": Case("lra-train", lambda c, r: _train_args(c, c / "raw"), "label 12 is outside 0..9",
                                     setup=lambda c, r: _raw_copy(r, c / "raw", _label("12"))),
    "train_truncated_cache_file": Case(
        "lra-train", lambda c, r: _train_args(c, c / "data"), "the cache is damaged",
        setup=lambda c, r: _prepared_cache_without_raw(c, r, lambda f: _truncate(f / "train.ids.u16"))),
    "train_half_written_manifest": Case(
        "lra-train", lambda c, r: _train_args(c, c / "data"), "manifest.json is missing, half-written",
        setup=lambda c, r: _prepared_cache_without_raw(c, r, lambda f: _truncate(f / "manifest.json"))),
    "train_batch_larger_than_split": Case("lra-train", lambda c, r: _train_args(c, r, "data.batch_size=500"),
                                          "fewer than one batch of 500"),
    # -- lra-train: names, options, lengths --------------------------------------------------------------
    "train_unknown_task": Case("lra-train", lambda c, r: _train_args(c, r, "task=foo"), "Could not find 'task/foo'",
                               rc=1),
    "train_unknown_backend_group": Case("lra-train", lambda c, r: _train_args(c, r, "attention=flash9"),
                                        "Could not find 'attention/flash9'", rc=1),
    "train_unknown_backend_name": Case("lra-train", lambda c, r: _train_args(c, r, "attention.name=flash9"),
                                       "a backend's name is its file name"),
    "train_length_backend_cannot_take": Case(
        "lra-train", lambda c, r: _train_args(c, r, "attention=linformer", "model.max_len=20"),
        "model.max_len=20 is shorter"),
    "train_bad_backend_option": Case("lra-train", lambda c, r: _train_args(c, r, "attention.conv_kernel=4"),
                                     "conv_kernel must be 0 (off) or odd"),
    "train_bad_precision": Case("lra-train", lambda c, r: _train_args(c, r, "precision=fp8"),
                                "precision=fp8 is not supported"),
    "train_bad_resume_mode": Case("lra-train", lambda c, r: _train_args(c, r, "resume=maybe"),
                                  "resume=maybe is not a mode"),
    "train_non_integer_steps": Case("lra-train", lambda c, r: _train_args(c, r, "trainer.max_steps=abc"),
                                    "trainer.max_steps=abc must be an integer"),
    "train_ddp_inside_a_sweep": Case(
        "lra-train", lambda c, r: ["-m", *_train_args(c, r, "trainer=ddp", "trainer.devices=2",
                                                     "trainer.accelerator=cpu")],
        "a -m sweep cannot run multi-process jobs", rc=0),  # a sweep reports and goes on: exit 0
    # -- lra-train: where results and checkpoints go -----------------------------------------------------
    "train_results_dir_is_a_file": Case(
        "lra-train", lambda c, r: [*_train_args(c, r), f"results_dir={c}/taken"], "results_dir=",
        setup=lambda c, r: (c / "taken").write_text("a file")),
    "train_results_dir_under_a_file": Case(
        "lra-train", lambda c, r: [*_train_args(c, r), f"results_dir={c}/taken/runs"], "cannot be written to",
        setup=lambda c, r: (c / "taken").write_text("a file")),
    "train_runs_root_is_a_file": Case(
        "lra-train", lambda c, r: [*_train_args(c, r), f"runs_root={c}/taken"], "runs_root=",
        setup=lambda c, r: (c / "taken").write_text("a file")),
    "train_corrupt_checkpoint": Case("lra-train", lambda c, r: _train_args(c, r), "cannot resume from",
                                     setup=_garbage_checkpoint),
    "train_foreign_checkpoint": Case("lra-train", lambda c, r: _train_args(c, r), "no 'global_step' entry",
                                     setup=_foreign_checkpoint),
    "train_full_error_shows_traceback": Case("lra-train", lambda c, r: _train_args(c, c / "nothing"),
                                             "DataError", rc=1, env={"HYDRA_FULL_ERROR": "1"}),
    # -- lra-data -----------------------------------------------------------------------------------------
    "data_unknown_task": Case("lra-data", lambda c, r: ["prepare", "foo", "--source", str(r), "--data-dir", str(c)],
                              "unknown task 'foo'"),
    "data_missing_source": Case("lra-data", lambda c, r: ["prepare", "listops", "--source", str(c / "nothing"),
                                                          "--data-dir", str(c / "data")], "no ListOps data under"),
    "data_malformed_row": Case(
        "lra-data", lambda c, r: ["prepare", "listops", "--source", str(c / "raw"), "--data-dir", str(c / "data")],
        "malformed row", setup=lambda c, r: _raw_copy(r, c / "raw", _label("seven"))),
    "data_label_out_of_range": Case(
        "lra-data", lambda c, r: ["prepare", "listops", "--source", str(c / "raw"), "--data-dir", str(c / "data")],
        "label 12 is outside", setup=lambda c, r: _raw_copy(r, c / "raw", _label("12"), split="test")),
    "data_unknown_override_key": Case(
        "lra-data", lambda c, r: ["prepare", "listops", "--source", str(r), "--data-dir", str(c), "task.foo=1"],
        "bad override in task.foo=1"),
    "data_bad_override_value": Case(
        "lra-data", lambda c, r: ["prepare", "listops", "--source", str(r), "--data-dir", str(c), "task.max_len=abc"],
        "bad listops reader setting"),
    "data_stats_without_cache": Case("lra-data", lambda c, r: ["stats", "listops", "--data-dir", str(c)],
                                     "no prepared listops cache"),
    "data_corrupt_archive": Case("lra-data", lambda c, r: ["unpack", str(c / "lra_release.gz"), "--out", str(c / "u")],
                                 "truncated or corrupt",
                                 setup=lambda c, r: (c / "lra_release.gz").write_bytes(b"\x1f\x8b\x08 cut short")),
}

# Inputs that are not errors but look like leftovers of a crash: handled, said, and the run completes.
RECOVERED: dict[str, Case] = {
    "train_leftover_partial_checkpoint": Case(
        "lra-train", lambda c, r: _train_args(c, r, "trainer.max_steps=2"), "a checkpoint write that never finished",
        rc=0, setup=lambda c, r: _leftover_tmp(_ckpt_folder(c, r, "trainer.max_steps=2"))),
    "data_leftover_partial_prepare": Case(
        "lra-data", lambda c, r: ["prepare", "listops", "--source", str(c / "raw"), "--data-dir", str(c / "data"),
                                  "--quiet", "task.max_len=40"], "prepared listops cache", rc=0,
        setup=_half_partial_prepare),
}


def _exe(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _env(extra: dict | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra or {})}
    if not (extra and "HYDRA_FULL_ERROR" in extra):
        env.pop("HYDRA_FULL_ERROR", None)
    return env


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, listops_dir) -> dict[str, tuple[Case, Path]]:
    raw = tmp_path_factory.mktemp("raw")
    _raw_copy(listops_dir, raw)  # the TSVs only: lra-train builds its cache next to them
    root = tmp_path_factory.mktemp("bad")

    cases = {**CASES, **RECOVERED}
    for name, case in cases.items():  # set-ups one by one (they compose configs: Hydra's state is global)
        (root / name).mkdir()
        case.setup(root / name, raw)

    def go(name: str) -> tuple[str, tuple[Case, Path]]:
        case, folder = cases[name], root / name
        t0 = time.perf_counter()
        case.result = subprocess.run([_exe(case.tool), *case.args(folder, raw)], cwd=folder, env=_env(case.env),
                                     capture_output=True, text=True, timeout=300)
        case.seconds = time.perf_counter() - t0
        return name, (case, folder)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(go, cases))


def _no_partial_files(folder: Path, failed: bool = True) -> None:
    left = [p for p in folder.rglob("*") if ".tmp" in p.name]
    assert not left, f"partial files left behind: {left}"
    for partial in folder.rglob("*.partial"):  # a prepare keeps finished splits (with their done-file) only
        done = {p.name.split(".")[0] for p in partial.glob("*.done.json")}
        half = [p for p in partial.iterdir() if p.name.split(".")[0] not in done]
        assert done and not half, f"half-written cache files left behind: {half}"
    for rec in folder.rglob("runs/*.json") if failed else []:
        assert json.loads(rec.read_text())["status"] == "failed", f"{rec} is not a failed record"


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gives_one_clear_paragraph(outcomes, name: str):
    case, folder = outcomes[name]
    p = case.result
    assert p.returncode == case.rc, f"exit {p.returncode}\n{p.stdout[-1500:]}\n{p.stderr[-3000:]}"
    assert case.expect in p.stderr, p.stderr[-3000:]
    if case.env.get("HYDRA_FULL_ERROR") == "1":
        assert "Traceback" in p.stderr  # asked for: the whole traceback
    else:
        assert "Traceback" not in p.stderr, p.stderr[-3000:]
    if case.rc == 2:  # our own errors: exactly one paragraph, on one line, naming the problem
        ours = [line for line in p.stderr.splitlines() if line.startswith(f"{case.tool}: error:")]
        assert len(ours) == 1 and case.expect in ours[0], p.stderr[-3000:]
    _no_partial_files(folder)
    assert not list(folder.rglob("ckpt/**/best-*.ckpt")), "a failed run left a checkpoint"


def test_a_corrupt_checkpoint_is_left_alone_and_named(outcomes):
    case, folder = outcomes["train_corrupt_checkpoint"]
    [line] = [l for l in case.result.stderr.splitlines() if l.startswith("lra-train: error:")]
    last = next(folder.rglob("last.ckpt"))
    assert str(last) in line and "Delete" in line and "resume=never" in line
    assert last.read_bytes().startswith(b"PK\x03\x04 this is not a checkpoint")  # not overwritten, not trusted


def test_bad_rows_leave_no_half_built_split(outcomes):
    """Rows are checked while a split is written: its arrays go, the splits finished before it stay."""
    for name, kept in (("data_malformed_row", {"train"}), ("data_label_out_of_range", {"train", "val"}),
                       ("train_malformed_row", {"train"}), ("train_bad_header", set())):
        _, folder = outcomes[name]
        files = {p.name for p in folder.rglob("cache/**/*") if p.is_file() and not p.name.endswith(".lock")}
        assert files == {f"{s}.{kind}" for s in kept for kind in ("ids.u16", "len.i32", "labels.i64", "done.json")}


@pytest.mark.parametrize("name", sorted(RECOVERED))
def test_crash_leftovers_are_cleaned_and_said(outcomes, name: str):
    case, folder = outcomes[name]
    p = case.result
    assert p.returncode == 0, p.stderr[-3000:]
    assert case.expect in p.stdout
    _no_partial_files(folder, failed=False)
    if case.tool == "lra-train":
        [rec] = [json.loads(f.read_text()) for f in (folder / "runs").glob("*.json")]
        assert rec["status"] == "finished" and rec["resumed_from_step"] is None  # started over, and said so
    else:
        [cache] = [p for p in (folder / "data" / "cache").iterdir() if not p.name.startswith(".")]
        manifest = json.loads((cache / "manifest.json").read_text())
        assert manifest["splits"]["train"]["n"] == 200
