"""Exact streaming STEP engine: per new frame, a fraction of the cost of re-running attention.

A STEP head (:class:`~step_ros.model.heads.StepHead`, default configuration) computes, over the
window's ``N = 1 + T*n`` tokens ``[g, e_1 + t_1, ..., e_T + t_T]``, one bare multi-head
self-attention layer, a mean over all ``N`` outputs and a linear classifier.  Re-running it for
every new frame costs ``O((T n)^2 D)``; yet when the window slides by one frame, only the new
frame's content is new -- what changes for the others is their *position* (hence their
positional term) and the softmax normalisers.  :class:`FastStepRunner` exploits that exactly
(same numbers as the reference forward, to float32 rounding).

Derivation (per STEP head, per attention head of width ``d``; scale ``1/sqrt(d)`` folded into
the query side).  Frame tokens at window position ``P`` are ``x = e + t_P``; the fused qkv
projection splits into a *content* part and a *position* part::

    q = a + c_P,   a = e Wq^T / sqrt(d),   c_P = (t_P Wq^T + bq) / sqrt(d)
    k = b + c'_P,  b = e Wk^T,             c'_P = t_P Wk^T + bk
    v = u + c''_P, u = e Wv^T,             c''_P = t_P Wv^T + bv

so the score of query ``j`` of frame G (position P) and key ``l`` of frame F (position P') is::

    s_jl = S^{GF}_jl + beta^G_j[P'] + gamma^F_l[P] + kappa[P, P']
    S^{GF} = a_G b_F^T   (n x n, content only: computed ONCE, when the later frame arrives)
    beta^G[P'] = a_G c'_{P'},  gamma^F[P] = b_F c_P,  kappa = c c'^T  (per-frame / constant)

Everything the window position touches is a rank-one additive term in the log domain, so
``exp(s_jl) = E^{GF}_jl * U^F_l[P] * exp(m_j + mu^F[P] + beta_j[P'] + kappa[P,P'])`` with
the stored, row-max-stabilised block ``E^{GF} = exp(S^{GF} - m^{GF})``, ``m_j = max_l S_jl``,
and the max-stabilised ``U^F = exp(gamma^F - mu^F)``, ``mu^F[P] = max_l gamma^F_l[P]``
(stored for every P).  Hence

* softmax normaliser of query j (frame G at P_G)::

      log Z_j = logsumexp( s_jg,  { beta_j[P_F] + kappa[P_G,P_F] + M^{GF}_j[P_G] }_F )
      M^{GF}_j[P] = m_j + mu^F[P] + log(E^{GF}_j . U^F[:, P])     (all P, at block creation)

* mean pooling is linear, so only the *column sums* of the attention matrix are needed::

      r'_{jGF} = exp(beta_j[P_F] + kappa[P_G,P_F] + m^{GF}_j + mu^F[P_G] - log Z_j)
      W^F_l    = sum_G U^F_l[P_G] * (r'_{.GF}^T E^{GF})_l      (+ the CLS query's row)
      o_bar    = ( sum_F W^F (u_F + c''_{P_F}) + W_g v_g ) / N,  logits = cls(proj(o_bar))

  with ``W_g`` = the CLS key's column sum (``sum_j exp(s_jg - log Z_j)`` + the CLS query's
  own weight).  The projection bias enters once: the mean of ``o W^T + b`` is
  ``o_bar W^T + b``.  The CLS query row (1 x N) is computed directly every prediction.

  ``exp(mu^F[P_G])`` is folded into ``r'`` *before* the GEMV, not applied to its result:
  ``mu`` (the positional query against key contents) can be large of either sign with trained
  PEs, and ``exp(beta + kappa + m - log Z)`` alone then overflows or underflows float32.
  With it folded in, ``log r'_j <= -log(E_j . U^F[:, P_G])`` (because ``log Z_j`` contains that
  very term), a small number for any sane head (at most ``min`` of the row's logit spread and
  the positional term's spread over the keys).

Cost per new frame (T frames, n tokens, H heads, K STEP heads): the qkv content projection of
one frame, ``2T - 1`` new ``n x n`` blocks per attention head (a GEMM, a row max, an exp and an
``(n x n) @ (n x T)`` product each), then per prediction one GEMV over every stored block
(``T^2 H n^2`` multiply-adds: memory-bound, it reads each stored block once) and small
``O(T^2 H n)`` log-domain bookkeeping.  Memory: ``K H T^2 n^2`` float32 for the blocks
(~403 MB per STEP head for ViT-S, T=16, n=256, H=6), see :meth:`FastStepRunner.memory_bytes`.

The block cache is indexed by *frame slot*, not by position, so it is independent of the
window order: the same cache serves any order of the same frames (e.g. reversed).

Numerical safety.  All sums are of positive terms and every large quantity lives in the log
domain.  At block creation ``rho^{GF}[P] = max_j -log(E_j . U^F[:, P])`` is recorded; it bounds
``log r'`` for the block when G sits at position P.  If ``rho <= RANGE_LIMIT`` (=60) then
``r' <= e^60``, nothing overflows, and any entry of ``E`` or ``U`` that underflowed (< 1e-38)
would have contributed less than ``1e-38 * e^60 ~ 1e-12`` of a softmax row: the prediction is
exact to float32 rounding.  Otherwise -- both the row's logit spread and the positional term's
spread beyond ~60 at once, far outside trained attention -- or if anything non-finite appears,
that group's prediction is recomputed with the reference forward and counted in
:attr:`FastStepRunner.fallbacks` (a silent underflow would otherwise give a finite, wrong
result: checking for non-finite output alone is not enough).

STEP configurations the algebra does not cover (PE token-wise or after the attention, no global
CLS, CLS/both token sets, LN/MLP blocks) and every other head kind run their normal forward on
the window; a log line says so once per head.  Incomplete (front-padded) windows also use the
reference forward.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from .heads import MultiHeadAttention, StepHead, pool_patch_grid

log = logging.getLogger(__name__)

#: Above this logit spread (in both factors of one block at once) a prediction falls back.
RANGE_LIMIT = 60.0
#: Frames per batch of new blocks in ``add_frame`` (measured: smaller tiles only add call overhead).
DEFAULT_TILE = 16


# ---------------------------------------------------------------------------------------------
# naive reference (benchmark baseline)
# ---------------------------------------------------------------------------------------------


def naive_attention(attn: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """Multi-head self-attention written out like ``nn.MultiheadAttention``'s math path:
    explicit score matrix, explicit softmax, explicit ``P @ V`` (no fused kernel)."""
    b, n, dim = x.shape
    h = attn.num_heads
    d = dim // h
    qkv = torch.matmul(x, attn.qkv.weight.t()) + attn.qkv.bias
    q, k, v = qkv.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(d))  # (B, H, N, N)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(b, n, dim)
    return torch.matmul(out, attn.proj.weight.t()) + attn.proj.bias


@torch.inference_mode()
def reference_step_logits(head: StepHead, window: torch.Tensor) -> torch.Tensor:
    """A deliberately naive STEP forward (explicit softmax matmuls): the "naive head" baseline.

    ``window`` is ``(T, 1 + n, D)`` (returns ``(C,)``) or ``(B, T, 1 + n, D)`` (returns
    ``(B, C)``).  Same math as ``head(window)`` for every configuration of the head.
    """
    single = window.ndim == 3
    w = window[None] if single else window
    logits = head.classifier(head.pooled(w, attention=lambda x: naive_attention(head.attn, x)))
    return logits[0] if single else logits


# ---------------------------------------------------------------------------------------------
# fast path
# ---------------------------------------------------------------------------------------------


def fast_path_unsupported(head: nn.Module) -> str | None:
    """Why ``head`` cannot use the exact streaming algebra (None: it can)."""
    if not isinstance(head, StepHead):
        return f"{type(head).__name__} is not a STEP head"
    if head.block != "attention":
        return f"block={head.block!r} (LayerNorm/MLP are not linear in the tokens)"
    if head.tokens != "patch":
        return f"tokens={head.tokens!r}"
    if head.global_cls is None:
        return "global_cls is off"
    if head.pe != "none":
        if head.pe_scope != "frame":
            return f"pe_scope={head.pe_scope!r} (the PE is not a per-frame constant)"
        if head.pe_position != "before":
            return f"pe_position={head.pe_position!r}"
    return None


class _StepGroup:
    """K STEP heads with the same number of attention heads H and the same token pooling,
    computed in batched calls (``n`` below is the pooled token count).

    Tensor layout: K (STEP heads), H (attention heads), slots s (frame cache slots, T of them),
    positions P (window positions, T of them), n tokens, d head width.
    """

    def __init__(self, tasks: list[str], heads: list[StepHead], frames: int, tile: int | None = None) -> None:
        self.tasks, self.heads, self.T = tasks, heads, frames
        self.K = len(heads)
        self.pool = heads[0].token_pool
        self.H = heads[0].attn.num_heads
        self.D = heads[0].attn.qkv.in_features
        self.d = self.D // self.H
        self.n: int | None = None
        self.tile = max(1, min(tile or DEFAULT_TILE, frames))
        self.refresh()

    # -- constants: position and CLS terms, weights --------------------------------------------
    @torch.inference_mode()
    def refresh(self) -> None:
        """(Re)read the heads' weights and precompute every per-position / CLS constant."""
        K, H, T, D, d = self.K, self.H, self.T, self.D, self.d
        scale = 1.0 / math.sqrt(d)
        self.W = torch.stack([h.attn.qkv.weight.detach().float() for h in self.heads])  # (K, 3D, D)
        self.device = self.W.device  # every cache and index lives with the heads' weights
        bias = torch.stack([h.attn.qkv.bias.detach().float() for h in self.heads])  # (K, 3D)
        pes = []
        for h in self.heads:
            pe = h.positional()
            pes.append(torch.zeros(T, D, device=self.device) if pe is None else pe.detach().float().reshape(T, D))
        pe = torch.stack(pes)  # (K, T, D)
        pos = torch.baddbmm(bias[:, None], pe, self.W.transpose(1, 2))  # (K, T, 3D): t_P W^T + b
        pos = pos.reshape(K, T, 3, H, d).permute(2, 0, 3, 1, 4)  # (3, K, H, T, d)
        self.cq = pos[0] * scale  # c_P (query side, pre-scaled)
        self.ck = pos[1].contiguous()  # c'_P
        self.cv = pos[2].contiguous()  # c''_P
        g = torch.stack([h.global_cls.detach().float().reshape(D) for h in self.heads])  # (K, D)
        gqkv = (torch.einsum("kd,ked->ke", g, self.W) + bias).reshape(K, 3, H, d)
        self.qg, self.kg, self.vg = gqkv[:, 0] * scale, gqkv[:, 1], gqkv[:, 2]  # (K, H, d)
        self.kappa = torch.matmul(self.cq, self.ck.transpose(-1, -2))  # (K, H, P, P')
        self.cls_key_pos = torch.einsum("khpd,khd->khp", self.cq, self.kg)  # c_P . k_g
        self.cls_query_pos = torch.einsum("khpd,khd->khp", self.ck, self.qg)  # q_g . c'_P
        self.s_gg = (self.qg * self.kg).sum(-1)  # (K, H)
        self.proj_w = torch.stack([h.attn.proj.weight.detach().float() for h in self.heads])
        self.proj_b = torch.stack([h.attn.proj.bias.detach().float() for h in self.heads])

    # -- caches -------------------------------------------------------------------------------
    def cache_shapes(self, n: int) -> dict[str, tuple[int, ...]]:
        K, H, T, d = self.K, self.H, self.T, self.d
        return {
            "E": (K, T, H, T, n, n),  # [k, slot G, h, slot F, j, l]: exp(S^{GF} - m^{GF})
            "m": (K, H, T, T, n),  # [G, F, j]: max_l S^{GF}_jl (row stabiliser of E)
            "M": (K, H, T, T, T, n),  # [P, G, F, j]: m + mu^F[P] + log(E_j . U^F[:, P])
            "rho": (K, H, T, T, T),  # [P, G, F]: max_j -log(E_j . U^F[:, P])  (bounds log r')
            "a": (K, H, T, n, d),  # query content (scaled), per slot
            "b": (K, H, T, n, d),  # key content
            "u": (K, H, T, n, d),  # value content
            "beta": (K, H, T, T, n),  # [P', slot G, j]: a_j . c'_{P'}
            "delta": (K, H, T, n),  # a_j . k_g   (query content vs CLS key)
            "eps": (K, H, T, n),  # q_g . b_l   (CLS query vs key content)
            "U": (K, H, T, T, n),  # [P, slot F, l]: exp(gamma - mu)
            "Ut": (K, H, T, n, T),  # [slot F, l, P]: U again, in the layout E @ U wants
            "mu": (K, H, T, T),  # [P, slot F]: max_l gamma
            "scratch": (self.tile, n, n),  # new blocks of one attention head, `tile` frames
            "mx_r": (K, H, T, n),  # row / column blocks of the newest frame: row max of S,
            "eu_r": (K, H, T, n, T),  # E @ U
            "mx_c": (K, H, T, n),
            "eu_c": (K, H, T, n, T),
            "r_buf": (K, T, H, T, n),  # per prediction: r' and the GEMV result, in E's order
            "w_buf": (K, T, H, T, n),
        }

    def allocate(self, n: int) -> None:
        self.n = n
        for name, shape in self.cache_shapes(n).items():
            setattr(self, name, torch.empty(shape, dtype=torch.float32, device=self.device))

    def memory_bytes(self, n: int | None = None) -> int:
        n = n or self.n
        if n is None:
            return 0
        return sum(4 * math.prod(s) for s in self.cache_shapes(n).values())

    @torch.inference_mode()
    def add_frame(self, x: int, filled: list[int], patches: torch.Tensor) -> None:
        """Cache frame content at slot ``x`` and create every block pairing it with ``filled``
        (sorted slots now holding frames, ``x`` included): row blocks (x, F) and column blocks
        (G, x); the (x, x) block is made twice, with the same values.

        Blocks are made ``tile`` frames of one attention head at a time (see the loop).
        """
        K, H, T, d = self.K, self.H, self.T, self.d
        n = patches.shape[0]
        if self.n != n:
            self.allocate(n)
        g = len(filled)
        full = g == T
        idx: Any = slice(None) if full else torch.tensor(filled, dtype=torch.long, device=self.device)
        qkv = torch.matmul(patches, self.W.transpose(1, 2))  # (K, n, 3D), no bias (content only)
        qkv = qkv.reshape(K, n, 3, H, d).permute(2, 0, 3, 1, 4)  # (3, K, H, n, d)
        a = qkv[0] * (1.0 / math.sqrt(d))
        b = qkv[1]
        self.a[:, :, x] = a
        self.b[:, :, x] = b
        self.u[:, :, x] = qkv[2]
        self.beta[:, :, :, x] = torch.matmul(self.ck, a.transpose(-1, -2))  # (K, H, P', n)
        gamma = torch.matmul(self.cq, b.transpose(-1, -2))  # (K, H, P, n)
        gmx = gamma.amax(-1)
        self.mu[:, :, :, x] = gmx
        Ux = torch.exp(gamma - gmx[..., None])
        self.U[:, :, :, x] = Ux
        self.Ut[:, :, x] = Ux.transpose(-1, -2)
        self.delta[:, :, x] = torch.einsum("khnd,khd->khn", a, self.kg)
        self.eps[:, :, x] = torch.einsum("khnd,khd->khn", b, self.qg)

        # The big work, one attention head and ``tile`` frames at a time: every call is a large
        # batched GEMM or a plain elementwise pass (measured on 2 cores: batching several
        # attention heads per call was slower, smaller tiles only added call overhead).
        mx_r, mx_c = (self._dense(buf, (K, H, g, n)) for buf in (self.mx_r, self.mx_c))
        eu_r, eu_c = (self._dense(buf, (K, H, g, n, T)) for buf in (self.eu_r, self.eu_c))
        for f0 in range(0, g, self.tile):
            f1 = min(g, f0 + self.tile)
            t = f1 - f0
            fs: Any = (slice(filled[f0], filled[f0] + t) if full
                       else torch.tensor(filled[f0:f1], dtype=torch.long, device=self.device))
            sc = self._dense(self.scratch, (t, n, n))
            flat = sc.view(t * n, n)
            for k in range(K):
                for h in range(H):
                    # row blocks (x, F): [F, j, l] = a_x[j] . b_F[l]
                    torch.matmul(self.a[k, h, x], self.b[k, h, fs].transpose(-1, -2), out=sc)
                    mr = mx_r[k, h, f0:f1]
                    torch.amax(sc, -1, out=mr)
                    dest = self.E[k, x, h, fs] if full else sc  # (t, n, n), dense
                    torch.sub(sc, mr[..., None], out=dest).exp_()  # E = exp(S - rowmax)
                    torch.matmul(dest, self.Ut[k, h, fs], out=eu_r[k, h, f0:f1])  # (t, n, P)
                    if not full:
                        self.E[k, x, h, fs] = sc
                    # column blocks (G, x): [G, j, l] = a_G[j] . b_x[l]  (one GEMM)
                    torch.matmul(self.a[k, h, fs].reshape(t * n, d), self.b[k, h, x].t(), out=flat)
                    mc = mx_c[k, h, f0:f1]
                    torch.amax(sc, -1, out=mc)
                    sc.sub_(mc[..., None]).exp_()
                    torch.matmul(flat, self.Ut[k, h, x], out=eu_c[k, h, f0:f1].view(t * n, T))
                    self.E[k, fs, h, x] = sc
        # log-domain bookkeeping, batched over all heads
        eu = eu_r.log_()  # (K, H, F, n, P): log(E_j . U^F[:, P])
        self.rho[:, :, :, x, idx] = eu.amax(3).neg_().transpose(-1, -2)
        eu.add_(mx_r[..., None]).add_(self.mu[:, :, :, idx].transpose(-1, -2)[:, :, :, None, :])
        self.M[:, :, :, x, idx] = eu.permute(0, 1, 4, 2, 3)  # (K, H, P, F, n)
        self.m[:, :, x, idx] = mx_r
        eu = eu_c.log_()  # (K, H, G, n, P): log(E_j . U^x[:, P])
        self.rho[:, :, :, idx, x] = eu.amax(3).neg_().transpose(-1, -2)
        eu.add_(mx_c[..., None]).add_(self.mu[:, :, None, None, :, x])
        self.M[:, :, :, idx, x] = eu.permute(0, 1, 4, 2, 3)  # (K, H, P, G, n)
        self.m[:, :, idx, x] = mx_c

    @staticmethod
    def _dense(buf: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """A dense tensor of ``shape`` on the front of the preallocated ``buf``."""
        return buf.view(-1)[: math.prod(shape)].view(shape)

    # -- prediction ---------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, pos: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Logits for every head of the group; ``pos[s]`` = window position of slot s.

        Returns None when the prediction must be recomputed by the reference forward
        (a block whose ``rho`` exceeds :data:`RANGE_LIMIT`, or a non-finite result).
        """
        K, H, T, n = self.K, self.H, self.T, self.n
        ar = torch.arange(T, device=self.device)
        if bool((self.rho[:, :, pos, ar] > RANGE_LIMIT).any()):
            return None
        # per (G, F) block quantities at the current positions (G: query slot, F: key slot)
        beta = self.beta[:, :, pos].transpose(2, 3)  # (K, H, G, F, n): beta^G[P_F]
        kappa = self.kappa[:, :, pos][:, :, :, pos]  # (K, H, G, F): kappa[P_G, P_F]
        M = self.M[:, :, pos, ar]  # (K, H, G, F, n): M^{GF}[P_G]
        mu = self.mu[:, :, pos]  # (K, H, G, F): mu^F[P_G]
        U = self.U[:, :, pos]  # (K, H, G, F, n): U^F[:, P_G]
        base = beta + kappa[..., None]  # (K, H, G, F, n)
        cls_key = self.delta + self.cls_key_pos[:, :, pos][..., None]  # (K, H, G, n): s_{j,g}
        logz = torch.logaddexp(torch.logsumexp(base + M, dim=3), cls_key)  # (K, H, G, n)
        base.add_(self.m).add_(mu[..., None]).sub_(logz[:, :, :, None])
        # r' goes straight into the layout of E ([k, G, h, F]); then the one pass over every
        # stored block: a batched GEMV, (1 x n) @ (n x n) per block, memory-bound
        torch.exp(base, out=self.r_buf.transpose(1, 2))  # r' (K, H, G, F, n), stored [k, G, h, F]
        torch.bmm(self.r_buf.view(-1, 1, n), self.E.view(-1, n, n), out=self.w_buf.view(-1, 1, n))
        w = self.w_buf.transpose(1, 2)  # (K, H, G, F, l)
        col = (w * U).sum(2)  # (K, H, F, n): column weights of the frame keys
        wg = torch.exp(cls_key - logz).sum((2, 3))  # (K, H): CLS key column
        # the CLS query's own row, directly
        sg = self.eps + self.cls_query_pos[:, :, pos][..., None]  # (K, H, F, n)
        row = torch.cat([sg.reshape(K, H, T * n), self.s_gg[..., None]], dim=-1).softmax(-1)
        col = col + row[..., :-1].reshape(K, H, T, n)
        wg = wg + row[..., -1]
        out = torch.einsum("khfl,khfld->khd", col, self.u)
        out = out + torch.einsum("khf,khfd->khd", col.sum(-1), self.cv[:, :, pos])
        out = (out + wg[..., None] * self.vg) / (1 + T * n)
        pooled = torch.baddbmm(self.proj_b[:, None], out.reshape(K, 1, self.D), self.proj_w.transpose(1, 2))[:, 0]
        if not bool(torch.isfinite(pooled).all()):
            return None
        return {task: head.classifier(pooled[k]) for k, (task, head) in enumerate(zip(self.tasks, self.heads))}

    def flops_per_frame(self, n: int) -> float:
        """Multiply-adds x 2 per new frame (steady state), for the benchmark's GFLOP column."""
        K, H, T, D, d = self.K, self.H, self.T, self.D, self.d
        qkv = 2 * n * D * 3 * D + 2 * 2 * H * T * n * d  # projection + beta, gamma
        blocks = (2 * T) * H * (2 * n * n * d + 2 * n * n * T)  # S and E @ U, row + column
        gemv = T * T * H * 2 * n * n
        tail = 2 * (T * n * D) * 2 + 2 * D * D
        return float(K * (qkv + blocks + gemv + tail))


class FastStepRunner:
    """HeadRunner (see :mod:`step_ros.model.streaming`) with the exact streaming STEP algebra.

    ``model``: a :class:`~step_ros.model.multitask.MultiTaskModel` (or anything with a
    ``heads`` mapping, or the mapping itself).  STEP heads in the default configuration are
    computed from per-frame caches (all of them batched, grouped by attention head count);
    every other head runs its normal forward on the window.  Caches are keyed by frame id and
    hold at most ``T`` frames (the oldest is evicted when a frame arrives into a full cache).

    ``tile``: frames whose new blocks are made in one batch of calls in :meth:`add_frame`
    (default :data:`DEFAULT_TILE`: all of them; scratch ``tile n^2`` floats, 4 MB for ViT-S).
    Same numbers for every value; a smaller tile only saves scratch memory.

    Weights are read at construction: after changing a head's weights call :meth:`refresh`.
    Counters: ``fallbacks`` (fast-path predictions recomputed by the reference forward for
    numerical safety), ``reference_predictions`` (predictions on incomplete windows, which
    use the reference forward by design).
    """

    def __init__(self, model: Any, frames: int | None = None, tile: int | None = None) -> None:
        heads = getattr(model, "heads", model)
        if not isinstance(heads, Mapping) and not isinstance(heads, nn.ModuleDict):
            raise TypeError("FastStepRunner needs a MultiTaskModel or a mapping {task: head}")
        self.heads: dict[str, nn.Module] = dict(heads.items())
        manifest = getattr(model, "manifest", None)
        self.frames = frames or (manifest.frames if manifest is not None else None)
        if self.frames is None:
            self.frames = next(h.frames for h in self.heads.values() if hasattr(h, "frames"))
        self.slow_tasks: dict[str, str] = {}
        groups: dict[tuple[int, int], list[str]] = {}  # (attention heads, token_pool) -> tasks
        for task, head in self.heads.items():
            why = fast_path_unsupported(head)
            if why is None and head.frames != self.frames:
                why = f"head has {head.frames} frames, the window {self.frames}"
            if why is None:
                groups.setdefault((head.attn.num_heads, head.token_pool), []).append(task)
            else:
                self.slow_tasks[task] = why
                if isinstance(head, StepHead):
                    log.info("fast STEP engine: head %r uses the reference forward: %s", task, why)
        self.groups = [_StepGroup(ts, [self.heads[t] for t in ts], self.frames, tile) for ts in groups.values()]
        self.fallbacks = 0
        self.reference_predictions = 0
        self.fallback_reasons: Counter = Counter()
        self._logged: set[str] = set()
        self._slot_of: dict[int, int] = {}
        self._order: list[int] = []  # cached frame ids, oldest first

    # -- HeadRunner protocol ------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every cached frame (the window was reset)."""
        self._slot_of.clear()
        self._order.clear()

    def refresh(self) -> None:
        """Re-read head weights (after training or loading) and drop the caches."""
        self.reset()
        for g in self.groups:
            g.refresh()

    @property
    def fast_tasks(self) -> list[str]:
        return [t for g in self.groups for t in g.tasks]

    def add_frame(self, frame_id: int, tokens: torch.Tensor) -> None:
        """Cache one frame (tokens ``(1 + n, D)``): its projections and its 2T-1 new blocks."""
        frame_id = int(frame_id)
        if frame_id in self._slot_of or not self.groups:
            return
        if any(g.n not in (None, (tokens.shape[0] - 1) // g.pool**2) for g in self.groups):
            self.reset()  # a different token count (image size): nothing cached can be reused
        if len(self._order) >= self.frames:
            self._evict(self._order[0])
        used = set(self._slot_of.values())
        slot = next(s for s in range(self.frames) if s not in used)
        self._slot_of[frame_id] = slot
        self._order.append(frame_id)
        filled = sorted(self._slot_of.values())
        for g in self.groups:
            patches = tokens[1:].detach().to(device=g.device, dtype=torch.float32)
            g.add_frame(slot, filled, pool_patch_grid(patches, g.pool))

    @torch.inference_mode()
    def predict(self, window: torch.Tensor, frame_ids: Iterable[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """``{task: logits (C,)}`` for the window ``(T, 1 + n, D)`` whose frames are ``frame_ids``
        (oldest first).  A padded window (fewer ids than T) uses the reference forward."""
        ids = [int(i) for i in np.asarray(frame_ids).reshape(-1)]
        out: dict[str, torch.Tensor] = {}
        batch = window[None]
        complete = len(ids) == self.frames == window.shape[0] and len(set(ids)) == len(ids)
        if self.groups and complete:
            self._sync(ids, window)
            slots = np.empty(self.frames, dtype=np.int64)
            for p, fid in enumerate(ids):
                slots[self._slot_of[fid]] = p
            for g in self.groups:
                res = g.predict(torch.from_numpy(slots).to(g.device))
                if res is None:
                    self.fallbacks += 1
                    self.fallback_reasons["numerics"] += 1
                    self._log_once("numerics", "fast STEP engine: extreme logits, prediction recomputed "
                                   "with the reference forward (counted in .fallbacks)")
                    res = {t: self.heads[t](batch)[0] for t in g.tasks}
                out.update(res)
        elif self.groups:
            self.reference_predictions += 1
            self._log_once("incomplete", "fast STEP engine: incomplete window, using the reference forward")
        for task, head in self.heads.items():
            if task not in out:
                out[task] = head(batch)[0]
        return {task: out[task] for task in self.heads}

    # -- helpers ------------------------------------------------------------------------------
    def _evict(self, frame_id: int) -> None:
        self._order.remove(frame_id)
        del self._slot_of[frame_id]

    def _sync(self, ids: list[int], window: torch.Tensor) -> None:
        """Make the cache hold exactly the window's frames (normally it already does)."""
        wanted = set(ids)
        for fid in [f for f in self._order if f not in wanted]:
            self._evict(fid)
        for p, fid in enumerate(ids):
            if fid not in self._slot_of:
                self.add_frame(fid, window[p])

    def _log_once(self, key: str, msg: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.info(msg)

    def memory_bytes(self, num_tokens: int | None = None) -> int:
        """Bytes of the frame and block caches (allocated on the first frame, then kept):
        about ``4 K H T^2 n^2`` (the stored blocks) + ``4 K H T^3 n`` + ``O(K T n D)``.
        ``num_tokens`` (n) gives the figure before any frame was seen."""
        return sum(g.memory_bytes(num_tokens and num_tokens // g.pool**2) for g in self.groups)

    def flops_per_frame(self, num_tokens: int) -> float:
        """FLOPs of the fast STEP heads per new frame (add_frame + predict, steady state)."""
        return sum(g.flops_per_frame(num_tokens // g.pool**2) for g in self.groups)


__all__ = [
    "RANGE_LIMIT",
    "FastStepRunner",
    "fast_path_unsupported",
    "naive_attention",
    "reference_step_logits",
]
