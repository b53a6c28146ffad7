"""Plain dense reference for the block/window-sparse backends (local, sparse, longformer, bigbird):
softmax over an explicit L x L allowed mask, and a check that a backend equals it in float64,
outputs and gradients, with and without key padding. Small L only."""
from __future__ import annotations

import math

import torch

B, H, DH = 2, 3, 4


def dense_masked_attention(q, k, v, allowed, key_padding_mask=None):
    """softmax(q kᵀ/√Dh) v where query i sees key j iff allowed[h, i, j] and j is real.
    q, k, v: (B, H, L, Dh); allowed: (H or 1, L, L) bool. A row that sees no key gives zeros."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, L, L)
    ok = allowed[None].expand_as(logits)
    if key_padding_mask is not None:
        ok = ok & key_padding_mask[:, None, None, :]
    seen = ok.any(-1, keepdim=True)
    logits = torch.where(seen, logits.masked_fill(~ok, float("-inf")), 0.0)
    return (logits.softmax(-1) * seen) @ v


def padding_mask(lengths, length):
    return torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]  # (B, L) True = real


def assert_matches_dense(backend, allowed, length, lengths=None, seed=0):
    """backend(q, k, v, mask) equals dense_masked_attention(allowed) in float64: outputs and the
    gradients of a random projection of the output with respect to q, k and v."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, length, DH, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = None if lengths is None else padding_mask(lengths, length)
    backend = backend.double()
    out = backend(q, k, v, mask)
    ref = dense_masked_attention(q, k, v, allowed, mask)
    assert out.shape == ref.shape and out.dtype == torch.float64
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    return out


def largest_tensors(backend, length, lengths=None):
    """Shapes of every op output (forward and backward) of backend on a (1, H, length, DH) input."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.shapes.append((str(func), tuple(t.shape)))
            return out

    q, k, v = (torch.randn(1, H, length, DH, requires_grad=True) for _ in range(3))
    mask = None if lengths is None else padding_mask(lengths, length)
    with Shapes() as mode:
        backend(q, k, v, mask).sum().backward()
    return mode.shapes


def assert_no_length_squared(backend, length, lengths=None):
    """No op output has two dimensions as long as the sequence (nothing L x L is materialised)."""
    shapes = largest_tensors(backend, length, lengths)
    big = [(f, s) for f, s in shapes if sum(d >= length for d in s) >= 2]
    assert shapes and not big, big[:3]
