"""Synthesizer backend against the paper's formulas written out per example, head and token."""
from __future__ import annotations

import math

import pytest
import torch

from models.attention import AttentionConfigError
from models.attention.synthesizer import SynthesizerAttention

B, H, L, DH, MAX_LEN = 3, 2, 7, 4, 10
LENGTHS = [7, 4, 1]


def paper_synthesizer(attn: SynthesizerAttention, q, k, v, lengths):
    """For each example b, head h, token i: logits over the example's real keys j < n,
    dense: W2ᵀ relu(W1ᵀ q_i + b1) + b2 (the first n of max_len); random: R[i, j];
    plus q_i·k_j/√Dh when dot_product; softmax over j; Σ_j p_j v_j."""
    out = torch.zeros_like(q)
    for b, n in enumerate(lengths):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                if attn.mode == "dense":
                    hid = torch.relu(q[b, h, i] @ attn.w1[h] + attn.b1[h])
                    logits = (hid @ attn.w2[h] + attn.b2[h])[:n]
                elif attn.rank is not None:
                    logits = attn.random_left[h, i] @ attn.random_right[h, :, :n]
                else:
                    logits = attn.random_logits[h, i, :n]
                if attn.dot_product:
                    logits = logits + k[b, h, :n] @ q[b, h, i] / math.sqrt(q.shape[-1])
                out[b, h, i] = torch.softmax(logits, 0) @ v[b, h, :n]
    return out


@pytest.mark.parametrize("mode,rank", [("dense", None), ("random", None), ("random", 3)])
@pytest.mark.parametrize("dot_product", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_outputs_and_gradients_equal_paper_formula(mode, rank, dot_product, padded):
    torch.manual_seed(0)
    attn = SynthesizerAttention(H, DH, MAX_LEN, mode=mode, dot_product=dot_product, rank=rank).double()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, L, DH, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    lengths = LENGTHS if padded else [L] * B
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None] if padded else None
    out = attn(q, k, v, mask)
    ref = paper_synthesizer(attn, q, k, v, lengths)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    leaves = [q, k, v, *attn.parameters()]
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), leaves, allow_unused=True)
    ref_grads = torch.autograd.grad((ref * w).sum(), leaves, allow_unused=True)
    for got, want in zip(grads, ref_grads):
        if want is None:  # k without dot product: neither uses it
            assert got is None or got.abs().max() == 0
        else:
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_options_and_lengths_are_checked():
    with pytest.raises(AttentionConfigError, match="mode"):
        SynthesizerAttention(H, DH, MAX_LEN, mode="factorised")
    with pytest.raises(AttentionConfigError, match="max_len"):
        SynthesizerAttention(H, DH, None)
    with pytest.raises(AttentionConfigError, match="rank"):
        SynthesizerAttention(H, DH, MAX_LEN, rank=0)
    with pytest.raises(AttentionConfigError, match="attention.rank=32"):  # Path-X: 4 x 16384² entries
        SynthesizerAttention(4, DH, 16384)
    assert SynthesizerAttention(4, DH, 16384, rank=32).random_left.shape == (4, 16384, 32)
    attn = SynthesizerAttention(H, DH, MAX_LEN)
    attn.check_length(MAX_LEN)
    with pytest.raises(AttentionConfigError, match="at most 10"):
        attn.check_length(MAX_LEN + 1)


@pytest.mark.parametrize("mode", ["dense", "random"])
def test_bf16_autocast_runs_softmax_in_fp32(mode):
    torch.manual_seed(0)
    attn = SynthesizerAttention(H, DH, MAX_LEN, mode=mode)
    q, k, v = (torch.randn(B, H, L, DH) for _ in range(3))
    mask = torch.arange(L)[None, :] < torch.tensor(LENGTHS)[:, None]
    ref = attn(q, k, v, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)


def test_capability_note_is_declared():
    """The logits are L x max_len by design; the class says so (the no-L x L contract check reads it)."""
    assert SynthesizerAttention.quadratic_memory and SynthesizerAttention.needs_max_len
    attn = SynthesizerAttention(H, DH, MAX_LEN, mode="dense")
    assert attn.synthetic_logits(torch.randn(B, H, L, DH)).shape == (B, H, L, L)
