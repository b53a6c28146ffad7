"""The model code's shortcuts compute what the plain formulas compute: the unmasked run of a batch
without padding, the per-part q/k/v projections, pooling as one weighted product, and the Nyström
landmark count without a mask. Tiny sizes; every discovered backend where a backend is involved."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lra.config import attention_spec, backend_names
from models.attention.linformer import SHARING
from models.attention.nystrom import nonempty_landmarks
from models.classifier import build_model
from models.heads import pool
from models.multihead import MultiHeadAttention

B, L, DIM = 2, 16, 8


def _tiny(name: str) -> torch.nn.Module:
    spec = {k: v for k, v in attention_spec(name).items() if k != "name"}
    torch.manual_seed(0)
    return build_model(head="pooled", vocab_size=11, num_classes=3, max_len=L, attention=spec, dim=DIM,
                       depth=2, heads=2, head_dim=4, ffn_dim=16, dropout=0.1).double().train()


def _run(net: torch.nn.Module, forward) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(1)  # the same dropout and backend draws for both runs
    net.zero_grad(set_to_none=True)
    out = forward()
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("name", backend_names())
def test_a_batch_without_padding_runs_unmasked_with_the_same_outputs_and_gradients(name, padded):
    """Encoder drops an all-True mask before the layers; the layers with that mask give the same (and
    a padded batch's mask still reaches them)."""
    net = _tiny(name)
    enc = net.encoder
    ids = torch.randint(1, 11, (B, L), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(B, L, dtype=torch.bool)
    if padded:
        mask[1, L // 2:] = False

    def masked_layers() -> torch.Tensor:  # Encoder.forward with the mask handed to every layer
        x = enc.drop(enc.embed(ids) + enc.pos[:, :L])
        for block in enc.blocks:
            x = block(x, mask)
        return net.mlp(pool(enc.norm(x), mask, net.pooling))

    fast, fast_grads = _run(net, lambda: net({"input_ids": ids, "mask": mask}))
    ref, ref_grads = _run(net, masked_layers)
    torch.testing.assert_close(fast, ref)
    assert len(fast_grads) == len(ref_grads)
    for got, want in zip(fast_grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_qkv_parts_are_the_fused_projection():
    """q, k, v from the three row blocks of the fused weight equal one fused Linear split into heads."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(DIM, 2, {"_target_": "models.attention.softmax.SoftmaxAttention"}, head_dim=4).double()
    seen = {}
    mha.attn.forward = lambda q, k, v, mask: seen.update(q=q, k=k, v=v) or q  # record what the backend gets
    x = torch.randn(B, L, DIM, dtype=torch.float64, requires_grad=True)
    mha(x)
    fused = F.linear(x, mha.qkv.weight, mha.qkv.bias).view(B, L, 3, 2, 4).permute(2, 0, 3, 1, 4)  # (3, B, H, L, Dh)
    for i, part in enumerate("qkv"):
        torch.testing.assert_close(seen[part], fused[i])
    grads = torch.autograd.grad(sum((seen[p] * (i + 1)).sum() for i, p in enumerate("qkv")), (x, mha.qkv.weight))
    want = torch.autograd.grad(sum((fused[i] * (i + 1)).sum() for i in range(3)), (x, mha.qkv.weight))
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("mode", ["mean", "mean_padded", "mean_pos"])
def test_pooling_is_the_plain_masked_sum(mode):
    g = torch.Generator().manual_seed(3)
    states = torch.randn(B, L, DIM, dtype=torch.float64, generator=g, requires_grad=True)
    mask = torch.arange(L)[None] < torch.tensor([L, 5])[:, None]
    pos_weight = torch.randn(L, dtype=torch.float64, generator=g, requires_grad=True)
    m = mask[..., None].double()  # (B, L, 1)
    plain = {"mean": (states * m).sum(1) / m.sum(1), "mean_padded": (states * m).sum(1) / L,
             "mean_pos": (states * m).sum(1) / m.sum(1) + (states * m * pos_weight[:, None]).sum(1)}[mode]
    ours = pool(states, mask, mode, pos_weight)
    torch.testing.assert_close(ours, plain)
    gy = torch.randn_like(ours)
    inputs = (states, pos_weight) if mode == "mean_pos" else (states,)
    for got, want in zip(torch.autograd.grad(ours, inputs, gy), torch.autograd.grad(plain, inputs, gy)):
        torch.testing.assert_close(got, want)


def test_nonempty_landmarks_without_a_mask_counts_segments_of_the_padded_length():
    """100 tokens in 64 segments of 2 slots: the last 14 segments are padding only, mask or no mask."""
    full = torch.ones(3, 100, dtype=torch.bool)
    for segments in ("padded", "real"):
        assert nonempty_landmarks(None, 3, 100, 64, segments).tolist() == \
            nonempty_landmarks(full, 3, 100, 64, segments).tolist()
    assert nonempty_landmarks(None, 3, 100, 64, "padded").tolist() == [50] * 3


@pytest.mark.parametrize("sharing", SHARING)
def test_linformer_keys_and_values_from_the_input_match_forward(sharing):
    """In the model, Linformer projects the layer's input along the length and then maps it to keys and
    values (`forward_from_input`); for every sharing mode that is `forward` on the wrapper's k, v: outputs
    and gradients, masked and not, at max_len and shorter (the contract's check, at each sharing)."""
    from lra.testing.contract import backend_spec, check_forward_from_input

    check_forward_from_input({**backend_spec("linformer"), "sharing": sharing, "proj_dim": 5})
