"""The hand-written autograd functions behind Nyström attention (models/attention/_nystrom_kernels.py)
against the plain ops they replace: the same outputs and gradients (float64 gradcheck at tiny sizes),
and the whole layer equal to its plain-ops path (the one torch.compile traces) over its options, with
padding and lengths that are no multiple of anything."""
from __future__ import annotations

import itertools

import pytest
import torch

from models.attention import _nystrom_kernels as kern
from models.attention.nystrom import NystromAttention, depthwise_seq_conv

B, H, DH = 2, 2, 3


def blhd(L: int, dtype=torch.float64) -> torch.Tensor:
    """A (B, H, L, Dh) leaf laid out (B, L, H, Dh), as the multi-head wrapper's q/k/v views are."""
    return torch.randn(B, L, H, DH, dtype=dtype).transpose(1, 2).detach().requires_grad_()


def lengths_mask(L: int, lengths: tuple[int, ...]) -> torch.Tensor:
    return torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]  # (B, L), True = real


def blhd_strides(t: torch.Tensor) -> bool:
    """Whether t (B, H, L, Dh) is laid out (B, L, H, Dh) in memory."""
    Bt, Ht, L, D = t.shape
    return t.stride() == (L * Ht * D, D, Ht * D, 1)


@pytest.mark.parametrize("L,kernel,block", [(21, 5, 4), (16, 3, 16), (9, 9, 4), (40, 21, 8)])
def test_conv_skip_add_is_the_sum_and_keeps_the_layouts(L, kernel, block):
    """x + conv(v) written by the convolution: equal to the separate sum, in x's layout; V's gradient in
    (B, L, H, Dh) memory and zero at padded tokens; gradcheck for x, v and the filters."""
    x, v = blhd(L), blhd(L)
    w = torch.randn(H, kernel, dtype=torch.float64, requires_grad=True)
    for mask in (None, lengths_mask(L, (L, L // 2))):
        out = kern.conv_skip_add(x, v, w, mask, block)
        torch.testing.assert_close(out, x + depthwise_seq_conv(v, w, mask, block))
        assert out.stride() == x.stride() and blhd_strides(depthwise_seq_conv(v, w, mask, block))
        gx, gv, gw = torch.autograd.grad(out, (x, v, w), torch.randn_like(out))
        assert blhd_strides(gv)
        if mask is not None:
            assert (gv.transpose(1, 2)[~mask] == 0).all()  # padded tokens of V get no gradient
        assert torch.autograd.gradcheck(lambda x, v, w, m=mask: kern.conv_skip_add(x, v, w, m, block), (x, v, w))
    contiguous = v.detach().contiguous().requires_grad_()  # any input layout gives the same values
    torch.testing.assert_close(depthwise_seq_conv(contiguous, w, None, block), depthwise_seq_conv(v, w, None, block))


def plain_iteration(a, z, eye, iterations):
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


@pytest.mark.parametrize("iterations", [1, 3, 6])
def test_pinv_iterations_backward_is_the_iterations_gradient(iterations):
    """The hand-written backward against autograd through the iteration written plainly, and gradcheck,
    with Z0 depending on A (the gradient reaches A through Z0 as well)."""
    torch.manual_seed(iterations)
    a = torch.softmax(torch.randn(3, 6, 6, dtype=torch.float64), -1).requires_grad_()
    eye = torch.eye(6, dtype=torch.float64)
    z0 = lambda a: a.mT / (a.abs().sum(-2).amax(-1) * a.abs().sum(-1).amax(-1))[:, None, None]  # noqa: E731
    ours = kern.pinv_iterations(a, z0(a), eye, iterations)
    ref = plain_iteration(a, z0(a), eye, iterations)
    torch.testing.assert_close(ours, ref)
    g = torch.randn_like(ours)
    torch.testing.assert_close(torch.autograd.grad(ours, a, g), torch.autograd.grad(ref, a, g))
    zz = z0(a).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, z: kern.pinv_iterations(a, z, eye, iterations), (a, zz))


OPTIONS = [{}, {"segments": "real"}, {"pad_in_landmarks": True}, {"pinv_init": "batch"}, {"conv_kernel": 0},
           {"pinv_iterations": None}]


@pytest.mark.parametrize("L,m,opts", list(itertools.product((13, 24), (4, 5), OPTIONS)))
def test_layer_equals_its_plain_ops_path(monkeypatch, L, m, opts):
    """The eager layer and the plain-ops path torch.compile traces (the pseudo-inverse's; the conv skip
    runs as it is): the same outputs and gradients, masked and not; padded positions never change real
    positions' outputs."""
    torch.manual_seed(L * m)
    attn = NystromAttention(H, DH, num_landmarks=m, conv_kernel=opts.pop("conv_kernel", 3), **opts).double()
    q, k, v = blhd(L), blhd(L), blhd(L)
    g = torch.randn(B, H, L, DH, dtype=torch.float64)
    params = [q, k, v, *attn.parameters()]
    for mask in (None, lengths_mask(L, (L, L - 6))):
        eager = attn(q, k, v, mask)
        eager_grads = torch.autograd.grad(eager, params, g)
        with monkeypatch.context() as mp:
            mp.setattr(torch.compiler, "is_compiling", lambda: True)
            plain = attn(q, k, v, mask)
            plain_grads = torch.autograd.grad(plain, params, g)
        torch.testing.assert_close(eager, plain)
        for a, b in zip(eager_grads, plain_grads):
            torch.testing.assert_close(a, b)
        if mask is not None:  # garbage at padded tokens changes nothing at real ones
            noisy = [t.detach().masked_fill(~mask[:, None, :, None], 1e3) for t in (q, k, v)]
            out = attn(*noisy, mask)
            real = mask[:, None, :, None].expand_as(out)
            torch.testing.assert_close(out[real], eager.detach()[real])


@pytest.mark.parametrize("L,m,pad_in_means", list(itertools.product((24, 26), (4, 6), (False, True))))
def test_segment_means_are_the_means_of_real_tokens_in_either_layout(L, m, pad_in_means):
    """Landmarks (the weighted-sum path when segments tile L, the masked-sum path otherwise) equal the
    per-segment loop of their definition, values and gradients, for q/k laid out (B, L, H, Dh) as the
    wrapper's views are and (B, H, L, Dh) contiguous, masked and not; gradients at padded tokens are zero
    and (when segments tile L) keep the input's memory order."""
    from models.attention.nystrom import segment_means

    torch.manual_seed(L + m)
    seg = -(-L // m)
    for mask in (None, lengths_mask(L, (L, L - 9))):
        real = torch.ones(B, L, dtype=torch.bool) if mask is None else mask
        for x in (blhd(L), torch.randn(B, H, L, DH, dtype=torch.float64, requires_grad=True)):
            got, got_mask = segment_means(x, mask, m, pad_in_means)
            want = torch.zeros(B, H, m, DH, dtype=torch.float64)
            nonempty = torch.zeros(B, m, dtype=torch.bool)
            for b, j in itertools.product(range(B), range(m)):
                rows = [r for r in range(j * seg, min(L, (j + 1) * seg)) if real[b, r]]
                nonempty[b, j] = bool(rows)
                if rows:
                    want[b, :, j] = x[b, :, rows].sum(1) / (seg if pad_in_means else len(rows))
            torch.testing.assert_close(got, want)
            if got_mask is None:  # None: every landmark is kept
                assert pad_in_means or nonempty.all()
            else:
                assert not pad_in_means and torch.equal(got_mask, nonempty)
            g = torch.randn_like(want)
            (grad,) = torch.autograd.grad(got, x, g)
            (want_grad,) = torch.autograd.grad(want, x, g)
            torch.testing.assert_close(grad, want_grad)
            assert not grad.masked_select(~real[:, None, :, None]).any()
            if blhd_strides(x) and L % m == 0:  # the weighted-sum path writes x's own layout
                assert blhd_strides(grad)
