"""lra-bench --approx, every backend: how close each backend that approximates softmax comes to it.

Which backends: every discovered one (conf/attention/ + the searchpath) whose class sets
`approximates_softmax` (models/attention/base.py says what that means); never a list of names.
For each: built as its attention/<name>.yaml says (plus its `approx_fixed_options`, e.g. Nyström's
conv skip off), then with its main size option swept: the first integer option of the yaml (block or
window size, hashes, landmarks, features, k), at ¼, ½, 1, 2 and 4 times its default. A setting the
backend refuses at build is a row with the refusal, not a number.

Error: ‖out − exact‖_F / ‖exact‖_F over the real query rows, on the report's two input families
(random, structured; lra.bench.approx.make_inputs), with no padding and with the last quarter of the
keys padded. exact = softmax(q kᵀ/√Dh) v over the real keys, in float64; for a `shared_qk` backend
(Reformer) the keys are the normalised queries and a query's own key is left out unless it is alone,
as the method defines. Learned parts (Linformer's projections, Sinkhorn's sorting network) are at
their initialisation, drawn after torch.manual_seed(seed): the error of an untrained layer.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)
PAD_FRACTION = 0.25  # the padded rows: this fraction of the keys (at the end) is padding
FAMILIES = ("random", "structured")


def approximating_backends(overrides: list[str] | None = None) -> dict[str, dict]:
    """{name: composed spec} of every discovered backend whose class approximates softmax."""
    from lra.config import attention_spec, backend_names
    from models.attention import backend_class, capability

    out = {}
    for name in backend_names(overrides):
        spec = attention_spec(name, overrides)
        if capability(backend_class(spec["_target_"], name), "approximates_softmax"):
            out[name] = spec
    return out


def main_option(spec: dict) -> tuple[str, int] | None:
    """The backend's main size option: the first integer (not boolean) option of its yaml."""
    for key, value in spec.items():
        if key not in ("_target_", "name") and isinstance(value, int) and not isinstance(value, bool):
            return key, value
    return None


def sweep_values(default: int) -> list[int]:
    return sorted({int(default * s) for s in SCALES if int(default * s) >= 1})


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    shared_qk: bool = False) -> torch.Tensor:
    """The exact target in float64. q, k, v (B, H, L, Dh); mask (B, L) True = real key, or None."""
    q, k, v = q.double(), k.double(), v.double()
    if shared_qk:
        k = q / q.norm(dim=-1, keepdim=True)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, L, L)
    if shared_qk:  # own key only as a last resort: the method's -1e5 self logit
        eye = torch.eye(q.shape[-2], dtype=torch.bool)
        logits = logits.masked_fill(eye, -1e5)
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.softmax(logits, -1) @ v


def rows_error(out: torch.Tensor, exact: torch.Tensor, mask: torch.Tensor | None) -> float:
    """Relative Frobenius error over the real query rows."""
    if mask is not None:
        keep = mask[0]
        out, exact = out[..., keep, :], exact[..., keep, :]
    return float((out.double() - exact).norm() / exact.norm())


def backend_error(spec: dict, options: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: torch.Tensor | None, exact: torch.Tensor, seed: int = 0) -> float:
    """Build the backend of `spec` with `options` at q's length (max_len = that length), run it in eval
    mode without gradients, return its error. AttentionConfigError (a refused setting or length)
    propagates."""
    from models.attention import build_attention

    torch.manual_seed(seed)
    att = build_attention({**spec, **options}, num_heads=q.shape[1], head_dim=q.shape[-1], max_len=q.shape[-2])
    if hasattr(att, "check_length"):  # a length the backend refuses is a refusal too
        att.check_length(q.shape[-2])
    att = att.to(q.dtype).eval()
    with torch.no_grad():
        return rows_error(att(q, k, v, mask), exact, mask)


def settings(spec: dict, n: int) -> list[tuple[str, dict]]:
    """(label, options) rows of one backend: 'default', each sweep value of its main option, and 'exact'
    when the class has an exact setting at length n."""
    from models.attention import backend_class, capability

    cls = backend_class(spec["_target_"], spec.get("name"))
    fixed = dict(capability(cls, "approx_fixed_options"))
    main = main_option(spec)
    out = [("default" + (f" ({main[0]}={main[1]})" if main else ""), fixed)]
    if main:
        key, default = main
        out += [(f"{key}={val}", {**fixed, key: val}) for val in sweep_values(default) if val != default]
    exact = capability(cls, "exact_options")(n)
    if exact is not None:
        out.append(("exact: " + ", ".join(f"{k}={v}" for k, v in exact.items()), {**fixed, **exact}))
    return out


def run_backends_approx(n: int, heads: int, head_dim: int, dtype: torch.dtype,
                        backends: dict[str, dict] | None = None,
                        progress: Callable[[], object] | None = None) -> list[dict]:
    """One row per (backend, setting, family, padded): {"backend", "setting", "options", "family",
    "padded", "error"} with error None and "refused" the message where the backend refused the setting."""
    from lra.bench.approx import make_inputs
    from models.attention import AttentionConfigError, backend_class, capability

    backends = approximating_backends() if backends is None else backends
    rows: list[dict] = []
    real = n - int(n * PAD_FRACTION)
    padded_mask = (torch.arange(n) < real)[None, :]  # (1, n) True = real key
    for family in FAMILIES:
        q64, k64, v64 = make_inputs(family, n, heads, head_dim, torch.float64)
        q, k, v = q64.to(dtype), k64.to(dtype), v64.to(dtype)
        for name, spec in backends.items():
            shared = capability(backend_class(spec["_target_"], name), "shared_qk")
            targets = {False: exact_attention(q64, k64, v64, None, shared),
                       True: exact_attention(q64, k64, v64, padded_mask, shared)}
            for label, options in settings(spec, n):
                for padded in (False, True):
                    mask = padded_mask if padded else None
                    row = {"backend": name, "setting": label, "options": options, "family": family,
                           "padded": padded, "error": None}
                    try:
                        row["error"] = backend_error(spec, options, q, k, v, mask, targets[padded])
                    except AttentionConfigError as err:
                        row["refused"] = str(err)
                    rows.append(row)
                    if progress:
                        progress()
    return rows


def count_backend_settings(n: int, backends: dict[str, dict]) -> int:
    return len(FAMILIES) * 2 * sum(len(settings(spec, n)) for spec in backends.values())


def backends_table(rows: list[dict], n: int) -> str:
    """Markdown: one row per backend setting, columns family x (no padding, padded)."""
    cols = [(f, p) for f in FAMILIES for p in (False, True)]
    out = [f"Every backend that approximates softmax (discovered; `approximates_softmax`), n = {n}, relative error "
           f"over the real rows; padded: the last {PAD_FRACTION:.0%} of the keys are padding. Learned parts at "
           "their initialisation (seed 0).\n",
           "| backend | setting | " + " | ".join(f"{f}{', padded' if p else ''}" for f, p in cols) + " |",
           "|---|---|" + "---:|" * len(cols)]
    seen: dict[tuple[str, str], dict] = {}
    for r in rows:
        seen.setdefault((r["backend"], r["setting"]), {})[(r["family"], r["padded"])] = r
    for (backend, setting), cells in seen.items():
        shown = []
        for c in cols:
            r = cells.get(c)
            shown.append("—" if r is None else "refused" if r["error"] is None else f"{r['error']:.2e}"
                         if r["error"] < 1e-3 else f"{r['error']:.4f}")
        out.append(f"| {backend} | {setting} | " + " | ".join(shown) + " |")
    refused = {(r["backend"], r["setting"]): r["refused"] for r in rows if r.get("refused")}
    out += [f"\nrefused: {b} {s}: {msg}" for (b, s), msg in refused.items()]
    return "\n".join(out)


def plot_backends(ax, rows: list[dict], family: str) -> None:
    """Error against the main option's value as a multiple of its default (no padding), one line per
    backend, on a matplotlib axis; the exact setting is left out (it is ~0)."""
    by_backend: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["family"] != family or r["padded"] or r["error"] is None or r["setting"].startswith("exact"):
            continue
        by_backend.setdefault(r["backend"], []).append((r["setting"], r["error"]))
    for backend, points in by_backend.items():
        default = next((s for s, _ in points if s.startswith("default")), None)
        if default is None or "=" not in default:
            continue
        base = int(default.split("=")[1].rstrip(")"))
        xy = sorted((1.0 if s.startswith("default") else int(s.split("=")[1]) / base, e) for s, e in points)
        ax.plot(*zip(*xy), marker="o", label=f"{backend} ({default.split('(')[1].split('=')[0]})")
    ax.set(xscale="log", yscale="log", xlabel="main option / its default", ylabel="relative error",
           title=f"every approximating backend, {family} inputs")
    ax.legend(fontsize=7)
