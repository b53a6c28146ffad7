"""The switches that give back the Nyströmformer authors' model: each one against a small reference
computation written here (their formulas as read from their LRA code; shared/LRA_FACTS.md §2, §5)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lra.training.schedules import one_cycle
from models.attention.linformer import SHARING, LinformerAttention
from models.attention.nystrom import NystromAttention, iterative_pinv, nonempty_landmarks, nystrom_attention
from models.attention.performer import orthogonal_features, performer_attention
from models.attention.softmax import SoftmaxAttention
from models.classifier import build_model
from models.heads import pool

B, H, L, DH = 3, 2, 24, 8


def qkv(seed: int = 0, length: int = L, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, length, DH, generator=g, dtype=dtype) for _ in range(3)]


def prefix_mask(lengths: list[int], length: int = L) -> torch.Tensor:
    """(B, L) True for the first lengths[b] positions."""
    return torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]


def tiny_model(**kw) -> nn.Module:
    args = dict(head="pooled", vocab_size=500, num_classes=5, max_len=32,
                attention={"_target_": "models.attention.softmax.SoftmaxAttention"}, dim=16,
                depth=2, heads=2, head_dim=8, ffn_dim=32)
    return build_model(**{**args, **kw})


# ---- embeddings, head, pooling ---------------------------------------------------------------------
def test_embed_init_std_sets_token_and_position_tables():
    torch.manual_seed(0)
    theirs = tiny_model(embed_init_std=0.02, dim=64, max_len=512).encoder
    ours = tiny_model(dim=64, max_len=512).encoder
    assert theirs.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert theirs.pos.std().item() == pytest.approx(0.02, rel=0.05)
    assert ours.embed.weight.std().item() == pytest.approx(1.0, rel=0.05)  # nn.Embedding's N(0, 1)


def test_head_hidden_and_activation():
    net = tiny_model(head_hidden=128, head_activation="relu")
    assert [type(m) for m in net.mlp] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (net.mlp[0].in_features, net.mlp[0].out_features, net.mlp[2].out_features) == (16, 128, 5)
    dual = tiny_model(head="dual", head_hidden=128, head_activation="relu")
    assert (dual.mlp[0].in_features, dual.mlp[0].out_features) == (64, 128)  # [u, v, u*v, u-v]
    assert isinstance(tiny_model().mlp[1], nn.GELU) and tiny_model().mlp[0].out_features == 16


def test_mean_padded_divides_by_the_padded_length_and_mean_by_the_real_count():
    states = torch.randn(B, L, 4, dtype=torch.float64)
    mask = prefix_mask([L, 10, 3])
    padded = pool(states, mask, "mean_padded")
    real = pool(states, mask, "mean")
    for b, n in enumerate([L, 10, 3]):
        torch.testing.assert_close(padded[b], states[b, :n].sum(0) / L)
        torch.testing.assert_close(real[b], states[b, :n].mean(0))
    longer = torch.cat([states, torch.randn(B, 8, 4, dtype=torch.float64)], 1)
    longer_mask = torch.cat([mask, torch.zeros(B, 8, dtype=torch.bool)], 1)
    torch.testing.assert_close(pool(longer, longer_mask, "mean"), real)  # padding-invariant
    assert not torch.allclose(pool(longer, longer_mask, "mean_padded"), padded)  # the defect


def test_softmax_attention_dropout_acts_in_training_only():
    q, k, v = qkv()
    att = SoftmaxAttention(H, DH, attn_dropout=0.5)
    att.eval()
    torch.testing.assert_close(att(q, k, v), F.scaled_dot_product_attention(q, k, v))
    att.train()
    assert not torch.allclose(att(q, k, v), F.scaled_dot_product_attention(q, k, v))


# ---- Linformer sharing -----------------------------------------------------------------------------
def linformer_model(sharing: str, depth: int = 3) -> nn.Module:
    return tiny_model(attention={"_target_": "models.attention.linformer.LinformerAttention", "proj_dim": 4, "sharing": sharing}, depth=depth)


def test_linformer_sharing_parameter_counts():
    k, n, heads, depth = 4, 32, 2, 3
    expected = {"none": depth * 2 * heads * k * n, "headwise": depth * 2 * k * n, "kv": depth * k * n,
                "layerwise": heads * k * n}
    assert set(expected) == set(SHARING)
    base = sum(p.numel() for p in tiny_model(depth=depth).parameters())
    for sharing, count in expected.items():
        assert sum(p.numel() for p in linformer_model(sharing).parameters()) - base == count, sharing


def test_layerwise_sharing_is_one_parameter_per_model_never_across_models():
    a, b = linformer_model("layerwise"), linformer_model("layerwise")
    layers_a = [blk.attn.attn for blk in a.encoder.blocks]
    assert all(layer.proj_k is layers_a[0].proj_k for layer in layers_a)
    assert layers_a[0].proj_k is not b.encoder.blocks[0].attn.attn.proj_k
    # a checkpoint round trip keeps the tie (the state dict holds the same tensor under each layer's name)
    b.load_state_dict(a.state_dict())
    assert all(blk.attn.attn.proj_k is b.encoder.blocks[0].attn.attn.proj_k for blk in b.encoder.blocks)
    torch.testing.assert_close(b.encoder.blocks[2].attn.attn.proj_k, layers_a[0].proj_k)
    headwise = [blk.attn.attn for blk in linformer_model("headwise").encoder.blocks]
    assert headwise[0].proj_k is not headwise[1].proj_k


def test_layerwise_linformer_is_the_authors_formula():
    """Their forward: K' = E (K * mask), V' = E (V * mask) with E (heads, k, L); softmax(Q K'ᵀ / √Dh) V'."""
    q, k, v = qkv(1)
    att = LinformerAttention(H, DH, max_len=L, proj_dim=5, sharing="layerwise", init_std=0.02).double()
    mask = prefix_mask([L, 17, 4])
    m = mask[:, None, :, None].double()
    e = att.proj_k  # (H, k, L)
    kp, vp = torch.matmul(e, k * m), torch.matmul(e, v * m)  # (B, H, k, Dh)
    ref = torch.softmax(q @ kp.transpose(-1, -2) / math.sqrt(DH), -1) @ vp
    torch.testing.assert_close(att(q, k, v, mask), ref)
    kv = LinformerAttention(H, DH, max_len=L, proj_dim=5, sharing="kv").double()
    e = kv.proj_k  # (k, L) shared by heads, keys and values
    ref = torch.softmax(q @ (e @ (k * m)).transpose(-1, -2) / math.sqrt(DH), -1) @ (e @ (v * m))
    torch.testing.assert_close(kv(q, k, v, mask), ref)


# ---- Performer: what the authors' runs computed ----------------------------------------------------
def authors_performer(q, k, v, w, mask, eps=0.0):
    """performer-pytorch 1.1.4's softmax kernel on their inputs (q / Dh^¼, (k / Dh^¼) * mask, v * mask),
    which scales the data by Dh^-¼ once more; stabilised by the query's row maximum and by one maximum per
    example and head for keys, then + eps."""
    d = q.shape[-1]
    m = mask[:, None, :, None].to(q.dtype)
    q, k, v = q * d**-0.25, k * d**-0.25 * m, v * m
    dn = d**-0.25

    def phi(x, is_query):
        z = (dn * x) @ w.T
        stab = z.amax(-1, keepdim=True) if is_query else z.amax((-1, -2), keepdim=True)
        return torch.exp(z - (x.square().sum(-1, keepdim=True) * dn**2) / 2 - stab) + eps

    qf, kf = phi(q, True), phi(k, False)
    return (qf @ (kf.transpose(-1, -2) @ v)) / (qf @ kf.sum(-2)[..., None])


def test_performer_authors_switches_reproduce_their_computation():
    q, k, v = qkv(2)
    w = orthogonal_features(16, DH, torch.Generator().manual_seed(0)).double()
    mask = prefix_mask([L, 9, 2])
    theirs = performer_attention(q, k, v, w, "softmax", mask, logit_scale="1/Dh", pad_in_normaliser=True)
    torch.testing.assert_close(theirs, authors_performer(q, k, v, w, mask))
    with_eps = performer_attention(q, k, v, w, "softmax", mask, logit_scale="1/Dh", pad_in_normaliser=True,
                                   feature_eps=1e-4)
    torch.testing.assert_close(with_eps, authors_performer(q, k, v, w, mask, eps=1e-4))
    assert not torch.allclose(with_eps, theirs)
    # the ε path with our padding fix is still padding-invariant
    eps_fixed = performer_attention(q, k, v, w, "softmax", mask, logit_scale="1/Dh", feature_eps=1e-4)
    qq, kk, vv = (torch.cat([x, torch.randn(B, H, 5, DH, dtype=torch.float64)], 2) for x in (q, k, v))
    mm = torch.cat([mask, torch.zeros(B, 5, dtype=torch.bool)], 1)
    torch.testing.assert_close(performer_attention(qq, kk, vv, w, "softmax", mm, logit_scale="1/Dh",
                                                   feature_eps=1e-4)[:, :, :L], eps_fixed)
    # our fix: padding never changes outputs at real positions; theirs does
    pad = torch.randn(B, H, 6, DH, dtype=torch.float64)
    qq, kk, vv = (torch.cat([x, pad], 2) for x in (q, k, v))
    mm = torch.cat([mask, torch.zeros(B, 6, dtype=torch.bool)], 1)
    ours = performer_attention(q, k, v, w, "softmax", mask, logit_scale="1/Dh")
    torch.testing.assert_close(performer_attention(qq, kk, vv, w, "softmax", mm, logit_scale="1/Dh")[:, :, :L], ours)
    longer = performer_attention(qq, kk, vv, w, "softmax", mm, logit_scale="1/Dh", pad_in_normaliser=True)
    assert not torch.allclose(longer[:, :, :L], theirs)


# ---- Nyström: landmarks, pseudo-inverse initialisation, statistics ---------------------------------
def authors_nystrom(q, k, v, mask, m, iters=6):
    """Their forward without the conv skip: Q, K zeroed at padding and scaled by Dh^-¼; landmarks = means of
    L/m consecutive positions of the padded length; kernel 1 and 2 unmasked, kernel 3 over real keys;
    Z0 = Aᵀ / (one maximum of column sums over the whole batch)."""
    Bq, Hq, n, d = q.shape
    mm = mask[:, None, :, None].to(q.dtype)
    q, k = q * mm * d**-0.25, k * mm * d**-0.25
    ql = q.reshape(Bq, Hq, m, n // m, d).mean(-2)
    kl = k.reshape(Bq, Hq, m, n // m, d).mean(-2)
    k1 = torch.softmax(q @ kl.transpose(-1, -2), -1)
    k2 = torch.softmax(ql @ kl.transpose(-1, -2), -1)
    k3 = torch.softmax(ql @ k.transpose(-1, -2) - 1e9 * (~mask[:, None, None, :]).to(q.dtype), -1)
    eye = torch.eye(m, dtype=q.dtype)
    z = k2.transpose(-1, -2) / k2.sum(-2).max()
    for _ in range(iters):
        kz = k2 @ z
        z = (0.25 * z) @ (13 * eye - kz @ (15 * eye - kz @ (7 * eye - kz)))
    return (k1 @ z) @ (k3 @ v)


def test_nystrom_authors_switches_reproduce_their_outputs():
    q, k, v = qkv(3)
    mask = prefix_mask([L, 13, 5])
    theirs = nystrom_attention(q, k, v, 6, 6, mask, segments="padded", pinv_init="batch", pad_in_landmarks=True)
    real = mask[:, None, :, None]
    torch.testing.assert_close(theirs.masked_fill(~real, 0), authors_nystrom(q, k, v, mask, 6).masked_fill(~real, 0))


def test_batch_pinv_init_equals_the_plain_formula_and_couples_batch_mates():
    a = torch.softmax(torch.randn(4, 2, 5, 5, dtype=torch.float64) * 3, -1)
    z = a.transpose(-1, -2) / a.sum(-2).max()  # their init: one maximum over the batch (row sums are 1)
    eye = torch.eye(5, dtype=torch.float64)
    for _ in range(3):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    torch.testing.assert_close(iterative_pinv(a, 3, "batch"), z)
    q, k, v = qkv(4)
    mask = prefix_mask([L, 13, 5])
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    q2[2], k2[2] = q2[2] * 4, k2[2] * 4  # another batch mate for example 0
    for init, coupled in (("batch", True), ("per_example", False)):
        out = nystrom_attention(q, k, v, 6, 6, mask, pinv_init=init)[0]
        out2 = nystrom_attention(q2, k2, v2, 6, 6, mask, pinv_init=init)[0]
        assert torch.allclose(out, out2) is not coupled, init


def real_landmark_reference(x, n, m):
    """Segment j of the n real tokens holds tokens r with ⌊r·m/n⌋ = j."""
    seg = torch.arange(n) * m // n
    return torch.stack([x[..., seg == j, :].mean(-2) for j in range(m) if (seg == j).any()], -2)


def test_real_segments_follow_each_examples_length_and_ignore_padding():
    q, k, v = qkv(5)
    lengths, m = [L, 13, 5], 6
    mask = prefix_mask(lengths)
    from models.attention.nystrom import landmarks

    ql, kl, land_mask = landmarks(q, k, mask, m, "real")
    for b, n in enumerate(lengths):
        ref = real_landmark_reference(q[b, :, :n], n, m)
        got = ql[b][:, land_mask[b]] if land_mask is not None else ql[b]
        torch.testing.assert_close(got, ref)
    # the same sequences padded further: equal outputs at real positions with real segments only
    pad = torch.randn(B, H, 40, DH, dtype=torch.float64)
    qq, kk, vv = (torch.cat([x, pad], 2) for x in (q, k, v))
    mm = torch.cat([mask, torch.zeros(B, 40, dtype=torch.bool)], 1)
    real = mask[:, None, :, None]
    for segments, invariant in (("real", True), ("padded", False)):
        short = nystrom_attention(q, k, v, m, 6, mask, segments=segments).masked_fill(~real, 0)
        long_ = nystrom_attention(qq, kk, vv, m, 6, mm, segments=segments)[:, :, :L].masked_fill(~real, 0)
        assert torch.allclose(short, long_) is invariant, segments
    # without padding and with L divisible by m the two cuts are the same
    torch.testing.assert_close(nystrom_attention(q, k, v, m, 6, None, segments="real"),
                               nystrom_attention(q, k, v, m, 6, None, segments="padded"))


def test_nonempty_landmark_counts_and_attention_stats():
    mask = prefix_mask([L, 13, 2])
    # padded: 6 segments of 4 positions -> 6, 4 (13 tokens reach segment 3), 1; real: min(n, m)
    assert nonempty_landmarks(mask, B, L, 6, "padded").tolist() == [6, 4, 1]
    assert nonempty_landmarks(mask, B, L, 6, "real").tolist() == [6, 6, 2]
    att = NystromAttention(H, DH, num_landmarks=6, conv_kernel=3).double()
    q, k, v = qkv(6)
    assert att.attention_stats() == {}
    att.eval()
    att(q, k, v, mask)
    att(q[:1], k[:1], v[:1], mask[:1])
    assert att.attention_stats() == {"nonempty_landmarks": pytest.approx((6 + 4 + 1 + 6) / 4)}
    att.train()
    att(q, k, v, mask)  # training forwards are not counted
    att.eval()  # a new pass starts from zero
    att(q[1:], k[1:], v[1:], mask[1:])
    assert att.attention_stats() == {"nonempty_landmarks": pytest.approx(2.5)}


# ---- schedule ------------------------------------------------------------------------------------
def test_one_cycle_is_pytorchs_with_momentum_cycling():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-4, betas=(0.9, 0.999))
    sched = one_cycle(opt, warmup_steps=10, total_steps=50)
    assert isinstance(sched, torch.optim.lr_scheduler.OneCycleLR)
    seen = []
    for _ in range(50):
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0]))
        opt.step()
        sched.step()
    # PyTorch's linear one-cycle: max/25 -> max over steps 0..9, then -> max/25/1e4 at step 49
    start, peak, end = 1e-4 / 25, 1e-4, 1e-4 / 25 / 1e4
    for s, (lr, beta1) in enumerate(seen):
        if s <= 9:
            want_lr, want_b = start + (peak - start) * s / 9, 0.95 - 0.10 * s / 9
        else:
            want_lr, want_b = peak + (end - peak) * (s - 9) / 40, 0.85 + 0.10 * (s - 9) / 40
        assert lr == pytest.approx(want_lr, rel=1e-9, abs=1e-15) and beta1 == pytest.approx(want_b), s


def test_performer_preset_settings_equal_the_library_the_authors_called():
    """Their PerformerAttention: performer_pytorch.FastAttention(kernel_fn=ReLU) called on (Q / Dh^¼,
    K / Dh^¼ * mask, V * mask); without generalized_attention=True the ReLU is ignored (softmax features)."""
    pp = pytest.importorskip("performer_pytorch")  # installed by `make test` (make install-bench)
    q, k, v = qkv(7)
    mask = prefix_mask([L, 11, 3])
    lib = pp.FastAttention(dim_heads=DH, nb_features=16, causal=False, kernel_fn=nn.ReLU()).double()
    m = mask[:, None, :, None].double()
    theirs = lib(q / DH**0.25, k / DH**0.25 * m, v * m)
    ours = performer_attention(q, k, v, lib.projection_matrix, "softmax", mask, logit_scale="1/Dh",
                               pad_in_normaliser=True, feature_eps=1e-4)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("warmup,total", [(1000, 1), (5, 2), (0, 10), (10, 10), (20, 10)])
def test_one_cycle_survives_degenerate_runs(warmup: int, total: int):
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = one_cycle(opt, warmup_steps=warmup, total_steps=total)
    for _ in range(total):
        opt.step()
        sched.step()
        assert math.isfinite(opt.param_groups[0]["lr"])
