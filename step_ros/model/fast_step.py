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

    q = a + c_P,   a = e Wq^T / sqrt(d) + c_bar,   c_P = (t_P Wq^T + bq) / sqrt(d) - c_bar
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

      log Z_j = logsumexp( s_jg,  { big^{GF}_j + M^{GF}_j[P_G] }_F )
      big^{GF}_j = beta_j[P_F] + kappa[P_G,P_F] + m^{GF}_j + mu^F[P_G]
      M^{GF}_j[P] = log(E^{GF}_j . U^F[:, P])     (all P, at block creation)

* mean pooling is linear, so only the *column sums* of the attention matrix are needed::

      r'_{jGF} = exp(big^{GF}_j - log Z_j)
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

Cost per new frame (T frames, n tokens, H heads, K STEP heads): the query and key content
projection of one frame (the values are never formed: ``sum_F W^F u_F = (sum_F W^F e_F) Wv^T``,
one product with the window's patch tokens, which are cached instead), ``2T - 1`` new
``n x n`` blocks per attention head (a GEMM, a row max, an exp and an ``(n x n) @ (n x T)``
product each), then per prediction one GEMV over every stored block
(``T^2 H n^2`` multiply-adds: memory-bound, it reads each stored block once) and small
``O(T^2 H n)`` log-domain bookkeeping.  Memory: ``K H T^2 n^2`` float32 for the blocks
(~403 MB per STEP head for ViT-S, T=16, n=256, H=6; half in bfloat16, see "Block storage"), see
:meth:`FastStepRunner.memory_bytes`.
The projection, the block creation and the GEMV are the kernels of :mod:`.fast_kernels`
(PyTorch, ONNX Runtime or step_ros's own compiled ones, whichever is fastest on the machine);
the prediction's log-domain bookkeeping is PyTorch, or compiled with the ``native`` kernels;
everything else here is PyTorch.

The block cache is indexed by *frame slot*, not by position, so it is independent of the
window order: the same cache serves any order of the same frames (e.g. reversed).

Numerical safety: exact for any logit spread, with no fallback.  Three rules.

* The position-independent part of the query's positional term, ``c_bar = mean_P c_P`` (for
  ``pe: none`` all of it: the query bias), is folded into the content query ``a``; ``gamma``
  then only carries ``(c_P - c_bar) . b_l``, so ``U`` is flat unless the PE itself is large.
* At block creation ``rho_j[P] = -log(E_j . U^F[:, P])`` is known for every P; it bounds
  ``log r'``.  A row whose ``rho`` exceeds :data:`RANGE_LIMIT` (=60) for some P, where an
  entry of E or U that underflowed (< 1e-38) could matter, is an *exact row*: its slot in E
  holds ``S - m`` instead of ``exp(S - m)``, it is left out of the GEMV (``r' = 0``), and each
  prediction takes it through ``exp`` directly: ``x_l = (S_jl - m_j) + (gamma_l[P] - mu[P])``,
  its normaliser ``logsumexp(x)`` and its column weights ``exp(x_l + log r')``, all moderate
  numbers.  Realistic heads have none; a sharp head with huge tokens has many, and pays
  ``O(n)`` exponentials per exact row and prediction (counted in
  :attr:`FastStepRunner.exact_rows`).  Every other row satisfies ``r' <= e^60``, so nothing
  overflows and an underflowed entry weighs under ``1e-38 e^60 ~ 1e-12`` of its row.
* ``log Z_j`` is held as ``ref + small``, ``ref`` being the large part (``beta + kappa + m +
  mu``) of the row's dominant term, and never added up, so the dominant term's ``log r'`` is
  ``0 - small`` as in a plain softmax's ``s - max(s)``.  Summing the large terms first would
  cost ``ulp(|s|)`` in every weight: a few percent at logits of 1e4.

* Speed holds for sharp heads too.  Every ``exp`` argument is floored at
  :data:`~step_ros.model.fast_kernels.EXP_FLOOR` (-87: ``exp`` = 1.6e-38, still a normal float32),
  and ``step-ros`` and the node flush denormals to zero
  (:func:`~step_ros.model.device.flush_denormals`).  Both only move values under the 1e-38 that
  the bound above already counts as lost, and they keep sharp attention off the CPU's slow
  paths: an ``exp`` below -87.3 and every multiply with a denormal (three ViT-S heads at token
  scale 10 took 964 ms per frame without them, 101 ms with them; decision 36).

Block storage.  ``block_dtype="float32"`` (the default) is exact to float32 rounding.
``"bfloat16"`` stores each ``E`` entry rounded to nearest bfloat16, a relative error of at most
``2^-8``, and changes nothing else: ``M`` (the normalisers) comes from the unrounded blocks,
exact rows and the CLS row stay in float32 (an exact row's ``S - m``, which bfloat16 could not
hold, goes to a float32 side table instead of the block), and every sum is float32.  So each
attention weight is within a relative ``2^-8`` (0.4 %) of the exact one, the mean attention
output within ``2^-8 max_l |v_l|`` per channel, and the logits within ``|W_cls W_proj|`` times
that (test ``test_bf16_blocks_stay_within_the_stated_bound``).  Where the ``native`` kernels make
bfloat16 blocks with the AMX tile unit (:mod:`.native_kernels`), the content scores ``S`` carry
up to ``delta = 3 * 2^-18 max sum_i |a_i b_i|`` more error and the normalisers ``3 * 2^-18``
relative: each weight within ``2^-8 + 2 delta + 3 * 2^-18`` relative (the same test, with that
bound). bfloat16, not float16: the same exponent range as float32, so the range rules above hold
unchanged.  It halves the cache and the bytes of the pass over it, which :mod:`.native_kernels`
runs as a compiled kernel (PyTorch has no product of a bfloat16 matrix with a float32 vector);
decision 37.

Measured against a float64 forward over query/key scales 1-40 and token scales 1-30 (test
``test_no_fallback_at_any_logit_spread``), the error stays at the fused SDPA forward's own
float32 error.  Non-finite tokens or weights still give the reference forward, counted in
:attr:`FastStepRunner.fallbacks`.

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

from .fast_kernels import EXP_FLOOR, floored_exp_, host_zeros, make_kernels, resolve_kernels
from .native_kernels import row_weights
from .heads import MultiHeadAttention, StepHead, pool_patch_grid

log = logging.getLogger(__name__)

#: A block row whose ``-log(E_j . U[:, P])`` exceeds this for some P is kept in the log domain.
RANGE_LIMIT = 60.0


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

    Tensor layout, slot-major (every block a new frame makes lands in one contiguous buffer,
    which the ONNX Runtime kernels write in place): G / F / s (query / key / any frame cache
    slot, T of them), P (window positions, T of them), K (STEP heads), H (attention heads),
    n tokens, d head width.  The per-position constants from the weights stay (K, H, ...).
    """

    def __init__(self, tasks: list[str], heads: list[StepHead], frames: int, kernels: str = "auto",
                 block_dtype: str = "float32") -> None:
        self.tasks, self.heads, self.T = tasks, heads, frames
        self.block_dtype = block_dtype  # validated with the kernels below
        self.K = len(heads)
        self.pool = heads[0].token_pool
        self.H = heads[0].attn.num_heads
        self.D = heads[0].attn.qkv.in_features
        self.d = self.D // self.H
        self.n: int | None = None
        self.refresh()
        self.kernels_request = kernels
        self.kernels_name = resolve_kernels(kernels, self.device, block_dtype=block_dtype)  # final at allocate()
        self.kernel_timings: dict[str, float] = {}  # what auto measured: {kernels: ms per frame}
        self.exact_count = 0  # rows flagged in ``exact``, counted by the thread that adds frames

    # -- constants: position and CLS terms, weights --------------------------------------------
    @torch.inference_mode()
    def refresh(self) -> None:
        """(Re)read the heads' weights and precompute every per-position / CLS constant."""
        K, H, T, D, d = self.K, self.H, self.T, self.D, self.d
        scale = 1.0 / math.sqrt(d)
        self.W = torch.stack([h.attn.qkv.weight.detach().float() for h in self.heads])  # (K, 3D, D)
        # The content projection makes queries and keys only, per attention head in the layouts the
        # blocks want (no copies after it); the values are never formed: the pooled output takes
        # Wv after the weighted sum of the patch tokens (decision 39).
        self.Wq_t = (self.W[:, :D] * scale).reshape(K * H, d, D).transpose(1, 2).contiguous()  # (K H, D, d)
        self.Wk = self.W[:, D: 2 * D].reshape(K * H, d, D).contiguous()  # (K H, d, D)
        self.Wv = self.W[:, 2 * D:].reshape(K, H, d, D).contiguous()  # (K, H, d, D)
        self.device = self.W.device  # every cache and index lives with the heads' weights
        bias = torch.stack([h.attn.qkv.bias.detach().float() for h in self.heads])  # (K, 3D)
        pes = []
        for h in self.heads:
            pe = h.positional()
            pes.append(torch.zeros(T, D, device=self.device) if pe is None else pe.detach().float().reshape(T, D))
        pe = torch.stack(pes)  # (K, T, D)
        pos = torch.baddbmm(bias[:, None], pe, self.W.transpose(1, 2))  # (K, T, 3D): t_P W^T + b
        pos = pos.reshape(K, T, 3, H, d).permute(2, 0, 3, 1, 4)  # (3, K, H, T, d)
        cq = pos[0] * scale  # c_P (query side, pre-scaled)
        # The position-independent part of the query's positional term (mostly the query bias)
        # goes into the content blocks, so that only the deviation ``c_P - c_bar`` multiplies
        # U: stored blocks then stay well inside float32's range (see "Numerical safety").
        self.cq_bar = cq.mean(2)  # (K, H, d)
        self.cq = (cq - self.cq_bar[:, :, None]).contiguous()  # c_P - c_bar
        self.ck = pos[1].contiguous()  # c'_P
        self.cv = pos[2].contiguous()  # c''_P
        g = torch.stack([h.global_cls.detach().float().reshape(D) for h in self.heads])  # (K, D)
        gqkv = (torch.einsum("kd,ked->ke", g, self.W) + bias).reshape(K, 3, H, d)
        self.qg, self.kg, self.vg = gqkv[:, 0] * scale, gqkv[:, 1], gqkv[:, 2]  # (K, H, d)
        self.kappa = torch.matmul(self.cq, self.ck.transpose(-1, -2))  # (K, H, P, P')
        self.cls_key_pos = torch.einsum("khpd,khd->pkh", self.cq, self.kg).contiguous()  # (P, K, H): c_P . k_g
        self.cls_query_pos = torch.einsum("khpd,khd->pkh", self.ck, self.qg)  # (P, K, H): q_g . c'_P
        self.s_gg = (self.qg * self.kg).sum(-1)  # (K, H)
        self.proj_w = torch.stack([h.attn.proj.weight.detach().float() for h in self.heads])
        self.proj_b = torch.stack([h.attn.proj.bias.detach().float() for h in self.heads])

    # -- caches -------------------------------------------------------------------------------
    def cache_shapes(self, n: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every per-frame cache, slot-major: G (query slot), F (key slot), P (position)."""
        K, H, T, d = self.K, self.H, self.T, self.d
        f32 = torch.float32
        return {
            "E": ((T, T, K, H, n, n), getattr(torch, self.block_dtype)),  # [G, F, k, h, j, l]: exp(S^{GF} - m^{GF});
            #                        a float32 cache's exact row holds S - m instead (see `exact`)
            "exact": ((T, T, K, H, n), torch.bool),  # rows of E kept in the log domain
            "m": ((T, T, K, H, n), f32),  # [G, F, ., ., j]: max_l S^{GF}_jl (row stabiliser of E)
            "M": ((T, T, T, K, H, n), f32),  # [G, F, P, ., ., j]: log(E_j . U^F[:, P])
            "a": ((T, K, H, n, d), f32),  # query content + c_bar (scaled), per slot
            "bT": ((T, K, H, d, n), f32),  # key content, transposed
            "e": ((T, n, self.D), f32),  # the frames' (pooled) patch tokens: the values' content is e Wv^T
            "beta": ((T, T, K, H, n), f32),  # [G, P', ., ., j]: a_j . c'_{P'}
            "delta": ((T, K, H, n), f32),  # a_j . k_g   (query content vs CLS key)
            "eps": ((T, K, H, n), f32),  # q_g . b_l   (CLS query vs key content)
            "U": ((T, T, K, H, n), f32),  # [P, F, ., ., l]: exp(gamma - mu)
            "logU": ((T, T, K, H, n), f32),  # gamma - mu (U before the exp, for exact rows)
            "Ut": ((T, K, H, n, T), f32),  # [F, ., ., l, P]: U again, in the layout E @ U wants
            "mu": ((T, T, K, H), f32),  # [P, F, ., .]: max_l gamma
            "mr": ((T, K, H, n), f32),  # its row blocks (x, F): row max of S and the minimum
            "minr": ((T, K, H, n), f32),  # of log(E @ U) over the positions (M is written directly)
            "mc": ((T, K, H, n), f32),  # its column blocks (G, x), the same
            "minc": ((T, K, H, n), f32),
            "r_buf": ((T, T, K, H, n), f32),  # per prediction: r', in E's order
            "col_buf": ((T, K, H, n), f32),  # the frame keys' column weights
            "big_buf": ((T, T, K, H, n), f32),  # per prediction: gathered per-block terms
            "M_buf": ((T, T, K, H, n), f32),
            "U_buf": ((T, T, K, H, n), f32),
            "t_buf": ((T, T, K, H, n), f32),
            "wg_buf": ((T, K, H), f32),  # the CLS key's column weight, per query slot
        }

    def allocate(self, n: int) -> None:
        self.n = n
        self.exact_count = 0
        self.exact_sm: dict[tuple[int, int], torch.Tensor] = {}  # bfloat16 blocks: (G, F) -> its exact rows' S - m
        self._exact_cat: torch.Tensor | None = None  # their concatenation, made at the next prediction
        for name, (shape, dtype) in self.cache_shapes(n).items():
            setattr(self, name, host_zeros(shape, dtype, self.device))
        slots = torch.arange(self.T, device=self.device)
        self._gf_T = ((slots[:, None] * self.T + slots[None, :]) * self.T)  # row (G*T + F)*T of M.view(T**3, ...)
        self.kernels, self.kernel_timings = make_kernels(
            resolve_kernels(self.kernels_request, self.device, n, self.block_dtype), self)
        self.kernels_name = self.kernels.name
        if self.kernel_timings:
            log.info("fast STEP engine: kernels auto -> %s (per frame, measured here: %s)", self.kernels_name,
                     ", ".join(f"{k} {v:.1f} ms" for k, v in self.kernel_timings.items()))

    def memory_bytes(self, n: int | None = None) -> int:
        n = n or self.n
        if n is None:
            return 0
        return sum(math.prod(s) * t.itemsize for s, t in self.cache_shapes(n).values())

    @torch.inference_mode()
    def add_frame(self, x: int, patches: torch.Tensor, filled: list[int]) -> None:
        """Cache frame content at slot ``x`` and create every block pairing it with a slot:
        row blocks (x, F) and column blocks (G, x); the (x, x) block is made twice, with the
        same values.  Blocks with slots not in ``filled`` (no frame there yet) are made too, and
        never read."""
        n = patches.shape[0]
        if self.n != n:
            self.allocate(n)
        self.kernels.project(patches.contiguous(), x)  # a[x] and bT[x], the frame's content queries and keys
        a, bT = self.a[x], self.bT[x]  # (K, H, n, d), (K, H, d, n)
        self.e[x] = patches
        self.beta[x] = torch.matmul(self.ck, a.transpose(-1, -2)).permute(2, 0, 1, 3)  # (P', K, H, n)
        gamma = torch.matmul(self.cq, bT)  # (K, H, P, n)
        gmx = gamma.amax(-1, keepdim=True)
        self.mu[:, x] = gmx[..., 0].permute(2, 0, 1)
        log_u = (gamma - gmx).permute(2, 0, 1, 3)  # (P, K, H, n)
        self.logU[:, x] = log_u
        torch.clamp(log_u, min=EXP_FLOOR, out=self.U[:, x]).exp_()  # (logU keeps the unfloored values)
        self.Ut[x] = self.U[:, x].permute(1, 2, 3, 0)
        self.delta[x] = torch.matmul(a, self.kg[..., None])[..., 0]
        self.eps[x] = torch.matmul(self.qg[:, :, None], bT)[:, :, 0]

        self.kernels.create(x)  # E[x, :], E[:, x], their row maxima, M[x, :], M[:, x]: the big work
        mask = torch.zeros(self.T, dtype=torch.bool, device=self.device)
        mask[filled] = True
        self.exact_count -= self._exact_rows_of(x)  # counted by slot: a sum over all of `exact` took 2 ms a frame
        self._keep_exact_rows(x, mask)
        self.exact_count += self._exact_rows_of(x)
        self.m[x] = self.mr
        self.m[:, x] = self.mc

    def _exact_rows_of(self, x: int) -> int:
        """Flagged rows in the blocks of slot x (its row and column blocks, (x, x) once)."""
        e = self.exact
        return int(torch.count_nonzero(e[x])) + int(torch.count_nonzero(e[:, x])) - int(torch.count_nonzero(e[x, x]))

    def _keep_exact_rows(self, x: int, filled: torch.Tensor) -> None:
        """Flag the new blocks' rows that the factored form cannot carry exactly and put them
        in the log domain: ``E[row] = S[row] - m[row]`` (bfloat16 blocks, which cannot hold it:
        a float32 side table per block, :attr:`exact_sm`).  ``filled``: (T,) bool, slots that
        hold a frame (blocks with empty slots are never read, so never fixed).

        A row is exact-by-factoring when, for every position P, ``log r' <= -log(E_j . U[:, P])
        <= RANGE_LIMIT``: then nothing the prediction multiplies overflows, and every entry of E
        or U that underflowed weighs under ``1e-38 e^60 ~ 1e-12`` of its softmax row.
        """
        in_e = self.E.dtype == torch.float32
        pieces: dict[tuple[int, int], list[torch.Tensor]] = {}  # side table rows, per (G, F) block
        if not in_e:
            for slot in range(self.T):  # the blocks of slot x are new: their old rows go
                self.exact_sm.pop((x, slot), None)
                self.exact_sm.pop((slot, x), None)
            self._exact_cat = None
        for new_is_query, low, mx in ((True, self.minr, self.mr), (False, self.minc, self.mc)):
            bad = ~(low >= -RANGE_LIMIT) & filled[:, None, None, None]  # (slot, K, H, n); NaN is bad
            if new_is_query:
                self.exact[x] = bad
            else:
                self.exact[:, x] = bad
                if not in_e:
                    bad = bad.clone()
                    bad[x] = False  # block (x, x): its rows went in with the row blocks
            if not bool(bad.any()):
                continue
            # S of every block with a bad row, recomputed (the kernels overwrote it with E)
            slots, kk, hh = bad.any(-1).nonzero(as_tuple=True)
            for lo in range(0, slots.numel(), self._EXACT_BLOCKS):
                s, k, h = (i[lo:lo + self._EXACT_BLOCKS] for i in (slots, kk, hh))
                q, kslot = (torch.full_like(s, x), s) if new_is_query else (s, torch.full_like(s, x))
                S = torch.matmul(self.a[q, k, h], self.bT[kslot, k, h])  # (B, n, n)
                rows = bad[s, k, h]  # (B, n)
                b, j = rows.nonzero(as_tuple=True)
                values = S[b, j] - mx[s[b], k[b], h[b], j, None]
                if in_e:
                    self.E[q[b], kslot[b], k[b], h[b], j] = values
                    continue
                sb = s[b]  # sorted by (slot, k, h, j): each block's rows in exact.nonzero()'s order
                for slot in torch.unique_consecutive(sb).tolist():
                    pieces.setdefault((x, slot) if new_is_query else (slot, x), []).append(values[sb == slot])
        for key, parts in pieces.items():
            self.exact_sm[key] = torch.cat(parts)

    # -- prediction ---------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, pos: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Logits for every head of the group; ``pos[s]`` = window position of slot s.

        Returns None when the result is not finite (non-finite tokens or weights): the caller
        then runs the reference forward.
        """
        K, H, T, n = self.K, self.H, self.T, self.n
        exact = self.exact.nonzero(as_tuple=True) if self.exact_count else None
        if self.kernels.fused_weights:
            log_r_exact, wg = self._row_weights_native(pos, exact)
        else:
            log_r_exact, wg = self._row_weights_torch(pos, exact)
        col = self.kernels.columns()  # (F, K, H, n): sum_G U * (r' E), the one pass over the cache
        if exact is not None:
            self._exact_columns(exact, pos, log_r_exact, col)
        # the CLS query's own row, directly
        sg = self.eps + self.cls_query_pos[pos][..., None]  # (F, K, H, n)
        row = torch.cat([sg.permute(1, 2, 0, 3).reshape(K, H, T * n), self.s_gg[..., None]], dim=-1).softmax(-1)
        col = col + row[..., :-1].reshape(K, H, T, n).permute(2, 0, 1, 3)
        wg = wg + row[..., -1]
        # sum_F W^F u_F = (sum_F W^F e_F) Wv^T: one GEMM over the window's tokens, shared by every head,
        # then each head's (d x D) value weights (cheaper than projecting and storing u every frame)
        y = torch.matmul(col.permute(1, 2, 0, 3).reshape(K * H, T * n), self.e.view(T * n, self.D))  # (K H, D)
        out = torch.matmul(self.Wv, y.view(K, H, self.D, 1)).view(K, H, self.d)
        out = out + torch.einsum("fkh,khfd->khd", col.sum(-1), self.cv[:, :, pos])
        out = (out + wg[..., None] * self.vg) / (1 + T * n)
        pooled = torch.baddbmm(self.proj_b[:, None], out.reshape(K, 1, self.D), self.proj_w.transpose(1, 2))[:, 0]
        if not bool(torch.isfinite(pooled).all()):
            return None
        return {task: head.classifier(pooled[k]) for k, (task, head) in enumerate(zip(self.tasks, self.heads))}

    def _row_weights_torch(self, pos: torch.Tensor, exact: tuple[torch.Tensor, ...] | None
                           ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Every cached row's weight ``r'`` into :attr:`r_buf` (0 for exact rows) and ``U`` at the
        query's position into :attr:`U_buf`; returns the exact rows' ``log r'`` (None without
        any) and the CLS key's column weight ``(K, H)``."""
        # per (G, F) block quantities at the current positions, all (G, F, K, H[, n]), into
        # preallocated buffers (fresh multi-MB temporaries cost page faults every prediction)
        big, M, U, t = self.big_buf, self.M_buf, self.U_buf, self.t_buf
        torch.index_select(self.beta, 1, pos, out=big)  # beta^G[P_F]
        self._M_at(pos, exact)  # M^{GF}[P_G], into M
        torch.index_select(self.U, 0, pos, out=U)  # U^F[:, P_G]
        kappa = self.kappa[:, :, pos][:, :, :, pos].permute(2, 3, 0, 1)  # kappa[P_G, P_F]
        mu = self.mu[pos]  # mu^F[P_G]
        # Row j of block (G, F) adds exp(big + M) to Z_j; big holds the large terms.  log Z_j
        # is kept as ref + small and never added up: ref is one of the row's big values (or
        # the CLS key's score), so big - ref is exact for the terms that matter and every later
        # step handles moderate numbers.  Summing the large terms first would cost ulp(|s|) in
        # every weight, a few percent at logits of 1e4 (a plain softmax loses none: s - max(s)).
        big.add_(kappa[..., None]).add_(self.m).add_(mu[..., None])
        cls_key = self.delta + self.cls_key_pos[pos][..., None]  # (G, K, H, n): s_{j,g}
        ref = torch.maximum(big.amax(1), cls_key)  # (G, K, H, n)
        big.sub_(ref[:, None])
        cls_key = cls_key - ref
        torch.add(big, M, out=t)
        top = torch.maximum(t.amax(1), cls_key)  # the row's largest term, less ref
        floored_exp_(t.sub_(top[:, None]))
        small = torch.log(t.sum(1).add_(floored_exp_(cls_key - top))).add_(top)  # log Z_j - ref
        log_r = big.sub_(small[:, None])  # log r' (G, F, K, H, n)
        torch.clamp(log_r, min=EXP_FLOOR, out=self.r_buf).exp_()
        log_r_exact = None
        if exact is not None:
            log_r_exact = log_r[exact]
            self.r_buf[exact] = 0.0  # their E rows hold S - m: kept out of the GEMV
        return log_r_exact, floored_exp_(cls_key - small).sum((0, 3))  # (K, H): CLS key column

    def _M_at(self, pos: torch.Tensor, exact: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        """:attr:`M_buf` = ``M^{GF}[P_G]`` for every (G, F) block, exact rows' terms in the log domain."""
        K, H, T, n = self.K, self.H, self.T, self.n
        M = self.M_buf
        torch.index_select(self.M.view(T**3, K, H, n), 0, (self._gf_T + pos[:, None]).view(-1),
                           out=M.view(T * T, K, H, n))
        if exact is not None:
            M[exact] = self._exact_lse(exact, pos)
        return M

    def _row_weights_native(self, pos: torch.Tensor, exact: tuple[torch.Tensor, ...] | None
                            ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """:meth:`_row_weights_torch` in one compiled pass (``step_row_weights``): the same
        arithmetic, each (query slot, attention head)'s rows kept in L1 through it."""
        M = self.M if exact is None else self._M_at(pos, exact)  # the kernel takes M at P_G itself
        row_weights(self.beta, self.kappa, self.m, self.mu, M, self.delta, self.cls_key_pos, self.U,
                    None if exact is None else self.exact, pos, self.r_buf, None if exact is None else self.big_buf,
                    self.U_buf, self.wg_buf, EXP_FLOOR)
        return None if exact is None else self.big_buf[exact], self.wg_buf.sum(0)

    # exact rows: ``x_l = (S_jl - m_j) + (gamma_l[P_G] - mu[P_G])``, the row's logits less the
    # block's stabilisers, taken through exp only after the row's own max is subtracted.  x is
    # gathered again for the column pass rather than kept: log Z needs every row first, and
    # keeping x for all exact rows could take as much memory as the blocks themselves.
    _EXACT_CHUNK = 4096  # exact rows per pass at prediction (CHUNK n floats)
    _EXACT_BLOCKS = 64  # blocks recomputed per batch when new blocks have exact rows

    def _exact_x(self, exact: tuple[torch.Tensor, ...], pos: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        gg, ff, kk, hh, jj = (i[lo:hi] for i in exact)
        if self.E.dtype == torch.float32:
            s_m = self.E[gg, ff, kk, hh, jj]  # S - m, stored in the row
        else:  # bfloat16 blocks: the side table, its blocks in (G, F) order as exact.nonzero() has them
            if self._exact_cat is None:
                keys = sorted(self.exact_sm)
                self._exact_cat = torch.cat([self.exact_sm[key] for key in keys]) if keys else self.E.new_zeros(
                    (0, self.n), dtype=torch.float32)
                if self._exact_cat.shape[0] != exact[0].numel():
                    raise RuntimeError(f"fast STEP engine: {self._exact_cat.shape[0]} rows in the exact side table, "
                                       f"{exact[0].numel()} flagged")
            s_m = self._exact_cat[lo:hi]
        return s_m + self.logU[pos[gg], ff, kk, hh]

    def _exact_lse(self, exact: tuple[torch.Tensor, ...], pos: torch.Tensor) -> torch.Tensor:
        """``log sum_l exp(x_l)`` of every exact row: its ``M`` at the current position."""
        count = exact[0].numel()
        out = []
        chunk = self._EXACT_CHUNK
        for lo in range(0, count, chunk):
            x = self._exact_x(exact, pos, lo, min(count, lo + chunk))
            top = x.amax(-1, keepdim=True)  # torch.logsumexp, with its exp kept on the fast path
            out.append(floored_exp_(x.sub_(top)).sum(-1).log_().add_(top[:, 0]))
        return torch.cat(out)

    def _exact_columns(self, exact: tuple[torch.Tensor, ...], pos: torch.Tensor, log_r: torch.Tensor,
                       col: torch.Tensor) -> None:
        """Add the exact rows' attention weights ``exp(x_l + log r')`` to the key columns."""
        _, ff, kk, hh, _ = exact
        target = (ff * self.K + kk) * self.H + hh  # row of col.view(-1, n)
        flat = col.view(-1, col.shape[-1])
        count = ff.numel()
        chunk = self._EXACT_CHUNK
        for lo in range(0, count, chunk):
            hi = min(count, lo + chunk)
            x = floored_exp_(self._exact_x(exact, pos, lo, hi).add_(log_r[lo:hi, None]))
            flat.index_add_(0, target[lo:hi], x)

    def flops_per_frame(self, n: int) -> float:
        """Multiply-adds x 2 per new frame (steady state), for the benchmark's GFLOP column."""
        K, H, T, D, d = self.K, self.H, self.T, self.D, self.d
        qkv = 2 * n * D * 2 * D + 2 * 2 * H * T * n * d  # projection (queries, keys) + beta, gamma
        blocks = (2 * T) * H * (2 * n * n * d + 2 * n * n * T)  # S and E @ U, row + column
        gemv = T * T * H * 2 * n * n
        tail = 2 * H * T * n * D + 2 * H * d * D + 2 * D * D  # the weighted token sum, Wv, the output projection
        return float(K * (qkv + blocks + gemv + tail))


class FastStepRunner:
    """HeadRunner (see :mod:`step_ros.model.streaming`) with the exact streaming STEP algebra.

    ``model``: a :class:`~step_ros.model.multitask.MultiTaskModel` (or anything with a
    ``heads`` mapping, or the mapping itself).  STEP heads in the default configuration are
    computed from per-frame caches (all of them batched, grouped by attention head count);
    every other head runs its normal forward on the window.  Caches are keyed by frame id and
    hold at most ``T`` frames (the oldest is evicted when a frame arrives into a full cache).

    ``kernels``: who runs the projection, the block creation and the pass over the blocks
    (:mod:`~step_ros.model.fast_kernels`): ``onnxruntime`` (MLAS, CPU; float32 blocks), ``torch``
    (any device), ``native`` (step_ros's compiled, fused block creation and row weights, with the
    AMX tile unit for bfloat16 blocks where the CPU has one; CPU) or ``auto``: PyTorch off the
    CPU and for frames under :data:`~step_ros.model.fast_kernels.AUTO_MIN_TOKENS` tokens,
    otherwise whichever is fastest on this machine, timed once at the first frame
    (:attr:`kernel_timings`).  Same numbers to float32 rounding either way (with bfloat16
    blocks: within the bound of the module docstring, "Block storage").

    ``block_dtype``: ``float32`` (exact to float32 rounding) or ``bfloat16`` (half the cache and
    a faster pass over it; each attention weight within a relative ``2^-8`` of the exact one:
    module docstring, "Block storage").

    Weights are read at construction: after changing a head's weights call :meth:`refresh`.
    Counters: ``fallbacks`` (fast-path predictions recomputed by the reference forward because
    a value was not finite), ``reference_predictions`` (predictions on incomplete windows, which
    use the reference forward by design); ``exact_rows``: cached block rows taken through the
    log domain (module docstring, "Numerical safety").
    """

    def __init__(self, model: Any, frames: int | None = None, kernels: str = "auto",
                 block_dtype: str = "float32") -> None:
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
        self.block_dtype = block_dtype
        self.groups = [_StepGroup(ts, [self.heads[t] for t in ts], self.frames, kernels, block_dtype)
                       for ts in groups.values()]
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
    def exact_rows(self) -> int:
        """Rows of the cached blocks now computed in the log domain (see "Numerical safety").

        A count kept as frames are added, so that another thread (a node's diagnostics) reads
        it without tensor work: a PyTorch op from a second thread starts a second OpenMP team,
        whose spinning workers took the cores from the inference thread's (node compute 220
        instead of 160 ms per frame, Intel VM, session 11)."""
        return sum(g.exact_count for g in self.groups)

    @property
    def kernels(self) -> str:
        """``torch``, ``onnxruntime`` or ``native``; ``auto`` until the first frame sets the token
        count and the choice is made (measured where more than one could win); ``none`` without
        fast heads."""
        return self.groups[0].kernels_name if self.groups else "none"

    @property
    def kernel_timings(self) -> dict[str, float]:
        """``{kernels: ms per frame}`` that ``auto`` measured to choose (empty: nothing measured)."""
        return dict(self.groups[0].kernel_timings) if self.groups else {}

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
            g.add_frame(slot, pool_patch_grid(patches, g.pool), filled)

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
                    self.fallback_reasons["non-finite"] += 1
                    self._log_once("non-finite", "fast STEP engine: non-finite values (tokens or weights), "
                                   "prediction recomputed with the reference forward (counted in .fallbacks)")
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
