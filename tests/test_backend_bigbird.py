"""BigBird block-sparse attention (Zaheer et al. 2020) against the dense pattern written out plainly."""
from __future__ import annotations

import pytest
import torch

from blocked_reference import DH, H, assert_matches_dense, assert_no_length_squared
from lra.testing.contract import CHECKS, backend_spec
from models.attention.base import AttentionConfigError
from models.attention.bigbird import BigBirdAttention


def bigbird_pattern(length, block, random_blocks):
    """(H, L, L) from the block rule: window |bi - bj| <= 1, global first/last block (both ways), and
    the random blocks random_blocks[h, bi] (-1 = none)."""
    nb = -(-length // block)
    heads = random_blocks.shape[0]
    allowed = torch.zeros(heads, length, length, dtype=torch.bool)
    for h in range(heads):
        for i in range(length):
            for j in range(length):
                bi, bj = i // block, j // block
                ok = abs(bi - bj) <= 1 or bi in (0, nb - 1) or bj in (0, nb - 1)
                allowed[h, i, j] = ok or bj in random_blocks[h, bi].tolist()
    return allowed


@pytest.mark.parametrize(
    "block,r,length,lengths",
    [
        (2, 1, 16, None),  # 8 blocks, one random block per row
        (3, 2, 25, [25, 11]),  # 9 blocks, the last partial, key padding
        (2, 3, 20, [20, 7]),
        (4, 5, 22, None),  # 6 blocks: fewer candidates than r in some rows
        (3, 0, 14, [14, 6]),  # no random blocks
        (64, 3, 22, [22, 9]),  # LRA's block size: one block, all global: full softmax
    ],
)
def test_bigbird_equals_dense_pattern(block, r, length, lengths):
    torch.manual_seed(block * 10 + r)
    attn = BigBirdAttention(H, DH, block_size=block, num_random_blocks=r)
    nb = -(-length // block)
    rand = attn.random_blocks(nb)
    assert rand.shape == (H, nb, r)
    assert_matches_dense(attn, bigbird_pattern(length, block, rand), length, lengths)


def test_random_blocks_follow_the_rules():
    torch.manual_seed(0)
    attn = BigBirdAttention(4, DH, block_size=8, num_random_blocks=3)
    nb = 20
    rand = attn.random_blocks(nb)
    for h in range(4):
        for i in range(nb):
            picked = [j for j in rand[h, i].tolist() if j >= 0]
            if i in (0, nb - 1):
                assert picked == []  # global rows see everything already
                continue
            assert len(picked) == 3 and len(set(picked)) == 3
            assert all(abs(i - j) > 1 and j not in (0, nb - 1) for j in picked)
    assert not all(torch.equal(rand[0], rand[h]) for h in range(1, 4))  # drawn per head
    torch.testing.assert_close(attn.random_blocks(nb), rand, atol=0, rtol=0)  # fixed across forwards


def test_random_pattern_drawn_at_build_from_the_seeded_rng():
    torch.manual_seed(5)
    a = BigBirdAttention(H, DH, block_size=2)
    torch.manual_seed(5)
    b = BigBirdAttention(H, DH, block_size=2)
    c = BigBirdAttention(H, DH, block_size=2)  # next draw: another layer, another pattern
    assert torch.equal(a.random_blocks(30), b.random_blocks(30))
    assert not torch.equal(a.random_blocks(30), c.random_blocks(30))
    c.load_state_dict(a.state_dict())  # the checkpoint carries the pattern
    assert torch.equal(a.random_blocks(30), c.random_blocks(30))


def test_mostly_padded_example_stays_finite():
    """Example 2 has 2 real tokens (block 0). Its middle blocks' rows still see block 0 (global),
    so no row is empty; the outputs stay finite and equal the reference."""
    torch.manual_seed(1)
    attn = BigBirdAttention(H, DH, block_size=2, num_random_blocks=1)
    out = assert_matches_dense(attn, bigbird_pattern(12, 2, attn.random_blocks(6)), 12, [12, 2])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("opts", [{"block_size": 0}, {"num_random_blocks": -1}])
def test_bad_options_refused_at_build(opts):
    with pytest.raises(AttentionConfigError, match="bigbird"):
        BigBirdAttention(H, DH, **opts)


@pytest.mark.parametrize("opts", [{}, {"block_size": 16, "num_random_blocks": 2}])
def test_nothing_length_squared(opts):
    assert_no_length_squared(BigBirdAttention(H, DH, **opts), 600, [600])


SMALL = [{"block_size": 3, "num_random_blocks": 2}, {"block_size": 2, "num_random_blocks": 1}]  # the yaml defaults are one block at the contract's length 22; these are not


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("opts", SMALL, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_contract_with_small_blocks(opts, check):
    check(backend_spec("bigbird") | opts)
