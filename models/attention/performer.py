"""Performer attention: FAVOR+ (Choromanski et al., "Rethinking Attention with Performers", ICLR 2021).

    out_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / φ(q_i)ᵀ Σ_j φ(k_j)       (j over real keys only)

softmax kernel: φ(x) = exp(ω x − |x|²/2) / √m with x = q / Dh^¼ (so ω·q ω·k estimates exp(q·k/√Dh)),
ω the rows of a positive orthogonal random projection (m, Dh). relu kernel: φ(x) = relu(ω x) + ε
(the setting of the Nyströmformer paper's LRA runs). Cost is linear in L; nothing is L x L.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from models.attention.base import AttentionBackend, AttentionConfigError

RELU_EPS = 1e-3  # keeps relu-feature normalisers positive (the Performer paper's generalized-kernel epsilon)
KERNELS = ("softmax", "relu")


def orthogonal_features(
    num_features: int, head_dim: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(num_features, head_dim) Gaussian rows made orthogonal in blocks of head_dim (QR), each row
    rescaled to the norm of an independent Gaussian vector, so rows stay marginally N(0, I)."""
    blocks = []
    for _ in range(-(-num_features // head_dim)):
        g = torch.randn(head_dim, head_dim, generator=generator)
        q, r = torch.linalg.qr(g)  # columns orthonormal
        q = q * torch.sign(torch.diagonal(r))  # fix the signs so that q is Haar-distributed (unbiased)
        blocks.append(q.T)
    w = torch.cat(blocks)[:num_features]  # (m, Dh) unit rows
    norms = torch.randn(num_features, head_dim, generator=generator).norm(dim=1)
    return w * norms[:, None]


def favor_features(
    x: torch.Tensor,
    projection: torch.Tensor,
    kernel: str,
    is_query: bool,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Random features (B, H, L, m) of queries or keys x (B, H, L, Dh), for logits scaled by 1/√Dh.

    Softmax kernel, stabilised by a max subtracted per query row (queries) or per example and head
    over the real keys (keys): both factors cancel between numerator and normaliser, as do the
    query's exp(-|q|²/2) and the constant 1/√m, which are left out. Padded keys (mask False) get
    all-zero features. One GEMM plus in-place elementwise passes."""
    B, H, L, D = x.shape
    w = projection * D**-0.25  # (m, Dh): folds the x / Dh^¼ scaling into the projection
    x2 = x.reshape(B * H * L, D)  # (B*H*L, Dh); in-place steps below act on 2-D bases, never on views
    if kernel == "relu":
        feats = (torch.relu(x2 @ w.T) + RELU_EPS).view(B, H, L, -1)  # (B, H, L, m)
        if key_padding_mask is not None:
            feats = feats * key_padding_mask[:, None, :, None].to(feats.dtype)
        return feats
    if is_query:
        z = x2 @ w.T  # (B*H*L, m)
        return z.sub_(z.detach().amax(-1, keepdim=True)).exp_().view(B, H, L, -1)
    half_sq = x2.square().sum(-1, keepdim=True).mul_(-0.5 * D**-0.5)  # (B*H*L, 1): -|x/Dh^¼|²/2
    z = torch.addmm(half_sq, x2, w.T)  # (B*H*L, m)
    if key_padding_mask is not None:
        pad_rows = (~key_padding_mask)[:, None, :].expand(B, H, L).reshape(-1, 1)  # (B*H*L, 1)
        z = z.masked_fill_(pad_rows, float("-inf"))
    peak = z.detach().view(B, H, L * z.shape[-1]).amax(-1)  # (B, H): per example and head
    z = z.sub_(peak[:, :, None].expand(B, H, L).reshape(-1, 1))  # (B*H*L, m)
    return z.exp_().view(B, H, L, -1)  # exp(-inf) = 0 for padded keys


def performer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    kernel: str = "softmax",
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """FAVOR+ attention. q, k, v: (B, H, L, Dh); projection: (m, Dh); mask (B, L) bool, True = real.
    Returns (B, H, L, Dh) in q's dtype; features and sums run in at least fp32 with autocast off."""
    if kernel not in KERNELS:
        raise AttentionConfigError(f"performer: kernel must be one of {KERNELS}, got '{kernel}'")
    acc = torch.promote_types(q.dtype, torch.float32)
    D = q.shape[-1]
    with torch.autocast(device_type=q.device.type, enabled=False):
        w = projection.to(acc)
        qf = favor_features(q.to(acc), w, kernel, True)  # (B, H, L, m)
        kf = favor_features(k.to(acc), w, kernel, False, key_padding_mask)  # (B, H, L, m)
        ones = torch.ones(*v.shape[:-1], 1, dtype=acc, device=v.device)
        v1 = torch.cat([v.to(acc), ones], -1)  # (B, H, L, Dh + 1): last column sums the normaliser
        kv_t = torch.matmul(v1.transpose(-1, -2), kf)  # (B, H, Dh + 1, m); this order keeps the
        out = torch.matmul(qf, kv_t.transpose(-1, -2))  # (B, H, L, Dh + 1)  feature grads contiguous
        num, den = out[..., :D], out[..., D:]
        out = num / den.clamp_min(torch.finfo(acc).tiny)
    return out.to(q.dtype)


class PerformerAttention(AttentionBackend):
    """FAVOR+ with positive orthogonal random features, one projection shared by the heads.

    forward(q, k, v, key_padding_mask) -> (B, H, L, Dh); mask (B, L) bool, True = real token.
    Options: num_features (m), kernel ('softmax' | 'relu'), redraw (new features at every training
    forward, from torch's global RNG), feature_seed (draw the initial features from a private
    generator with this seed; None = torch's global RNG, which the run seeds). The features live in
    the `projection` buffer, so a checkpoint restores them.
    """

    name = "performer"
    mixed_precision: ClassVar[str] = "random features, sums and the normalisation run in fp32 with autocast off"

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        max_len: int | None = None,
        num_features: int = 256,
        kernel: str = "softmax",
        redraw: bool = False,
        feature_seed: int | None = None,
    ) -> None:
        super().__init__(num_heads, head_dim, max_len)
        if kernel not in KERNELS:
            raise AttentionConfigError(f"performer: kernel must be one of {KERNELS}, got '{kernel}'")
        if num_features < 1:
            raise AttentionConfigError(f"performer: num_features must be >= 1, got {num_features}")
        self.num_features, self.kernel, self.redraw = num_features, kernel, redraw
        gen = None if feature_seed is None else torch.Generator().manual_seed(feature_seed)
        self.register_buffer("projection", orthogonal_features(num_features, head_dim, gen))  # (m, Dh)

    @torch.no_grad()
    def redraw_features(self) -> None:
        """Replace the projection by a fresh draw from torch's global RNG."""
        new = orthogonal_features(self.num_features, self.head_dim)
        self.projection.copy_(new.to(self.projection.device, self.projection.dtype))

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.redraw and self.training:
            self.redraw_features()
        return performer_attention(q, k, v, self.projection, self.kernel, key_padding_mask)

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, kernel={self.kernel}, redraw={self.redraw}"
