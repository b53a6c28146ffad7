"""Performer's hand-written FAVOR Function (models/attention/performer.py: _FavorSoftmax) against a plain
autograd formula written here from the module's math, in float64: outputs and the gradients of q, k and
v, with and without padding, padded keys in or out of the normaliser, feature ε 0 and 1e-4, both logit
scales. Tiny sizes; the file runs in seconds."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch

import models.attention.performer as performer_module
from models.attention.performer import LOGIT_SCALES, orthogonal_features, performer_attention

B, H, L, DH, M = 3, 2, 13, 8, 16


def plain_favor(q, k, v, w, mask, logit_scale, pad_in_normaliser, eps, keys_max_with_norm=None):
    """φ(x) = exp(ω·x − |x|²/2 − stab) + ε, x = c·q or c·k (c = Dh^-¼, or Dh^-½ for '1/Dh');
    out_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / φ(q_i)ᵀ Σ_j φ(k_j). Stabilisers are constants (detached): queries
    their row max of ω·x, keys one max per example and head over real keys, of ω·x − |x|²/2 when ε = 0
    and of ω·x alone when ε > 0 (keys_max_with_norm overrides that choice). pad_in_normaliser: padded
    keys and values zeroed but counted; else padded keys get φ = 0."""
    d = q.shape[-1]
    c = d**-0.5 if logit_scale == "1/Dh" else d**-0.25
    xq, xk = c * q, c * k  # (B, H, L, Dh)
    real = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool) if mask is None else mask  # (B, L)
    if mask is not None and pad_in_normaliser:
        keep = mask[:, None, :, None].to(q.dtype)
        xk, v = xk * keep, v * keep
        real = torch.ones_like(mask)
    zq, zk = xq @ w.T, xk @ w.T  # (B, H, L, m)
    hq, hk = xq.square().sum(-1, keepdim=True) / 2, xk.square().sum(-1, keepdim=True) / 2  # (B, H, L, 1)
    with_norm = eps == 0 if keys_max_with_norm is None else keys_max_with_norm
    sq = zq.amax(-1, keepdim=True).detach()
    key_logits = (zk - hk) if with_norm else zk
    sk = key_logits.masked_fill(~real[:, None, :, None], float("-inf")).amax((-1, -2), keepdim=True).detach()
    qf = torch.exp(zq - hq - sq) + eps
    kf = (torch.exp(zk - hk - sk) + eps) * real[:, None, :, None]
    return (qf @ (kf.transpose(-1, -2) @ v)) / (qf @ kf.sum(-2)[..., None])


def inputs(seed: int, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, DH, generator=g, dtype=torch.float64) for _ in range(3))
    w = orthogonal_features(M, DH, g).double()
    return spread * q, spread * k, v, w


MASKS = {"none": None, "padded": torch.arange(L)[None, :] < torch.tensor([L, 7, 2])[:, None]}
CASES = list(itertools.product(MASKS, (False, True), (0.0, 1e-4), LOGIT_SCALES))


def compare(mask_name, pad_in_normaliser, eps, logit_scale):
    mask = MASKS[mask_name]
    q, k, v, w = inputs(1, spread=2.0)  # spread: exponents wide enough for the stabilisers to matter
    g_out = torch.randn(B, H, L, DH, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    results = []
    for fn in (performer_attention, None):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        if fn is None:
            out = plain_favor(*leaves, w, mask, logit_scale, pad_in_normaliser, eps)
        else:
            out = fn(*leaves, w, "softmax", mask, logit_scale, pad_in_normaliser, eps)
        out.backward(g_out)
        results.append([out.detach()] + [x.grad for x in leaves])
    for name, ours, ref in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-11, msg=f"{name} differs")
    if mask is not None and not pad_in_normaliser:
        assert results[0][3][~mask[:, None, :].expand(B, H, L)].abs().max() == 0  # padded values: no gradient


@pytest.mark.parametrize("mask_name,pad_in_normaliser,eps,logit_scale", CASES)
def test_function_equals_plain_formula_with_gradients(mask_name, pad_in_normaliser, eps, logit_scale):
    compare(mask_name, pad_in_normaliser, eps, logit_scale)


@pytest.mark.parametrize("rows", [5, L, 2 * L + 1, 10**9])
@pytest.mark.parametrize("pad_in_normaliser,eps", [(False, 0.0), (False, 1e-4), (True, 1e-4)])
def test_blocked_passes_equal_plain_formula(monkeypatch, rows, pad_in_normaliser, eps):
    """Blocks within an example (with a shorter last one), one example, several whole examples, and one
    block of everything (what more than one thread runs)."""
    monkeypatch.setattr(performer_module, "BLOCK_ROWS", rows)
    compare("padded", pad_in_normaliser, eps, "1/Dh")


def test_several_threads_run_one_block_and_equal_plain_formula():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert performer_module._rows_per_block(B * H, L, torch.device("cpu")) == B * H * L
        compare("padded", False, 1e-4, "1/Dh")
    finally:
        torch.set_num_threads(threads)
    if threads == 1:
        assert performer_module._rows_per_block(B * H, L, torch.device("cpu")) == performer_module.BLOCK_ROWS
        assert performer_module._rows_per_block(B * H, L, torch.device("meta")) == B * H * L


def test_reference_discriminates_the_stabilisers_when_eps_is_set():
    """With ε > 0 the keys' stabiliser changes the result: the comparison above can tell the two apart."""
    q, k, v, w = inputs(1, spread=2.0)
    mask = MASKS["padded"]
    ours = performer_attention(q, k, v, w, "softmax", mask, "1/Dh", False, 1e-4)
    other = plain_favor(q, k, v, w, mask, "1/Dh", False, 1e-4, keys_max_with_norm=True)
    assert (ours - other).abs().max() > 1e-6
    same = plain_favor(q, k, v, w, mask, "1/Dh", False, 0.0, keys_max_with_norm=False)  # ε = 0: no effect
    torch.testing.assert_close(performer_attention(q, k, v, w, "softmax", mask, "1/Dh"), same)


def test_float32_agrees_with_float64():
    """The preset's dtype: fp32 outputs and gradients within fp32 rounding of the float64 computation."""
    q, k, v, w = inputs(3)
    mask = MASKS["padded"]
    grads = []
    for dtype in (torch.float32, torch.float64):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        out = performer_attention(*leaves, w.to(dtype), "softmax", mask, "1/Dh", False, 1e-4)
        out.square().sum().backward()
        grads.append([out.detach().double()] + [x.grad.double() for x in leaves])
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_feature_maps_are_reused_between_steps_without_changing_results():
    """The module lends its two feature maps to each training forward and gets them back from the backward;
    the next step reuses the same memory and computes what a call without reuse computes."""
    attn = performer_module.PerformerAttention(H, DH, num_features=M, feature_seed=0, logit_scale="1/Dh",
                                               feature_eps=1e-4).double().train()
    mask = MASKS["padded"]
    seen = []
    for seed in (1, 2, 3):
        q, k, v, _ = inputs(seed)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        attn(*leaves, mask).square().sum().backward()
        seen.append(sorted(t.data_ptr() for t in attn.feature_maps.free))
        fresh = [x.clone().requires_grad_() for x in (q, k, v)]
        performer_attention(*fresh, attn.projection, "softmax", mask, "1/Dh", False, 1e-4).square().sum().backward()
        for a, b in zip(leaves, fresh):
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    assert len(seen[0]) == 3 and seen[0] == seen[1] == seen[2]  # two feature maps and the backward's buffer
    assert not copy.deepcopy(attn).feature_maps.free  # scratch memory is not copied
    assert not attn.eval().feature_maps.free and attn.train().training  # nor kept for evaluation


def test_a_kept_graph_whose_maps_were_reused_fails_loudly():
    attn = performer_module.PerformerAttention(H, DH, num_features=M, feature_seed=0, feature_eps=1e-4).double()
    q, k, v, _ = inputs(4)
    q.requires_grad_()
    out = attn(q, k, v)
    out.sum().backward(retain_graph=True)
    attn(q, k, v)  # takes the maps the kept graph still refers to, and overwrites them
    with pytest.raises(RuntimeError, match="inplace"):
        out.sum().backward()
