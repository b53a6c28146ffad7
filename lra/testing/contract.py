"""The attention-backend contract as runnable checks, for ours and for yours.

    lra-check-attention NAME [attention.OPTION=VALUE ...] [--config-dir DIR]
    python -m lra.testing.contract NAME ...          # the same

NAME is an `attention/NAME.yaml` on the searchpath (conf/attention/, LRA_CONFIG_PATH, --config-dir);
its `_target_` must be importable (install its package or put it on PYTHONPATH). Every check builds the
backend at tiny sizes (batch 3, 2 heads, length 22 with 9..22 real tokens, head dim 8, max_len 32),
so the whole run takes seconds on a CPU. Exit status 0: all passed; 1: a check failed; 2: bad input.

From pytest (the suite's tests/test_attention.py does this for every discovered backend):

    from lra.testing.contract import CHECKS, backend_spec
    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
    def test_mine(check):
        check(backend_spec("mine"))

Each check takes the backend's spec ({"_target_", "name", **options}) and raises AssertionError (or
the backend's own error) with a message that says what broke.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import nn

from models.attention import AttentionConfigError, build_attention, capability
from models.multihead import MultiHeadAttention

B, H, L, DH, MAX_LEN, DIM = 3, 2, 22, 8, 32, 16
LENGTHS = (22, 15, 9)  # real tokens per example; the rest is padding


def backend_spec(name: str, overrides: list[str] | None = None) -> dict:
    """Backend `name`'s composed spec (overrides: `attention.k=v`, `hydra.searchpath=[file:///DIR]`)."""
    from lra.config import attention_spec

    return attention_spec(name, overrides)


def make_backend(spec: dict, dtype: torch.dtype = torch.float32, max_len: int = MAX_LEN) -> nn.Module:
    return build_attention(spec, num_heads=H, head_dim=DH, max_len=max_len).to(dtype).eval()


def make_qkv(seed: int = 0, dtype: torch.dtype = torch.float32, length: int = L) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, length, DH, generator=g, dtype=dtype) for _ in range(3)]  # each (B, H, L, Dh)


def padding_mask(lengths: tuple[int, ...] = LENGTHS, length: int = L) -> torch.Tensor:
    return torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]  # (B, L) True = real


def _close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    try:
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    except AssertionError as err:
        detail = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise AssertionError(f"{what} ({detail})") from None


def check_output_shape(spec: dict) -> None:
    """forward(q, k, v, mask) and forward(q, k, v, None) return (B, H, L, Dh); the wrapper returns (B, L, dim)."""
    torch.manual_seed(0)
    attn = make_backend(spec)
    q, k, v = make_qkv()
    for mask in (padding_mask(), None):
        out = attn(q, k, v, mask)
        assert out.shape == (B, H, L, DH), f"out is {tuple(out.shape)} for q/k/v {(B, H, L, DH)} (mask {mask is not None})"
    mha = MultiHeadAttention(DIM, H, spec, head_dim=DH, max_len=MAX_LEN)
    mha.check_length(MAX_LEN)
    assert mha(torch.randn(B, L, DIM), padding_mask()).shape == (B, L, DIM)


def check_padding_invariance(spec: dict) -> None:
    """Changing the padded tokens' q, k, v never changes the outputs at real positions."""
    torch.manual_seed(0)
    attn = make_backend(spec)
    q, k, v = make_qkv()
    mask = padding_mask()
    out = attn(q, k, v, mask)
    pad = ~mask[:, None, :, None]
    q2, k2, v2 = (t + 5.0 * torch.randn_like(t) * pad for t in (q, k, v))  # only padded tokens change
    out2 = attn(q2, k2, v2, mask)
    real = mask[:, None, :, None].expand_as(out)
    _close(out[real], out2[real], "outputs at real positions changed when only padding changed")


def check_batch_independence(spec: dict) -> None:
    """A sample's output is the same alone, in its batch, or beside other batch mates (logit scales far
    apart, so a stabiliser shared across the batch would underflow)."""
    torch.manual_seed(0)
    attn = make_backend(spec)
    q, k, v = make_qkv()
    scales = torch.tensor([30.0, 1.0, 0.1])[:, None, None, None]
    q, k = q * scales, k * scales
    mask = padding_mask()
    full = attn(q, k, v, mask)
    q_alt, k_alt, v_alt = (torch.cat([t[:1], 10 * t[1:]]) for t in (q, k, v))  # new batch mates
    alt = attn(q_alt, k_alt, v_alt, mask)
    for i in range(B):
        alone = attn(q[i : i + 1], k[i : i + 1], v[i : i + 1], mask[i : i + 1])
        _close(alone[0], full[i], f"sample {i} alone differs from sample {i} in the batch")
    _close(alt[0], full[0], "sample 0 changed when its batch mates changed")


def check_seeded_determinism(spec: dict) -> None:
    """The same seed builds the same weights and gives bit-identical outputs."""
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        mha = MultiHeadAttention(DIM, H, spec, head_dim=DH, max_len=MAX_LEN)
        outs.append(mha(torch.randn(B, L, DIM), padding_mask()))
    _close(outs[0], outs[1], "two builds under the same seed differ", atol=0, rtol=0)


def check_gradients(spec: dict) -> None:
    """Finite, non-zero gradients reach the input and every parameter (DDP needs all of them used)."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(DIM, H, spec, head_dim=DH, max_len=MAX_LEN)
    x = torch.randn(B, L, DIM, requires_grad=True)
    mha(x, padding_mask()).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all(), "the input's gradient is missing or not finite"
    for pname, p in mha.named_parameters():
        assert p.grad is not None, f"parameter {pname} got no gradient"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{pname}: gradient is zero or not finite"


def check_float64(spec: dict) -> None:
    """Runs in float64, and float32 with the same weights agrees with it."""
    torch.manual_seed(0)
    attn64 = make_backend(spec, torch.float64)
    q, k, v = make_qkv(dtype=torch.float64)
    out64 = attn64(q, k, v, padding_mask())
    assert out64.dtype == torch.float64 and torch.isfinite(out64).all(), f"float64 output is {out64.dtype} or not finite"
    attn32 = make_backend(spec)
    attn32.load_state_dict({key: t.float() for key, t in attn64.state_dict().items()})
    out32 = attn32(q.float(), k.float(), v.float(), padding_mask())
    _close(out32.double(), out64, "float32 and float64 disagree", atol=1e-4, rtol=1e-3)


def check_autocast(spec: dict) -> None:
    """Under CPU bf16 autocast the wrapper's output is finite and near the fp32 one."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(DIM, H, spec, head_dim=DH, max_len=MAX_LEN).eval()
    x = torch.randn(B, L, DIM)
    ref = mha(x, padding_mask())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mha(x, padding_mask())
    assert torch.isfinite(out).all(), "non-finite output under bf16 autocast"
    _close(out.float(), ref, "bf16 autocast output is far from the fp32 one", atol=0.1, rtol=0.1)


def check_length_limit(spec: dict) -> None:
    """A backend that needs max_len refuses to build without one and rejects longer inputs at build time."""
    if not capability(_cls(spec), "needs_max_len"):
        mha = MultiHeadAttention(DIM, H, spec, head_dim=DH, max_len=MAX_LEN)
        mha.check_length(MAX_LEN)
        return
    try:
        build_attention(spec, num_heads=H, head_dim=DH, max_len=None)
    except AttentionConfigError:
        pass
    else:
        raise AssertionError("needs_max_len = True, but it was built without max_len")
    mha = MultiHeadAttention(DIM, H, spec, head_dim=DH, max_len=16)
    try:
        mha.check_length(17)
    except AttentionConfigError:
        return
    raise AssertionError("built for max_len=16, check_length(17) did not raise AttentionConfigError")


def check_forward_from_input(spec: dict) -> None:
    """A backend with the optional `forward_from_input(q, x, kv_weight, kv_bias, mask)` hook (it forms keys
    and values from the layer's input itself) computes what `forward(q, k, v, mask)` computes on the
    wrapper's k, v: outputs and gradients to the input and every parameter, float64, with and without a
    mask, at the maximum length and a shorter one. Backends without the hook pass."""
    if not callable(getattr(_cls(spec), "forward_from_input", None)):
        return
    for length in (L, MAX_LEN):
        for mask in (padding_mask(length=length), None):
            torch.manual_seed(0)
            mha = MultiHeadAttention(DIM, H, spec, head_dim=DH, max_len=MAX_LEN).double()
            x = torch.randn(B, length, DIM, dtype=torch.float64, requires_grad=True)
            fused = mha(x, mask)
            w, b = mha.qkv.weight.view(3, H * DH, DIM), mha.qkv.bias.view(3, H * DH)
            q, k, v = (nn.functional.linear(x, w[i], b[i]).view(B, length, H, DH).transpose(1, 2) for i in range(3))
            plain = mha.out(mha.attn(q, k, v, mask).transpose(1, 2).reshape(B, length, H * DH))
            what = f"length {length}, mask {mask is not None}"
            _close(fused, plain, f"forward_from_input differs from forward on the wrapper's k, v ({what})", 1e-10, 1e-8)
            params = [x, *mha.parameters()]
            gy = torch.randn_like(fused)
            got = torch.autograd.grad(fused, params, gy, allow_unused=True)
            want = torch.autograd.grad(plain, params, gy, allow_unused=True)
            for name, a, c in zip(["input"] + [n for n, _ in mha.named_parameters()], got, want):
                assert (a is None) == (c is None), f"{name}: gradient reaches it on one path only ({what})"
                if a is not None:
                    _close(a, c, f"forward_from_input: the gradient of {name} differs ({what})", 1e-10, 1e-8)


def _cls(spec: dict) -> type:
    from models.attention import backend_class

    return backend_class(spec["_target_"], spec.get("name"))


CHECKS: list[Callable[[dict], None]] = [check_output_shape, check_padding_invariance, check_batch_independence,
                                        check_seeded_determinism, check_gradients, check_float64, check_autocast,
                                        check_length_limit, check_forward_from_input]


def run_checks(spec: dict, checks: list[Callable[[dict], None]] = CHECKS) -> list[tuple[str, str | None]]:
    """(check name, None if it passed else the failure) for each check."""
    results = []
    for check in checks:
        try:
            check(spec)
            results.append((check.__name__, None))
        except Exception as err:  # noqa: BLE001 - every failure is a result to show
            results.append((check.__name__, f"{type(err).__name__}: {err}"))
    return results


def main(argv: list[str] | None = None) -> int:
    import argparse
    from pathlib import Path

    p = argparse.ArgumentParser(prog="lra-check-attention", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("name", help="backend name: the file name of its attention/<name>.yaml")
    p.add_argument("overrides", nargs="*", help="attention.OPTION=VALUE (Hydra override syntax)")
    p.add_argument("--config-dir", type=Path, action="append", default=[],
                   help="a folder holding attention/<name>.yaml (added to the searchpath; repeatable)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    overrides = list(args.overrides)
    missing = [d for d in args.config_dir if not d.is_dir()]
    if missing:
        print(f"lra-check-attention: error: --config-dir {missing[0]} is not a folder.", file=sys.stderr)
        return 2
    try:
        if args.config_dir:  # added to LRA_CONFIG_PATH's folders (a searchpath override replaces them)
            from lra.config import check_no_shadowing, user_searchpath

            for d in args.config_dir:
                check_no_shadowing(d)
            dirs = [*user_searchpath(), *(f"file://{d.resolve()}" for d in args.config_dir)]
            overrides.append("hydra.searchpath=[" + ",".join(f"'{d}'" for d in dirs) + "]")
        spec = backend_spec(args.name, overrides)
        _cls(spec)
    except Exception as err:  # noqa: BLE001 - a config or import problem: one paragraph, no traceback
        from lra.config import backend_names, error_text

        msg = error_text(err)
        try:
            known = ", ".join(backend_names([o for o in overrides if o.startswith("hydra.searchpath=")]))
        except Exception:  # noqa: BLE001
            known = "?"
        print(f"lra-check-attention: error: {msg} (backends found: {known})", file=sys.stderr)
        return 2
    print(f"{args.name}: {spec['_target_']} " + " ".join(f"{k}={v}" for k, v in spec.items() if k not in ("_target_", "name")))
    failed = 0
    for check, problem in run_checks(spec):
        failed += problem is not None
        print(f"  {'ok  ' if problem is None else 'FAIL'} {check}" + (f": {problem}" if problem else ""))
    print(f"{args.name}: {len(CHECKS) - failed}/{len(CHECKS)} contract checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
