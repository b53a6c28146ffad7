"""Longformer sliding window + global tokens (Beltagy et al. 2020) against the dense pattern."""
from __future__ import annotations

import pytest
import torch

from blocked_reference import DH, H, assert_matches_dense, assert_no_length_squared
from lra.testing.contract import CHECKS, backend_spec
from models.attention.base import AttentionConfigError
from models.attention.longformer import LongformerAttention


def longformer_pattern(length, window, num_global):
    """(1, L, L): j - i in [-(w - w//2 - 1), w//2], or i or j among the first num_global positions."""
    right = window // 2
    left = window - right - 1
    allowed = torch.zeros(1, length, length, dtype=torch.bool)
    for i in range(length):
        for j in range(length):
            allowed[0, i, j] = -left <= j - i <= right or i < num_global or j < num_global
    return allowed


@pytest.mark.parametrize(
    "window,g,length,lengths",
    [
        (5, 0, 16, None),  # odd window: 2 keys each side
        (4, 0, 15, [15, 6]),  # even window: 1 key before, 2 after
        (6, 1, 17, [17, 8]),  # one global token (the [CLS] setting)
        (3, 2, 13, None),
        (1, 0, 9, [9, 4]),  # each token only itself
        (9, 3, 20, [20, 2]),  # the globals include padding for example 2
        (512, 0, 22, [22, 9]),  # LRA's window, longer than the sequence: full softmax
        (2, 22, 22, [22, 5]),  # every token global: full softmax
    ],
)
def test_longformer_equals_dense_pattern(window, g, length, lengths):
    attn = LongformerAttention(H, DH, window=window, num_global=g)
    assert_matches_dense(attn, longformer_pattern(length, window, g), length, lengths)


def test_window_is_lra_convention():
    """w = 4: keys i-1 ... i+2 (LRA: left side incl. i gets w - w//2 = 2, right side w//2 = 2)."""
    pattern = longformer_pattern(10, 4, 0)[0]
    assert pattern[5].nonzero().flatten().tolist() == [4, 5, 6, 7]
    assert longformer_pattern(10, 5, 0)[0, 5].nonzero().flatten().tolist() == [3, 4, 5, 6, 7]


def test_padded_window_rows_are_zero_and_finite():
    """With window 3 and no globals, example 2's queries beyond position 3 see only padding."""
    attn = LongformerAttention(H, DH, window=3)
    out = assert_matches_dense(attn, longformer_pattern(12, 3, 0), 12, [12, 3])
    assert torch.equal(out[1, :, 4:], torch.zeros_like(out[1, :, 4:]))


@pytest.mark.parametrize("opts", [{"window": 0}, {"num_global": -1}])
def test_bad_options_refused_at_build(opts):
    with pytest.raises(AttentionConfigError, match="longformer"):
        LongformerAttention(H, DH, **opts)


@pytest.mark.parametrize("opts", [{"window": 128, "num_global": 2}, {"window": 33}])
def test_nothing_length_squared(opts):
    assert_no_length_squared(LongformerAttention(H, DH, **opts), 600, [600])


SMALL = [{"window": 5, "num_global": 2}, {"window": 8}]  # the yaml defaults are one block at the contract's length 22; these are not


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("opts", SMALL, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_contract_with_small_blocks(opts, check):
    check(backend_spec("longformer") | opts)
