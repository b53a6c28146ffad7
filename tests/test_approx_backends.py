"""lra-bench --approx covers every discovered backend that approximates softmax (its class's
`approximates_softmax` flag), with finite errors, and the exact settings a method has give ~0."""
from __future__ import annotations

import json
import math

import pytest
import torch

from lra.bench.approx_backends import (approximating_backends, backends_table, exact_attention, run_backends_approx,
                                       settings)
from lra.bench.cli import main
from lra.config import attention_spec, backend_names
from models.attention import backend_class, capability

FLAGGED = sorted(b for b in backend_names()
                 if capability(backend_class(attention_spec(b)["_target_"], b), "approximates_softmax"))
N = 256  # longer than every default block, window and chunk: no default is exact by accident


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    torch.set_num_threads(1)
    return run_backends_approx(N, heads=1, head_dim=8, dtype=torch.float64)


def test_every_flagged_backend_is_in_the_report_with_finite_errors(rows):
    assert FLAGGED, "no discovered backend approximates softmax"
    assert sorted({r["backend"] for r in rows}) == FLAGGED == sorted(approximating_backends())
    for backend in FLAGGED:
        mine = [r for r in rows if r["backend"] == backend]
        spec = attention_spec(backend)
        assert {r["setting"] for r in mine} == {label for label, _ in settings(spec, N)}
        assert {(r["family"], r["padded"]) for r in mine} == {(f, p) for f in ("random", "structured") for p in (0, 1)}
        default = [r for r in mine if r["setting"].startswith("default")]
        assert default and all(r["error"] is not None and math.isfinite(r["error"]) for r in default), default
        for r in default:  # the yaml's own options (plus the class's fixed ones) were what ran
            assert {k: spec[k] for k in spec if k not in ("_target_", "name") and k not in r["options"]}
        errors = [r["error"] for r in mine if r["error"] is not None]
        assert all(math.isfinite(e) and e >= 0 for e in errors)
        # an approximation: its smallest setting is not exact at this length
        assert max(errors) > 1e-3, f"{backend}: every setting exact at n={N}; is it an approximation?"
    table = backends_table(rows, N)
    for backend in FLAGGED:
        assert f"| {backend} | default" in table


def test_exact_settings_give_zero_error(rows):
    """Where a method has an exact setting (class.exact_options), its error is rounding, padded or not."""
    with_exact = [b for b in FLAGGED
                  if capability(backend_class(attention_spec(b)["_target_"], b), "exact_options")(N) is not None]
    assert with_exact, "no backend declares an exact setting"
    for backend in with_exact:
        exact = [r for r in rows if r["backend"] == backend and r["setting"].startswith("exact")]
        assert len(exact) == 4, backend
        assert all(r["error"] is not None and r["error"] < 1e-9 for r in exact), (backend, exact)


def test_shared_qk_target_is_softmax_over_normalised_queries_without_self():
    g = torch.Generator().manual_seed(0)
    q, v = torch.randn(1, 1, 5, 4, generator=g, dtype=torch.float64), torch.randn(1, 1, 5, 4, generator=g,
                                                                                    dtype=torch.float64)
    out = exact_attention(q, torch.zeros_like(q), v, None, shared_qk=True)
    kn = q / q.norm(dim=-1, keepdim=True)
    for i in range(5):
        logits = torch.tensor([float(q[0, 0, i] @ kn[0, 0, j]) / 2 for j in range(5) if j != i], dtype=torch.float64)
        want = torch.softmax(logits, 0) @ v[0, 0, [j for j in range(5) if j != i]]
        assert torch.allclose(out[0, 0, i], want)


def test_lra_bench_approx_writes_every_flagged_backend(tmp_path, capsys):
    argv = ["--approx", "--approx-length", "64", "--heads", "1", "--head-dim", "8", "--threads", "1",
            "--no-progress", "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    record = json.loads((tmp_path / "cpu-approx.json").read_text())
    assert sorted({r["backend"] for r in record["approx"]["backends"]}) == FLAGGED
    assert record["settings"]["approx_backends"] == FLAGGED
    out = capsys.readouterr().out
    assert all(f"| {b} | default" in out for b in FLAGGED) and "PASS" in out
