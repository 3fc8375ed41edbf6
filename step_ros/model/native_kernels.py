"""step_ros's compiled CPU kernels for the fast STEP engine (:mod:`.fast_step`): the places where
no library call does what the engine needs at memory or FMA speed.

* ``step_create_blocks``, per new frame (the ``native`` kernel set of :mod:`.fast_kernels`): the
  ``2T - 1`` new ``n x n`` content blocks of every attention head, fused.  Six query rows at a
  time, their scores ``S = a b^T`` are made in AVX-512 registers (a 6 x 64 tile, 24
  accumulators) into a stripe that stays in L1, and while they are there the row maximum
  ``m``, ``E = exp(max(S - m, floor))`` (a vectorised Cephes ``expf``, about 1 ulp),
  ``E @ U`` (from the unrounded ``E``) with its log ``M`` (a vectorised Cephes ``logf``) and
  the store of ``E`` into the block cache (float32, or bfloat16 rounded to nearest even)
  follow; that store bypasses the caches (non-temporal), since the next reader is the next
  prediction's pass, long after they would have been overwritten.
  PyTorch needs seven calls per block and three per frame for the same work, each sending
  the block through memory (a new frame for three ViT-S heads, Intel Xeon, 2 threads: 34.8
  against 46.9 ms with either storage; decision 38).
  With bfloat16 blocks, on a CPU with AMX (Sapphire Rapids and later) and where Linux grants
  the tile state, ``create_amx_head`` instead makes ``S`` sixteen query rows at a time with the
  tile unit, from a three-piece bfloat16 split (``x = hi + lo``, products ``hi hi + hi lo +
  lo hi`` with float32 accumulation: ``S`` within ``3 * 2^-18 sum_i |a_i b_i|``, three times
  float32 GEMM's own worst case), and ``E @ U`` the same way from ``E``'s two pieces (within
  ``3 * 2^-18`` relative, all terms positive); ``E``'s hi piece is its stored bfloat16
  rounding.  The row work between the two stays in AVX-512.  Per new frame of three ViT-S heads:
  18 against 29 ms (decision 39).  Float32 blocks keep the AVX-512 products, exact to float32
  rounding.
* ``step_row_weights``, per prediction: every cached row's weight ``r'`` (the log-domain
  bookkeeping of :meth:`~step_ros.model.fast_step._StepGroup.predict`) in one pass, each
  (query slot, attention head)'s rows in L1 -- PyTorch made about fifteen passes over the
  ``(T, T, K, H, n)`` arrays, each through memory (three ViT-S heads: 2 against about 5 ms).
* ``step_columns_bf16``, per prediction with bfloat16 blocks: for every key slot, STEP head and
  attention head ``o`` and key ``l``::

      col[o, l] = sum_G U[G, o, l] * sum_j r[G, o, j] * E[G, o, j, l]

  with ``E`` in bfloat16 and every sum in float32.  The pass is bound by memory bandwidth (it
  reads each stored block once per prediction), so halving the bytes halves its time -- but
  only if nothing converts them to float32 in memory first, and PyTorch has no product of a
  bfloat16 matrix with a float32 vector (``bmm`` in bfloat16 rounds its output and ran no faster
  than float32; decision 37).

C99 with AVX-512 intrinsics where the CPU has them (F, BW and VL: Skylake-X and later, AMD
Zen 4; AMX tiles and AVX512-BF16 where the compiler and CPU have them) and plain C elsewhere,
compiled with the machine's C compiler the first time it is needed, cached in
:func:`~step_ros.resources.default_cache_dir` and loaded with ``ctypes`` (no Python headers, no
build step at install).  Without AVX-512 the block creation's plain C is slower than PyTorch's,
so the ``native`` kernels then create blocks with PyTorch ops (:func:`fused_create_available`);
where no compiler works at all, the bfloat16 pass falls back to PyTorch ops with the same result
to float32 rounding, and says so once in the log.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import torch

from ..resources import default_cache_dir

log = logging.getLogger(__name__)

C_SOURCE = r"""
#define _GNU_SOURCE /* syscall, posix_memalign */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define STEP_AVX512 1
#include <immintrin.h>
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__) && defined(__x86_64__)
#define STEP_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

/* ---- the pass over bfloat16 blocks ---------------------------------------------------------- */

static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

/* c[l] += u[l] * sum_j r[j] * e[j, l] for one n x n block, l in [l0, n): plain C. */
static void block_pass(const float *restrict r, const uint16_t *restrict e, const float *restrict u,
                       float *restrict c, long n, long l0, float *restrict w) {
  for (long l = l0; l < n; ++l) w[l] = 0.0f;
  for (long j = 0; j < n; ++j) {
    const float rj = r[j];
    if (rj == 0.0f) continue;
    const uint16_t *row = e + j * n;
    for (long l = l0; l < n; ++l) w[l] += rj * bf16_to_f32(row[l]);
  }
  for (long l = l0; l < n; ++l) c[l] += u[l] * w[l];
}

#if STEP_AVX512
/* The same for columns [l0, l0 + 256): all 256 sums in 16 registers while the rows stream by. */
static void block_pass_256(const float *restrict r, const uint16_t *restrict e, const float *restrict u,
                           float *restrict c, long n, long l0) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (long j = 0; j < n; ++j) {
    if (r[j] == 0.0f) continue;
    const __m512 rj = _mm512_set1_ps(r[j]);
    const uint16_t *row = e + j * n + l0;
    for (int i = 0; i < 16; ++i) {
      const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(row + 16 * i)));
      acc[i] = _mm512_fmadd_ps(rj, _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)), acc[i]);
    }
  }
  for (int i = 0; i < 16; ++i) {
    const long l = l0 + 16 * i;
    _mm512_storeu_ps(c + l, _mm512_fmadd_ps(_mm512_loadu_ps(u + l), acc[i], _mm512_loadu_ps(c + l)));
  }
}
#endif

/* col[o, :] = sum_G U[G, o, :] * (r[G, o, :] @ E[G, o, :, :]); rows with r = 0 are skipped.
   Each thread takes a fixed range of o and walks the blocks in memory order (G outer). */
void step_columns_bf16(const float *restrict r, const uint16_t *restrict E, const float *restrict U,
                       float *restrict col, long T, long O, long n, int threads) {
#pragma omp parallel num_threads(threads)
  {
    float w[n];
    for (long G = 0; G < T; ++G) {
#pragma omp for schedule(static)
      for (long o = 0; o < O; ++o) {
        const long b = G * O + o;
        float *c = col + o * n;
        if (G == 0)
          for (long l = 0; l < n; ++l) c[l] = 0.0f;
        long l0 = 0;
#if STEP_AVX512
        for (; l0 + 256 <= n; l0 += 256) block_pass_256(r + b * n, E + b * n * n, U + b * n, c, n, l0);
#endif
        if (l0 < n) block_pass(r + b * n, E + b * n * n, U + b * n, c, n, l0, w);
      }
    }
  }
}

/* ---- the block creation ---------------------------------------------------------------------- */

/* exp(x) for x in [-87.5, 0]: Cephes' expf (Cody-Waite reduction, degree-5 minimax), ~1 ulp. */
static inline float exp_small(float x) {
  const float k = floorf(x * 1.44269504088896341f + 0.5f);
  const float f = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * f + 1.3981999507E-3f;
  p = p * f + 8.3334519073E-3f;
  p = p * f + 4.1665795894E-2f;
  p = p * f + 1.6666665459E-1f;
  p = p * f + 5.0000001201E-1f;
  p = p * f * f + f + 1.0f;
  const int32_t bits = ((int32_t)k + 127) << 23;
  float s;
  memcpy(&s, &bits, sizeof s);
  return p * s;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; finite inputs */
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

typedef struct {
  const float *q, *key, *u; /* (n, d), (d, n), (n, T) */
  void *e;                  /* (n, n) float32 or bfloat16 */
  float *m, *low;           /* (n): row max of S, min over P of M */
  float *M;                 /* M[P, j] at M + P * stride + j: log(E u) */
  long stride;
} block_job;

/* One block in plain C: S = q key, m = rowmax S, E = exp(max(S - m, floor)), M = log(E u) and its
   minimum over positions. */
static void create_plain(const block_job *jb, long n, long d, long T, int bf16, float floor, float *srow) {
  for (long j = 0; j < n; ++j) {
    for (long l = 0; l < n; ++l) srow[l] = 0.0f;
    for (long k = 0; k < d; ++k) {
      const float qk = jb->q[j * d + k];
      const float *kr = jb->key + k * n;
      for (long l = 0; l < n; ++l) srow[l] += qk * kr[l];
    }
    float mx = srow[0];
    for (long l = 1; l < n; ++l) mx = srow[l] > mx ? srow[l] : mx;
    jb->m[j] = mx;
    for (long l = 0; l < n; ++l) {
      const float v = srow[l] - mx;
      srow[l] = exp_small(v < floor ? floor : v);
    }
    if (bf16) {
      uint16_t *e = (uint16_t *)jb->e + j * n;
      for (long l = 0; l < n; ++l) e[l] = f32_to_bf16(srow[l]);
    } else {
      memcpy((float *)jb->e + j * n, srow, n * sizeof(float));
    }
    float low = INFINITY;
    for (long P = 0; P < T; ++P) {
      float eu = 0.0f;
      for (long l = 0; l < n; ++l) eu += srow[l] * jb->u[l * T + P];
      const float lg = logf(eu);
      jb->M[P * jb->stride + j] = lg;
      low = lg < low ? lg : low;
    }
    jb->low[j] = low;
  }
}

#if STEP_AVX512
static inline __m512 exp512(__m512 x) { /* exp_small, 16 lanes; scalef does the 2^k */
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fmadd_ps(k, _mm512_set1_ps(2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, f), f, _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, k);
}

static inline __m512 log512(__m512 x) { /* Cephes' logf, 16 lanes: x > 0 (0 gives -inf) */
  __m512 e = _mm512_getexp_ps(x);
  __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src); /* x = m 2^e, m in [1, 2) */
  const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356237f), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_ps(e, big, e, _mm512_set1_ps(1.0f));
  const __m512 f = _mm512_sub_ps(m, _mm512_set1_ps(1.0f)), z = _mm512_mul_ps(f, f);
  __m512 p = _mm512_set1_ps(7.0376836292E-2f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-1.1514610310E-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.1676998740E-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-1.2420140846E-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.4249322787E-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-1.6668057665E-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.0000714765E-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-2.4999993993E-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(3.3333331174E-1f));
  __m512 y = _mm512_mul_ps(_mm512_mul_ps(p, f), z);
  y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), y);
  y = _mm512_fmadd_ps(z, _mm512_set1_ps(-0.5f), y);
  __m512 r = _mm512_fmadd_ps(e, _mm512_set1_ps(0.693359375f), _mm512_add_ps(f, y));
  const __mmask16 zero = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_EQ_OQ);
  return _mm512_mask_mov_ps(r, zero, _mm512_set1_ps(-INFINITY));
}

static inline __mmask16 lanes(long left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u); }

static inline float row_max(const float *row, long n) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (long l = 0; l < n; l += 16) mx = _mm512_mask_max_ps(mx, lanes(n - l), mx, _mm512_loadu_ps(row + l));
  return _mm512_reduce_max_ps(mx);
}

/* float32 bits rounded to nearest even at bit 16: the bfloat16 is the top half (finite inputs) */
static inline __m512i bf16_round(__m512i u) {
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
}

/* M = log(E u) of rows j0 .. j0 + R - 1 (eu: one register per row, lanes = positions): stored
   transposed (M[P, j]), with each row's minimum over the positions. */
static void store_log_rows(const __m512 *eu, long R, long T, const block_job *jb, long j0) {
  const __mmask16 tm = lanes(T);
  float lg[16][16];
  for (long r = 0; r < R; ++r) {
    const __m512 v = log512(_mm512_mask_mov_ps(_mm512_set1_ps(1.0f), tm, eu[r]));
    _mm512_storeu_ps(lg[r], v);
    jb->low[j0 + r] = _mm512_mask_reduce_min_ps(tm, v);
  }
  for (long P = 0; P < T; ++P)
    for (long r = 0; r < R; ++r) jb->M[P * jb->stride + j0 + r] = lg[r][P];
}

#define ROWS 6
/* One block with AVX-512 (T <= 16): six query rows at a time, their n scores in an L1 stripe
   (6 x 64 register tiles), then the row max, exp, store, E u and its log while the stripe is hot. */
static void create_avx512(const block_job *jb, long n, long d, long T, int bf16, float floor, float *stripe,
                          float *qpad) {
  const long np = (n + 63) / 64 * 64;
  const __mmask16 tm = lanes(T);
  const int stream = n % 16 == 0 && (uintptr_t)jb->e % 64 == 0; /* whole aligned vectors */
  for (long j0 = 0; j0 < n; j0 += ROWS) {
    const long R = n - j0 < ROWS ? n - j0 : ROWS;
    const float *qr = jb->q + j0 * d;
    if (R < ROWS) { /* the last rows, padded with zero queries */
      memset(qpad, 0, ROWS * d * sizeof(float));
      memcpy(qpad, qr, R * d * sizeof(float));
      qr = qpad;
    }
    for (long c0 = 0; c0 < np; c0 += 64) {
      __mmask16 cm[4];
      for (int v = 0; v < 4; ++v) cm[v] = n - (c0 + 16 * v) <= 0 ? 0 : lanes(n - (c0 + 16 * v));
      __m512 acc[ROWS][4];
      for (int r = 0; r < ROWS; ++r)
        for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
      for (long k = 0; k < d; ++k) {
        const float *kr = jb->key + k * n + c0;
        const __m512 b0 = _mm512_maskz_loadu_ps(cm[0], kr), b1 = _mm512_maskz_loadu_ps(cm[1], kr + 16);
        const __m512 b2 = _mm512_maskz_loadu_ps(cm[2], kr + 32), b3 = _mm512_maskz_loadu_ps(cm[3], kr + 48);
        for (int r = 0; r < ROWS; ++r) {
          const __m512 a = _mm512_set1_ps(qr[r * d + k]);
          acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
          acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
          acc[r][2] = _mm512_fmadd_ps(a, b2, acc[r][2]);
          acc[r][3] = _mm512_fmadd_ps(a, b3, acc[r][3]);
        }
      }
      for (int r = 0; r < ROWS; ++r)
        for (int v = 0; v < 4; ++v) _mm512_storeu_ps(stripe + r * np + c0 + 16 * v, acc[r][v]);
    }
    for (long r = 0; r < R; ++r) {
      float *row = stripe + r * np;
      const float m = row_max(row, n);
      jb->m[j0 + r] = m;
      const __m512 mv = _mm512_set1_ps(m), fl = _mm512_set1_ps(floor);
      for (long l = 0; l < n; l += 16) {
        const __mmask16 lm = lanes(n - l);
        const __m512 e = exp512(_mm512_max_ps(_mm512_sub_ps(_mm512_loadu_ps(row + l), mv), fl));
        _mm512_mask_storeu_ps(row + l, lm, e);
        if (bf16) {
          const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_round(_mm512_castps_si512(e)), 16));
          uint16_t *dst = (uint16_t *)jb->e + (j0 + r) * n + l;
          if (stream) _mm256_stream_si256((__m256i *)dst, h);
          else _mm256_mask_storeu_epi16(dst, lm, h);
        } else {
          float *dst = (float *)jb->e + (j0 + r) * n + l;
          if (stream) _mm512_stream_ps(dst, e);
          else _mm512_mask_storeu_ps(dst, lm, e);
        }
      }
    }
    __m512 eu[ROWS]; /* eu[j, :] = sum_l E[j, l] u[l, :]: one register per row */
    for (int r = 0; r < ROWS; ++r) eu[r] = _mm512_setzero_ps();
    for (long l = 0; l < n; ++l) {
      const __m512 uv = _mm512_maskz_loadu_ps(tm, jb->u + l * T);
      for (int r = 0; r < ROWS; ++r) eu[r] = _mm512_fmadd_ps(_mm512_set1_ps(stripe[r * np + l]), uv, eu[r]);
    }
    store_log_rows(eu, R, T, jb, j0);
  }
}
#endif

#if STEP_AMX
/* ---- S = q key with AMX: bfloat16 tiles, three-piece split ------------------------------------
   x = hi + lo + r, hi = bf16(x), lo = bf16(x - hi), |r| <= 2^-18 |x|; S = qh kh + qh kl + ql kh
   with float32 accumulation in the tile unit.  What is left out (ql kl, and the r terms) is at
   most 3 * 2^-18 |q_i key_i| per product: S to within 1.2e-5 sum_i |q_i key_i|, float32 GEMM's
   own worst case being d 2^-24 sum_i |q_i key_i| (3.8e-6 at d = 64).  Used for bfloat16 blocks,
   whose 2^-8 rounding of E is 300 times larger. */

typedef struct __attribute__((packed, aligned(64))) {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} amx_config;

/* 1 where Linux lets this process use the tile registers (asked once; each thread's tiles are
   configured where it uses them). */
int step_amx_enable(void) {
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) != 0) return 0;
  unsigned long granted = 0;
  if (syscall(SYS_arch_prctl, 0x1022 /* ARCH_GET_XCOMP_PERM */, &granted) != 0) return 0;
  return (granted >> 18) & 1u;
}

static void amx_configure(void) {
  amx_config cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
  _tile_loadconfig(&cfg);
}

/* hi and lo halves of 16 floats, as the top 16 bits of 32-bit lanes (round to nearest even). */
static inline void split16(__m512 x, __m512i *hi, __m512i *lo) {
  const __m512i mask = _mm512_set1_epi32((int)0xFFFF0000u);
  *hi = _mm512_and_si512(bf16_round(_mm512_castps_si512(x)), mask);
  *lo = _mm512_and_si512(bf16_round(_mm512_castps_si512(_mm512_sub_ps(x, _mm512_castsi512_ps(*hi)))), mask);
}

/* Two rows' halves (top 16 bits of each lane) interleaved as the tile unit's pairs: [row0, row1]. */
static inline __m512i pair16(__m512i row0, __m512i row1) {
  return _mm512_or_si512(row1, _mm512_srli_epi32(row0, 16));
}

/* q (n, d) float32 -> qh, ql (n16, dp) bfloat16 rows; rows and columns past n, d are zero. */
static void amx_pack_q(const float *q, long n, long d, long n16, long dp, uint16_t *qh, uint16_t *ql) {
  if (n16 > n || dp > d) { /* padding: zero */
    memset(qh, 0, n16 * dp * 2);
    memset(ql, 0, n16 * dp * 2);
  }
  for (long j = 0; j < n; ++j)
    for (long k = 0; k < d; k += 16) {
      __m512i h, l;
      split16(_mm512_maskz_loadu_ps(lanes(d - k), q + j * d + k), &h, &l);
      _mm256_mask_storeu_epi16(qh + j * dp + k, lanes(d - k), _mm512_cvtepi32_epi16(_mm512_srli_epi32(h, 16)));
      _mm256_mask_storeu_epi16(ql + j * dp + k, lanes(d - k), _mm512_cvtepi32_epi16(_mm512_srli_epi32(l, 16)));
    }
}

/* key (d, n) float32 -> kh, kl in the tile unit's pair layout (dp / 2, np, 2): [k/2][l][k%2]. */
static void amx_pack_key(const float *key, long n, long d, long np, long dp, uint16_t *kh, uint16_t *kl) {
  for (long kp = 0; kp < dp / 2; ++kp)
    for (long l = 0; l < np; l += 16) {
      const __mmask16 m = l < n ? lanes(n - l) : 0;
      const long k0 = 2 * kp, k1 = 2 * kp + 1;
      const __m512 x0 = k0 < d ? _mm512_maskz_loadu_ps(m, key + k0 * n + l) : _mm512_setzero_ps();
      const __m512 x1 = k1 < d ? _mm512_maskz_loadu_ps(m, key + k1 * n + l) : _mm512_setzero_ps();
      __m512i h0, l0, h1, l1;
      split16(x0, &h0, &l0);
      split16(x1, &h1, &l1);
      _mm512_storeu_si512(kh + (kp * np + l) * 2, pair16(h0, h1));
      _mm512_storeu_si512(kl + (kp * np + l) * 2, pair16(l0, l1));
    }
}

/* u (n, T) float32 -> uh, ul in the pair layout (np / 2, 16, 2), T <= 16; rows past n and columns
   past T are zero. */
static void amx_pack_u(const float *u, long n, long T, long np, uint16_t *uh, uint16_t *ul) {
  const __mmask16 tm = lanes(T);
  for (long lp = 0; lp < np / 2; ++lp) {
    const long l0 = 2 * lp, l1 = 2 * lp + 1;
    const __m512 x0 = l0 < n ? _mm512_maskz_loadu_ps(tm, u + l0 * T) : _mm512_setzero_ps();
    const __m512 x1 = l1 < n ? _mm512_maskz_loadu_ps(tm, u + l1 * T) : _mm512_setzero_ps();
    __m512i h0, lo0, h1, lo1;
    split16(x0, &h0, &lo0);
    split16(x1, &h1, &lo1);
    _mm512_storeu_si512(uh + lp * 32, pair16(h0, h1));
    _mm512_storeu_si512(ul + lp * 32, pair16(lo0, lo1));
  }
}

#define AMX_ROWS 16

typedef struct { /* one operand set in tile layouts: query rows, key pairs, u pairs (hi and lo each) */
  uint16_t *qh, *ql, *kh, *kl, *uh, *ul;
} amx_operands;

typedef struct {
  long n, d, T, np, n16, dp;
} amx_dims;

static amx_dims amx_dims_of(long n, long d, long T) {
  amx_dims z = {n, d, T, (n + 31) / 32 * 32, (n + 15) / 16 * 16, (d + 31) / 32 * 32};
  return z;
}

/* bfloat16 elements of one operand set */
static long amx_operand_elems(amx_dims z) { return 2 * z.n16 * z.dp + 2 * z.dp * z.np + 2 * z.np * 16; }

/* floats of amx_block's work area: the S stripe (AMX_ROWS x np), E u (AMX_ROWS x 16), E's two
   pieces (2 x AMX_ROWS x np bfloat16) */
static long amx_work_floats(amx_dims z) { return AMX_ROWS * z.np + AMX_ROWS * 16 + AMX_ROWS * z.np; }

static amx_operands amx_operands_at(uint16_t *base, amx_dims z) {
  amx_operands o;
  o.qh = base;
  o.ql = o.qh + z.n16 * z.dp;
  o.kh = o.ql + z.n16 * z.dp;
  o.kl = o.kh + z.dp * z.np;
  o.uh = o.kl + z.dp * z.np;
  o.ul = o.uh + z.np * 16;
  return o;
}

/* One block with bfloat16 storage, sixteen query rows at a time: S by the tile unit (three-piece
   split, see above) into an L1 stripe; per row the max, exp and the store of E rounded to
   bfloat16 (non-temporal), whose rounding is the split's hi part, so E's hi and lo parts go to
   two small tiles as they are made; E u by the tile unit again, three-piece (all its terms are
   positive: within 3 * 2^-18 relative, plus float32 accumulation), and its log.
   q: the query operand's qh/ql, k: the key operand's kh/kl and uh/ul; work: amx_work_floats. */
static void amx_block(const amx_operands *q, const amx_operands *k, const block_job *jb, amx_dims z, float floor,
                      float *work) {
  const long n = z.n, np = z.np, dp = z.dp, T = z.T;
  float *stripe = work, *eu = stripe + AMX_ROWS * np;
  uint16_t *eh = (uint16_t *)(eu + AMX_ROWS * 16), *el = eh + AMX_ROWS * np;
  const int stream = n % 32 == 0 && (uintptr_t)jb->e % 64 == 0;
  const __m512 fl = _mm512_set1_ps(floor);
  for (long j0 = 0; j0 < n; j0 += AMX_ROWS) {
    const long R = n - j0 < AMX_ROWS ? n - j0 : AMX_ROWS;
    for (long c0 = 0; c0 < np; c0 += 32) {
      _tile_zero(0);
      _tile_zero(1);
      for (long k0 = 0; k0 < dp; k0 += 32) {
        _tile_loadd(2, q->qh + j0 * dp + k0, dp * 2);
        _tile_loadd(3, q->ql + j0 * dp + k0, dp * 2);
        _tile_loadd(4, k->kh + (k0 / 2 * np + c0) * 2, np * 4);
        _tile_loadd(5, k->kh + (k0 / 2 * np + c0 + 16) * 2, np * 4);
        _tile_loadd(6, k->kl + (k0 / 2 * np + c0) * 2, np * 4);
        _tile_loadd(7, k->kl + (k0 / 2 * np + c0 + 16) * 2, np * 4);
        _tile_dpbf16ps(0, 3, 4); /* the small products first */
        _tile_dpbf16ps(1, 3, 5);
        _tile_dpbf16ps(0, 2, 6);
        _tile_dpbf16ps(1, 2, 7);
        _tile_dpbf16ps(0, 2, 4);
        _tile_dpbf16ps(1, 2, 5);
      }
      _tile_stored(0, stripe + c0, np * 4);
      _tile_stored(1, stripe + c0 + 16, np * 4);
    }
    if (R < AMX_ROWS) { /* past the last row: zero E parts, so that their E u rows are zero */
      memset(eh + R * np, 0, (AMX_ROWS - R) * np * 2);
      memset(el + R * np, 0, (AMX_ROWS - R) * np * 2);
    }
    for (long r = 0; r < R; ++r) {
      const float *row = stripe + r * np;
      const float m = row_max(row, n);
      jb->m[j0 + r] = m;
      const __m512 mv = _mm512_set1_ps(m);
      uint16_t *dst = (uint16_t *)jb->e + (j0 + r) * n;
      for (long l = 0; l < np; l += 32) {
        const __mmask16 m0 = l < n ? lanes(n - l) : 0, m1 = l + 16 < n ? lanes(n - l - 16) : 0;
        const __m512 x0 = _mm512_max_ps(_mm512_sub_ps(_mm512_loadu_ps(row + l), mv), fl);
        const __m512 x1 = _mm512_max_ps(_mm512_sub_ps(_mm512_loadu_ps(row + l + 16), mv), fl);
        const __m512 e0 = _mm512_maskz_mov_ps(m0, exp512(x0)), e1 = _mm512_maskz_mov_ps(m1, exp512(x1));
        const __m512i h = (__m512i)_mm512_cvtne2ps_pbh(e1, e0); /* 32 bfloat16, rounded to nearest even */
        const __m512i h0i = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(h));
        const __m512i h1i = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1));
        const __m512 h0 = _mm512_castsi512_ps(_mm512_slli_epi32(h0i, 16));
        const __m512 h1 = _mm512_castsi512_ps(_mm512_slli_epi32(h1i, 16));
        _mm512_storeu_si512(eh + r * np + l, h);
        const __m512i lo = (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(e1, h1), _mm512_sub_ps(e0, h0));
        _mm512_storeu_si512(el + r * np + l, lo);
        if (stream && l + 32 <= n) _mm512_stream_si512((void *)(dst + l), h);
        else if (m0) _mm512_mask_storeu_epi16(dst + l, ((__mmask32)m1 << 16) | m0, h);
      }
    }
    _tile_zero(0); /* E u: (16 x np) @ (np x 16) */
    for (long k0 = 0; k0 < np; k0 += 32) {
      _tile_loadd(2, eh + k0, np * 2);
      _tile_loadd(3, el + k0, np * 2);
      _tile_loadd(4, k->uh + k0 * 16, 64);
      _tile_loadd(6, k->ul + k0 * 16, 64);
      _tile_dpbf16ps(0, 3, 4);
      _tile_dpbf16ps(0, 2, 6);
      _tile_dpbf16ps(0, 2, 4);
    }
    _tile_stored(0, eu, 64);
    __m512 rows[AMX_ROWS];
    for (long r = 0; r < R; ++r) rows[r] = _mm512_loadu_ps(eu + r * 16);
    store_log_rows(rows, R, T, jb, j0);
  }
}

static long amx_scratch_floats(long n, long d, long T) {
  const amx_dims z = amx_dims_of(n, d, T);
  return amx_work_floats(z) + amx_operand_elems(z) + 64; /* two operand sets of bfloat16; 64: alignment */
}

/* Every new block of attention head o of the frame in slot x (see step_create_blocks): the new
   frame's query, key and u in tile layouts once, each other slot's as its two blocks need them. */
static void create_amx_head(const float *a, const float *bT, const float *Ut, void *E, float *M, float *mr, float *mc,
                            float *minr, float *minc, long x, long O, long o, amx_dims z, float floor,
                            float *scratch) {
  const long n = z.n, d = z.d, T = z.T;
  float *work = scratch;
  uint16_t *ops = (uint16_t *)(work + amx_work_floats(z));
  const uintptr_t al = ((uintptr_t)ops + 63) & ~(uintptr_t)63;
  ops = (uint16_t *)al;
  amx_operands nx = amx_operands_at(ops, z), other = amx_operands_at(ops + amx_operand_elems(z), z);
  amx_pack_q(a + (x * O + o) * n * d, n, d, z.n16, z.dp, nx.qh, nx.ql);
  amx_pack_key(bT + (x * O + o) * d * n, n, d, z.np, z.dp, nx.kh, nx.kl);
  amx_pack_u(Ut + (x * O + o) * n * T, n, T, z.np, nx.uh, nx.ul);
  for (long s = 0; s < T; ++s) {
    block_job jb;
    const amx_operands *k = &nx;
    if (s != x) {
      amx_pack_key(bT + (s * O + o) * d * n, n, d, z.np, z.dp, other.kh, other.kl);
      amx_pack_u(Ut + (s * O + o) * n * T, n, T, z.np, other.uh, other.ul);
      k = &other;
    }
    jb.e = (char *)E + ((x * T + s) * O + o) * n * n * 2; /* row block (x, s) */
    jb.m = mr + (s * O + o) * n;
    jb.low = minr + (s * O + o) * n;
    jb.M = M + (x * T + s) * T * O * n + o * n;
    jb.stride = O * n;
    amx_block(&nx, k, &jb, z, floor, work);
    if (s == x) continue;
    amx_pack_q(a + (s * O + o) * n * d, n, d, z.n16, z.dp, other.qh, other.ql);
    jb.e = (char *)E + ((s * T + x) * O + o) * n * n * 2; /* column block (s, x) */
    jb.m = mc + (s * O + o) * n;
    jb.low = minc + (s * O + o) * n;
    jb.M = M + (s * T + x) * T * O * n + o * n;
    amx_block(&other, &nx, &jb, z, floor, work);
  }
}
#else
int step_amx_enable(void) { return 0; }
#endif

#if STEP_AVX512
/* ---- per prediction: every cached row's weight r' (see fast_step._StepGroup.predict) ----------
   For query slot G and attention head o, row j of block (G, F) adds exp(big + M) to the row's
   normaliser, big = beta[G, P_F] + kappa[P_G, P_F] + m[G, F] + mu[P_G, F] (P = the slots'
   positions) and M = M[G, F, P_G]; the CLS key adds exp(cls), cls = delta[G] + clspos[P_G].
   log Z is held as ref + small, ref = max(cls, max_F big), and r' = exp(big - ref - small),
   each exp argument floored.  One job per (G, o): its T rows of n stay in L1 through the four
   passes that PyTorch made over the whole (T, T, O, n) arrays, each in memory.  Also copied: U at
   the query's position (for the pass over the blocks), and, where exact rows exist, log r' for
   all rows (their r' is 0: their blocks hold S - m).
   Layouts: beta, m, U, r, logr, Ubuf (T, T, O, n); kappa (O, T, T); mu (T, T, O); M (T, T, T, O,
   n) [G, F, P], or (T, T, O, n) [G, F] already taken at P_G when gathered; delta (T, O, n);
   clspos (T, O); exact (T, T, O, n) bytes or NULL; wg (T, O): the CLS key's weight, per (G, o). */
void step_row_weights(const float *beta, const float *kappa, const float *m, const float *mu, const float *M,
                      int gathered, const float *delta, const float *clspos, const float *U, const uint8_t *exact,
                      const long *pos, float *r, float *logr, float *Ubuf, float *wg, long T, long O, long n,
                      float floor, int threads) {
  const __m512 fl = _mm512_set1_ps(floor);
#pragma omp parallel num_threads(threads)
  {
    float big[T * n], cls[n], ref[n], top[n], small[n];
#pragma omp for schedule(static)
    for (long i = 0; i < T * O; ++i) {
      const long G = i / O, o = i % O, PG = pos[G];
      for (long j = 0; j < n; j += 16) {
        const __mmask16 lm = lanes(n - j);
        const __m512 c = _mm512_add_ps(_mm512_maskz_loadu_ps(lm, delta + (G * O + o) * n + j),
                                       _mm512_set1_ps(clspos[PG * O + o]));
        _mm512_mask_storeu_ps(cls + j, lm, c);
        _mm512_mask_storeu_ps(ref + j, lm, c);
      }
      for (long F = 0; F < T; ++F) {
        const long gf = (G * T + F) * O + o;
        const __m512 kap = _mm512_set1_ps(kappa[(o * T + PG) * T + pos[F]]);
        const __m512 mu_ = _mm512_set1_ps(mu[(PG * T + F) * O + o]);
        const float *bt = beta + ((G * T + pos[F]) * O + o) * n, *mm = m + gf * n;
        for (long j = 0; j < n; j += 16) {
          const __mmask16 lm = lanes(n - j);
          const __m512 b = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(_mm512_maskz_loadu_ps(lm, bt + j), kap),
                                                       _mm512_maskz_loadu_ps(lm, mm + j)), mu_);
          _mm512_mask_storeu_ps(big + F * n + j, lm, b);
          _mm512_mask_storeu_ps(ref + j, lm, _mm512_max_ps(_mm512_maskz_loadu_ps(lm, ref + j), b));
        }
        memcpy(Ubuf + gf * n, U + ((PG * T + F) * O + o) * n, n * sizeof(float));
      }
      for (long j = 0; j < n; j += 16) { /* cls - ref: the CLS key's term, and the first candidate for top */
        const __mmask16 lm = lanes(n - j);
        const __m512 c = _mm512_sub_ps(_mm512_maskz_loadu_ps(lm, cls + j), _mm512_maskz_loadu_ps(lm, ref + j));
        _mm512_mask_storeu_ps(cls + j, lm, c);
        _mm512_mask_storeu_ps(top + j, lm, c);
      }
      for (long F = 0; F < T; ++F) {
        const long gf = (G * T + F) * O + o;
        const float *mg = gathered ? M + gf * n : M + ((G * T + F) * T + PG) * O * n + o * n;
        for (long j = 0; j < n; j += 16) {
          const __mmask16 lm = lanes(n - j);
          const __m512 b =
              _mm512_sub_ps(_mm512_maskz_loadu_ps(lm, big + F * n + j), _mm512_maskz_loadu_ps(lm, ref + j));
          _mm512_mask_storeu_ps(big + F * n + j, lm, b);
          _mm512_mask_storeu_ps(top + j, lm, _mm512_max_ps(_mm512_maskz_loadu_ps(lm, top + j),
                                                           _mm512_add_ps(b, _mm512_maskz_loadu_ps(lm, mg + j))));
        }
      }
      for (long j = 0; j < n; j += 16) { /* small = log Z - ref */
        const __mmask16 lm = lanes(n - j);
        const __m512 tp = _mm512_maskz_loadu_ps(lm, top + j);
        __m512 sum = _mm512_setzero_ps();
        for (long F = 0; F < T; ++F) {
          const long gf = (G * T + F) * O + o;
          const float *mg = gathered ? M + gf * n : M + ((G * T + F) * T + PG) * O * n + o * n;
          const __m512 t = _mm512_add_ps(_mm512_maskz_loadu_ps(lm, big + F * n + j), _mm512_maskz_loadu_ps(lm, mg + j));
          sum = _mm512_add_ps(sum, exp512(_mm512_max_ps(_mm512_sub_ps(t, tp), fl)));
        }
        sum = _mm512_add_ps(sum, exp512(_mm512_max_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(lm, cls + j), tp), fl)));
        sum = _mm512_mask_mov_ps(_mm512_set1_ps(1.0f), lm, sum);
        _mm512_mask_storeu_ps(small + j, lm, _mm512_add_ps(log512(sum), tp));
      }
      __m512 w = _mm512_setzero_ps();
      for (long j = 0; j < n; j += 16) {
        const __mmask16 lm = lanes(n - j);
        const __m512 c = _mm512_sub_ps(_mm512_maskz_loadu_ps(lm, cls + j), _mm512_maskz_loadu_ps(lm, small + j));
        w = _mm512_add_ps(w, _mm512_maskz_mov_ps(lm, exp512(_mm512_max_ps(c, fl))));
      }
      wg[G * O + o] = _mm512_reduce_add_ps(w);
      for (long F = 0; F < T; ++F) {
        const long gf = (G * T + F) * O + o;
        for (long j = 0; j < n; j += 16) {
          const __mmask16 lm = lanes(n - j);
          const __m512 lr =
              _mm512_sub_ps(_mm512_maskz_loadu_ps(lm, big + F * n + j), _mm512_maskz_loadu_ps(lm, small + j));
          __m512 rv = exp512(_mm512_max_ps(lr, fl));
          if (exact) {
            const __mmask16 ex = _mm512_mask_test_epi32_mask(
                lm, _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lm, exact + gf * n + j)), _mm512_set1_epi32(0xFF));
            rv = _mm512_mask_mov_ps(rv, ex, _mm512_setzero_ps());
          }
          _mm512_mask_storeu_ps(r + gf * n + j, lm, rv);
          if (logr) _mm512_mask_storeu_ps(logr + gf * n + j, lm, lr);
        }
      }
    }
  }
}
#endif

/* 512 where the block creation runs in AVX-512 (for T <= 16), else 0 (plain C, slower than PyTorch). */
int step_create_simd(void) {
#if STEP_AVX512
  return 512;
#else
  return 0;
#endif
}

/* The 2T - 1 new blocks of frame slot x, for every (STEP head, attention head) o of O: row
   blocks (x, s) from a[x] and bT[s], column blocks (s, x) from a[s] and bT[x] (s != x).
   Layouts: a (T, O, n, d), bT (T, O, d, n), Ut (T, O, n, T), E (T, T, O, n, n) float32 or
   bfloat16, M (T, T, T, O, n) [G, F, P, o, j], mr, mc, minr and minc (T, O, n). */
void step_create_blocks(const float *a, const float *bT, const float *Ut, void *E, float *M, float *mr,
                        float *mc, float *minr, float *minc, long x, long T, long O, long n, long d, int bf16,
                        int amx, float floor, int threads) {
  const long jobs = 2 * T * O;
  const size_t es = bf16 ? 2 : 4;
  (void)amx; /* without AMX compiled in */
#if STEP_AMX
  if (amx && bf16 && T <= 16) { /* one job per attention head: its 2T - 1 blocks */
    const amx_dims z = amx_dims_of(n, d, T);
    int missed = 0;
#pragma omp parallel num_threads(threads)
    {
      float *scratch = NULL;
      if (posix_memalign((void **)&scratch, 64, amx_scratch_floats(n, d, T) * sizeof(float)) != 0) scratch = NULL;
      if (scratch) amx_configure();
#pragma omp for schedule(dynamic, 1)
      for (long o = 0; o < O; ++o) {
        if (scratch) create_amx_head(a, bT, Ut, E, M, mr, mc, minr, minc, x, O, o, z, floor, scratch);
        else {
#pragma omp atomic write
          missed = 1;
        }
      }
      if (scratch) {
        _tile_release();
        free(scratch);
      }
      _mm_sfence();
    }
    if (!missed) return; /* else (no memory for a thread's scratch) every block again, below */
  }
#endif
#pragma omp parallel num_threads(threads)
  {
    float stripe[6 * ((n + 63) / 64 * 64)];
    float qpad[6 * d];
    (void)qpad; /* the AVX-512 path's */
#pragma omp for schedule(dynamic, 1)
    for (long i = 0; i < jobs; ++i) {
      const long s = i / (2 * O), col = (i / O) % 2, o = i % O;
      if (col && s == x) continue; /* block (x, x) is a row block */
      const long q = col ? s : x, k = col ? x : s, g = col ? s : x, f = col ? x : s;
      block_job jb;
      jb.q = a + (q * O + o) * n * d;
      jb.key = bT + (k * O + o) * d * n;
      jb.u = Ut + (k * O + o) * n * T;
      jb.e = (char *)E + ((g * T + f) * O + o) * n * n * es;
      jb.m = (col ? mc : mr) + (s * O + o) * n;
      jb.low = (col ? minc : minr) + (s * O + o) * n;
      jb.M = M + (g * T + f) * T * O * n + o * n;
      jb.stride = O * n;
#if STEP_AVX512
      if (T <= 16) {
        create_avx512(&jb, n, d, T, bf16, floor, stripe, qpad);
        continue;
      }
#endif
      create_plain(&jb, n, d, T, bf16, floor, stripe);
    }
#if STEP_AVX512
    _mm_sfence(); /* the non-temporal stores are visible before the caller reads the blocks */
#endif
  }
}
"""
#: Compiler flag sets tried in order: tuned for this CPU with OpenMP, then portable ones.
FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-mcpu=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3",),
)

_lock = threading.Lock()
_loaded: dict[str, Any] = {}  # "lib": the ctypes library or None, "why": why not
_amx_off = False  # see without_amx


def _cpu_signature() -> str:
    """What ``-march=native`` compiles for: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compile(cc: str, flags: tuple[str, ...], out: Path) -> str | None:
    """Compile :data:`C_SOURCE` to ``out`` (atomically); the compiler's complaint, or None."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "step_native.c"
        src.write_text(C_SOURCE)
        lib = Path(tmp) / out.name
        cmd = [cc, *flags, "-std=c99", "-shared", "-fPIC", str(src), "-o", str(lib), "-lm"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(cmd)}: {exc}"
        if res.returncode != 0:
            return f"{' '.join(cmd)}: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}"
        os.replace(lib, out)  # another process may load it the moment it exists: whole or absent
    return None


def load_native(cache_dir: Path | None = None) -> Any:
    """The compiled kernels (a ``ctypes`` library), built on first use; None where no C compiler
    works here (``$CC``, else ``cc``), with the reason in :func:`native_status`."""
    with _lock:
        if "lib" in _loaded:
            return _loaded["lib"]
        cc = os.environ.get("CC") or "cc"
        if shutil.which(cc) is None:
            _loaded.update(lib=None, why=f"no C compiler ({cc!r} not found; set CC)")
            return None
        folder = (cache_dir or default_cache_dir()) / "kernels"
        errors = []
        for flags in FLAG_SETS:
            key = hashlib.sha256("\0".join([C_SOURCE, cc, *flags, _cpu_signature()]).encode()).hexdigest()[:16]
            lib = folder / f"step_native-{key}.so"
            if not lib.exists():
                try:
                    err = _compile(cc, flags, lib)
                except OSError as exc:  # a cache folder it cannot write (a read-only home, say)
                    err = f"{folder}: {exc}"
                if err is not None:
                    errors.append(err)
                    continue
            try:
                native = ctypes.CDLL(str(lib))
            except OSError as exc:
                errors.append(f"{lib}: {exc}")
                continue
            native.step_columns_bf16.restype = None
            native.step_columns_bf16.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
            native.step_create_blocks.restype = None
            native.step_create_blocks.argtypes = ([ctypes.c_void_p] * 9 + [ctypes.c_long] * 5
                                                  + [ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int])
            native.step_amx_enable.restype = ctypes.c_int
            native.step_create_simd.restype = ctypes.c_int
            if native.step_create_simd() == 512:
                native.step_row_weights.restype = None
                native.step_row_weights.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_int] + [ctypes.c_void_p] * 9
                                                    + [ctypes.c_long] * 3 + [ctypes.c_float, ctypes.c_int])
            simd = "AVX-512" if native.step_create_simd() == 512 else "plain C"
            amx = bool(native.step_amx_enable())  # compiled in, and Linux grants the tile state
            _loaded.update(lib=native, simd=simd == "AVX-512", amx=amx, path=str(lib),
                           why=f"compiled with {cc} {' '.join(flags)} ({simd}{', AMX' if amx else ''})")
            log.info("compiled kernels: %s (%s)", native_status(), lib)
            return native
        _loaded.update(lib=None, simd=False, why="; ".join(errors))
        return None


def native_status() -> str:
    """How the compiled kernels run here (after :func:`load_native`), for logs, the doctor and the bench."""
    if "lib" not in _loaded:
        return "not loaded yet"
    return ("native: " if _loaded["lib"] is not None else "PyTorch fallback: ") + _loaded["why"]


def columns_bf16(r: torch.Tensor, E: torch.Tensor, U: torch.Tensor, out: torch.Tensor,
                 native: bool = True, chunk: int = 64) -> torch.Tensor:
    """``out[o] = sum_G U[G, o] * (r[G, o] @ E[G, o])`` (shapes ``(T, O, n)``, ``(T, O, n, n)``
    bfloat16, ``(T, O, n)``, ``(O, n)``); every tensor contiguous.

    ``native``: use the compiled kernel on the CPU when it builds (else, and on other devices,
    PyTorch ops over ``chunk`` blocks at a time, converted to float32 as they go).
    """
    T, O, n = r.shape
    if E.dtype != torch.bfloat16 or E.shape != (T, O, n, n) or U.shape != (T, O, n) or out.shape != (O, n):
        raise ValueError(f"columns_bf16: shapes r {tuple(r.shape)}, E {tuple(E.shape)} {E.dtype}, "
                         f"U {tuple(U.shape)}, out {tuple(out.shape)} do not fit")
    if not all(t.is_contiguous() for t in (r, E, U, out)):
        raise ValueError("columns_bf16: every tensor must be contiguous")
    lib = load_native() if native and E.device.type == "cpu" else None
    if lib is not None:
        if r.dtype != torch.float32 or U.dtype != torch.float32 or out.dtype != torch.float32:
            raise ValueError("columns_bf16: r, U and out must be float32")
        lib.step_columns_bf16(r.data_ptr(), E.data_ptr(), U.data_ptr(), out.data_ptr(), T, O, n,
                              torch.get_num_threads())
        return out
    if native and E.device.type == "cpu" and not _loaded.get("warned"):
        _loaded["warned"] = True
        log.warning("fast STEP engine: bfloat16 blocks without the compiled kernel (%s); PyTorch ops give "
                    "the same numbers, more slowly", native_status())
    out.zero_()
    for G in range(T):
        for lo in range(0, O, chunk):
            hi = min(O, lo + chunk)
            w = torch.bmm(r[G, lo:hi, None], E[G, lo:hi].float())[:, 0]
            out[lo:hi].addcmul_(U[G, lo:hi], w)
    return out


#: The longest window the fused creation's AVX-512 code takes: one register holds a row of
#: ``E @ U`` (``T <= 16`` in ``create_avx512`` above).
FUSED_MAX_FRAMES = 16


def fused_create_available(frames: int) -> bool:
    """Whether :func:`create_blocks` runs its AVX-512 code here for windows of ``frames`` (at most
    :data:`FUSED_MAX_FRAMES`); elsewhere PyTorch's ops are the faster choice."""
    return load_native() is not None and bool(_loaded.get("simd")) and frames <= FUSED_MAX_FRAMES


def amx_available() -> bool:
    """Whether :func:`create_blocks` makes bfloat16 blocks with the AMX tile unit here: compiled in
    (a compiler and CPU with AMX-BF16), the tile state granted by Linux, and not turned off
    (:func:`without_amx`)."""
    return fused_create_available(1) and bool(_loaded.get("amx")) and not _amx_off


@contextlib.contextmanager
def without_amx() -> Iterator[None]:
    """Inside: bfloat16 blocks made by the AVX-512 code, as on a CPU without AMX (the bench's
    lever-by-lever rows; the thread that runs the engine)."""
    global _amx_off
    saved, _amx_off = _amx_off, True
    try:
        yield
    finally:
        _amx_off = saved


def create_blocks(a: torch.Tensor, bT: torch.Tensor, Ut: torch.Tensor, E: torch.Tensor, M: torch.Tensor,
                  mr: torch.Tensor, mc: torch.Tensor, minr: torch.Tensor, minc: torch.Tensor, x: int,
                  floor: float, amx: bool = False) -> None:
    """The new blocks of frame slot ``x`` (see ``step_create_blocks`` above), written in place:
    ``E[x, :]`` and ``E[:, x]`` (float32 or bfloat16), ``M[x, :]`` and ``M[:, x]`` (``log(E @
    U)`` for every position), and for blocks ``(x, s)`` / ``(s, x)`` the row maxima ``mr[s]`` /
    ``mc[s]`` and the minima of ``M`` over positions ``minr[s]`` / ``minc[s]`` (the column
    entries for ``s = x`` are left alone: that block is the row block).  Shapes
    ``a (T, O, n, d)``, ``bT (T, O, d, n)``, ``Ut (T, O, n, T)``, ``E (T, T, O, n, n)``,
    ``M (T, T, T, O, n)``, the rest ``(T, O, n)``; CPU, contiguous, float32 but ``E``."""
    T, O, n, d = a.shape
    shapes = {"bT": (bT, (T, O, d, n)), "Ut": (Ut, (T, O, n, T)), "E": (E, (T, T, O, n, n)),
              "M": (M, (T, T, T, O, n)), "mr": (mr, (T, O, n)), "mc": (mc, (T, O, n)), "minr": (minr, (T, O, n)),
              "minc": (minc, (T, O, n))}
    for name, (t, shape) in {"a": (a, (T, O, n, d)), **shapes}.items():
        want = (torch.bfloat16, torch.float32) if name == "E" else (torch.float32,)
        if tuple(t.shape) != shape or t.dtype not in want or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"create_blocks: {name} is {tuple(t.shape)} {t.dtype} on {t.device}"
                             f"{'' if t.is_contiguous() else ', not contiguous'}; expected {shape} contiguous on the CPU")
    if not 0 <= x < T:
        raise ValueError(f"create_blocks: slot {x} outside 0..{T - 1}")
    lib = load_native()
    if lib is None:
        raise RuntimeError(f"create_blocks: no compiled kernels ({native_status()})")
    lib.step_create_blocks(a.data_ptr(), bT.data_ptr(), Ut.data_ptr(), E.data_ptr(), M.data_ptr(), mr.data_ptr(),
                           mc.data_ptr(), minr.data_ptr(), minc.data_ptr(), x, T, O, n, d,
                           int(E.dtype == torch.bfloat16), int(amx and amx_available()), floor,
                           torch.get_num_threads())


def row_weights_available() -> bool:
    """Whether :func:`row_weights` can run here (the compiled kernels, with AVX-512)."""
    return load_native() is not None and bool(_loaded.get("simd"))


def row_weights(beta: torch.Tensor, kappa: torch.Tensor, m: torch.Tensor, mu: torch.Tensor, M: torch.Tensor,
                delta: torch.Tensor, clspos: torch.Tensor, U: torch.Tensor, exact: torch.Tensor | None,
                pos: torch.Tensor, r: torch.Tensor, logr: torch.Tensor | None, Ubuf: torch.Tensor, wg: torch.Tensor,
                floor: float) -> None:
    """Every cached row's weight ``r'`` at window positions ``pos`` (``step_row_weights`` above),
    written into ``r`` (0 where ``exact``), ``U`` at each query slot's position into ``Ubuf``,
    ``log r'`` into ``logr`` (if given) and the CLS key's weight per (query slot, head) into
    ``wg``.  Shapes, with O attention heads over all STEP heads: ``beta``, ``m``, ``U``, ``r``,
    ``logr``, ``Ubuf``, ``exact`` ``(T, T, O, n)``; ``kappa (O, T, T)``; ``mu (T, T, O)``; ``M``
    ``(T, T, T, O, n)`` or, already taken at the positions, ``(T, T, O, n)``; ``delta (T, O, n)``;
    ``clspos``, ``wg`` ``(T, O)``; ``pos (T,)`` int64.  CPU, contiguous (any view of those shapes)."""
    T = pos.shape[0]
    n = beta.shape[-1]
    O = beta.numel() // (T * T * n)
    want = {"beta": (beta, T * T * O * n), "kappa": (kappa, O * T * T), "m": (m, T * T * O * n),
            "mu": (mu, T * T * O), "delta": (delta, T * O * n), "clspos": (clspos, T * O), "U": (U, T * T * O * n),
            "r": (r, T * T * O * n), "Ubuf": (Ubuf, T * T * O * n), "wg": (wg, T * O)}
    if logr is not None:
        want["logr"] = (logr, T * T * O * n)
    gathered = M.numel() == T * T * O * n
    want["M"] = (M, T * T * O * n if gathered else T * T * T * O * n)
    for name, (t, size) in want.items():
        if t.numel() != size or t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"row_weights: {name} is {tuple(t.shape)} {t.dtype} on {t.device}; expected {size} "
                             f"contiguous float32 values on the CPU (T={T}, O={O}, n={n})")
    if exact is not None and (exact.numel() != T * T * O * n or exact.dtype != torch.bool or not exact.is_contiguous()):
        raise ValueError(f"row_weights: exact is {tuple(exact.shape)} {exact.dtype}; expected {T * T * O * n} "
                         f"contiguous bools")
    if pos.dtype != torch.int64 or not pos.is_contiguous() or pos.device.type != "cpu":
        raise ValueError(f"row_weights: pos is {pos.dtype} on {pos.device}; expected int64 on the CPU")
    lib = load_native()
    if lib is None or not _loaded.get("simd"):
        raise RuntimeError(f"row_weights: no compiled AVX-512 kernels ({native_status()})")
    lib.step_row_weights(beta.data_ptr(), kappa.data_ptr(), m.data_ptr(), mu.data_ptr(), M.data_ptr(), int(gathered),
                         delta.data_ptr(), clspos.data_ptr(), U.data_ptr(), 0 if exact is None else exact.data_ptr(),
                         pos.data_ptr(), r.data_ptr(), 0 if logr is None else logr.data_ptr(), Ubuf.data_ptr(),
                         wg.data_ptr(), T, O, n, floor, torch.get_num_threads())


__all__ = ["C_SOURCE", "FLAG_SETS", "FUSED_MAX_FRAMES", "amx_available", "columns_bf16", "create_blocks",
           "fused_create_available", "load_native", "native_status", "row_weights", "row_weights_available",
           "without_amx"]
