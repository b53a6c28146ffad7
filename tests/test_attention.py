"""Contract tests for every discovered attention backend (the checks of lra.testing.contract, which a
user runs on theirs with lra-check-attention), plus backend-specific checks against plain
implementations of each paper's formula. Tiny sizes: the file runs in seconds on 2 CPU cores."""
from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lra.config import attention_spec, backend_names
from lra.testing.contract import B, CHECKS, DH, H, L, LENGTHS, MAX_LEN, make_qkv, padding_mask
from models.attention import AttentionConfigError, backend_class, build_attention, capability
from models.attention.linformer import LinformerAttention
from models.attention.nystrom import depthwise_seq_conv, nystrom_attention
from models.attention.performer import RELU_EPS, performer_attention
from models.multihead import MultiHeadAttention

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "attention"

# Every backend with its defaults, plus small-option variants that exercise other code paths.
EXTRA = {
    "nystrom": [{"num_landmarks": 4}, {"num_landmarks": 5, "conv_kernel": 0}],
    "performer": [{"kernel": "relu", "num_features": 16}],
    "linformer": [{"proj_dim": 6}],
    "reformer": [{"chunk_size": 4, "n_buckets": 4, "n_hashes": 3}],
    "sinkhorn": [{"block_size": 5, "n_iters": 0}],
    "synthesizer": [{"mode": "dense", "dot_product": False}],
}
BACKENDS = backend_names()
CASES = [(name, {}) for name in BACKENDS] + [
    (name, opts) for name, variants in EXTRA.items() if name in BACKENDS for opts in variants
]
CASE_IDS = [name + "".join(f"-{k}={v}" for k, v in opts.items()) for name, opts in CASES]


@functools.lru_cache(maxsize=None)
def _spec(name: str) -> tuple:
    return tuple(attention_spec(name).items())


def spec(name: str, **opts) -> dict:
    """Backend `name` as its yaml defines it (the `_target_`, its options), with `opts` on top."""
    return dict(_spec(name)) | opts


def make_backend(name: str, opts: dict, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return build_attention(spec(name, **opts), num_heads=H, head_dim=DH, max_len=MAX_LEN).to(dtype).eval()


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("name,opts", CASES, ids=CASE_IDS)
def test_contract(name, opts, check):
    """The contract a user's backend is held to (lra-check-attention runs the same checks)."""
    check(spec(name, **opts))


def softmax_reference(q, k, v, mask=None):
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, L, L)
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    return logits.softmax(-1) @ v


def test_softmax_matches_plain_math():
    q, k, v = make_qkv(dtype=torch.float64)
    attn = make_backend("softmax", {}, torch.float64)
    torch.testing.assert_close(attn(q, k, v, padding_mask()), softmax_reference(q, k, v, padding_mask()))
    torch.testing.assert_close(attn(q, k, v), softmax_reference(q, k, v))


@pytest.mark.parametrize("landmarks", [L, 64])
def test_nystrom_landmarks_equal_length_is_softmax(landmarks):
    q, k, v = make_qkv(dtype=torch.float64)
    mask = padding_mask()
    ref = softmax_reference(q, k, v, mask)
    for iters in (30, None):
        out = nystrom_attention(q, k, v, landmarks, iters, mask)
        torch.testing.assert_close(out, ref, atol=1e-7, rtol=1e-6)


def paper_nystrom(q, k, v, m, iters, lengths):
    """The paper's formula for one example at a time, written out: real tokens only, padded to a
    multiple of m, segment means, three softmax kernels, pseudo-inverse (iterative or exact)."""
    out = torch.zeros_like(q)
    for b, n in enumerate(lengths):
        m_eff = min(m, q.shape[2])
        seg = math.ceil(q.shape[2] / m_eff)
        for h in range(q.shape[1]):
            qb, kb, vb = q[b, h, :n], k[b, h, :n], v[b, h, :n]
            qs = [qb[i * seg : (i + 1) * seg] for i in range(m_eff)]
            ks = [kb[i * seg : (i + 1) * seg] for i in range(m_eff)]
            q_land = torch.stack([s.mean(0) for s in qs if len(s)])  # empty segments give no landmark
            k_land = torch.stack([s.mean(0) for s in ks if len(s)])
            d = math.sqrt(q.shape[-1])
            f = torch.softmax(qb @ k_land.T / d, -1)
            a = torch.softmax(q_land @ k_land.T / d, -1)
            bm = torch.softmax(q_land @ kb.T / d, -1)
            if iters is None:
                a_inv = torch.linalg.pinv(a)
            else:
                z = a.T / (a.abs().sum(0).max() * a.abs().sum(1).max())
                eye = torch.eye(a.shape[0], dtype=a.dtype)
                for _ in range(iters):
                    az = a @ z
                    z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
                a_inv = z
            out[b, h, :n] = f @ a_inv @ bm @ vb
    return out


@pytest.mark.parametrize("m,iters", [(4, 6), (5, 6), (7, None), (11, 3)])
def test_nystrom_functional_matches_paper_formula(m, iters):
    q, k, v = make_qkv(dtype=torch.float64)
    mask = padding_mask()
    out = nystrom_attention(q, k, v, m, iters, mask)
    ref = paper_nystrom(q, k, v, m, iters, LENGTHS)
    real = mask[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], ref[real], atol=1e-9, rtol=1e-7)


def test_nystrom_options_are_checked():
    with pytest.raises(AttentionConfigError, match="odd"):
        build_attention(spec("nystrom", conv_kernel=4), num_heads=H, head_dim=DH)
    assert build_attention(spec("nystrom", conv_kernel=0), num_heads=H, head_dim=DH).conv_weight is None


@pytest.mark.parametrize("length,kernel", [(22, 5), (64, 35), (70, 3), (5, 9)])
def test_nystrom_conv_skip_is_per_head_depthwise_conv(length, kernel):
    attn = build_attention(spec("nystrom", conv_kernel=kernel), num_heads=H, head_dim=DH).double()
    v = torch.randn(B, H, length, DH, dtype=torch.float64)
    ref = torch.nn.functional.conv2d(v, attn.conv_weight[:, None, :, None], padding=(kernel // 2, 0), groups=H)
    torch.testing.assert_close(depthwise_seq_conv(v, attn.conv_weight), ref)


@pytest.mark.parametrize("length,kernel,block", [(22, 5, 16), (64, 35, 16), (70, 3, 8), (5, 9, 4), (40, 21, 4)])
def test_nystrom_conv_skip_gradients_and_padding_match_conv2d(length, kernel, block):
    """The banded conv's own backward (filters reversed for V, diagonal sums for the filter) against
    conv2d's autograd, with padded rows zeroed first; blocks shorter than the filter included."""
    v = torch.randn(B, H, length, DH, dtype=torch.float64, requires_grad=True)
    w = torch.randn(H, kernel, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(B, length, generator=torch.Generator().manual_seed(length)) > 0.3
    grad = torch.randn(B, H, length, DH, dtype=torch.float64)
    for m in (None, mask):
        ours = depthwise_seq_conv(v, w, m, block=block)
        v_in = v if m is None else v.masked_fill(~m[:, None, :, None], 0.0)
        ref = torch.nn.functional.conv2d(v_in, w[:, None, :, None], padding=(kernel // 2, 0), groups=H)
        torch.testing.assert_close(ours, ref)
        torch.testing.assert_close(torch.autograd.grad(ours, (v, w), grad), torch.autograd.grad(ref, (v, w), grad))


def favor_reference(q, k, v, w, kernel, mask):
    """FAVOR+ written out plainly: φ(x) = exp(ω·x − |x|²/2)/√m with x = q/Dh^¼ (softmax kernel)."""
    x_q, x_k = q / q.shape[-1] ** 0.25, k / k.shape[-1] ** 0.25
    if kernel == "softmax":
        phi = lambda x: torch.exp(x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)) / math.sqrt(w.shape[0])  # noqa: E731
    else:
        phi = lambda x: torch.relu(x @ w.T) + RELU_EPS  # noqa: E731
    fq, fk = phi(x_q), phi(x_k) * mask[:, None, :, None]
    return (fq @ (fk.transpose(-1, -2) @ v)) / (fq @ fk.sum(-2)[..., None])


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_performer_matches_plain_formula(kernel):
    q, k, v = make_qkv(dtype=torch.float64)
    mask = padding_mask()
    attn = build_attention(spec("performer", num_features=32, kernel=kernel, feature_seed=3), num_heads=H, head_dim=DH)
    w = attn.projection.double()
    torch.testing.assert_close(performer_attention(q, k, v, w, kernel, mask), favor_reference(q, k, v, w, kernel, mask))


def test_performer_softmax_kernel_estimates_softmax():
    q, k, v = (t * 0.5 for t in make_qkv(dtype=torch.float64))
    mask = padding_mask()
    attn = build_attention(spec("performer", num_features=4096, feature_seed=0), num_heads=H, head_dim=DH).double()
    err = (attn(q, k, v, mask) - softmax_reference(q, k, v, mask)).norm() / softmax_reference(q, k, v, mask).norm()
    assert err < 0.06  # ~0.025; unsigned QR features (biased), a 1/Dh scale or padded keys give > 0.07


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_performer_gradients_match_numerical(kernel):
    q, k, v = (t[:2, :, :7, :4].clone().requires_grad_() for t in make_qkv(dtype=torch.float64))
    w = torch.randn(6, 4, dtype=torch.float64)
    mask = padding_mask([7, 5], 7)
    assert torch.autograd.gradcheck(lambda a, b, c: performer_attention(a, b, c, w, kernel, mask), (q, k, v))


def test_performer_redraw_only_in_training():
    torch.manual_seed(0)
    attn = build_attention(spec("performer", num_features=16, redraw=True), num_heads=H, head_dim=DH)
    q, k, v = make_qkv()
    attn.train()
    assert not torch.allclose(attn(q, k, v), attn(q, k, v))
    attn.eval()
    torch.testing.assert_close(attn(q, k, v), attn(q, k, v), atol=0, rtol=0)
    assert "projection" in attn.state_dict()


def test_linformer_instances_do_not_share_parameters():
    torch.manual_seed(0)
    a = LinformerAttention(H, DH, max_len=MAX_LEN, proj_dim=4)
    b = LinformerAttention(H, DH, max_len=MAX_LEN, proj_dim=4)
    assert a.proj_k.shape == (4, MAX_LEN) and a.proj_v.shape == (4, MAX_LEN)
    assert not any(isinstance(val, torch.Tensor) for val in vars(LinformerAttention).values())
    ids_a = {id(p) for p in a.parameters()}
    assert ids_a.isdisjoint(id(p) for p in b.parameters())
    assert a.proj_k.data_ptr() != a.proj_v.data_ptr() and not torch.equal(a.proj_k, b.proj_k)
    before = b.proj_k.detach().clone()
    with torch.no_grad():
        a.proj_k.add_(1.0)
    torch.testing.assert_close(b.proj_k.detach(), before, atol=0, rtol=0)


def test_linformer_rejects_too_long_input():
    attn = LinformerAttention(H, DH, max_len=16, proj_dim=4)
    with pytest.raises(AttentionConfigError, match="at most 16 tokens"):
        attn.check_length(17)
    attn.check_length(16)
    q, k, v = make_qkv(length=17)
    with pytest.raises(AttentionConfigError):
        attn(q, k, v)
    with pytest.raises(AttentionConfigError, match="max_len"):
        build_attention(spec("linformer"), num_heads=H, head_dim=DH)


def test_bad_target_and_options_name_the_yaml_and_key():
    with pytest.raises(AttentionConfigError, match=r"attention/typo.yaml.*cannot import module 'models.attentio.x'"):
        build_attention({"_target_": "models.attentio.x.Y", "name": "typo"}, num_heads=H, head_dim=DH)
    with pytest.raises(AttentionConfigError, match=r"attention/typo.yaml.*has no 'SoftmaxAttn'"):
        build_attention({"_target_": "models.attention.softmax.SoftmaxAttn", "name": "typo"}, num_heads=H, head_dim=DH)
    with pytest.raises(AttentionConfigError, match=r"must name a torch.nn.Module"):
        build_attention({"_target_": "math.sqrt", "name": "typo"}, num_heads=H, head_dim=DH)
    with pytest.raises(AttentionConfigError, match=r"attention/softmax.yaml.*option 'landmarks' is not a constructor"):
        build_attention(spec("softmax", landmarks=3), num_heads=H, head_dim=DH)
    with pytest.raises(AttentionConfigError, match="has no `_target_` key"):
        build_attention({"name": "old", "num_landmarks": 3}, num_heads=H, head_dim=DH)


def test_attention_yamls_name_a_class_and_build():
    """Every discovered yaml: a `_target_` that imports, no `name:` key (the file name is the name)."""
    for name in BACKENDS:
        raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{name}.yaml")) if (CONF_DIR / f"{name}.yaml").exists() else {}
        assert "name" not in raw, f"conf/attention/{name}.yaml has a `name:` key; the file name is the name"
        cfg = spec(name)
        assert cfg["name"] == name
        attn = build_attention(cfg, num_heads=H, head_dim=DH, max_len=MAX_LEN).eval()
        q, k, v = make_qkv()
        assert attn(q, k, v, padding_mask()).shape == (B, H, L, DH)


def test_linformer_matches_plain_formula_on_shorter_input():
    torch.manual_seed(0)
    attn = LinformerAttention(H, DH, max_len=MAX_LEN, proj_dim=6).double()
    q, k, v = make_qkv(dtype=torch.float64)
    mask = padding_mask()
    keep = mask[:, None, :, None].double()  # padded keys/values zeroed before projection
    e, f = attn.proj_k[:, :L], attn.proj_v[:, :L]  # only the first L of MAX_LEN columns
    ref = softmax_reference(q, e @ (k * keep), f @ (v * keep))
    torch.testing.assert_close(attn(q, k, v, mask), ref)


def _quadratic(name: str) -> bool:
    """The class declares quadratic_memory = True: L x L by design (a synthesizer's logits are L x max_len)."""
    return bool(capability(backend_class(spec(name)["_target_"]), "quadratic_memory"))


SUBQUADRATIC = [(case, i) for case, i in zip(CASES, CASE_IDS) if not _quadratic(case[0])]


@pytest.mark.parametrize("name,opts", [c for c, _ in SUBQUADRATIC], ids=[i for _, i in SUBQUADRATIC])
def test_no_length_squared_tensor(name, opts):
    """No op output, forward or backward, has two dimensions as long as the sequence."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.shapes.append((str(func), tuple(t.shape)))
            return out

    n = 400  # longer than every option below (landmarks, features, projection, conv blocks)
    small = {"nystrom": {"num_landmarks": 16}, "performer": {"num_features": 32}, "linformer": {"proj_dim": 16}}
    mha = MultiHeadAttention(16, H, spec(name), head_dim=DH, max_len=n, **{**small.get(name, {}), **opts})
    x = torch.randn(2, n, 16, requires_grad=True)
    with Shapes() as mode:
        mha(x, torch.ones(2, n, dtype=torch.bool)).sum().backward()
    big = [(f, s) for f, s in mode.shapes if sum(d >= n for d in s) >= 2]
    assert mode.shapes and not big, big[:3]


def test_mixed_precision_parts_stay_fp32_under_autocast(monkeypatch):
    import models.attention.nystrom as ny
    import models.attention.performer as pf

    seen = []
    for module, fn in ((ny, "iterative_pinv"), (pf, "softmax_features")):
        original = getattr(module, fn)

        def spy(x, *args, _original=original, _fn=fn, **kwargs):
            seen.append((_fn, x.dtype, torch.is_autocast_enabled("cpu")))
            return _original(x, *args, **kwargs)

        monkeypatch.setattr(module, fn, spy)
    q, k, v = make_qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nystrom_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 4, 6, padding_mask())
        performer_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), torch.randn(8, DH), "softmax")
    assert sorted(seen) == sorted([("iterative_pinv", torch.float32, False)] + [("softmax_features", torch.float32, False)] * 2)
    assert ny.NystromAttention.mixed_precision and pf.PerformerAttention.mixed_precision
