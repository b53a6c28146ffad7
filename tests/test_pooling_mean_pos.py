"""`mean_pos` pooling (the default recipe's head): mean over real tokens plus a learned weight per position."""
from __future__ import annotations

import pytest
import torch

from models.classifier import build_model
from models.heads import pool


def test_mean_pos_is_the_mean_at_zero_weights_and_adds_weighted_real_positions():
    states = torch.randn(2, 5, 3)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    w = torch.zeros(7)
    assert torch.allclose(pool(states, mask, "mean_pos", w), pool(states, mask, "mean"))
    w[0], w[4] = 2.0, 5.0  # position 4 is padding in the second example: it must not count there
    want = pool(states, mask, "mean") + 2.0 * states[:, 0]
    want[0] += 5.0 * states[0, 4]
    assert torch.allclose(pool(states, mask, "mean_pos", w), want, atol=1e-6)


@pytest.mark.parametrize("head", ["pooled", "dual"])
def test_mean_pos_head_learns_its_weights_and_ignores_padding(head):
    torch.manual_seed(0)
    net = build_model(head=head, vocab_size=9, num_classes=3, max_len=12, attention={"_target_": "models.attention.softmax.SoftmaxAttention"},
                      dim=16, depth=1, heads=2, head_dim=8, ffn_dim=16, pooling="mean_pos").eval()
    assert net.pos_weight.shape == (12,) and not net.pos_weight.any()
    ids = torch.randint(1, 9, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    batch = {"input_ids": ids, "mask": mask, "input_ids2": ids.flip(0), "mask2": mask.flip(0)}
    net(batch).sum().backward()
    assert net.pos_weight.grad is not None and net.pos_weight.grad.abs().sum() > 0
    with torch.no_grad():
        net.pos_weight.normal_()
        out = net(batch)
        other = dict(batch, input_ids=ids.masked_fill(~mask, 5), input_ids2=ids.flip(0).masked_fill(~mask.flip(0), 5))
        assert torch.allclose(out, net(other), atol=1e-5)
