"""scripts/check_learning.py: plateau-exit detection on synthetic validation histories, the table built
from records, and the lra-train commands it runs (no training here)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from lra.config import CONF_DIR, compose

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_learning.py"
_spec = importlib.util.spec_from_file_location("check_learning", SCRIPT)
cl = importlib.util.module_from_spec(_spec)
sys.modules["check_learning"] = cl  # dataclasses look their module up there
_spec.loader.exec_module(cl)


def test_plateau_exit_is_the_first_validation_at_the_threshold():
    plateau = [[20, 14.0], [40, 16.5], [60, 15.0]]
    assert cl.plateau_exit(plateau, majority=15.0, margin=10.0) is None
    broke = [[20, 15.0], [40, 18.0], [60, 25.0], [80, 31.0], [100, 12.0]]
    assert cl.plateau_exit(broke, majority=15.0, margin=10.0) == 60  # 25.0 is exactly majority + margin
    assert cl.plateau_exit(broke, majority=15.0, margin=10.5) == 80
    # order of the history and missing accuracies do not matter
    assert cl.plateau_exit([[80, 31.0], [40, None], [60, 24.9]], majority=15.0, margin=10.0) == 80
    assert cl.plateau_exit([], majority=15.0) is None


def _record(folder: Path, backend: str, seed: int, history, *, status="finished", test=30.0, chash="h1") -> Path:
    rec = {"attention": backend, "seed": seed, "status": status, "config_hash": chash, "majority_acc": 15.0,
           "test_acc": test if status == "finished" else None, "val_history": history, "steps": 200,
           "train_seconds": 100.0}
    path = folder / f"listops-{backend}-s{seed}-{chash}-{status}.json"
    path.write_text(json.dumps(rec))
    return path


def test_table_counts_breakouts_per_backend_and_shows_failures(tmp_path):
    _record(tmp_path, "alpha", 0, [[20, 15.0], [40, 33.0]], test=32.5)
    _record(tmp_path, "alpha", 1, [[20, 15.0], [40, 16.0]], test=15.0)
    _record(tmp_path, "beta", 0, None, status="failed")
    rows = cl.load_rows(tmp_path)
    assert [(r.backend, r.seed, r.exit_step) for r in rows] == [("alpha", 0, 40), ("alpha", 1, None), ("beta", 0, None)]
    assert rows[0].best_val == 33.0 and rows[0].final_val == 33.0 and rows[1].final_val == 16.0
    table = cl.render_table(rows, "t")
    assert "| alpha | 0 | 40 | 33.0 | 33.0 | 32.5 |" in table
    assert "| alpha | 1 | — |" in table
    assert "| beta | 0 | FAIL (failed) |" in table
    assert "| alpha | 1/2 | 23.8 (n=2) |" in table and "| beta | 0/1 | — |" in table


def test_a_finished_run_wins_over_its_failed_attempt_but_two_recipes_in_one_folder_are_refused(tmp_path):
    _record(tmp_path, "alpha", 0, None, status="failed")
    _record(tmp_path, "alpha", 0, [[20, 30.0]])
    assert [r.status for r in cl.load_rows(tmp_path)] == ["finished"]
    _record(tmp_path, "alpha", 0, [[20, 15.0]], chash="h2")
    with pytest.raises(cl.CheckError, match="different configs"):
        cl.load_rows(tmp_path)


def test_table_only_writes_table_md_and_bad_records_fail_with_the_file_named(tmp_path, capsys):
    assert cl.main(["--table-only", "--results", str(tmp_path)]) == 2
    assert "no records" in capsys.readouterr().err
    _record(tmp_path, "alpha", 0, [[20, 30.0]])
    assert cl.main(["--table-only", "--results", str(tmp_path), "--title", "T"]) == 0
    assert (tmp_path / "TABLE.md").read_text().startswith("# T\n")
    (tmp_path / "broken.json").write_text("{")
    assert cl.main(["--table-only", "--results", str(tmp_path)]) == 2
    assert "broken.json" in capsys.readouterr().err


def test_unknown_backend_is_refused_before_any_run(tmp_path, capsys):
    assert cl.main(["--results", str(tmp_path), "--backends", "no_such_backend"]) == 2
    assert "no_such_backend" in capsys.readouterr().err and not list(tmp_path.glob("*.json"))


def _args(cmd: list[str]) -> list[str]:
    """The overrides of an lra-train command line (what follows the program)."""
    return cmd[next(i for i, a in enumerate(cmd) if a.startswith("experiment=")):]


CHECKS = sorted(f"check/{p.stem}" for p in (CONF_DIR / "experiment" / "check").glob("*.yaml"))


def test_every_check_has_its_own_data_and_a_ten_percent_warm_up():
    assert cl.CHECK_EXPERIMENT in CHECKS
    cfgs = {c: compose([f"experiment={c}"]) for c in CHECKS}
    assert len({c.data_dir for c in cfgs.values()}) == len(cfgs)  # no two checks read one folder
    for name, cfg in cfgs.items():
        assert cfg.scheduler.warmup_steps * 10 == cfg.trainer.max_steps, name
        assert cfg.trainer.max_steps % cfg.trainer.val_check_interval == 0, name


def test_an_unknown_check_is_refused_before_anything_runs(tmp_path, capsys):
    backend = cl.discovered_backends()[0]
    rc = cl.main(["--check", "check/nope", "--backends", backend, "--results", str(tmp_path)])
    assert rc == 2 and "check/nope" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("check_name", CHECKS)
def test_commands_compose_the_check_alone_and_after_a_preset(tmp_path, check_name):
    from omegaconf import OmegaConf

    backend = cl.discovered_backends()[0]
    plain, = cl.train_commands([backend], [1], tmp_path, None, ["optimizer.lr=0.003"], check_name)
    preset = sorted(p.relative_to(CONF_DIR / "experiment").with_suffix("").as_posix()
                    for p in (CONF_DIR / "experiment").rglob("*/listops.yaml") if p.parent.name != "check")[0]
    with_preset, = cl.train_commands([backend], [1], tmp_path, preset, [], check_name)
    check = compose([f"experiment={check_name}"])
    assert compose(_args(plain)).optimizer.lr == 0.003
    for cmd in (plain, with_preset):
        assert f"attention={backend}" in cmd
        cfg = compose(_args(cmd))
        assert cfg.seed == 1 and cfg.results_dir == str(tmp_path)
        # the check's data and budget win over the preset's
        for key in ("data_dir", "task.max_len", "trainer.max_steps", "trainer.val_check_interval",
                    "scheduler.warmup_steps"):
            assert OmegaConf.select(cfg, key) == OmegaConf.select(check, key), key


def test_root_operator_baseline_is_the_majority_label_per_first_operator(tmp_path):
    rows = {"train": [("( ( [MAX 1 2 ] ) 3 )", "3"), ("[MAX 4 ]", "3"), ("[MIN 5 7 ]", "5"), ("[MIN 1 ]", "5"),
                      ("[MIN 0 ]", "0")],
            "val": [("[MAX 1 ]", "3"), ("[MIN 2 ]", "2")],
            "test": [("[MAX 3 ]", "3"), ("[MIN 5 ]", "5"), ("[MED 5 ]", "5"), ("[MIN 0 ]", "0")]}
    for split, pairs in rows.items():
        (tmp_path / f"basic_{split}.tsv").write_text("Source\tTarget\n" + "".join(f"{s}\t{t}\n" for s, t in pairs))
    # MAX -> 3, MIN -> 5; an operator unseen in train (MED) gets the overall majority (3 and 5 tie: first seen, 3)
    assert cl.root_operator_baseline(tmp_path) == {"val": 50.0, "test": 50.0}
    (tmp_path / "basic_test.tsv").write_text("Source\tTarget\n1 2 3\t4\n")  # no operator: not ListOps
    assert cl.root_operator_baseline(tmp_path) is None
    assert cl.root_operator_baseline(tmp_path / "missing") is None


def test_table_states_the_baseline_of_the_data_its_records_name(tmp_path, monkeypatch):
    data, results = tmp_path / "data", tmp_path / "results"
    data.mkdir(), results.mkdir()
    for split in ("train", "val", "test"):
        (data / f"basic_{split}.tsv").write_text("Source\tTarget\n[MAX 1 3 ]\t3\n[MIN 5 7 ]\t5\n")
    for seed in (0, 1):
        rec = json.loads(_record(results, "b", seed, [[20, 40.0]]).read_text())
        rec["config"] = {"data_dir": "data"}
        (results / f"listops-b-s{seed}-h1-finished.json").write_text(json.dumps(rec))
    monkeypatch.chdir(tmp_path)  # data_dir is relative to the working directory, as lra-train wrote it
    assert cl.baseline_of(cl.load_rows(results)) == {"val": 100.0, "test": 100.0}
    assert cl.main(["--table-only", "--results", "results"]) == 0
    assert "Root-operator baseline" in (results / "TABLE.md").read_text()
    rec["config"] = {"data_dir": "elsewhere"}  # two data folders: no single baseline to state
    (results / "listops-b-s1-h1-finished.json").write_text(json.dumps(rec))
    assert cl.baseline_of(cl.load_rows(results)) is None
