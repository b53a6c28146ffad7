"""Reformer LSH backend against a dense reference: the same buckets (same rotations) turned into an
L x L membership mask per hash round, the paper's attention and round combination written densely."""
from __future__ import annotations

import math

import pytest
import torch

from models.attention import AttentionConfigError
from models.attention.reformer import SELF_LOGIT, ReformerAttention, default_buckets

B, H, DH = 3, 2, 4


def paper_reformer(q, v, rotations, chunk, lengths):
    """Per example and head, for each round r: buckets argmax([qR; -qR]) of the real tokens, padded
    positions (up to a multiple of `chunk`) in a last extra bucket; the sorted order by (bucket,
    position) cut into chunks; member[i, j] = j sits in i's chunk or the one before it (cyclically,
    no look-back with one chunk) and is real. Logits q_i·k_j/√Dh with k_j = q_j/|q_j|, the own logit
    replaced by SELF_LOGIT; z_r = logsumexp over members, o_r = softmax · v; out = Σ_r softmax_r(z) o_r.
    Only real query rows are filled in."""
    L, D = q.shape[2], q.shape[3]
    R, nbk = rotations.shape[2], 2 * rotations.shape[3]
    nc = -(-L // chunk)
    Lp = nc * chunk
    out = torch.zeros_like(q)
    for e, n in enumerate(lengths):
        for h in range(q.shape[1]):
            x = torch.cat([q[e, h], q.new_zeros(Lp - L, D)])  # (Lp, Dh)
            vv = torch.cat([v[e, h], v.new_zeros(Lp - L, D)])
            real = torch.arange(Lp) < n
            keys = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-300)
            logits = x @ keys.T / math.sqrt(D)  # (Lp, Lp)
            logits = torch.where(torch.eye(Lp, dtype=torch.bool), torch.full_like(logits, SELF_LOGIT), logits)
            zs, os = [], []
            for r in range(R):
                rot = x @ rotations[h, :, r]  # (Lp, n/2)
                bucket = torch.where(real, torch.cat([rot, -rot], -1).argmax(-1), torch.tensor(nbk))
                order = sorted(range(Lp), key=lambda t: (int(bucket[t]), t))
                chunk_of = torch.empty(Lp, dtype=torch.long)
                for slot, t in enumerate(order):
                    chunk_of[t] = slot // chunk
                same = chunk_of[:, None] == chunk_of[None, :]
                prev = (chunk_of[:, None] - 1) % nc == chunk_of[None, :]
                member = (same | (prev if nc > 1 else same)) & real[None, :]  # (Lp, Lp)
                lg = logits.masked_fill(~member, float("-inf"))[:n]  # real query rows
                zs.append(torch.logsumexp(lg, -1))
                os.append(torch.softmax(lg, -1) @ vv)
            w = torch.softmax(torch.stack(zs), 0)  # (R, n)
            out[e, h, :n] = (w[..., None] * torch.stack(os)).sum(0)
    return out


def inputs(L, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, DH, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("L,chunk,n_hashes,n_buckets", [(16, 4, 2, 4), (13, 3, 1, 6), (21, 5, 3, 2), (9, 2, 2, 8)])
@pytest.mark.parametrize("padded", [False, True])
def test_outputs_and_gradients_equal_dense_reference(L, chunk, n_hashes, n_buckets, padded):
    torch.manual_seed(0)
    attn = ReformerAttention(H, DH, n_hashes=n_hashes, chunk_size=chunk, n_buckets=n_buckets).double().eval()
    q, k, v = inputs(L)
    lengths = [L, L // 2, 1] if padded else [L] * B
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None] if padded else None
    out = attn(q, k, v, mask)
    ref = paper_reformer(q, v, attn.rotations, chunk, lengths)
    real = (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None])[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], ref[real], atol=1e-12, rtol=1e-10)
    if padded:  # a lone real token has nothing else to attend to: it takes its own value
        torch.testing.assert_close(out[2, :, 0], v[2, :, 0].detach(), atol=1e-12, rtol=0)
    w = torch.randn_like(out) * real
    g_out = torch.autograd.grad((out * w).sum(), (q, v))
    g_ref = torch.autograd.grad((ref * w).sum(), (q, v))
    for got, want in zip(g_out, g_ref):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("n_buckets", [2, 8])
def test_one_chunk_is_full_shared_qk_softmax_without_self(n_buckets):
    L = 11
    attn = ReformerAttention(H, DH, n_hashes=2, chunk_size=16, n_buckets=n_buckets).double().eval()
    q, k, v = (t.detach() for t in inputs(L, 2))
    mask = torch.arange(L)[None, :] < torch.tensor([11, 6, 2])[:, None]
    keys = q / q.norm(dim=-1, keepdim=True)
    logits = q @ keys.transpose(-1, -2) / math.sqrt(DH)  # (B, H, L, L)
    logits = logits.masked_fill(torch.eye(L, dtype=torch.bool), float("-inf"))
    logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    ref = logits.softmax(-1) @ v
    out = attn(q, k, v, mask)
    real = mask[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], ref[real], atol=1e-12, rtol=1e-10)


def test_rotations_are_seeded_redrawn_in_training_and_fixed_in_eval():
    torch.manual_seed(5)
    a = ReformerAttention(H, DH, max_len=256)
    torch.manual_seed(5)
    b = ReformerAttention(H, DH, max_len=256)
    assert torch.equal(a.rotations, b.rotations) and a.n_buckets == default_buckets(256, 64) == 8
    q, k, v = (torch.randn(1, H, 40, DH) for _ in range(3))
    a.eval()
    first = a(q, k, v)
    torch.testing.assert_close(a(q, k, v), first, atol=0, rtol=0)
    before = a.rotations.clone()
    a.train()(q, k, v)
    assert not torch.equal(a.rotations, before)
    b.redraw = False
    b.train()(q, k, v)
    assert torch.equal(b.rotations, before)


def test_options_are_checked():
    for bad in ({"n_hashes": 0}, {"chunk_size": 0}, {"n_buckets": 3}, {"n_buckets": 0}):
        with pytest.raises(AttentionConfigError, match="reformer"):
            ReformerAttention(H, DH, max_len=64, **bad)
    with pytest.raises(AttentionConfigError, match="n_buckets"):
        ReformerAttention(H, DH)
    assert ReformerAttention(H, DH, n_buckets=4).n_buckets == 4
    assert default_buckets(2048, 64) == 64 and default_buckets(4000, 64) == 64 and default_buckets(10, 64) == 2


def test_bf16_autocast_hashes_in_fp32():
    torch.manual_seed(0)
    attn = ReformerAttention(H, DH, n_buckets=4, chunk_size=4).eval()
    q, k, v = (torch.randn(B, H, 17, DH) for _ in range(3))
    ref = attn(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # bf16 inputs can move a token to another bucket, so only the scale is compared
    assert (out.float() - ref).abs().mean() < 0.2


def test_padding_content_never_changes_real_outputs_across_chunks():
    torch.manual_seed(0)
    attn = ReformerAttention(H, DH, n_hashes=2, chunk_size=4, n_buckets=4).eval()
    q, k, v = (torch.randn(B, H, 30, DH) for _ in range(3))
    mask = torch.arange(30)[None, :] < torch.tensor([30, 17, 5])[:, None]
    out = attn(q, k, v, mask)
    pad = ~mask[:, None, :, None]
    out2 = attn(*(t + 5 * torch.randn_like(t) * pad for t in (q, k, v)), mask)
    real = mask[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out2[real], out[real], atol=1e-6, rtol=1e-6)
