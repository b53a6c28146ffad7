"""lra-leaderboard on result records built from the real presets: cells of one fingerprint, honest protocol
labels, averages, paper differences (like with like), every published row, outputs, wandb."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
from leaderboard_records import acc_table, md_tables, write_record

from lra import leaderboard
from lra.config import backend_names
from lra.leaderboard.load import load_records
from lra.leaderboard.plot import _short_labels, panels
from lra.leaderboard.table import TEXT_NOTE, build_leaderboard, like_for_like
from lra.published import AVG_TASKS, NYSTROMFORMER_PAPER, SOURCES, PublishedRow
from lra.training.fingerprint import preset_settings

COLUMNS = {"listops": "ListOps", "text": "Text", "retrieval": "Retrieval", "image": "Image",
           "pathfinder": "Pathfinder", "pathx": "Path-X"}
BACKENDS = backend_names()  # discovered from conf/ (+ searchpath), never typed
COMPARED = "Compared with published results"


def run(tmp_path: Path, *extra: str, out: Path | None = None) -> str:
    out = out or tmp_path / "out" / "LEADERBOARD.md"
    assert leaderboard.main([str(tmp_path / "runs"), "--out", str(out), *extra]) == 0
    return out.read_text()


def compared(text: str, protocol: str = "nystromformer") -> dict[tuple[str, str], dict[str, str]]:
    """The comparison table as {(row label, source without the model name): row}."""
    return {(r["Backend"], r["Source"].split(" (")[0]): r for r in md_tables(text)[(protocol, COMPARED)]}


def test_mean_std_fail_missing_and_partial_average(tmp_path):
    runs = tmp_path / "runs"
    a, b = BACKENDS[0], BACKENDS[1]
    listops = [36.25, 37.5, 38.125]
    for seed, acc in enumerate(listops):
        write_record(runs, "listops", a, seed, acc)
    write_record(runs, "text", a, 0, 64.0)
    write_record(runs, "listops", b, 0, None)  # every run failed -> FAIL
    write_record(runs, "listops", b, 1, None)
    write_record(runs, "text", b, 0, 60.0)  # one finished, one failed
    write_record(runs, "text", b, 1, None)
    text = run(tmp_path)
    table = acc_table(text)

    assert set(table) == {a, b}
    m, s = statistics.mean(listops), statistics.stdev(listops)
    assert table[a]["ListOps"] == f"{m:.2f} ± {s:.2f} (n=3)" == "37.29 ± 0.95 (n=3)"
    assert table[a]["Text"] == "64.00 (n=1)"
    assert table[b]["ListOps"] == "FAIL (2 runs)"
    assert table[b]["Text"] == "60.00 (n=1, 1 failed)"
    assert table[a]["Retrieval"] == "—"
    # Averages over the present tasks only, marked, never with zeros for the missing ones.
    assert table[a]["Avg"] == f"{(m + 64.0) / 2:.2f}*"
    assert table[b]["Avg"] == "60.00*"  # the FAIL cell is not a 0 either
    assert f"{a} 2/5 (ListOps, Text)" in text and f"{b} 1/5 (Text)" in text
    assert "Path-X is reported but left out of Avg" in text
    assert "Majority-class rate (test, chance level): ListOps 50.00 · Text 50.00" in text
    assert f"- {b} / ListOps seed 0: RuntimeError: out of memory" in text


def test_unknown_backend_cannot_claim_a_protocol(tmp_path):
    """A backend with no conf/attention file has no preset: its claim is shown as unverified, uncompared."""
    write_record(tmp_path / "runs", "image", "mystery", 0, 30.0)
    text = run(tmp_path)
    assert ("nystromformer", "Test accuracy (%)") not in md_tables(text)
    [row] = md_tables(text)[("nystromformer (unverified)", "Test accuracy (%)")]
    assert row["Backend"].startswith("mystery [fingerprint=") and row["Image"] == "30.00 (n=1)"
    assert ("nystromformer (unverified)", COMPARED) not in md_tables(text)


def test_complete_average_excludes_pathx_and_compares_with_the_protocols_paper(tmp_path):
    ours = {"listops": 37.6, "text": 64.0, "retrieval": 80.0, "image": 40.0, "pathfinder": 70.0}
    for task, acc in ours.items():
        write_record(tmp_path / "runs", task, "softmax", 0, acc)
    write_record(tmp_path / "runs", "pathx", "softmax", 0, 99.0, protocol="lra")  # another section
    text = run(tmp_path)
    avg = statistics.mean(ours.values())
    assert acc_table(text)["softmax"]["Avg"] == f"{avg:.2f}"
    assert acc_table(text, "lra")["softmax"]["Path-X"] == "99.00 (n=1)"
    assert acc_table(text, "lra")["softmax"]["Avg"] == "—"  # Path-X alone makes no average

    rows = compared(text)
    nys = NYSTROMFORMER_PAPER.row("softmax")
    assert rows[("softmax", "ours")]["ListOps"] == "37.60"
    assert rows[("softmax", "Nyströmformer paper")]["ListOps"] == f"37.10 ({37.6 - 37.10:+.2f})" == "37.10 (+0.50)"
    assert rows[("softmax", "Nyströmformer paper")]["Avg"] == f"{nys.avg:.2f} ({avg - nys.avg:+.2f})"
    # Like with like: the nystromformer preset is compared with the Nyströmformer paper only.
    assert not any(src == "LRA paper" for _, src in rows)
    assert TEXT_NOTE in text.split(f"### {COMPARED}")[1]
    lra_rows = compared(text, "lra")
    assert lra_rows[("softmax", "LRA paper")]["Path-X"] == "FAIL"


def test_a_printed_average_that_is_not_the_mean_is_compared_as_printed_and_flagged(tmp_path):
    noted = [(s, r) for s in SOURCES for r in s.rows if r.avg_note and r.backend in BACKENDS]
    assert noted, "the LRA paper's Sinkhorn average (51.39 printed, 51.48 the mean) has no backend to test it with"
    for source, row in noted:
        for task in AVG_TASKS:
            write_record(tmp_path / "runs", task, row.backend, 0, 50.0, protocol=source.protocol)
    text = run(tmp_path)
    for source, row in noted:
        shown = compared(text, source.protocol)[(row.backend, source.title)]["Avg"]
        assert shown == f"{row.avg:.2f} ({50 - row.avg:+.2f}) †"
        assert f"- † {row.backend}: {row.avg_note}; the Avg above is what the paper printed." in text


def test_partial_average_is_compared_over_the_same_tasks(tmp_path):
    write_record(tmp_path / "runs", "listops", "linformer", 0, 38.0)
    write_record(tmp_path / "runs", "text", "linformer", 0, 56.0)
    paper = compared(run(tmp_path))[("linformer", "Nyströmformer paper")]
    same = (37.25 + 55.91) / 2
    assert paper["Avg"] == f"{same:.2f}* ({47.0 - same:+.2f})"


def test_published_rows_are_consistent():
    for source in SOURCES:
        assert len({r.backend for r in source.rows}) == len(source.rows), source.key
        for row in source.rows:
            assert set(row.acc) == set(AVG_TASKS)
            mean = statistics.mean(row.acc.values())
            if row.avg_note:  # a paper whose printed average is not its numbers' mean says so, with both
                assert abs(mean - row.avg) > 0.006 and f"{row.avg:.2f}" in row.avg_note \
                    and f"{mean:.2f}" in row.avg_note, (source.key, row.backend)
            else:
                assert abs(mean - row.avg) < 0.006, (source.key, row.backend)


def test_every_published_row_is_shown_and_compared_when_run(tmp_path):
    """Iterates over the published tables: every row is printed as the paper printed it, and every row whose
    backend conf/ defines is compared (ours − published) when its preset runs exist."""
    runs = tmp_path / "runs"
    ours = {"listops": 30.0, "text": 60.0}  # two tasks keep it fast; the full average is tested above
    runnable = [(s, r) for s in SOURCES for r in s.rows if r.backend in BACKENDS]
    for source, row in runnable:
        for task, acc in ours.items():
            write_record(runs, task, row.backend, 0, acc, protocol=source.protocol)
    text = run(tmp_path)
    tables = md_tables(text)
    for source in SOURCES:
        printed = {r["Backend"]: r for r in tables[("Published results", f"{source.title} (protocol "
                                                                         f"`{source.protocol}`)")]}
        for row in source.rows:
            shown = printed[row.backend]
            assert shown["Model"] == row.paper_name
            assert [shown[COLUMNS[t]] for t in AVG_TASKS] == [f"{row.acc[t]:.2f}" for t in AVG_TASKS]
            assert shown["Avg"].startswith(f"{row.avg:.2f}")
            if row.avg_note:
                assert shown["Avg"].endswith("†") and row.avg_note in text
            if row.ran:
                assert row.ran in text
    for source, row in runnable:
        paper = compared(text, source.protocol)[(row.backend, source.title)]
        for task, acc in ours.items():
            assert paper[COLUMNS[task]] == f"{row.acc[task]:.2f} ({acc - row.acc[task]:+.2f})"
        if row.avg_note:  # with our partial average the paper is re-averaged, so its printed Avg is not used
            assert f"- † {row.backend}: " not in text
        same = statistics.mean(row.acc[t] for t in ours)  # the paper re-averaged over the same tasks
        assert paper["Avg"] == f"{same:.2f}* ({statistics.mean(ours.values()) - same:+.2f})"
        if row.ran:  # the table says what the paper ran, which options we ran, and whether they are the same
            [note] = [line for line in text.splitlines()
                      if line.startswith(f"- {row.backend}: the paper's {row.paper_name} ran {row.ran}; ours ran ")]
            options = {k.split(".", 1)[1]: v for k, v in preset_settings(source.protocol, "listops", row.backend).items()
                    if k.startswith("attention.")}
            differ = like_for_like(row, options)
            assert note.endswith("the same as the paper ran.") == (not differ)
            assert all(f"{k} (ours {a}, theirs {b})" in note for k, (a, b) in differ.items())
    doc = json.loads((tmp_path / "out" / "leaderboard.json").read_text())
    assert sum(len(s["rows"]) for s in doc["published"]) == sum(len(s.rows) for s in SOURCES)


def test_like_for_like_names_each_option_the_paper_ran_differently():
    row = PublishedRow("b", "B", dict.fromkeys(AVG_TASKS, 50.0), 50.0, ran="x", ran_options={"k": "a", "s": 1})
    assert like_for_like(row, {"k": "a", "s": 1, "other": 3}) == {}
    assert like_for_like(row, {"k": "z", "s": 1}) == {"k": ("z", "a")}
    assert like_for_like(row, {"s": 1}) == {"k": ("(unset)", "a")}


def test_duplicates_keep_the_newest(tmp_path):
    runs = tmp_path / "runs"
    old = write_record(runs, "listops", "softmax", 0, 10.0, created="2026-01-01T00:00:00+00:00", name="b.json")
    write_record(runs, "listops", "softmax", 0, 40.0, created="2026-02-01T00:00:00+00:00", name="a.json")
    write_record(runs, "listops", "softmax", 0, 20.0, created="2026-01-15T00:00:00", name="c.json")  # naive = UTC
    write_record(runs, "listops", "softmax", 0, 30.0, protocol="mini", name="d.json")  # other protocol: kept
    text = run(tmp_path)
    assert acc_table(text)["softmax"]["ListOps"] == "40.00 (n=1)"
    assert acc_table(text, "mini")["softmax"]["ListOps"] == "30.00 (n=1)"
    assert "Duplicates: 2 record(s)" in text
    doc = json.loads((tmp_path / "out" / "leaderboard.json").read_text())
    assert sorted(Path(p).name for p in doc["duplicates_ignored"]["nystromformer"]) == [old.name, "c.json"]


def test_no_records_writes_nothing(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    out = tmp_path / "out" / "LEADERBOARD.md"
    assert leaderboard.main([str(tmp_path / "runs"), "--out", str(out)]) == 1
    assert "no result records" in capsys.readouterr().err and not out.parent.exists()


def test_csv_and_json_agree_with_markdown(tmp_path):
    runs = tmp_path / "runs"
    for seed, acc in enumerate([70.0, 72.5]):
        write_record(runs, "pathfinder", "performer", seed, acc, steps_per_second=1.5 + seed, peak_memory_mb=800)
    write_record(runs, "image", "performer", 0, None)
    write_record(runs, "listops", "softmax", 0, 36.0, protocol="lra")
    write_record(runs, "text", "softmax", 0, 60.0, protocol="lra")
    text = run(tmp_path)
    out = tmp_path / "out"
    with open(out / "leaderboard.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    doc = json.loads((out / "leaderboard.json").read_text())
    assert len(csv_rows) == len(doc["rows"]) == 4
    for c, j in zip(csv_rows, doc["rows"]):
        assert (c["protocol"], c["task"], c["backend"]) == (j["protocol"], j["task"], j["backend"])
        assert int(c["n"]) == j["n"] and int(c["failed"]) == j["failed"]
        cell = acc_table(text, j["protocol"])[j["row"]][COLUMNS[j["task"]]]
        if j["mean"] is None:
            assert c["mean"] == "" and cell == f"FAIL ({j['failed']} run{'s' if j['failed'] > 1 else ''})"
        else:
            assert math.isclose(float(c["mean"]), j["mean"]) and cell.startswith(f"{j['mean']:.2f}")
            assert f"(n={j['n']}" in cell and (j["std"] is None or f"± {j['std']:.2f}" in cell)
        assert (j["note"] == TEXT_NOTE) == (j["task"] == "text") and c["note"] == j["note"]
    pf = next(r for r in doc["rows"] if r["task"] == "pathfinder")
    assert pf["mean"] == pytest.approx(71.25) and pf["std"] == pytest.approx(statistics.stdev([70.0, 72.5]))
    assert pf["steps_per_second"] == pytest.approx(2.0) and pf["seeds"] == "0 1" and pf["matches_preset"]
    assert pf["published_nystromformer_paper"] == 69.87
    assert pf["diff_nystromformer_paper"] == pytest.approx(71.25 - 69.87)
    assert pf["published_lra_paper"] == 77.05 and pf["diff_lra_paper"] is None  # not the LRA protocol
    cost_rows = md_tables(text)[("nystromformer", "Training cost (mean over finished seeds)")]
    cost = {(r["Backend"], r["Task"]): r for r in cost_rows}
    assert cost[("performer", "Pathfinder")]["steps/s"] == "2.00"
    assert cost[("performer", "Image")]["runs"] == "0 (+1 failed)"
    assert [a["avg"] for a in doc["averages"] if a["protocol"] == "lra"] == [48.0]
    assert doc["notes"]["text"] == TEXT_NOTE
    # Outputs written atomically leave no temporary files behind.
    assert sorted(p.name for p in out.iterdir()) == ["LEADERBOARD.md", "leaderboard.csv", "leaderboard.json",
                                                     "leaderboard.png"]


def test_png_and_plot_panels(tmp_path):
    runs = tmp_path / "runs"
    a, b, c = BACKENDS[:3]
    speeds = {"listops": 1.0, "text": 2.0, "retrieval": 4.0, "image": 8.0, "pathfinder": 16.0}
    for backend in (a, b):
        for task, sps in speeds.items():
            write_record(runs, task, backend, 0, 50.0, steps_per_second=sps)
    run(tmp_path)
    png = (tmp_path / "out" / "leaderboard.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    board = build_leaderboard(load_records([runs])[0])
    [(name, points)] = panels(board, "nystromformer")  # every row complete: one average panel
    assert name.startswith("Avg") and {p.backend for p in points} == {a, b}
    assert points[0].steps_per_second == pytest.approx(4.0)  # geometric mean of 1..16
    write_record(runs, "listops", c, 0, 40.0)  # now one row is partial: per-task panels
    board = build_leaderboard(load_records([runs])[0])
    assert [n for n, _ in panels(board, "nystromformer")] == ["ListOps", "Text (val = test)", "Retrieval",
                                                              "Image", "Pathfinder"]


def test_plot_labels_mark_rows_whose_settings_differ():
    labels = ["a", "a [x=1]", "a [x=2]", "b [y=$1]"]
    assert _short_labels(labels) == {"a": "a", "a [x=1]": "a*1", "a [x=2]": "a*2", "b [y=$1]": "b*"}


def test_outputs_inside_the_record_folder_are_not_read_back(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # wandb files then go beside the markdown
    monkeypatch.setenv("WANDB_SILENT", "true")
    write_record(tmp_path / "runs", "listops", "softmax", 0, 37.0)
    for _ in range(2):
        text = run(tmp_path, "--wandb", out=tmp_path / "runs" / "LEADERBOARD.md")
    assert list((tmp_path / "runs" / "wandb").glob("offline-run-*/files/media/table/*.json"))
    assert "warning" not in capsys.readouterr().err and "Skipped files" not in text


def test_wandb_offline_run_holds_the_table(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline must be the default
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    write_record(tmp_path / "runs", "listops", "softmax", 0, 37.0)
    write_record(tmp_path / "runs", "text", "nystrom", 0, 65.0)
    run(tmp_path, "--wandb", "--wandb-project", "lra-test")
    [run_dir] = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("*.wandb"))
    [table_file] = (run_dir / "files" / "media" / "table").glob("leaderboard_*.table.json")
    table = json.loads(table_file.read_text())
    with open(tmp_path / "out" / "leaderboard.csv", newline="") as f:
        reader = csv.DictReader(f)
        csv_rows = list(reader)
    assert table["columns"] == reader.fieldnames
    i = reader.fieldnames.index("mean")
    assert [(r[0], r[3], r[4], r[i]) for r in table["data"]] == [
        (r["protocol"], r["task"], r["backend"], float(r["mean"])) for r in csv_rows]
    assert list((run_dir / "files" / "media" / "images").glob("leaderboard_plot_*.png"))
