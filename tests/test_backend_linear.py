"""Linear Transformer backend against the paper's formula written out with a dense L x L matrix."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.attention.linear import LinearAttention

B, H, L, DH = 3, 2, 13, 4
LENGTHS = [13, 8, 1]  # real tokens per example


def paper_linear(q, k, v, mask=None):
    """out_i = Σ_j sim(q_i, k_j) v_j / Σ_j sim(q_i, k_j), sim(a, b) = φ(a)·φ(b), φ = elu + 1,
    j over real keys: one dense (L, L) similarity matrix per example and head."""
    sim = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)  # (B, H, L, L)
    if mask is not None:
        sim = sim * mask[:, None, None, :]
    return (sim @ v) / sim.sum(-1, keepdim=True)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, DH, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("padded", [False, True])
def test_outputs_and_gradients_equal_paper_formula(padded):
    mask = torch.arange(L)[None, :] < torch.tensor(LENGTHS)[:, None] if padded else None
    attn = LinearAttention(H, DH)
    q, k, v = inputs()
    out = attn(q, k, v, mask)
    ref = paper_linear(q, k, v, mask)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_padded_keys_get_no_gradient_and_all_padding_gives_zero():
    mask = torch.arange(L)[None, :] < torch.tensor(LENGTHS)[:, None]
    q, k, v = inputs(1)
    LinearAttention(H, DH)(q, k, v, mask).sum().backward()
    pad = ~mask[:, None, :, None].expand_as(k)
    assert k.grad[pad].abs().max() == 0 and v.grad[pad].abs().max() == 0
    empty = torch.zeros(B, L, dtype=torch.bool)
    out = LinearAttention(H, DH)(q.detach(), k.detach(), v.detach(), empty)
    assert torch.equal(out, torch.zeros_like(out))


def test_bf16_autocast_keeps_sums_in_fp32():
    q, k, v = (t.detach().float() for t in inputs(2))
    ref = LinearAttention(H, DH)(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = LinearAttention(H, DH)(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)
