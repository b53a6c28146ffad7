"""Exact softmax attention.

Without attention dropout: PyTorch's fused `scaled_dot_product_attention` (no L x L tensor on its
memory-efficient and flash paths). With attention dropout in training, SDPA on a CPU falls back to
its math path, which stores the whole (B, H, L, L) probability matrix and draws one Bernoulli sample
per entry (measured 3-7x slower than without dropout at L = 512). Here instead a hand-written autograd
function (`_DropoutAttention`) works in chunks of at most `CHUNK_ELEMENTS` scores: whole (L, S) score
matrices of a few (batch, head) rows, or blocks of queries of one row when a matrix is larger. Each
chunk's probabilities P are dropped with the word-based sampler of `models.dropout`: one 16-bit word
per probability, drawn from the global generator (reproducible under the run's seed, new words in every
layer and step), landing on the probabilities in (B, H, L, S) order whatever the chunks (exactly so
when S is a multiple of 4; otherwise each chunk starts on a fresh 64-bit draw); an element is
dropped with probability `quantized_p(p)` (p rounded to a multiple of 1/65536: 0.1 -> 0.1000061), kept
ones scaled by 1 / (1 - that). Every step writes into buffers reused from chunk to chunk (and, through a
`Workspace`, from call to call), the 1 / (1 - p) is folded into V, and backward uses
dS = D * dD - P * rowsum(dO * O) (D = P times the keep mask, dD = dO Vᵀ), so no softmax-backward pass.
With key padding, a chunk's matrices stop at its rows' last real key: later keys have probability 0
exactly (so the same function), and get no words.
Up to `STORE_ELEMENTS` scores in all, P and D are kept for backward; above, backward recomputes them
chunk by chunk, replaying the same words, so memory stays O(chunk). Eval, and devices other than a
CPU, use SDPA.
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from models.attention.base import AttentionBackend
from models.dropout import keep_threshold, quantized_p, random_words

CHUNK_ELEMENTS = 2**20  # scores per chunk when P and D are stored (4 MB fp32; 2**18..2**20 measured best at L = 512)
RECOMPUTE_CHUNK_ELEMENTS = 2**18  # per chunk when they are recomputed (long inputs; 2**17..2**18 best at L = 2,048)
STORE_ELEMENTS = 2**26  # above this many scores in all, P and D are recomputed in backward


class Workspace:
    """Memory a `SoftmaxAttention` keeps from call to call: freshly allocated tensors of many MB cost a
    page fault per 4 kB on first touch (measured: as long as the multiplies they hold). The stored P and
    D belong to one call until its backward has run (or its graph is freed); a call that finds them
    taken gets fresh memory of its own, so reuse never changes a result."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}
        self._owner: weakref.ref | None = None  # the autograd node whose backward still needs "P", "D"
        self.generation = 0  # bumped whenever "P", "D" are handed out again

    def __getstate__(self) -> dict:  # copies and pickles of a module start empty: memory is not state
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()  # type: ignore[misc]

    def get(self, name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat buffer of n elements (contents undefined)."""
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._bufs[name] = torch.empty(n, dtype=dtype)
        return buf[:n]

    def claim(self, owner: object) -> "Workspace":
        """This workspace if its stored P and D are free (then owned by `owner`), else a fresh one."""
        if self._owner is not None and self._owner() is not None:
            return Workspace()
        self._owner = weakref.ref(owner)
        self.generation += 1
        return self

    def release(self, owner: object) -> None:
        if self._owner is not None and self._owner() is owner:
            self._owner = None


class _Chunks:
    """Shared state of one call: q pre-scaled by 1/√Dh, V pre-scaled by 1/(1 - p), the key-padding bias,
    and the chunks. All 3-D with batch BH = B*H; keys S. A chunk is (b0, b1, i0, i1, keys, offset): rows
    b0:b1 of the batch, queries i0:i1, the first `keys` keys (up to the rows' last real key), stored at
    `offset`: whole matrices of as many rows as fit in `chunk_elements`, or, when one does not fit, blocks
    of queries of one row. The chunks follow (BH, L, S) order, and so do the draws within each."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                 p: float, ws: Workspace, chunk_elements: int) -> None:
        B, H, L, Dh = q.shape
        self.ws = ws
        S = k.shape[2]
        self.BH, self.L, self.S = B * H, L, S
        self.qs = (q * (1.0 / math.sqrt(Dh))).reshape(self.BH, L, Dh)  # (BH, L, Dh)
        self.k = k.reshape(self.BH, S, Dh)  # (BH, S, Dh)
        self.keep_scale = 1.0 / (1.0 - quantized_p(p))
        self.vs = (v * self.keep_scale).reshape(self.BH, S, Dh)  # (BH, S, Dh)
        self.threshold = keep_threshold(p)
        self.bias = None
        if attn_mask is not None and not bool(attn_mask.all()):  # (B, 1, 1, S) True = attend -> (BH, 1, S)
            bias = torch.zeros(B, 1, 1, S, dtype=q.dtype).masked_fill_(~attn_mask, torch.finfo(q.dtype).min)
            self.bias = bias.expand(B, H, 1, S).reshape(self.BH, 1, S)
        if L * S <= chunk_elements:
            g = chunk_elements // (L * S)  # whole rows per chunk
            blocks = [(b, min(b + g, self.BH), 0, L) for b in range(0, self.BH, g)]
        else:
            c = max(1, chunk_elements // S)  # queries per chunk of one row
            blocks = [(b, b + 1, i, min(i + c, L)) for b in range(self.BH) for i in range(0, L, c)]
        # keys after a row's last real key get probability 0 exactly: a chunk stops at its rows' last one
        last = [S] * self.BH
        self.empty: set[int] = set()  # rows with no real key: uniform over all keys, no gradient to q, k
        if self.bias is not None:
            pos = torch.arange(1, S + 1)
            ends = (attn_mask.reshape(B, S) * pos).amax(1).repeat_interleave(H)  # (BH,) 0 = no real key
            self.empty = set((ends == 0).nonzero().flatten().tolist())
            last = torch.where(ends > 0, ends, S).tolist()
        self.chunks: list[tuple[int, int, int, int, int, int]] = []  # (b0, b1, i0, i1, keys, offset)
        at = 0
        for b0, b1, i0, i1 in blocks:
            s = max(last[b0:b1])
            self.chunks.append((b0, b1, i0, i1, s, at))
            at += (b1 - b0) * (i1 - i0) * s
        self.total = at  # scores stored when P and D are kept
        self.chunk_elements = max((b1 - b0) * (i1 - i0) * s for b0, b1, i0, i1, s, _ in self.chunks)

    def probs(self, chunk: tuple[int, ...], P: torch.Tensor, D: torch.Tensor) -> None:
        """Fill P (b1 - b0, i1 - i0, keys) with softmax(q kᵀ/√Dh + bias) of the chunk and D with P times
        the keep mask drawn now from the global generator (one 16-bit word per probability)."""
        b0, b1, i0, i1, s, _ = chunk
        qc, kT = self.qs[b0:b1, i0:i1], self.k[b0:b1, :s].transpose(1, 2)  # (g, c, Dh), (g, Dh, s)
        if self.bias is None:
            torch.bmm(qc, kT, out=P)
        else:
            torch.baddbmm(self.bias[b0:b1, :, :s], qc, kT, out=P)
        torch.softmax(P, -1, out=P)
        n = P.numel()
        keep = self.ws.get("keep", n, P.dtype).view(P.shape)  # 1.0 = kept, 0.0 = dropped
        words = random_words(n, out=self.ws.get("words", (n + 3) // 4, torch.int64))
        torch.ge(words.view(P.shape), self.threshold, out=keep)
        torch.mul(P, keep, out=D)

    def views(self, chunk: tuple[int, ...], P_all: torch.Tensor, D_all: torch.Tensor,
              stored: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """P and D of a chunk: its place in the stored arrays, or the start of the scratch."""
        b0, b1, i0, i1, s, at = chunk
        at = at if stored else 0
        shape = (b1 - b0, i1 - i0, s)
        n = math.prod(shape)
        return P_all[at:at + n].view(shape), D_all[at:at + n].view(shape)


class _DropoutAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # type: ignore[override]
                attn_mask: torch.Tensor | None, p: float, needs_grad: bool, ws: Workspace) -> torch.Tensor:
        B, H, L, Dh = q.shape
        store = needs_grad and B * H * L * k.shape[2] <= STORE_ELEMENTS
        if store:
            ws = ws.claim(ctx)
        else:  # long inputs (or no backward): scratch of this call only, as small as a chunk
            ws = Workspace()
        st = _Chunks(q, k, v, attn_mask, p, ws, CHUNK_ELEMENTS if store else RECOMPUTE_CHUNK_ELEMENTS)
        rng = torch.get_rng_state()  # backward can replay the chunks' draws from here
        n = st.total if store else st.chunk_elements
        P_all, D_all = ws.get("P" if store else "Pc", n, q.dtype), ws.get("D" if store else "Dc", n, q.dtype)
        out = torch.empty(st.BH, L, Dh, dtype=q.dtype)
        for chunk in st.chunks:
            b0, b1, i0, i1, s, _ = chunk
            P, D = st.views(chunk, P_all, D_all, store)
            st.probs(chunk, P, D)
            torch.bmm(D, st.vs[b0:b1, :s], out=out[b0:b1, i0:i1])  # (g, c, Dh), contiguous
        if needs_grad:
            if not store:
                st.ws = Workspace()  # nothing held from forward to backward
            ctx.st, ctx.rng, ctx.store, ctx.generation = st, rng, store, ws.generation
            ctx.stored = (P_all, D_all) if store else None
            ctx.save_for_backward(out)
        return out.view(B, H, L, Dh)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        st: _Chunks = ctx.st
        (out,) = ctx.saved_tensors
        # stored P, D are valid unless the workspace was handed out again (a second backward with
        # retain_graph after a later forward): then recompute them like the long-input path
        store = ctx.store and st.ws.generation == ctx.generation
        dO = grad.to(out.dtype).reshape(st.BH, st.L, -1)  # (BH, L, Dh)
        delta = (dO * out).sum(-1, keepdim=True)  # (BH, L, 1) = rowsum(dD * D) per query
        dq, dk, dv = torch.empty_like(st.qs), torch.zeros_like(st.k), torch.zeros_like(st.vs)  # 0: unused keys
        n = st.chunk_elements
        dS_buf = st.ws.get("dS", n, dO.dtype)
        if store:
            P_all, D_all = ctx.stored
        else:
            P_all, D_all = st.ws.get("Pc", n, dO.dtype), st.ws.get("Dc", n, dO.dtype)
            now = torch.get_rng_state()
            torch.set_rng_state(ctx.rng)
        try:
            for chunk in st.chunks:
                b0, b1, i0, i1, s, _ = chunk
                P, D = st.views(chunk, P_all, D_all, store)
                if not store:
                    st.probs(chunk, P, D)
                dOc, qc = dO[b0:b1, i0:i1], st.qs[b0:b1, i0:i1]  # (g, c, Dh)
                dS = dS_buf[:P.numel()].view(P.shape)
                torch.bmm(dOc, st.vs[b0:b1, :s].transpose(1, 2), out=dS)  # dD
                dS.mul_(D).addcmul_(P, delta[b0:b1, i0:i1], value=-1.0)  # dS = D*dD - P*delta
                for b in st.empty.intersection(range(b0, b1)):  # every score masked: constant in q, k
                    dS[b - b0].zero_()
                torch.bmm(dS, st.k[b0:b1, :s], out=dq[b0:b1, i0:i1])
                if i0 == 0 and s == st.S:  # the first (or only) block of queries of these rows
                    torch.bmm(D.transpose(1, 2), dOc, out=dv[b0:b1])
                    torch.bmm(dS.transpose(1, 2), qc, out=dk[b0:b1])
                else:
                    dv[b0:b1, :s].baddbmm_(D.transpose(1, 2), dOc)
                    dk[b0:b1, :s].baddbmm_(dS.transpose(1, 2), qc)
        finally:
            if not store:
                torch.set_rng_state(now)
            st.ws.release(ctx)
        B, H, L, Dh = grad.shape
        dq = dq.mul_(1.0 / math.sqrt(Dh)).view(B, H, L, Dh)
        dk = dk.view(B, H, st.S, Dh)
        dv = dv.mul_(st.keep_scale).view(B, H, st.S, Dh)
        return dq, dk, dv, None, None, None, None


@torch.compiler.disable  # a hand-scheduled sequence of kernels with its own draws: always run eagerly
def dropout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                      p: float, workspace: Workspace | None = None) -> torch.Tensor:
    """Softmax attention with dropout `p` on the probabilities (a CPU path); q, k, v (B, H, L, Dh),
    attn_mask (B, 1, 1, L) bool (True = attend) or None. Chunked over queries; see the module docstring.
    `workspace` (reused memory) only changes the speed, never the result."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if torch.is_autocast_enabled("cpu"):  # mixed precision: everything in the autocast dtype, like the matmuls
        dtype = torch.get_autocast_dtype("cpu")
        with torch.autocast("cpu", enabled=False):
            return dropout_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask, p, workspace)
    q, k, v = (t.contiguous() for t in (q, k, v))
    return _DropoutAttention.apply(q, k, v, attn_mask, p, needs_grad, workspace or Workspace())


class SoftmaxAttention(AttentionBackend):
    """softmax(Q Kᵀ / √Dh) V over the real keys. q, k, v, out: (B, H, L, Dh); mask (B, L) bool,
    True = real token. `attn_dropout` drops attention probabilities in training."""

    name = "softmax"

    def __init__(
        self, num_heads: int, head_dim: int, max_len: int | None = None, attn_dropout: float = 0.0
    ) -> None:
        super().__init__(num_heads, head_dim, max_len)
        self.attn_dropout = attn_dropout
        self._workspace = Workspace()  # memory of the dropout path, reused from call to call

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        attn_mask = None
        if key_padding_mask is not None:
            attn_mask = key_padding_mask[:, None, None, :]  # (B, 1, 1, L) True = attend
        p = self.attn_dropout if self.training else 0.0
        if p > 0.0 and q.device.type == "cpu" and quantized_p(p) > 0.0:
            return dropout_attention(q, k, v, attn_mask, p, self._workspace)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
