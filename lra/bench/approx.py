"""lra-bench --approx: how close the backends come to exact softmax attention.

Two parts. Every backend that approximates softmax (lra.bench.approx_backends: discovered, by its
class's `approximates_softmax` flag) at its yaml defaults and a sweep of its main size option, with
and without padding. And, for Nyström and Performer, a finer sweep (landmarks x pseudo-inverse
iterations, features x draws) checked against plain implementations of the papers' formulas:

Relative error ‖out − softmax‖_F / ‖softmax‖_F on two input families:
  random:     q, k, v ~ N(0, 1): logits of spread ~1, attention close to uniform (high entropy);
  structured: tokens drawn around a few cluster centres, scaled so attention concentrates on a
              token's own cluster (low entropy), the regime where low-rank kernels struggle.
Errors are reported in the benchmark dtype (fp32 by default: an exact fp32 pinv of an ill-conditioned
landmark kernel can blow up, the iteration does not). The check: in float64, so that rounding cannot
hide or fake a difference, the harness's error must equal that of a plain implementation of the
paper's formula (explicit kernels, explicit pseudo-inverse iteration or torch.linalg.pinv, explicit
feature map) within 1e-4 relative, or 1e-9 absolute for exact settings (PASS/FAIL).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from lra.bench.approx_backends import backends_table, count_backend_settings, plot_backends, run_backends_approx
from models.attention.nystrom import nystrom_attention
from models.attention.performer import orthogonal_features, performer_attention

LANDMARKS = (16, 32, 64, 128, 256)
PINV_ITERATIONS: tuple[int | None, ...] = (1, 2, 3, 4, 6, 8, 10, 12, None)  # None = exact pinv
FEATURES = (64, 128, 256, 512)
CHECK_TOLERANCE = 1e-4
CHECK_FLOOR = 1e-9  # float64 errors below this are rounding (an exact setting): compared absolutely


def make_inputs(kind: str, n: int, heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0):
    """q, k, v (1, H, n, Dh) of the given family."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(1, heads, n, head_dim, generator=g, dtype=torch.float64)
    if kind == "random":
        q, k = (torch.randn(1, heads, n, head_dim, generator=g, dtype=torch.float64) for _ in range(2))
    elif kind == "structured":
        centres = torch.randn(1, heads, 8, head_dim, generator=g, dtype=torch.float64)
        centres = centres / centres.norm(dim=-1, keepdim=True) * 2.5 * head_dim**0.25  # logits ~ ±6
        which = torch.randint(0, 8, (n,), generator=g)
        q = centres[:, :, which] + 0.2 * torch.randn(1, heads, n, head_dim, generator=g, dtype=torch.float64)
        k = centres[:, :, which] + 0.2 * torch.randn(1, heads, n, head_dim, generator=g, dtype=torch.float64)
    else:
        raise ValueError(f"unknown input family '{kind}'; valid: random, structured")
    return q.to(dtype), k.to(dtype), v.to(dtype)


def softmax_exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v.double()


def entropy(q: torch.Tensor, k: torch.Tensor) -> float:
    """Mean row entropy of the exact attention, in nats (uniform rows: log n)."""
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    return float(-(p * p.clamp_min(1e-300).log()).sum(-1).mean())


def plain_nystrom(q, k, v, m: int, iterations: int | None) -> torch.Tensor:
    """The paper's formula written out (n divisible by m, no padding), in q's dtype."""
    B, H, n, d = q.shape
    ql = q.reshape(B, H, m, n // m, d).mean(-2)
    kl = k.reshape(B, H, m, n // m, d).mean(-2)
    f = torch.softmax(q @ kl.transpose(-1, -2) / math.sqrt(d), -1)
    a = torch.softmax(ql @ kl.transpose(-1, -2) / math.sqrt(d), -1)
    b = torch.softmax(ql @ k.transpose(-1, -2) / math.sqrt(d), -1)
    if iterations is None:
        a_inv = torch.linalg.pinv(a)
    else:
        eye = torch.eye(m, dtype=q.dtype)
        norm1 = a.abs().sum(-2).amax(-1)[..., None, None]
        norm_inf = a.abs().sum(-1).amax(-1)[..., None, None]
        a_inv = a.transpose(-1, -2) / (norm1 * norm_inf)
        for _ in range(iterations):
            az = a @ a_inv
            a_inv = 0.25 * a_inv @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return f @ (a_inv @ (b @ v))


def plain_favor(q, k, v, w: torch.Tensor) -> torch.Tensor:
    """FAVOR+ softmax-kernel estimate written out: φ(x) = exp(ω·x − |x|²/2)/√m, x = q/Dh^¼."""
    d = q.shape[-1]
    xq, xk = q / d**0.25, k / d**0.25
    phi_q = torch.exp(xq @ w.T - (xq * xq).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])
    phi_k = torch.exp(xk @ w.T - (xk * xk).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])
    return (phi_q @ (phi_k.transpose(-1, -2) @ v)) / (phi_q @ phi_k.sum(-2)[..., None])


def rel_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return float((out.double() - exact).norm() / exact.norm())


def run_approx(n: int = 1024, heads: int = 2, head_dim: int = 32, dtype: torch.dtype = torch.float32,
               feature_draws: int = 3, progress: Callable[[], object] | None = None,
               backends: dict[str, dict] | None = None) -> dict:
    """Every (family, setting) error of ours and of the plain formula, plus the PASS/FAIL check, and
    ["backends"]: the rows of lra.bench.approx_backends for `backends` ({name: spec}; None = every
    discovered backend that approximates softmax)."""
    rows: list[dict] = []
    families = {}
    f64 = torch.float64
    for family in ("random", "structured"):
        q64, k64, v64 = make_inputs(family, n, heads, head_dim, f64)
        q, k, v = q64.to(dtype), k64.to(dtype), v64.to(dtype)
        exact = softmax_exact(q64, k64, v64)
        families[family] = {"entropy_nats": entropy(q64, k64), "uniform_entropy_nats": math.log(n)}
        for m in LANDMARKS:
            if n % m:
                continue
            for it in PINV_ITERATIONS:
                rows.append({"family": family, "method": "nystrom", "landmarks": m, "pinv_iterations": it,
                             "error": rel_error(nystrom_attention(q, k, v, m, it), exact),
                             "error_fp64": rel_error(nystrom_attention(q64, k64, v64, m, it), exact),
                             "plain_error_fp64": rel_error(plain_nystrom(q64, k64, v64, m, it), exact)})
                if progress:
                    progress()
        for nf in FEATURES:
            errs, errs64, plain64 = [], [], []
            for draw in range(feature_draws):
                w = orthogonal_features(nf, head_dim, torch.Generator().manual_seed(draw)).to(f64)
                errs.append(rel_error(performer_attention(q, k, v, w.to(dtype), "softmax"), exact))
                errs64.append(rel_error(performer_attention(q64, k64, v64, w, "softmax"), exact))
                plain64.append(rel_error(plain_favor(q64, k64, v64, w), exact))
            rows.append({"family": family, "method": "performer", "features": nf, "draws": feature_draws,
                         "error": sum(errs) / len(errs), "error_std": _std(errs), "errors": errs,
                         "errors_fp64": errs64, "plain_errors_fp64": plain64})
            if progress:
                progress()
    for r in rows:
        pairs = zip(r.get("errors_fp64", [r.get("error_fp64")]), r.get("plain_errors_fp64", [r.get("plain_error_fp64")]))
        r["check_rel_diff"] = max(abs(a - b) / max(b, CHECK_FLOOR / CHECK_TOLERANCE) for a, b in pairs)
        r["check"] = "PASS" if r["check_rel_diff"] <= CHECK_TOLERANCE else "FAIL"
    backend_rows = run_backends_approx(n, heads, head_dim, dtype, backends, progress)
    return {"families": families, "rows": rows, "tolerance": CHECK_TOLERANCE, "n": n, "heads": heads,
            "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch."), "backends": backend_rows}


def count_settings(n: int, backends: dict[str, dict]) -> int:
    own = 2 * (sum(1 for m in LANDMARKS if n % m == 0) * len(PINV_ITERATIONS) + len(FEATURES))
    return own + count_backend_settings(n, backends)


def _std(xs: list[float]) -> float:
    mean = sum(xs) / len(xs)
    return (sum((x - mean) ** 2 for x in xs) / max(len(xs) - 1, 1)) ** 0.5


def approx_tables(result: dict) -> str:
    """Markdown: Nyström error by landmarks x pinv iterations, Performer error by features, per family."""
    out = [backends_table(result.get("backends", []), result["n"]), "",
           f"Nyström and Performer in detail: relative error ‖out − softmax‖_F / ‖softmax‖_F, n = {result['n']}, "
           f"{result['heads']} heads x {result['head_dim']}, {result['dtype']}; exact = torch.linalg.pinv (default cutoff).\n"]
    for family, facts in result["families"].items():
        rows = [r for r in result["rows"] if r["family"] == family]
        its = [it for it in PINV_ITERATIONS if any(r.get("pinv_iterations", 0) == it for r in rows if r["method"] == "nystrom")]
        out.append(f"**{family}** inputs (attention entropy {facts['entropy_nats']:.2f} nats; uniform "
                   f"{facts['uniform_entropy_nats']:.2f})\n")
        head = " | ".join("exact" if it is None else f"{it} it" for it in its)
        out += [f"| Nyström landmarks | {head} |", "|---:|" + "---:|" * len(its)]
        for m in LANDMARKS:
            cells = {r["pinv_iterations"]: r for r in rows if r["method"] == "nystrom" and r["landmarks"] == m}
            if cells:
                out.append(f"| {m} | " + " | ".join(f"{cells[it]['error']:.4f}" for it in its) + " |")
        out += ["", "| Performer features | rel. error (mean ± std over draws) |", "|---:|---:|"]
        for r in (r for r in rows if r["method"] == "performer"):
            out.append(f"| {r['features']} | {r['error']:.4f} ± {r['error_std']:.4f} |")
        out.append("")
    fails = [r for r in result["rows"] if r["check"] != "PASS"]
    worst = max(r["check_rel_diff"] for r in result["rows"])
    out.append(f"Same error as the plain formula (float64) within {result['tolerance']:g} relative: "
               f"{'PASS' if not fails else 'FAIL'} ({len(result['rows']) - len(fails)}/{len(result['rows'])} settings; "
               f"worst relative difference {worst:.2e})")
    return "\n".join(out)


def plot_approx(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(result["families"])
    fig, axes = plt.subplots(len(families), 3, figsize=(16, 4 * len(families)), squeeze=False)
    for row, family in enumerate(families):
        rows = [r for r in result["rows"] if r["family"] == family]
        ax = axes[row][0]
        for m in LANDMARKS:
            pts = [(r["pinv_iterations"], r["error"]) for r in rows
                   if r["method"] == "nystrom" and r["landmarks"] == m and r["pinv_iterations"] is not None]
            exact = [r["error"] for r in rows if r["method"] == "nystrom" and r["landmarks"] == m and r["pinv_iterations"] is None]
            if pts:
                line, = ax.plot(*zip(*pts), marker="o", label=f"{m} landmarks")
                if exact:
                    ax.axhline(exact[0], color=line.get_color(), linestyle=":", linewidth=1)
        ax.set(yscale="log", xlabel="pseudo-inverse iterations (dotted: exact pinv)", ylabel="relative error",
               title=f"Nyström, {family} inputs")
        ax.legend(fontsize=8)
        ax = axes[row][1]
        perf = [r for r in rows if r["method"] == "performer"]
        ax.errorbar([r["features"] for r in perf], [r["error"] for r in perf], yerr=[r["error_std"] for r in perf],
                    marker="o", capsize=3)
        ax.set(xscale="log", yscale="log", xlabel="random features", ylabel="relative error",
               title=f"Performer (softmax kernel), {family} inputs")
        ax.set_xticks(list(FEATURES), [str(f) for f in FEATURES])
        ax.minorticks_off()
        plot_backends(axes[row][2], result.get("backends", []), family)
        for a in axes[row]:
            a.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
