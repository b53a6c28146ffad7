"""lra-bench machinery on tiny sizes: records, statuses, tables, plots, target logic. Speed is never
tested here (the benchmark prints its targets as PASS/FAIL instead)."""
from __future__ import annotations

import json
import statistics
import sys

import pytest

from lra.bench import report
from lra.bench.approx import approx_tables, plot_approx, run_approx
from lra.bench.cli import check_reference_installed, main
from lra.bench.worker import summarize
from lra.bench.workloads import REFERENCE_PACKAGES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--warmup", "1", "--repeats", "2", "--threads", "1", "--no-progress"]


def _load(out_dir, stem):
    record = json.loads((out_dir / f"{stem}.json").read_text())
    assert (out_dir / f"{stem}.png").read_bytes().startswith(PNG_MAGIC)
    return record


def test_layer_and_model_bench_write_record_table_and_plot(tmp_path, capsys):
    argv = ["--backends", "nystrom", "--lengths", "32,64", "--tasks", "listops", "--model-batch", "2",
            "--model-length", "64", "--out-dir", str(tmp_path), *TINY]
    assert main(argv) == 0
    record = _load(tmp_path, "cpu-nystrom")
    assert record["mode"] == "layer" and record["threads"] == 1 and record["settings"]["lengths"] == [32, 64]
    assert {"cpu_percent", "loadavg", "idle"} <= set(record["load_before"]) and record["versions"]["torch"]
    layers = [e for e in record["results"] if e["workload"] == "layer"]
    assert [(e["backend"], e["n"], e["status"]) for e in layers] == [("nystrom", 32, "ok"), ("nystrom", 64, "ok")]
    for e in layers:
        assert e["options"]["num_landmarks"] == 64  # the protocol options of conf/attention/nystrom.yaml
        for key in ("fwd", "fwdbwd"):
            s = e[key]
            assert s["runs"] == 2 and 0 < s["min_ms"] <= s["median_ms"] <= s["max_ms"]
        assert e["mem_fwdbwd_mb"] >= 0 and e["mem_fwd_mb"] is not None
    (model,) = [e for e in record["results"] if e["workload"] == "model"]
    assert model["status"] == "ok" and model["task"] == "listops" and (model["batch"], model["n"]) == (2, 64)
    assert model["tokens_per_s"] > 0
    out = capsys.readouterr().out
    assert "| ours | nystrom | 64 |" in out and "| listops | nystrom | 2 x 64 |" in out
    assert "N/A" in out  # the targets need 2 threads and n up to 16384: not decidable from this run
    for e in [*layers, model]:  # the matmul floor: the step's products, the worker's own rate
        assert e["step_gflop"] > 0 and e["matmul_gflops"] > 0
        assert report.floor_ratio(e) == e["fwdbwd"]["median_ms"] / (1e3 * e["step_gflop"] / e["matmul_gflops"])
        assert f"{e['step_gflop']:.3g} / {report.floor_ratio(e):.2f}×" in out
        split = report.time_split(e)  # one profiled step: products, fused attention, the rest
        assert e["products_ms"] > 0 and e["attention_ms"] >= 0 and 0 <= e["attention_gflop"] <= e["step_gflop"]
        assert split["rest_ms"] == e["fwdbwd"]["median_ms"] - e["products_ms"] - e["attention_ms"]
        assert f"| {split['step_ms'] / split['floor_ms']:.2f}× | {split['kernels_floor_ratio']:.2f}× |" in out


def test_classifier_timed_in_several_processes_is_pooled(tmp_path, capsys):
    """--model-processes N / --layer-processes N: each classifier / layer configuration runs in N fresh
    processes; the entry pools their runs (and keeps each process's median), memory, matmul rate and the
    profiled kernel times are medians over processes."""
    argv = ["--backends", "nystrom", "--lengths", "32", "--tasks", "listops", "--model-batch", "2",
            "--model-length", "64", "--model-repeats", "2", "--model-processes", "2", "--layer-processes", "3",
            "--out-dir", str(tmp_path), *TINY]
    assert main(argv) == 0
    record = _load(tmp_path, "cpu-nystrom")
    (model,) = [e for e in record["results"] if e["workload"] == "model"]
    (layer,) = [e for e in record["results"] if e["workload"] == "layer"]
    assert model["status"] == "ok" and model["processes"] == 2 and layer["processes"] == 3
    assert model["fwdbwd"]["runs"] == 4 and len(model["fwdbwd_process_medians_ms"]) == 2
    assert layer["fwdbwd"]["runs"] == layer["fwd"]["runs"] == 3 * 2  # 2 repeats in each process
    assert len(layer["fwdbwd_process_medians_ms"]) == 3 and len(layer["mem_fwdbwd_mb_per_process"]) == 3
    assert len(model["mem_fwdbwd_mb_per_process"]) == 2 and len(model["matmul_gflops_per_process"]) == 2
    assert len(model["products_ms_per_process"]) == 2
    assert model["products_ms"] == statistics.median(model["products_ms_per_process"])
    assert model["tokens_per_s"] == model["tokens"] / (model["fwdbwd"]["median_ms"] / 1e3)
    assert record["settings"]["model_processes"] == 2 and record["settings"]["layer_processes"] == 3
    for flag in ("--model-processes", "--layer-processes"):
        with pytest.raises(SystemExit):
            main([*argv[:-len(TINY)], flag, "0"])


def test_step_flops_count_every_matrix_product_once():
    """2·m·k·n per product: a linear layer's forward and both gradients, an in-place addmm, and the fused
    attention kernel (two products forward, four backward: its recomputed scores are not counted)."""
    import torch
    import torch.nn.functional as F

    from lra.bench.flops import matmul_gflops, step_flops

    a, b = torch.randn(8, 16, requires_grad=True), torch.randn(16, 4, requires_grad=True)
    assert step_flops(lambda: (a @ b).sum().backward()) == 3 * 2 * 8 * 16 * 4
    assert step_flops(lambda: torch.zeros(8, 4).addmm_(a.detach(), b.detach())) == 2 * 8 * 16 * 4
    q = torch.randn(2, 3, 10, 8, requires_grad=True)
    k, v = torch.randn(2, 3, 12, 8, requires_grad=True), torch.randn(2, 3, 12, 8, requires_grad=True)
    one = 2 * 2 * 3 * 10 * 12 * 8  # one (B·H) x 10 x 8 x 12 product
    assert step_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 2 * one
    assert step_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward()) == 6 * one
    assert step_flops(lambda: torch.randn(100, 100).exp().softmax(-1)) == 0  # elementwise work is not counted
    assert matmul_gflops(torch.device("cpu"), n=256, repeats=3) > 0


def test_step_time_split_puts_products_and_fused_attention_apart():
    """The FLOPs and the profiled self time of plain products and of fused attention kernels are kept
    apart; elementwise work is in neither."""
    import torch
    import torch.nn.functional as F

    from lra.bench.flops import step_flop_counts, step_time_split

    q = torch.randn(2, 2, 64, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    one = 2 * 2 * 2 * 64 * 64 * 8
    both = lambda: F.scaled_dot_product_attention(q @ w, q, q).sum().backward()  # noqa: E731
    assert step_flop_counts(both) == {"products": 3 * 2 * 256 * 8 * 8, "attention": 6 * one}
    split = step_time_split(both)
    assert split["products_ms"] > 0 and split["attention_ms"] > 0
    assert split["profiled_ms"] > split["products_ms"] + split["attention_ms"]
    products_only = step_time_split(lambda: (q @ w).sum().backward())
    assert products_only["products_ms"] > 0 and products_only["attention_ms"] == 0
    elementwise = step_time_split(lambda: q.exp().softmax(-1).sum().backward())
    assert elementwise["products_ms"] == elementwise["attention_ms"] == 0 and elementwise["profiled_ms"] > 0


def test_out_of_memory_and_timeout_are_recorded_not_raised(tmp_path, capsys):
    argv = ["--backends", "softmax", "--lengths", "256,512", "--tasks", "none", "--memory-limit-mb", "1",
            "--out-dir", str(tmp_path), *TINY]
    assert main(argv) == 0
    first, second = _load(tmp_path, "cpu-softmax")["results"]
    assert first["status"] == "oom" and "allocate" in first["error"]
    assert second["status"] == "skipped" and "oom at n=256" in second["error"]
    assert "| ours | softmax | 256 | OOM |" in capsys.readouterr().out
    argv = ["--backends", "linformer", "--lengths", "64", "--tasks", "none", "--timeout", "0.05",
            "--out-dir", str(tmp_path), *TINY]
    assert main(argv) == 0
    (entry,) = _load(tmp_path, "cpu-linformer")["results"]
    assert entry["status"] == "timeout" and "0.05 s" in entry["error"]


def test_reference_side_by_side(tmp_path, capsys):
    pytest.importorskip("nystrom_attention")
    argv = ["--with-reference", "--backends", "nystrom", "--lengths", "64", "--tasks", "none", "--out-dir", str(tmp_path),
            *TINY]
    assert main(argv) == 0
    record = _load(tmp_path, "cpu-reference-nystrom")
    by_impl = {e["impl"]: e for e in record["results"]}
    assert set(by_impl) == {"ours", "reference"}
    for e in by_impl.values():
        assert e["status"] == "ok" and e["fwdbwd"]["runs"] == 2 and e["mem_fwdbwd_mb"] is not None
        assert e["options"] == {"num_landmarks": 64, "pinv_iterations": 6, "conv_kernel": 33}
    assert "| nystrom | 64 |" in capsys.readouterr().out


@pytest.mark.parametrize("kind", list(REFERENCE_PACKAGES))
def test_reference_classifier_has_the_package_attention_in_every_layer(kind):
    """The model comparison's reference: our preset classifier with the package's attention module (at
    the settings our preset maps to) in place of every layer's wrapper; it trains, and ours is untouched."""
    import torch

    from lra.bench.workloads import PackageAttention, build_reference, model_reference_options, model_workload
    from models.multihead import MultiHeadAttention

    spec = {"task": "listops", "preset": "nystromformer", "dtype": "float32", "model_length": 64, "model_batch": 2}
    options = model_reference_options(spec, kind)
    torch.manual_seed(0)
    ref = model_workload(spec, {"impl": "reference", "backend": kind, "options": options}, torch.device("cpu"))
    ours = model_workload(spec, {"impl": "ours", "backend": kind, "options": {}}, torch.device("cpu"))
    package_class = type(build_reference(kind, 64, 64, 2, 32, options))
    for work, wanted in ((ref, PackageAttention), (ours, MultiHeadAttention)):
        blocks = work.module.encoder.blocks
        assert len(blocks) == 2 and all(type(b.attn) is wanted for b in blocks)
        before = [p.detach().clone() for p in work.module.parameters()]
        work.train_step()
        assert all(torch.isfinite(p).all() for p in work.module.parameters())
        assert any(not torch.equal(a, p) for a, p in zip(before, work.module.parameters())), "no parameter moved"
    assert all(type(b.attn.module) is package_class and b.attn.drop.p == 0.1 for b in ref.module.encoder.blocks)
    assert (ref.batch, ref.n) == (ours.batch, ours.n) == (2, 64)


def test_reference_whole_classifier_side_by_side(tmp_path, capsys):
    """--with-reference with a task: the package's model timed beside ours in one process, memory apart,
    one table row each and their ratio."""
    kind = next(iter(REFERENCE_PACKAGES))
    argv = ["--with-reference", "--backends", kind, "--lengths", "32", "--tasks", "listops", "--model-length", "64",
            "--model-batch", "2", "--model-repeats", "2", "--out-dir", str(tmp_path), *TINY]
    assert main(argv) == 0
    models = {e["impl"]: e for e in _load(tmp_path, f"cpu-reference-{kind}")["results"] if e["workload"] == "model"}
    assert set(models) == {"ours", "reference"}
    for e in models.values():
        assert e["status"] == "ok", e["error"]
        assert e["fwdbwd"]["runs"] == 2 and e["mem_fwdbwd_mb"] is not None and (e["batch"], e["n"]) == (2, 64)
    assert models["reference"]["options"] and models["ours"]["options"] == {}
    out = capsys.readouterr().out
    assert f"| listops | {kind} | package | 2 x 64 |" in out and f"| listops | {kind} | ours | 2 x 64 |" in out
    assert "step time ours/package" in out


def test_missing_reference_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "linformer", None)  # makes `import linformer` fail
    with pytest.raises(SystemExit, match="make install-bench"):
        check_reference_installed(["linformer"])


def test_summarize_statistics():
    s = summarize([0.004, 0.001, 0.003, 0.002, 0.005])
    assert (s["median_ms"], s["min_ms"], s["max_ms"], s["runs"]) == pytest.approx((3.0, 1.0, 5.0, 5))
    assert (s["q1_ms"], s["q3_ms"], s["iqr_ms"]) == pytest.approx((2.0, 4.0, 2.0))


def _entry(backend, n, ms, mb, impl="ours", status="ok"):
    return {"workload": "layer", "impl": impl, "backend": backend, "n": n, "status": status,
            "fwd": {"median_ms": ms / 3, "iqr_ms": 0.0}, "fwdbwd": {"median_ms": ms, "iqr_ms": 0.0},
            "mem_fwd_mb": mb / 2, "mem_fwdbwd_mb": mb}


def _record(mode, results, threads=2):
    settings = {"dtype": "float32", "batch": 2, "heads": 2, "head_dim": 32, "threads": threads,
                "backends": ["nystrom", "linformer", "performer"], "lengths": [4096, 8192, 16384]}
    return {"mode": mode, "machine": {"device": "cpu"}, "threads": threads, "settings": settings, "results": results}


def test_targets_pass_fail_and_not_applicable():
    results = [_entry("softmax", 16384, 10_000, 50)]
    results += [_entry("nystrom", 4096, 100, 40), _entry("nystrom", 16384, 400, 170)]  # 4.25x memory: PASS
    results += [_entry("linformer", 4096, 100, 40), _entry("linformer", 16384, 2000, 200)]  # 5x, 0.2: FAIL both
    got = {t["target"]: t["status"] for t in report.targets(_record("layer", results))}
    assert got["nystrom: peak memory n=16384 / n=4096 <= 4.5"] == "PASS"
    assert got["nystrom: time at n=16384 / softmax's <= 0.15"] == "PASS"
    assert got["linformer: peak memory n=16384 / n=4096 <= 4.5"] == "FAIL"
    assert got["linformer: time at n=16384 / softmax's <= 0.15"] == "FAIL"
    assert got["performer: time at n=16384 / softmax's <= 0.15"] == "N/A"  # not measured
    assert got["nystrom n=4096: fwd+bwd / matmul floor <= 2"] == "N/A"  # no FLOPs in these entries
    assert {t["status"] for t in report.targets(_record("layer", results, threads=4))} == {"N/A"}
    results[1].update(step_gflop=1.0, matmul_gflops=200.0)  # floor 5 ms; 100 ms measured: 20x
    model = {**_entry("nystrom", None, 400, 800), "workload": "model", "task": "listops", "step_gflop": 50.0,
             "matmul_gflops": 200.0}  # floor 250 ms: 1.6x
    record = _record("layer", [*results, model])
    record["settings"].update(preset="nystromformer", compile=False, model_length=None, model_batch=None, model_options=[])
    got = {t["target"]: (t["status"], t["value"]) for t in report.targets(record)}
    assert got["nystrom n=4096: fwd+bwd / matmul floor <= 2"] == ("FAIL", 20.0)
    assert got["nystrom ListOps preset step / matmul floor <= 2"] == ("PASS", 1.6)
    record["settings"]["model_length"] = 512  # not the protocol size: the step target is not decided
    assert "nystrom ListOps preset step / matmul floor <= 2" not in {t["target"] for t in report.targets(record)}
    ref = [_entry("nystrom", 4096, 60, 10), _entry("nystrom", 4096, 100, 10, impl="reference"),
           _entry("performer", 8192, 80, 10), _entry("performer", 8192, 100, 10, impl="reference"),
           _entry("nystrom", 16384, 60, 10, status="oom")]
    got = {t["target"]: t["status"] for t in report.targets(_record("reference", ref))}
    assert got["nystrom n=4096: time ours/theirs <= 0.7"] == "PASS"
    assert got["performer n=8192: time ours/theirs <= 0.7"] == "FAIL"
    assert got["nystrom n=16384: peak memory ours/theirs <= 1.0"] == "N/A"
    assert "OOM" in report.layer_table(_record("reference", ref))


def test_approx_errors_match_plain_formula(tmp_path):
    result = run_approx(n=64, heads=1, head_dim=8, feature_draws=2)
    rows = result["rows"]
    assert {r["check"] for r in rows} == {"PASS"}
    exact_full = [r for r in rows if r["method"] == "nystrom" and r["landmarks"] == 64 and r["pinv_iterations"] is None]
    assert all(r["error_fp64"] < 1e-8 for r in exact_full)  # landmarks = tokens, exact pinv: softmax itself
    few = [r["error"] for r in rows if r["method"] == "nystrom" and r["landmarks"] == 16 and r["pinv_iterations"] is None]
    assert min(few) > 1e-3
    assert set(result["families"]) == {"random", "structured"}
    s = result["families"]["structured"]
    assert s["entropy_nats"] < result["families"]["random"]["entropy_nats"] < s["uniform_entropy_nats"]
    assert "PASS" in approx_tables(result)
    assert plot_approx(result, tmp_path / "a.png").read_bytes().startswith(PNG_MAGIC)


def test_model_bench_batches_pad_variable_length_tasks_as_training_does():
    """Every task's classifier is timed on a batch shaped like its DataModule's: pixel tasks all real
    tokens, the others padded (so a fast path for unpadded batches cannot flatter the step)."""
    import torch
    from hydra.utils import get_class

    from lra.bench.workloads import padded_batch
    from lra.config import compose, task_names

    kinds = set()
    for task in task_names():
        reader = get_class(compose([f"task={task}"]).task.reader._target_)
        ids, mask = padded_batch(8, 64, reader.vocab_size, reader.fixed_length, torch.Generator().manual_seed(0))
        assert ids.shape == mask.shape == (8, 64) and bool(mask[0].all())  # the padded length is the length
        assert bool((ids[~mask] == 0).all()) and bool((ids[mask] > 0).all())
        assert bool(mask.all()) == reader.fixed_length, task
        kinds.add(reader.fixed_length)
    assert kinds == {True, False}  # both kinds of task exist in conf/task/


def test_compile_flag_reaches_every_classifier_job_and_only_those(monkeypatch):
    import torch

    from lra.bench import workloads
    from lra.bench.cli import parse_args, plan
    from lra.config import backend_names

    backend = backend_names()[0]
    jobs = plan(parse_args(["--compile", "--backends", backend, "--lengths", "64", "--tasks", "listops"]))
    model = [j for j in jobs if j["spec"].get("workload") == "model"]
    assert model and all(j["spec"]["compile"] and "(compiled)" in j["label"] for j in model)
    assert not any(j["spec"].get("compile") for j in jobs if j["spec"].get("workload") != "model")
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    spec = {**model[0]["spec"], "model_length": 32, "model_batch": 2}
    workloads.model_workload(spec, spec["impls"][0], torch.device("cpu"))
    assert len(compiled) == 1  # the classifier, in place, as lra-train compile=true does
