"""Sparse Sinkhorn backend against the paper's formula written out per example, head and query token,
with the Sinkhorn iterations run on the real blocks only (no masking tricks)."""
from __future__ import annotations

import math

import pytest
import torch

from models.attention import AttentionConfigError
from models.attention.sinkhorn import SinkhornAttention, sinkhorn_normalise

B, H, DH, MAX_LEN = 3, 2, 4, 24


def paper_sinkhorn(attn: SinkhornAttention, q, k, v, lengths):
    """Example by example over its n real tokens: nv = ceil(n / b) blocks (the last one short),
    summaries = sums of real keys, logits R = (s W + c)/τ on the nv x nv real blocks, Sinkhorn
    (row then column log-normalisation, n_iters rounds), sorted slot s of block i = Σ_j P_ij k_{j,s}
    over the blocks that have a slot s; a query in block i attends, in one softmax, to the real keys of
    its block and to the sorted slots of block i."""
    b, out = attn.block_size, torch.zeros_like(q)
    for e, n in enumerate(lengths):
        nv = -(-n // b)
        for h in range(q.shape[1]):
            blocks = [list(range(i * b, min((i + 1) * b, n))) for i in range(nv)]
            s = torch.stack([k[e, h, idx].sum(0) for idx in blocks])  # (nv, Dh)
            r = (s @ attn.sort_weight[h, :, :nv] + attn.sort_bias[h, :nv]) / attn.temperature
            if attn.n_iters == 0:
                p = torch.softmax(r, 1)
            else:
                for _ in range(attn.n_iters):
                    r = r - torch.logsumexp(r, 1, keepdim=True)
                    r = r - torch.logsumexp(r, 0, keepdim=True)
                p = r.exp()
            for i, idx in enumerate(blocks):
                sk, sv = [], []
                for slot in range(b):
                    src = [j for j in range(nv) if slot < len(blocks[j])]
                    if src:
                        sk.append(sum(p[i, j] * k[e, h, blocks[j][slot]] for j in src))
                        sv.append(sum(p[i, j] * v[e, h, blocks[j][slot]] for j in src))
                keys = torch.cat([k[e, h, idx], torch.stack(sk)])
                vals = torch.cat([v[e, h, idx], torch.stack(sv)])
                for t in idx:
                    w = torch.softmax(keys @ q[e, h, t] / math.sqrt(q.shape[-1]), 0)
                    out[e, h, t] = w @ vals
    return out


@pytest.mark.parametrize("block,n_iters,temp", [(4, 3, 1.0), (5, 0, 1.0), (3, 8, 0.5), (24, 2, 1.0)])
@pytest.mark.parametrize("padded", [False, True])
def test_outputs_and_gradients_equal_paper_formula(block, n_iters, temp, padded):
    torch.manual_seed(0)
    L = 17  # not a multiple of any block size above: internal padding is exercised
    attn = SinkhornAttention(H, DH, MAX_LEN, block_size=block, n_iters=n_iters, temperature=temp).double()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, L, DH, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    lengths = [17, 9, 2] if padded else [L] * B
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None] if padded else None
    out = attn(q, k, v, mask)
    ref = paper_sinkhorn(attn, q, k, v, lengths)
    real = (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None])[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], ref[real], atol=1e-12, rtol=1e-10)
    leaves = [q, k, v, *attn.parameters()]
    w = torch.randn_like(out) * real  # only real positions are compared
    grads = torch.autograd.grad((out * w).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * w).sum(), leaves, allow_unused=True)
    for got, want in zip(grads, ref_grads):
        want = torch.zeros_like(got) if want is None else want
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_sinkhorn_gives_a_doubly_stochastic_matrix_and_ignores_empty_blocks():
    torch.manual_seed(0)
    p = sinkhorn_normalise(torch.randn(2, 6, 6, dtype=torch.float64) * 3, 50)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 6, dtype=torch.float64))
    torch.testing.assert_close(p.sum(-2), torch.ones(2, 6, dtype=torch.float64))
    attn = SinkhornAttention(H, DH, MAX_LEN, block_size=4).double()
    kb = torch.randn(1, H, 3, 4, DH, dtype=torch.float64)
    valid = torch.tensor([[True, True, False]])
    p = attn.sort_matrix(kb, valid)  # (1, H, 3, 3)
    assert torch.isfinite(p).all()
    assert p[..., :2, 2].abs().max() == 0 and p[..., 2, :2].abs().max() == 0  # empty block is not mixed in
    torch.testing.assert_close(p[..., :2, :2].sum(-2), torch.ones(1, H, 2, dtype=torch.float64))


def test_longer_padding_does_not_change_real_outputs():
    torch.manual_seed(0)
    attn = SinkhornAttention(H, DH, MAX_LEN, block_size=4)
    q, k, v = (torch.randn(1, H, 10, DH) for _ in range(3))
    short = attn(q, k, v)
    pad = lambda t: torch.cat([t, 7 * torch.randn(1, H, 13, DH)], 2)  # noqa: E731
    mask = torch.arange(23)[None, :] < 10
    long = attn(pad(q), pad(k), pad(v), mask)
    torch.testing.assert_close(long[:, :, :10], short, atol=1e-6, rtol=1e-5)


def test_options_and_lengths_are_checked():
    for bad in ({"block_size": 0}, {"n_iters": -1}, {"temperature": 0.0}):
        with pytest.raises(AttentionConfigError, match="sinkhorn"):
            SinkhornAttention(H, DH, MAX_LEN, **bad)
    with pytest.raises(AttentionConfigError, match="max_len"):
        SinkhornAttention(H, DH, None)
    attn = SinkhornAttention(H, DH, 10, block_size=4)
    assert attn.sort_weight.shape == (H, DH, 3)  # ceil(10 / 4) blocks
    capped = SinkhornAttention(H, DH, 21, block_size=64)  # at least two blocks at max_len
    assert capped.block_size == 11 and capped.max_blocks == 2
    with pytest.raises(AttentionConfigError, match="at most 10"):
        attn.check_length(11)


def test_bf16_autocast_keeps_sorting_in_fp32():
    torch.manual_seed(0)
    attn = SinkhornAttention(H, DH, MAX_LEN, block_size=4)
    q, k, v = (torch.randn(B, H, 17, DH) for _ in range(3))
    ref = attn(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)
