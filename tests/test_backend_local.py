"""Block-local attention (LRA's "Local Attention") against the dense pattern written out plainly."""
from __future__ import annotations

import pytest
import torch

from blocked_reference import B, DH, H, assert_matches_dense, assert_no_length_squared, padding_mask
from lra.testing.contract import CHECKS, backend_spec
from models.attention.base import AttentionConfigError
from models.attention.local import LocalAttention


def local_pattern(length, block, look_back, look_ahead):
    """(1, L, L): query i sees key j iff block(j) is within [block(i) - look_back, block(i) + look_ahead]."""
    allowed = torch.zeros(1, length, length, dtype=torch.bool)
    for i in range(length):
        for j in range(length):
            allowed[0, i, j] = i // block - look_back <= j // block <= i // block + look_ahead
    return allowed


@pytest.mark.parametrize(
    "block,back,ahead,length,lengths",
    [
        (4, 0, 0, 16, None),  # LRA's default shape: own block only, length a multiple of the block
        (4, 0, 0, 13, [13, 6]),  # internal padding of the last block, plus key padding
        (5, 1, 0, 17, None),  # block and previous block
        (3, 1, 1, 10, [10, 4]),  # both neighbours
        (4, 0, 2, 16, [16, 3]),
        (50, 0, 0, 22, [22, 9]),  # one block longer than the sequence: full softmax
    ],
)
def test_local_equals_dense_pattern(block, back, ahead, length, lengths):
    attn = LocalAttention(H, DH, block_size=block, look_back=back, look_ahead=ahead)
    assert_matches_dense(attn, local_pattern(length, block, back, ahead), length, lengths)


def test_block_of_padding_gives_zeros_not_nan():
    """Example 2 has 3 real tokens: its blocks 1 and 2 hold only padding, so their queries see no key."""
    attn = LocalAttention(H, DH, block_size=4)
    out = assert_matches_dense(attn, local_pattern(12, 4, 0, 0), 12, [12, 3])
    assert torch.equal(out[1, :, 4:], torch.zeros_like(out[1, :, 4:]))


def test_padding_never_reaches_real_positions():
    attn = LocalAttention(H, DH, block_size=4, look_back=1).eval()
    q, k, v = (torch.randn(B, H, 14, DH) for _ in range(3))
    mask = padding_mask([14, 7], 14)
    out = attn(q, k, v, mask)
    noise = 9.0 * torch.randn(B, H, 14, DH) * ~mask[:, None, :, None]
    out2 = attn(q + noise, k - noise, v + noise, mask)
    real = mask[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], out2[real])


@pytest.mark.parametrize("opts", [{"block_size": 0}, {"look_back": -1}, {"look_ahead": -2}])
def test_bad_options_refused_at_build(opts):
    with pytest.raises(AttentionConfigError, match="local"):
        LocalAttention(H, DH, **opts)


@pytest.mark.parametrize("opts", [{}, {"block_size": 16, "look_back": 1, "look_ahead": 1}])
def test_nothing_length_squared(opts):
    assert_no_length_squared(LocalAttention(H, DH, **opts), 600, [600])


SMALL = [{"block_size": 4}, {"block_size": 5, "look_back": 1}, {"block_size": 3, "look_back": 1, "look_ahead": 1}]  # the yaml defaults are one block at the contract's length 22; these are not


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("opts", SMALL, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_contract_with_small_blocks(opts, check):
    check(backend_spec("local") | opts)
