"""RunRecord: fingerprints, protocol labels, cells that never mix experiments, and hostile record files
(each bad input is built here; the leaderboard skips it with a warning naming the file, lra-train refuses to
overwrite it)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from leaderboard_records import acc_table, md_tables, record, write_record

from lra import leaderboard
from lra.config import CONF_DIR, backend_names, compose
from lra.leaderboard.load import variant_label
from lra.training.fingerprint import UNSET, fingerprint_of, preset_settings
from lra.training.records import RecordError, RunRecord, load_record, make_record, record_path

BACKENDS = backend_names()
PROTOCOLS = sorted(p.name for p in (CONF_DIR / "experiment").iterdir() if p.is_dir())


def board(tmp_path: Path) -> str:
    out = tmp_path / "out" / "LEADERBOARD.md"
    assert leaderboard.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    return out.read_text()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_preset_runs_fingerprint_equals_the_presets(tmp_path, protocol):
    task = sorted(p.stem for p in (CONF_DIR / "experiment" / protocol).glob("*.yaml"))[0]
    backend = BACKENDS[0]
    cfg = compose([f"experiment={protocol}/{task}", f"attention={backend}", f"results_dir={tmp_path}"])
    rec = make_record(cfg, "finished", test_acc=50.0)
    assert rec["protocol_matches"] is True and rec["fingerprint"] == fingerprint_of(
        preset_settings(protocol, task, backend))
    # Seed, paths, logging, threads, workers, devices, resume and checkpoint cadence are not the experiment.
    same = compose([f"experiment={protocol}/{task}", f"attention={backend}", f"results_dir={tmp_path}/x",
                    "seed=7", "data_dir=/elsewhere", "ckpt_root=/ck", "logger=none", "threads=1", "progress=false",
                    "data.num_workers=3", "trainer.devices=2", "resume=never", "checkpoint_every=7"])
    assert make_record(same, "finished", test_acc=50.0)["fingerprint"] == rec["fingerprint"]
    # A TRAIN_ARGS-style override (a shorter schedule) is another experiment: it loses the label.
    short = compose([f"experiment={protocol}/{task}", f"attention={backend}", f"results_dir={tmp_path}",
                     "trainer.max_steps=7"])
    other = make_record(short, "finished", test_acc=50.0)
    assert other["protocol_matches"] is False and other["fingerprint"] != rec["fingerprint"]
    # Reading the record back (as lra-train and the leaderboard do) gives the same fingerprint.
    assert RunRecord.from_dict(json.loads(json.dumps(other))).fingerprint == other["fingerprint"]


def test_fingerprints_are_recomputed_from_the_config():
    """Schema-1 records (no fingerprint) and records whose stored fingerprint is stale or edited are read by
    what their config says ran."""
    rec = record("listops", BACKENDS[0], 0, 40.0)
    old = {k: v for k, v in rec.items() if k not in ("fingerprint", "fingerprint_settings", "protocol_matches",
                                                     "attention_stats", "run_dir")}
    old["schema"] = 1
    assert RunRecord.from_dict(old).fingerprint == rec["fingerprint"]
    edited = {**rec, "fingerprint": "0" * 16, "fingerprint_settings": {"backend": "other"}}
    read = RunRecord.from_dict(edited)
    assert read.fingerprint == rec["fingerprint"] and read.fingerprint_settings == rec["fingerprint_settings"]


def test_modified_runs_lose_the_label_and_are_never_compared(tmp_path):
    runs = tmp_path / "runs"
    b = BACKENDS[0]
    write_record(runs, "listops", b, 0, 40.0)
    for seed, acc in enumerate([20.0, 22.0]):
        write_record(runs, "listops", b, seed, acc, overrides=("trainer.max_steps=100",))
    text = board(tmp_path)
    assert acc_table(text)[b]["ListOps"] == "40.00 (n=1)"  # the short runs are not averaged in
    label = f"{b} [scheduler.total_steps=100, trainer.max_steps=100]"
    assert acc_table(text, "nystromformer (modified)")[label]["ListOps"] == "21.00 ± 1.41 (n=2)"
    assert ("nystromformer (modified)", "Compared with published results") not in md_tables(text)
    with open(tmp_path / "out" / "leaderboard.csv", newline="") as f:
        short = [r for r in csv.DictReader(f) if r["protocol"] == "nystromformer (modified)"]
    assert short and all(r["diff_nystromformer_paper"] == "" and r["matches_preset"] == "False" for r in short)


def test_fingerprints_split_cells_and_rows_name_what_differs(tmp_path):
    """Two experiments under one backend: never one cell. Custom runs are labelled against the defaults."""
    runs = tmp_path / "runs"
    b = BACKENDS[-1]
    for seed, acc in enumerate([30.0, 32.0]):
        write_record(runs, "image", b, seed, acc, protocol="custom", overrides=("optimizer.lr=0.001",))
    write_record(runs, "image", b, 0, 50.0, protocol="custom", overrides=("optimizer.lr=0.01",))
    write_record(runs, "image", b, 1, 52.0, protocol="custom")
    table = acc_table(board(tmp_path), "custom")
    assert table[f"{b} [optimizer.lr=0.001]"]["Image"] == "31.00 ± 1.41 (n=2)"
    assert table[f"{b} [optimizer.lr=0.01]"]["Image"] == "50.00 (n=1)"
    assert table[b]["Image"] == "52.00 (n=1)"  # exactly the defaults: no bracket
    assert len(table) == 3


def test_row_labels_name_values_and_missing_keys_and_stay_distinct_when_cut():
    assert variant_label("b", ()) == "b"
    assert variant_label("b", (("a.k", "relu"), ("a.new", UNSET))) == "b [a.k=relu, lacks a.new]"
    long1 = tuple((f"k{i}", str(i)) for i in range(6))
    long2 = long1[:-1] + (("k5", "other"),)
    assert variant_label("b", long1).startswith("b [k0=0, k1=1, k2=2, +3 more, #")
    assert variant_label("b", long1) != variant_label("b", long2)


def test_backend_options_split_rows_within_a_protocol(tmp_path):
    """A backend option away from the preset (e.g. another kernel) is a separate, labelled row."""
    runs = tmp_path / "runs"
    # the first discovered backend with an integer option (not every backend has one: linear has none)
    b, option, value = next((b, k, v) for b in BACKENDS for k, v in preset_settings("nystromformer", "text", b).items()
                            if k.startswith("attention.") and isinstance(v, int) and not isinstance(v, bool))
    write_record(runs, "text", b, 0, 60.0)
    write_record(runs, "text", b, 0, 55.0, overrides=(f"{option}={value + 1}",))
    text = board(tmp_path)
    assert acc_table(text)[b]["Text"] == "60.00 (n=1)"
    assert acc_table(text, "nystromformer (modified)")[f"{b} [{option}={value + 1}]"]["Text"] == "55.00 (n=1)"


def test_hostile_names_cannot_break_tables_or_become_formulas(tmp_path):
    runs = tmp_path / "runs"
    names = ["=HYPERLINK(\"http://x\")", "+1+cmd", "-2+3", "@SUM(A1)", "\tTAB", "\rCR"]
    for i, evil in enumerate(names):
        write_record(runs, "listops", BACKENDS[0], i, 40.0, protocol=evil, name=f"p{i}.json")
        write_record(runs, evil, BACKENDS[0], i, 40.0, name=f"t{i}.json")
    write_record(runs, "list\nops | x", "soft`max\n|", 0, 41.0, protocol="a|b\nc", name="nl.json")
    text = board(tmp_path)
    tables = md_tables(text)  # asserts every row has its header's number of cells
    assert any(r["Backend"].startswith("soft'max") for (p, h), rows in tables.items() for r in rows)
    assert not any(line.startswith(("ops", "c (")) for line in text.splitlines())
    with open(tmp_path / "out" / "leaderboard.csv", newline="") as f:
        cells = [c for row in csv.reader(f) for c in row]
    assert not any(c.startswith(("=", "+", "-", "@", "\t", "\r")) for c in cells)
    assert "'=HYPERLINK(\"http://x\")" in cells and "'-2+3" in cells


def _bad_inputs() -> dict[str, tuple[str | bytes, str]]:
    """file name -> (content, the reason the warning must give). Each is one way a record can be hostile."""
    good = record("listops", BACKENDS[0], 0, 40.0)

    def with_(**changes) -> str:
        return json.dumps({**good, **changes})

    deep = '{"schema": 2, "config": ' + "[" * 100_000 + "]" * 100_000 + "}"
    return {
        "broken.json": ('{"schema": 2, "task": ', "not valid JSON"),
        "list.json": ("[1, 2]", "top level is a list"),
        "string.json": ('"a record"', "top level is a string"),
        "bench.json": ('{"steps_per_second": 3}', "no 'schema' field"),
        "future.json": (with_(schema=3), "unsupported schema 3"),
        "boolschema.json": (with_(schema=True), "unsupported schema True"),
        "noacc.json": (with_(test_acc=None), "without a test_acc"),
        "when.json": (with_(created="yesterday"), "not an ISO 8601 time"),
        "deep.json": (deep, "nested too deeply"),
        "deep64.json": (with_(config={"a": json.loads("[" * 70 + "]" * 70)}), "nested deeper than 64"),
        "hugeint.json": (with_(seed=1).replace('"seed": 1', '"seed": 1' + "0" * 5000), "digit"),
        "bigint.json": (with_(params=10 ** 30), "more than 2**63"),
        "nan.json": (with_(test_acc=40.0).replace('"test_acc": 40.0', '"test_acc": NaN'), "non-finite"),
        "inf.json": (with_(val_acc=1).replace('"val_acc": 1', '"val_acc": 1e999'), "non-finite"),
        "negsps.json": (with_(steps_per_second=-1.0), "'steps_per_second' is -1.0, not a cost"),
        "negmem.json": (with_(peak_memory_mb=-5), "'peak_memory_mb' is -5, not a cost"),
        "negtime.json": (with_(train_seconds=-0.5), "'train_seconds' is -0.5, not a cost"),
        "negparams.json": (with_(params=-3), "'params' is -3, not a count"),
        "negsteps.json": (with_(steps=-1), "'steps' is -1, not a count"),
        "pct.json": (with_(test_acc=120.0), "not a percentage"),
        "strseed.json": (with_(seed="0"), "'seed' is '0', not an integer"),
        "boolacc.json": (with_(test_acc=True), "'test_acc' is True, not a number"),
        "listtask.json": (with_(task=["listops"]), "'task' is ['listops'], not a non-empty string"),
        "listconfig.json": (with_(config=[1]), "'config' is [1], not an object"),
        "history.json": (with_(val_history=[[1, "x"]]), "val_history"),
        "status.json": (with_(status="done"), "neither 'finished' nor 'failed'"),
        "matches.json": (with_(protocol_matches="yes"), "'protocol_matches' is 'yes', not true/false"),
        "binary.json": (b'{"schema": 2, "task": "\xff\xfe"}', "not UTF-8"),
    }


def test_bad_records_are_skipped_with_a_warning_naming_the_file(tmp_path, capsys):
    runs = tmp_path / "runs"
    bad = _bad_inputs()
    for name, (content, _) in bad.items():
        (runs / "bad").mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            (runs / "bad" / name).write_bytes(content)
        else:
            (runs / "bad" / name).write_text(content)
    (runs / ".partial.json").write_text("{")  # hidden files (editor/temp files) are ignored silently
    write_record(runs / "nested" / "deeper", "listops", BACKENDS[0], 0, 37.0)
    text = board(tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(bad) and all(line.startswith("warning: skipped ") for line in err)
    for name, (_, reason) in bad.items():
        assert any(f"/{name}: not a result record: " in line and reason in line for line in err), (name, err)
    assert acc_table(text)[BACKENDS[0]]["ListOps"] == "37.00 (n=1)"
    assert "## Skipped files" in text and "broken.json" in text
    print(f"{len(bad)} bad inputs tried")


@pytest.mark.parametrize("content", ["[1, 2]", '{"schema": 2, "task": ', '{"schema": 1, "seed": 1e999}'])
def test_lra_train_refuses_to_overwrite_what_is_not_a_record(tmp_path, content):
    """A results file holding a JSON list (or anything unreadable) where the run's record goes: a clear
    error naming the file, and the file is left exactly as it was (the failure path writes nothing)."""
    from lra.train import run

    cfg = compose(["experiment=smoke", f"attention={BACKENDS[0]}", f"results_dir={tmp_path}", "logger=none",
                   f"data_dir={tmp_path}/nodata", f"ckpt_root={tmp_path}/ck"])
    path = record_path(cfg)
    path.write_text(content)
    with pytest.raises(RecordError) as err:
        load_record(path)
    msg = str(err.value)
    assert str(path) in msg and "not a valid record" in msg and "will not overwrite" in msg and "\n" not in msg
    with pytest.raises(RecordError):
        run(cfg)
    with pytest.raises(RecordError):  # the failure path (a failed record) refuses too
        make_record(cfg, "failed", error="boom")
    assert path.read_text() == content and [p.name for p in tmp_path.glob("*.json")] == [path.name]
    assert not list(tmp_path.glob(".*"))  # no temporary record left beside it


def test_make_record_rejects_unknown_fields_and_round_trips(tmp_path):
    cfg = compose(["experiment=smoke", f"attention={BACKENDS[0]}", f"results_dir={tmp_path}"])
    with pytest.raises(TypeError, match="unknown record field"):
        make_record(cfg, "finished", tset_acc=1.0)
    rec = make_record(cfg, "finished", test_acc=12.5, attention_stats={"rank": 3}, run_dir=str(tmp_path))
    path = record_path(cfg)
    path.write_text(json.dumps(rec))
    assert load_record(path) == rec
    assert load_record(tmp_path / "absent.json") is None
