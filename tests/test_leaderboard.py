"""lra-leaderboard on hand-written result records: cells, averages, paper differences, outputs, wandb."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from lra import leaderboard
from lra.leaderboard_plot import panels
from lra.published import AVG_TASKS, LRA_PAPER, NYSTROMFORMER_PAPER, SOURCES

COLUMNS = {"listops": "ListOps", "text": "Text", "retrieval": "Retrieval", "image": "Image",
           "pathfinder": "Pathfinder", "pathx": "Path-X"}


def write_record(folder: Path, task: str, attention: str, seed: int, acc: float | None, *,
                 protocol: str = "nystromformer", created: str = "2026-03-01T12:00:00+00:00",
                 name: str | None = None, **fields) -> Path:
    """A schema-1 record as docs/CONTRACTS.md describes it; acc=None makes a failed run."""
    failed = acc is None
    rec = {"schema": 1, "run_id": f"{task}-{attention}-s{seed}-0123456789",
           "status": "failed" if failed else "finished",
           "error": "RuntimeError: out of memory" if failed else None, "task": task, "attention": attention,
           "protocol": protocol, "seed": seed, "val_acc": None if failed else acc, "test_acc": acc,
           "majority_acc": None if failed else 50.0, "best_step": 100, "steps": 200, "train_seconds": 100.0,
           "steps_per_second": None if failed else 2.0, "peak_memory_mb": None if failed else 500.0,
           "params": None if failed else 1000, "config_hash": "0123456789abcdef", "config": {},
           "git_sha": "deadbeef", "versions": {}, "hardware": {}, "command": "lra-train", "created": created}
    rec.update(fields)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or f"{rec['run_id']}-{protocol}.json")
    path.write_text(json.dumps(rec))
    return path


def md_tables(text: str) -> dict[tuple[str, str], list[dict[str, str]]]:
    """Markdown tables keyed by (protocol, ### heading); blank leading cells inherit the row above."""
    tables: dict[tuple[str, str], list[dict[str, str]]] = {}
    protocol = heading = ""
    header: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("## Protocol"):
            protocol = line.split("`")[1]
        elif line.startswith("### "):
            heading, header = line[4:], None
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
                tables[(protocol, heading)] = []
            elif not set(line) <= set("|-"):
                rows = tables[(protocol, heading)]
                if rows and cells[0] == "":
                    cells[0] = rows[-1][header[0]]
                rows.append(dict(zip(header, cells)))
    return tables


def acc_table(text: str, protocol: str = "nystromformer") -> dict[str, dict[str, str]]:
    return {r["Backend"]: r for r in md_tables(text)[(protocol, "Test accuracy (%)")]}


def run(tmp_path: Path, *extra: str, out: Path | None = None) -> str:
    out = out or tmp_path / "out" / "LEADERBOARD.md"
    assert leaderboard.main([str(tmp_path / "runs"), "--out", str(out), *extra]) == 0
    return out.read_text()


def test_mean_std_fail_missing_and_partial_average(tmp_path):
    runs = tmp_path / "runs"
    listops = [36.25, 37.5, 38.125]
    for seed, acc in enumerate(listops):
        write_record(runs, "listops", "softmax", seed, acc)
    write_record(runs, "text", "softmax", 0, 64.0)
    write_record(runs, "listops", "nystrom", 0, None)  # every run failed -> FAIL
    write_record(runs, "listops", "nystrom", 1, None)
    write_record(runs, "text", "nystrom", 0, 60.0)  # one finished, one failed
    write_record(runs, "text", "nystrom", 1, None)
    write_record(runs, "image", "mystery", 0, 30.0)  # an unknown backend goes last
    text = run(tmp_path)
    table = acc_table(text)

    assert list(table) == ["softmax", "nystrom", "mystery"]
    m, s = statistics.mean(listops), statistics.stdev(listops)
    assert table["softmax"]["ListOps"] == f"{m:.2f} ± {s:.2f} (n=3)" == "37.29 ± 0.95 (n=3)"
    assert table["softmax"]["Text"] == "64.00 (n=1)"
    assert table["nystrom"]["ListOps"] == "FAIL (2 runs)"
    assert table["nystrom"]["Text"] == "60.00 (n=1, 1 failed)"
    assert table["softmax"]["Retrieval"] == table["mystery"]["ListOps"] == "—"
    # Averages over the present tasks only, marked, never with zeros for the missing ones.
    assert table["softmax"]["Avg"] == f"{(m + 64.0) / 2:.2f}*"
    assert table["nystrom"]["Avg"] == "60.00*"  # the FAIL cell is not a 0 either
    assert "softmax 2/5 (ListOps, Text)" in text and "nystrom 1/5 (Text)" in text
    assert "Path-X is reported but left out of Avg" in text
    assert "Majority-class rate (test, chance level): ListOps 50.00 · Text 50.00" in text
    assert "- nystrom / ListOps seed 0: RuntimeError: out of memory" in text


def test_complete_average_excludes_pathx_and_compares_with_both_papers(tmp_path):
    ours = {"listops": 37.6, "text": 64.0, "retrieval": 80.0, "image": 40.0, "pathfinder": 70.0}
    for task, acc in ours.items():
        write_record(tmp_path / "runs", task, "softmax", 0, acc)
    write_record(tmp_path / "runs", "pathx", "softmax", 0, 99.0)  # must not move the average
    text = run(tmp_path)
    avg = statistics.mean(ours.values())
    assert acc_table(text)["softmax"]["Avg"] == f"{avg:.2f}"
    assert acc_table(text)["softmax"]["Path-X"] == "99.00 (n=1)"

    rows = md_tables(text)[("nystromformer", "Compared with published results")]
    by_source = {r["Source"].split(" (")[0]: r for r in rows if r["Backend"] == "softmax"}
    assert by_source["ours"]["ListOps"] == "37.60"
    nys, lra = NYSTROMFORMER_PAPER.row("softmax"), LRA_PAPER.row("softmax")
    assert by_source["Nyströmformer paper"]["ListOps"] == f"37.10 ({37.6 - 37.10:+.2f})" == "37.10 (+0.50)"
    assert by_source["LRA paper"]["ListOps"] == "36.37 (+1.23)"  # LRA "Transformer" is our softmax
    assert by_source["LRA paper"]["Path-X"] == "FAIL"
    assert by_source["Nyströmformer paper"]["Avg"] == f"{nys.avg:.2f} ({avg - nys.avg:+.2f})"
    assert by_source["LRA paper"]["Avg"] == f"{lra.avg:.2f} ({avg - lra.avg:+.2f})"
    # A published backend we did not run still shows its paper numbers, with no difference.
    perf = {r["Source"].split(" (")[0]: r for r in rows if r["Backend"] == "performer"}
    assert perf["ours"]["ListOps"] == "—" and perf["Nyströmformer paper"]["ListOps"] == "18.80"


def test_partial_average_is_compared_over_the_same_tasks(tmp_path):
    write_record(tmp_path / "runs", "listops", "linformer", 0, 38.0)
    write_record(tmp_path / "runs", "text", "linformer", 0, 56.0)
    rows = md_tables(run(tmp_path))[("nystromformer", "Compared with published results")]
    paper = next(r for r in rows if r["Backend"] == "linformer" and r["Source"].startswith("Nyströmformer"))
    same = (37.25 + 55.91) / 2
    assert paper["Avg"] == f"{same:.2f}* ({47.0 - same:+.2f})"


def test_published_rows_are_consistent():
    for source in SOURCES:
        for row in source.rows:
            assert set(row.acc) == set(AVG_TASKS)
            assert abs(statistics.mean(row.acc.values()) - row.avg) < 0.006, (source.key, row.backend)
    assert [r.backend for r in LRA_PAPER.rows] == ["softmax", "linformer", "performer"]
    assert LRA_PAPER.row("softmax").paper_name == "Transformer"


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


def test_bad_files_are_skipped_with_one_line_warnings(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_record(runs / "nested" / "deeper", "listops", "softmax", 0, 37.0)
    (runs / "broken.json").write_text('{"schema": 1, "task": ')
    (runs / "list.json").write_text("[1, 2]")
    (runs / "bench.json").write_text('{"steps_per_second": 3}')
    (runs / ".partial.json").write_text("{")  # hidden files (editor/temp files) are ignored silently
    write_record(runs, "text", "softmax", 0, None, status="finished", name="noacc.json")
    write_record(runs, "text", "softmax", 1, 64.0, created="yesterday", name="when.json")
    text = run(tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("warning: skipped ") for line in err)
    for name, reason in [("broken.json", "not valid JSON"), ("list.json", "top level is a list"),
                         ("bench.json", "no 'schema' field"), ("noacc.json", "without a test_acc"),
                         ("when.json", "not an ISO 8601 time")]:
        assert any(name in line and reason in line for line in err), name
    assert acc_table(text)["softmax"]["ListOps"] == "37.00 (n=1)"
    assert "## Skipped files" in text and "broken.json" in text


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
    text = run(tmp_path)
    out = tmp_path / "out"
    with open(out / "leaderboard.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    doc = json.loads((out / "leaderboard.json").read_text())
    assert len(csv_rows) == len(doc["rows"]) == 3
    for c, j in zip(csv_rows, doc["rows"]):
        assert (c["protocol"], c["task"], c["backend"]) == (j["protocol"], j["task"], j["backend"])
        assert int(c["n"]) == j["n"] and int(c["failed"]) == j["failed"]
        cell = acc_table(text, j["protocol"])[j["backend"]][COLUMNS[j["task"]]]
        if j["mean"] is None:
            assert c["mean"] == "" and cell == f"FAIL ({j['failed']} run{'s' if j['failed'] > 1 else ''})"
        else:
            assert math.isclose(float(c["mean"]), j["mean"]) and cell.startswith(f"{j['mean']:.2f}")
            assert f"(n={j['n']}" in cell and (j["std"] is None or f"± {j['std']:.2f}" in cell)
    pf = next(r for r in doc["rows"] if r["task"] == "pathfinder")
    assert pf["mean"] == pytest.approx(71.25) and pf["std"] == pytest.approx(statistics.stdev([70.0, 72.5]))
    assert pf["steps_per_second"] == pytest.approx(2.0) and pf["seeds"] == "0 1"
    assert pf["published_nystromformer_paper"] == 69.87
    assert pf["diff_nystromformer_paper"] == pytest.approx(71.25 - 69.87)
    assert pf["diff_lra_paper"] == pytest.approx(71.25 - 77.05)
    cost_rows = md_tables(text)[("nystromformer", "Training cost (mean over finished seeds)")]
    cost = {(r["Backend"], r["Task"]): r for r in cost_rows}
    assert cost[("performer", "Pathfinder")]["steps/s"] == "2.00"
    assert cost[("performer", "Image")]["runs"] == "0 (+1 failed)"
    assert [a["avg"] for a in doc["averages"] if a["protocol"] == "lra"] == [36.0]
    # Outputs written atomically leave no temporary files behind.
    assert sorted(p.name for p in out.iterdir()) == ["LEADERBOARD.md", "leaderboard.csv", "leaderboard.json",
                                                     "leaderboard.png"]


def test_png_and_plot_panels(tmp_path):
    runs = tmp_path / "runs"
    speeds = {"listops": 1.0, "text": 2.0, "retrieval": 4.0, "image": 8.0, "pathfinder": 16.0}
    for backend in ("softmax", "nystrom"):
        for task, sps in speeds.items():
            write_record(runs, task, backend, 0, 50.0, steps_per_second=sps)
    run(tmp_path)
    png = (tmp_path / "out" / "leaderboard.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    records, _ = leaderboard.load_records([runs])
    board = leaderboard.build_leaderboard(records)
    [(name, points)] = panels(board, "nystromformer")  # every backend complete: one average panel
    assert name.startswith("Avg") and [p.backend for p in points] == ["softmax", "nystrom"]
    assert points[0].steps_per_second == pytest.approx(4.0)  # geometric mean of 1..16
    write_record(runs, "listops", "linformer", 0, 40.0)  # now one backend is partial: per-task panels
    board = leaderboard.build_leaderboard(leaderboard.load_records([runs])[0])
    assert [n for n, _ in panels(board, "nystromformer")] == ["ListOps", "Text", "Retrieval", "Image", "Pathfinder"]


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
    assert [(r[0], r[1], r[2], r[3]) for r in table["data"]] == [
        (r["protocol"], r["task"], r["backend"], float(r["mean"])) for r in csv_rows]
    assert list((run_dir / "files" / "media" / "images").glob("leaderboard_plot_*.png"))
