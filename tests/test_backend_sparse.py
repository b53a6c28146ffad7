"""Sparse Transformer fixed pattern (Child et al. 2019) against the dense pattern written out plainly."""
from __future__ import annotations

import pytest
import torch

from blocked_reference import DH, H, assert_matches_dense, assert_no_length_squared, dense_masked_attention
from lra.testing.contract import CHECKS, backend_spec
from models.attention.base import AttentionConfigError
from models.attention.sparse import SparseAttention


def fixed_pattern(length, stride, c, causal=False):
    """(1, L, L): A1 (same stride block) or A2 (j mod l in the last c positions), and j <= i if causal."""
    allowed = torch.zeros(1, length, length, dtype=torch.bool)
    for i in range(length):
        for j in range(length):
            ok = i // stride == j // stride or j % stride >= stride - c
            allowed[0, i, j] = ok and (j <= i or not causal)
    return allowed


@pytest.mark.parametrize(
    "stride,c,causal,length,lengths",
    [
        (4, 1, False, 16, None),
        (4, 2, False, 14, [14, 5]),  # partial last block, key padding
        (5, 2, True, 17, [17, 9]),  # LRA's causal reading
        (3, 1, True, 12, None),
        (6, 6, False, 13, [13, 2]),  # c = l: every column is a summary column, i.e. full softmax
        (50, 10, False, 22, [22, 9]),  # LRA's defaults, one block longer than the sequence
        # many summary columns: queries are processed in chunks of several stride blocks
        (2, 1, False, 40, [40, 13]),
        (2, 2, True, 64, [64, 30]),
        (3, 2, False, 61, [61, 20]),
        (4, 1, True, 150, [150, 77]),
    ],
)
def test_sparse_equals_dense_pattern(stride, c, causal, length, lengths):
    attn = SparseAttention(H, DH, block_size=stride, summary=c, causal=causal)
    assert_matches_dense(attn, fixed_pattern(length, stride, c, causal), length, lengths)


def test_summary_columns_counted_once():
    """A query in block b sees b's summary columns through A1 and A2; the softmax must count them once.
    With v = 1 at one summary column and 0 elsewhere, the output is that column's weight exactly."""
    L, stride, c = 8, 4, 2
    q, k = torch.zeros(1, 1, L, 1, dtype=torch.float64), torch.zeros(1, 1, L, 1, dtype=torch.float64)
    v = torch.zeros(1, 1, L, 1, dtype=torch.float64)
    v[0, 0, 3] = 1.0  # a summary column of block 0
    out = SparseAttention(1, 1, block_size=stride, summary=c).double()(q, k, v)
    # query 0 sees block 0 (4 keys) + block 1's summary columns (2 keys): uniform weights 1/6
    assert out[0, 0, 0, 0].item() == pytest.approx(1 / 6)
    torch.testing.assert_close(out, dense_masked_attention(q, k, v, fixed_pattern(L, stride, c)))


def test_all_padding_rows_are_zero_and_finite():
    """Example 2 has one real token (position 0, not a summary column): its queries from position 4
    on see only padding (their block and the summary columns 3 and 7), so they return zeros."""
    attn = SparseAttention(H, DH, block_size=4, summary=1, causal=True)
    out = assert_matches_dense(attn, fixed_pattern(12, 4, 1, True), 12, [12, 1])
    assert torch.equal(out[1, :, 4:], torch.zeros_like(out[1, :, 4:]))
    assert (out[1, :, :4] != 0).all()


@pytest.mark.parametrize("opts", [{"block_size": 0}, {"summary": 0}, {"block_size": 4, "summary": 5}])
def test_bad_options_refused_at_build(opts):
    with pytest.raises(AttentionConfigError, match="sparse"):
        SparseAttention(H, DH, **opts)


@pytest.mark.parametrize("opts", [{}, {"block_size": 25, "summary": 2, "causal": True}])
def test_nothing_length_squared(opts):
    assert_no_length_squared(SparseAttention(H, DH, **opts), 600, [600])


SMALL = [{"block_size": 4, "summary": 1}, {"block_size": 2, "summary": 1, "causal": True}]  # the yaml defaults are one block at the contract's length 22; these are not


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("opts", SMALL, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_contract_with_small_blocks(opts, check):
    check(backend_spec("sparse") | opts)
