"""The CPU fast paths: word-based dropout and chunked softmax attention with dropout. Each must equal the
plain computation it replaces (same draws replayed through a plain formula), not only run."""
from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import models.attention.softmax as softmax_mod
from models.dropout import Dropout, dropout, keep_threshold, quantized_p, random_words


def test_dropout_rate_scale_and_determinism():
    x = torch.ones(200_000)
    torch.manual_seed(0)
    y = dropout(x, 0.1, True)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.004  # 200k draws: 4 standard deviations is ~0.0027
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - quantized_p(0.1))))
    torch.manual_seed(0)
    assert torch.equal(dropout(x, 0.1, True), y)  # the global generator decides: reproducible
    assert abs(y.mean().item() - 1.0) < 0.01  # unbiased


def test_dropout_every_word_is_used():
    """Each 64-bit draw decides four elements: all four 16-bit lanes must drop at the same rate."""
    torch.manual_seed(1)
    y = dropout(torch.ones(400_000), 0.25, True).view(-1, 4)
    rates = (y == 0).float().mean(0)
    assert torch.all((rates - 0.25).abs() < 0.01), rates


def test_dropout_backward_uses_forward_mask_and_eval_is_identity():
    x = torch.randn(3, 7, 11, requires_grad=True)
    torch.manual_seed(2)
    y = dropout(x, 0.3, True)
    y.backward(torch.ones_like(y))
    scale = 1 / (1 - quantized_p(0.3))
    assert torch.allclose(x.grad, (y != 0).float() * scale)
    layer = Dropout(0.3).eval()
    assert layer(x) is x
    assert dropout(x, 0.0, True) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Dropout(1.0)


def test_dropout_keeps_non_finite_values_as_torch_dropout_does():
    """Kept values are x / (1 - p) exactly; a dropped inf or NaN gives NaN (input times a mask, as torch's
    own dropout), never a silent 0 that would hide a diverged activation."""
    x = torch.tensor([float("inf"), float("nan"), 2.0]).repeat(400)
    torch.manual_seed(0)
    y = dropout(x, 0.5, True)
    torch.manual_seed(0)
    keep = (random_words(x.numel()) >= keep_threshold(0.5))
    scale = 1 / (1 - quantized_p(0.5))
    assert 0 < int(keep.sum()) < x.numel()
    assert torch.equal(y[keep & (x == 2.0)], torch.full_like(y[keep & (x == 2.0)], 2.0 * scale))
    assert torch.isnan(y[~keep & ~torch.isfinite(x)]).all() and torch.equal(y[~keep & (x == 2.0)], torch.zeros_like(y[~keep & (x == 2.0)]))


def _plain(q, k, v, mask, p, seed):
    """softmax attention with dropout on the probabilities, drawing the same words: all at once, in
    (B, H, queries, keys) order."""
    torch.manual_seed(seed)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask[:, None, None, :], torch.finfo(s.dtype).min)
    return dropout(s.softmax(-1), p, True) @ v


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("chunk", ["all", "rows", "queries"])
def test_chunked_dropout_attention_equals_plain(monkeypatch, recompute, chunk):
    """Chunks of whole (L, L) matrices or of query blocks, P and D stored or recomputed: the words land on
    the probabilities in (B, H, L, L) order, so every layout gives the one-draw plain result (no padding;
    padded batches: the formula test below)."""
    B, H, L, D = 2, 2, 24, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.ones(B, L, dtype=torch.bool)
    ref = _plain(q, k, v, mask, 0.2, seed=5)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    budget = {"all": B * H * L * L, "rows": 3 * L * L, "queries": 7 * L}[chunk]  # 7 queries: 4 blocks, last of 3
    monkeypatch.setattr(softmax_mod, "CHUNK_ELEMENTS", budget)
    monkeypatch.setattr(softmax_mod, "RECOMPUTE_CHUNK_ELEMENTS", budget)
    monkeypatch.setattr(softmax_mod, "STORE_ELEMENTS", 0 if recompute else 10**9)
    torch.manual_seed(5)
    out = softmax_mod.dropout_attention(q, k, v, mask[:, None, None, :], 0.2)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref_grads):  # recomputation replays the chunk's draws exactly
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_softmax_backend_with_dropout_keeps_padding_out():
    """Training with attention dropout: outputs at real positions ignore whatever sits in padded keys."""
    from models.attention.softmax import SoftmaxAttention

    att = SoftmaxAttention(2, 8, attn_dropout=0.1).train()
    q, k, v = (torch.randn(2, 2, 16, 8) for _ in range(3))
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[:, 12:] = False
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 12:], v2[:, :, 12:] = 50.0, -50.0
    torch.manual_seed(3)
    a = att(q, k, v, mask)
    torch.manual_seed(3)
    b = att(q, k2, v2, mask)
    assert torch.allclose(a[:, :, :12], b[:, :, :12])
    att.eval()  # no dropout in eval: the fused SDPA path
    expect = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    assert torch.allclose(att(q, k, v, mask), expect, atol=1e-6)


@pytest.mark.slow
def test_compiled_network_gives_the_eager_loss_and_gradients():
    """compile=true (torch.compile in place) trains the same function: same loss and gradients to fp32
    tolerance, same parameter names (checkpoints and resume unchanged)."""
    from lra.config import compose
    from lra.training.run import build_net
    from lra.training.schema import validate

    cfg = compose(["experiment=smoke", "compile=true", "task.max_len=32", "attention=softmax"])
    validate(cfg)  # the key is known and typed
    torch.manual_seed(0)
    net = build_net(cfg, vocab_size=17, num_classes=10)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 17, (4, 32), generator=g)
    mask = torch.arange(32)[None, :] < torch.tensor([[32], [20], [9], [31]])
    batch = {"input_ids": ids, "mask": mask}
    labels = torch.tensor([1, 2, 3, 4])

    def loss_and_grads():
        loss = F.cross_entropy(net(batch), labels)
        grads = torch.autograd.grad(loss, list(net.parameters()))
        return loss.detach(), grads

    names = [n for n, _ in net.named_parameters()]
    eager = loss_and_grads()
    net.compile()
    compiled = loss_and_grads()
    assert [n for n, _ in net.named_parameters()] == names
    assert torch.allclose(eager[0], compiled[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(eager[1], compiled[1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def _protocol_backends() -> list[str]:
    from lra.config import protocol_backends

    return protocol_backends("nystromformer")


@pytest.mark.slow
@pytest.mark.parametrize("backend", _protocol_backends())
def test_compiled_preset_model_trains_with_dropout_and_evaluates(backend):
    """The Nyströmformer preset's model of each backend it compares under torch.compile, at toy size:
    dropout (the word-based CPU sampler hands over to the compiler's own) and the backends' hand-written
    paths trace; a training step gives every parameter a finite gradient, and an inference-mode forward
    (what evaluation and lra-bench run) equals the eager network's."""
    from lra.config import compose
    from lra.training.run import build_net

    cfg = compose(["experiment=nystromformer/listops", f"attention={backend}", "task.max_len=64"])
    torch.manual_seed(0)
    net = build_net(cfg, vocab_size=17, num_classes=10).train()
    ids = torch.randint(1, 17, (4, 64), generator=torch.Generator().manual_seed(1))
    mask = torch.arange(64)[None, :] < torch.tensor([[64], [40], [9], [63]])
    batch = {"input_ids": ids, "mask": mask}
    with torch.inference_mode():
        eager = net.eval()(batch)
    net.train().compile()
    loss = F.cross_entropy(net(batch), torch.tensor([1, 2, 3, 4]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)
    with torch.inference_mode():
        assert torch.allclose(net.eval()(batch), eager, rtol=1e-4, atol=1e-5)


def _reference_with_mask(q, k, v, pad, keep, p):
    """The textbook formula given the keep mask: softmax, times keep / (1 - p), times V (float64)."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if pad is not None:
        s = s.masked_fill(~pad[:, None, None, :], torch.finfo(s.dtype).min)
    return (s.softmax(-1) * keep / (1 - quantized_p(p))) @ v


def _keep_mask(shape, p, seed, keys=None):
    """The keep mask the dropout path draws under `seed` with one (L, S) matrix a chunk: one int16 word
    per probability in (B, H, L, S) order, kept when the word is >= keep_threshold(p); `keys[b]`: batch
    element b's matrices stop at its last real key (the rest get probability 0 and no word)."""
    B, H, L, S = shape
    torch.manual_seed(seed)
    keep = torch.zeros(shape, dtype=torch.float64)
    for b in range(B):
        s = S if keys is None else keys[b]
        for h in range(H):
            keep[b, h, :, :s] = (random_words(L * s).view(L, s) >= keep_threshold(p)).double()
    return keep


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("recompute", [False, True])
def test_dropout_attention_equals_formula_given_the_mask(monkeypatch, padded, recompute):
    """float64: outputs and q, k, v gradients of the chunked path equal softmax * keep / (1 - p) @ V with the
    same keep mask, whether P and D are stored or recomputed (replayed draws) in backward; with padding,
    the keys after a batch element's last real key are left out (exact: their probability is 0)."""
    B, H, L, D, p = 2, 3, 20, 8, 0.3
    monkeypatch.setattr(softmax_mod, "CHUNK_ELEMENTS", L * L)  # one (L, L) matrix a chunk
    monkeypatch.setattr(softmax_mod, "RECOMPUTE_CHUNK_ELEMENTS", 4 * L)  # 4 queries of one matrix a chunk
    monkeypatch.setattr(softmax_mod, "STORE_ELEMENTS", 0 if recompute else 10**9)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pad = None
    if padded:
        pad = torch.ones(B, L, dtype=torch.bool)
        pad[0, 13:] = False  # its matrices stop at key 13
        pad[1, 5:8] = False  # a gap before real keys: masked by the bias, nothing cut
    keep = _keep_mask((B, H, L, L), p, seed=7, keys=[13, L] if padded else None)
    assert 0 < keep.mean() < 1
    ref = _reference_with_mask(q, k, v, pad, keep, p)
    weight = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    ws = softmax_mod.Workspace()
    all_real = torch.ones(B, 1, 1, L, dtype=torch.bool)  # the same as no mask
    for call in range(2):  # the second call reuses the workspace's memory
        torch.manual_seed(7)
        attn_mask = (None if call == 0 else all_real) if pad is None else pad[:, None, None, :]
        out = softmax_mod.dropout_attention(q, k, v, attn_mask, p, ws)
        grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if padded:  # padded keys get no probability and no gradient
        assert torch.all(grads[1][0, :, 13:] == 0) and torch.all(grads[2][0, :, 13:] == 0)


def test_workspace_busy_or_reused_never_changes_gradients():
    """Two forwards before their backwards (the second gets its own memory), and a retained graph
    backpropagated again after a later forward took the memory (it recomputes): all gradients exact."""
    B, H, L, D, p = 2, 2, 12, 4, 0.2
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ws = softmax_mod.Workspace()

    def call(seed):
        torch.manual_seed(seed)
        return softmax_mod.dropout_attention(q, k, v, None, p, ws)

    def fresh_grads(seed):
        torch.manual_seed(seed)
        out = softmax_mod.dropout_attention(q, k, v, None, p)
        return torch.autograd.grad(out.sum(), (q, k, v))

    a, b = call(3), call(4)  # b finds the workspace taken by a
    assert not torch.allclose(a, b)  # another step: another mask
    for out, seed in ((b, 4), (a, 3)):
        for x, y in zip(torch.autograd.grad(out.sum(), (q, k, v)), fresh_grads(seed)):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    held = call(7)  # a graph that is never backpropagated holds the memory until it is freed
    att = softmax_mod.SoftmaxAttention(H, D, attn_dropout=p)
    att._workspace = ws
    copied = pickle.loads(pickle.dumps(att))  # the memory and its owner are not copied
    assert copied._workspace is not ws and copied._workspace.generation == 0
    generation = ws.generation
    del held
    a = call(5)  # the freed graph's memory is reused
    assert ws.generation == generation + 1
    first = torch.autograd.grad(a.sum(), (q, k, v), retain_graph=True)
    call(6).sum().backward()  # takes the workspace again
    for x, y, z in zip(torch.autograd.grad(a.sum(), (q, k, v)), first, fresh_grads(5)):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x, z, rtol=1e-12, atol=1e-12)


def test_attention_dropout_keep_rate_and_independence():
    """Read the keep mask off the backend itself (q = k = 0: uniform probabilities; V = identity: the
    output is keep / (L (1 - p))): drop rate quantized_p(p) within 4 standard deviations overall and per
    16-bit lane, a different mask in every call (layer, step), the same one under the same seed."""
    from models.attention.softmax import SoftmaxAttention

    B, H, L, p = 8, 4, 64, 0.1
    att = SoftmaxAttention(H, L, attn_dropout=p).train()
    q = torch.zeros(B, H, L, L, requires_grad=True)
    v = torch.eye(L).expand(B, H, L, L)

    def mask_of_one_call():
        out = att(q, q, v, None)
        return (out * L * (1 - quantized_p(p))).round().detach()  # (B, H, L, L), 1 = kept

    torch.manual_seed(0)
    m1, m2 = mask_of_one_call(), mask_of_one_call()
    assert set(m1.unique().tolist()) == {0.0, 1.0}
    n = m1.numel()
    sd = math.sqrt(p * (1 - p) / n)
    for m in (m1, m2):
        assert abs((1 - m.mean().item()) - quantized_p(p)) < 4 * sd
        lanes = 1 - m.reshape(-1, 4).mean(0)  # the four elements decided by one 64-bit draw
        assert torch.all((lanes - quantized_p(p)).abs() < 4 * sd * 2), lanes
    agree = (m1 == m2).float().mean().item()  # independent masks agree with prob (1-p)^2 + p^2
    assert abs(agree - ((1 - p) ** 2 + p ** 2)) < 4 * math.sqrt(0.18 * 0.82 / n)
    torch.manual_seed(0)
    assert torch.equal(mask_of_one_call(), m1)  # reproducible under the run's seed
    att.eval()
    torch.testing.assert_close(att(q, q, v, None), F.scaled_dot_product_attention(q, q, v))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dropout_attention_under_cpu_autocast(dtype):
    """precision=bf16 / 16-mixed: the path runs in the autocast dtype (as the matmuls would) and gives fp32
    inputs fp32 gradients; same draws as on inputs cast by hand, and near the fp32 result."""
    from models.attention.softmax import SoftmaxAttention

    att = SoftmaxAttention(2, 8, attn_dropout=0.1).train()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 16, 8, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 10:] = False
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=dtype):
        out = att(q, k, v, mask)
    assert out.dtype == dtype
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    assert all(x.dtype == torch.float32 for x in grads)
    low = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    torch.manual_seed(0)
    ref = att(*low, mask)
    assert torch.equal(out, ref)
    for x, y in zip(grads, torch.autograd.grad(ref.float().square().sum(), low)):
        assert torch.equal(x, y.float())
    torch.manual_seed(0)
    torch.testing.assert_close(out.float(), att(q, k, v, mask), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("recompute", [False, True])
def test_dropout_attention_odd_length_chunks_draw_their_own_words(monkeypatch, recompute):
    """S = 21 (not a multiple of 4), one (L, S) matrix a chunk: each chunk starts on a fresh 64-bit draw,
    and the result is the formula with that mask, stored or recomputed."""
    B, H, L, D, p = 1, 3, 21, 4, 0.25
    monkeypatch.setattr(softmax_mod, "CHUNK_ELEMENTS", L * L)
    monkeypatch.setattr(softmax_mod, "RECOMPUTE_CHUNK_ELEMENTS", L * L)
    monkeypatch.setattr(softmax_mod, "STORE_ELEMENTS", 0 if recompute else 10**9)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    torch.manual_seed(9)
    keep = torch.stack([random_words(L * L).view(L, L) >= keep_threshold(p) for _ in range(H)])[None].double()
    ref = _reference_with_mask(q, k, v, None, keep, p)
    torch.manual_seed(9)
    out = softmax_mod.dropout_attention(q, k, v, None, p)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_dropout_attention_fully_padded_element_keeps_every_key(monkeypatch):
    """A batch element with no real key: nothing is cut (its rows stay uniform over all keys, as the
    masked scores are all equal); the other element's matrices stop at its last real key."""
    B, H, L, D, p = 2, 1, 8, 4, 0.5
    monkeypatch.setattr(softmax_mod, "CHUNK_ELEMENTS", L * L)  # one (L, L) matrix a chunk
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, :3] = True
    keep = _keep_mask((B, H, L, L), p, seed=2, keys=[L, 3])
    ref = _reference_with_mask(q, k, v, pad, keep, p)
    torch.manual_seed(2)
    out = softmax_mod.dropout_attention(q, k, v, pad[:, None, None, :], p)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
