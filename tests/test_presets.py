"""Protocol presets: the whole protocol lives in conf/ (the Makefile only loops), each backend gets its
protocol options from conf/protocol_attention/<protocol>/<backend>.yaml, the Nyströmformer preset
models have the authors' parameter counts, and docs/DEPARTURES.md is true of the presets."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from lra.config import CONF_DIR, backend_names, compose
from lra.published import SOURCES, protocol_backends
from lra.training.fingerprint import fingerprint_of, fingerprint_settings, preset_config
from lra.training.records import config_hash
from models.classifier import build_model

ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = sorted(p.stem for p in (CONF_DIR / "protocols").glob("*.yaml"))
NYS_BACKENDS = sorted(p.stem for p in (CONF_DIR / "protocol_attention" / "nystromformer").glob("*.yaml"))
NYS_TASKS = sorted(p.stem for p in (CONF_DIR / "experiment" / "nystromformer").glob("*.yaml"))
PRESET_BACKENDS = sorted({(proto, p.stem) for proto in PROTOCOLS
                          for p in (CONF_DIR / "protocol_attention" / proto).glob("*.yaml")})

# Parameters of the authors' models without the token-embedding table (shared/LRA_FACTS.md §2, from their
# code at the protocol lengths): facts to compare with, keyed by their names.
AUTHORS_PARAMS = {
    "listops": {"softmax": 207_754, "nystrom": 207_894, "linformer": 1_256_330, "performer": 207_754},
    "text": {"softmax": 337_794, "nystrom": 337_934, "linformer": 2_434_946, "performer": 337_794},
    "image": {"softmax": 142_218, "nystrom": 142_358, "linformer": 666_506, "performer": 142_218},
}


def preset_net(cfg):
    """The model a run of `cfg` trains (every model.* key reaches build_model)."""
    from hydra.utils import get_class

    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
             if k not in ("_target_", "_partial_")}
    reader = get_class(cfg.task.reader._target_)
    return build_model(head=cfg.task.head, vocab_size=reader.vocab_size, num_classes=int(cfg.task.num_classes),
                       attention=OmegaConf.to_container(cfg.attention, resolve=True), **model)


@pytest.mark.parametrize("backend", NYS_BACKENDS)
@pytest.mark.parametrize("task", sorted(AUTHORS_PARAMS))
def test_preset_parameter_counts_equal_the_authors(task: str, backend: str):
    assert backend in AUTHORS_PARAMS[task], f"no published parameter count for {backend}: add it from their code"
    cfg = compose([f"experiment=nystromformer/{task}", f"attention={backend}"])
    net = preset_net(cfg)
    total = sum(p.numel() for p in net.parameters())  # a parameter shared by layers counts once
    assert total - net.encoder.embed.weight.numel() == AUTHORS_PARAMS[task][backend]


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


@pytest.mark.parametrize("task", NYS_TASKS)
def test_nystromformer_preset_pins_every_setting(task: str):
    """A default-recipe change (conf/model, conf/train.yaml, conf/task) must not move a published run:
    every model, optimiser and schedule key, and the run's size, is set by the protocol's own files."""
    base = _raw(CONF_DIR / "protocols" / "nystromformer.yaml")
    own = _raw(CONF_DIR / "experiment" / "nystromformer" / f"{task}.yaml")
    cfg = compose([f"experiment=nystromformer/{task}"])
    for section in ("model", "optimizer", "scheduler"):
        pinned = set(base.get(section, {})) | set(own.get(section, {}))
        missing = set(cfg[section]) - pinned - ({"_target_", "_partial_"} if section == "model" else set())
        assert not missing, f"conf/protocols/nystromformer.yaml does not pin {section}.{sorted(missing)}"
    assert {"batch_size"} <= set(own["data"]) and {"max_steps", "val_check_interval"} <= set(own["trainer"])
    assert "max_len" in own["task"] and "precision" in base


def _task_files(protocol: str, backend: str) -> dict[str, dict]:
    """task -> the `attention:` block of conf/protocol_attention/<protocol>/tasks/<task>/<backend>.yaml."""
    root = CONF_DIR / "protocol_attention" / protocol / "tasks"
    return {f.parent.name: _raw(f) for f in root.glob(f"*/{backend}.yaml")}


@pytest.mark.parametrize("protocol,backend", PRESET_BACKENDS)
def test_backend_preset_files_pin_every_option(protocol: str, backend: str):
    """A preset file holds an `attention:` block pinning every option; where the protocol's configs differ
    per task, its defaults list adds tasks/<task>/<backend>.yaml, which changes only options it pins."""
    raw = _raw(CONF_DIR / "protocol_attention" / protocol / f"{backend}.yaml")
    assert set(raw) <= {"attention", "defaults"} and "attention" in raw, \
        "a backend preset file holds an `attention:` block (and a defaults list for per-task files)"
    per_task = _task_files(protocol, backend)
    if "defaults" in raw:
        assert raw["defaults"] == ["_self_", {f"optional /protocol_attention/{protocol}/tasks": f"${{task}}/{backend}"}]
    else:
        assert not per_task, f"tasks/*/{backend}.yaml exist but {backend}.yaml does not list them"
    tasks = sorted(p.stem for p in (CONF_DIR / "experiment" / protocol).glob("*.yaml"))
    assert set(per_task) <= set(tasks), f"per-task files for tasks {protocol} does not have: {set(per_task) - set(tasks)}"
    for task in tasks:
        cfg = compose([f"experiment={protocol}/{task}", f"attention={backend}"])
        options = set(cfg.attention) - {"name", "_target_"}
        assert options <= set(raw["attention"]), f"unpinned: {sorted(options - set(raw['attention']))}"
        own = per_task.get(task, {})
        assert set(own) <= {"attention"} and set(own.get("attention", {})) <= set(raw["attention"])
        for key, value in {**raw["attention"], **own.get("attention", {})}.items():
            assert cfg.attention[key] == value, (task, key)


def test_a_backend_without_a_preset_file_runs_with_its_defaults():
    """Every discovered backend composes with the protocol; one with no file gets conf/attention defaults."""
    for backend in backend_names():
        cfg = compose(["experiment=nystromformer/listops", f"attention={backend}"])
        assert cfg.protocol == "nystromformer" and cfg.model.head_activation == "relu"
        if backend not in NYS_BACKENDS:
            assert cfg.attention == compose([f"attention={backend}"]).attention


def _tasks(protocol: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "experiment" / protocol).glob("*.yaml"))


@pytest.mark.parametrize("protocol,backend", sorted({(s.protocol, r.backend) for s in SOURCES for r in s.rows}))
def test_every_published_backend_has_a_preset_that_builds_for_every_task(protocol: str, backend: str):
    """A backend some paper has a row for is discovered, and `experiment=<protocol>/<task> attention=<it>`
    composes and builds for every task of that protocol (at a short length: only the options are checked)."""
    assert backend in backend_names(), (f"lra/published.py has a {protocol} row for '{backend}', but no "
                                        f"attention/{backend}.yaml is discovered")
    for task in _tasks(protocol):
        cfg = compose([f"experiment={protocol}/{task}", f"attention={backend}"])
        assert cfg.protocol == protocol and cfg.attention.name == backend
        preset_net(compose([f"experiment={protocol}/{task}", f"attention={backend}", "task.max_len=64", "model.depth=1"]))


def _make_commands(target: str, *args: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    out = subprocess.run(["make", "--no-print-directory", "-n", target, f"STAMP={ROOT / 'pyproject.toml'}", *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, env=env).stdout
    return [line.split(" -m ", 1)[1].split() for line in out.splitlines() if "lra-train -m" in line]


@pytest.mark.parametrize("target,protocol", [("reproduce-nystromformer", "nystromformer"), ("reproduce-lra", "lra")])
def test_make_reproduce_only_loops_and_its_runs_are_the_presets(target: str, protocol: str):
    commands = _make_commands(target)
    assert commands
    seen: set[tuple[str, str]] = set()
    for args in commands:
        keys = sorted(a.split("=", 1)[0] for a in args)
        assert keys == ["attention", "data_dir", "experiment", "seed"], f"the Makefile passes settings: {args}"
        exp = next(a for a in args if a.startswith("experiment="))
        assert exp.startswith(f"experiment={protocol}/")
        att = next(a for a in args if a.startswith("attention="))
        seed = next(a for a in args if a.startswith("seed="))
        # the run's fingerprint is the preset's own (and so is its config hash, hence its run id); composed
        # for each task's first command and each backend's first (every task and backend, stays fast)
        task, backend = exp.split("/", 1)[1], att.split("=", 1)[1]
        if ("task", task) in seen and ("backend", backend) in seen:
            continue
        seen |= {("task", task), ("backend", backend)}
        composed = compose(args)
        assert config_hash(composed) == config_hash(compose([exp, att, seed]))
        config = OmegaConf.to_container(composed, resolve=True)
        assert fingerprint_of(fingerprint_settings(config, backend)) == \
            fingerprint_of(fingerprint_settings(preset_config(protocol, task, backend), backend))


@pytest.mark.parametrize("protocol", sorted({s.protocol for s in SOURCES}))
def test_make_reproduce_runs_every_published_backend_on_every_task(protocol: str):
    """`make -n reproduce-<protocol>` prints one lra-train per task of the protocol and backend with a
    published row (python -m lra.published); BACKENDS= narrows it."""
    published = protocol_backends(protocol)
    assert {r.backend for s in SOURCES if s.protocol == protocol for r in s.rows} == set(published)
    runs: dict[str, list[str]] = {}
    for args in _make_commands(f"reproduce-{protocol}"):
        opts = dict(a.split("=", 1) for a in args)
        runs.setdefault(opts["experiment"].split("/", 1)[1], []).append(opts["attention"])
    assert runs == {task: published for task in _tasks(protocol)}
    narrowed = {dict(a.split("=", 1) for a in args)["attention"]
                for args in _make_commands(f"reproduce-{protocol}", f"BACKENDS={published[-1]}")}
    assert narrowed == {published[-1]}


def test_published_backends_cli(capsys):
    from lra.published import main

    for protocol in sorted({s.protocol for s in SOURCES}):
        assert main([protocol]) == 0 and capsys.readouterr().out.split() == protocol_backends(protocol)
    assert main(["no-such-protocol"]) == 2
    assert "no published table follows protocol 'no-such-protocol'" in capsys.readouterr().err


def test_sweep_gives_each_backend_its_protocol_options(tmp_path: Path, listops_dir: Path):
    """`lra-train -m experiment=nystromformer/listops attention=a,b,...`: each run's record holds the options
    of its backend's preset file (a tiny run: 1 step at length 40)."""
    runs = tmp_path / "runs"
    args = ["-m", "experiment=nystromformer/listops", "attention=" + ",".join(NYS_BACKENDS), f"data_dir={listops_dir}",
            f"results_dir={runs}", f"ckpt_root={tmp_path}/ckpt", "logger=none", "progress=false", "task.max_len=40",
            "data.batch_size=8", "trainer.max_steps=1", "trainer.val_check_interval=1", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([str(Path(sys.executable).parent / "lra-train"), *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    recs = {r["attention"]: r for r in (json.loads(f.read_text()) for f in runs.glob("*.json"))}
    assert sorted(recs) == NYS_BACKENDS
    for backend, rec in recs.items():
        assert rec["status"] == "finished" and rec["protocol"] == "nystromformer"
        preset = _raw(CONF_DIR / "protocol_attention" / "nystromformer" / f"{backend}.yaml")["attention"]
        assert {k: rec["config"]["attention"][k] for k in preset} == preset
        if "segments" in preset:  # Nyström: the record says how many landmarks held real tokens
            assert 0 < rec["attention_stats"]["nonempty_landmarks"] <= preset["num_landmarks"]


# ---- docs/DEPARTURES.md ---------------------------------------------------------------------------
def first_table(text: str) -> list[str]:
    """The lines of the first markdown table in `text` (the departures; later tables are measurements)."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def departures() -> list[dict[str, str]]:
    lines = first_table((ROOT / "docs" / "DEPARTURES.md").read_text())
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]
            if not set(ln) <= set("|-: ")]


def _switch(cell: str) -> tuple[str, object] | None:
    m = re.fullmatch(r"`([\w.]+)=([^`]+)`", cell)
    return None if m is None else (m.group(1), yaml.safe_load(m.group(2)))


def test_departures_table_is_true_of_the_presets():
    rows = departures()
    assert rows and {"Departure", "Preset runs", "Switch for theirs", "Backends"} <= set(rows[0])
    for row in rows:
        switch = _switch(row["Switch for theirs"])
        if switch is None:
            assert row["Switch for theirs"].startswith("none:"), f"{row['Departure']}: a switch or 'none: why'"
            continue
        key, theirs = switch
        backends = NYS_BACKENDS if row["Backends"] == "all" else [b.strip() for b in row["Backends"].split(",")]
        assert row["Preset runs"] in ("ours", "theirs")
        for backend in backends:
            cfg = compose(["experiment=nystromformer/listops", f"attention={backend}"])
            preset_value = OmegaConf.select(cfg, key, default="<missing>")
            assert preset_value != "<missing>", f"{key} is not a setting of {backend}"
            assert (preset_value == theirs) == (row["Preset runs"] == "theirs"), (row["Departure"], backend)
            switched = compose(["experiment=nystromformer/listops", f"attention={backend}", f"{key}={theirs}",
                                "task.max_len=64"])
            preset_net(switched)  # the authors' setting builds


def test_every_departure_marked_in_the_presets_is_in_the_table():
    listed = {row["Switch for theirs"].strip("`") for row in departures()}
    files = [CONF_DIR / "protocols" / "nystromformer.yaml",
             *(CONF_DIR / "protocol_attention" / "nystromformer").glob("*.yaml")]
    marked = {m for f in files for m in re.findall(r"departure \(a fix\):.*\(([\w.]+=[^)\s]+)\)", f.read_text())}
    assert marked, "the presets mark their departures as `departure (a fix): ... (key=value)`"
    for switch in marked:
        assert switch in listed or f"attention.{switch}" in listed or f"model.{switch}" in listed, switch


def test_departure_measurement_plan_covers_every_switch(tmp_path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("measure_departures", ROOT / "scripts" / "measure_departures.py")
    md = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(md)
    rows = md.switch_rows(ROOT / "docs" / "DEPARTURES.md")
    switches = {s for _, s, _ in rows}
    assert switches == {r["Switch for theirs"].strip("`") for r in departures() if _switch(r["Switch for theirs"])}
    plan = md.arms(rows, ["nystrom"])
    for backend in {b for b, _ in plan}:
        mine = [s for b, s in plan if b == backend]
        assert mine[0] is None and len(mine) == len(set(mine))  # the preset first, each switch once
    assert switches == {s for _, s in plan if s is not None}
    assert "| nystrom | preset (ours) | — | — | — |" in md.summary(tmp_path, rows, ["nystrom"])
    assert all("=" not in str(md.folder(tmp_path, b, s)) for b, s in plan)  # results_dir=PATH must parse
