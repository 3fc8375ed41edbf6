"""step_ros's compiled CPU kernels for the fast STEP engine (:mod:`.fast_step`): the two places
where no library call does what the engine needs at memory or FMA speed.

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
* ``step_columns_bf16``, per prediction with bfloat16 blocks: for every key slot, STEP head and
  attention head ``o`` and key ``l``::

      col[o, l] = sum_G U[G, o, l] * sum_j r[G, o, j] * E[G, o, j, l]

  with ``E`` in bfloat16 and every sum in float32.  The pass is bound by memory bandwidth (it
  reads each stored block once per prediction), so halving the bytes halves its time -- but
  only if nothing converts them to float32 in memory first, and PyTorch has no product of a
  bfloat16 matrix with a float32 vector (``bmm`` in bfloat16 rounds its output and ran no faster
  than float32; decision 37).

C99 with AVX-512 intrinsics where the CPU has them (F, BW and VL: Skylake-X and later, AMD
Zen 4) and plain C elsewhere, compiled with the machine's C compiler the first time it is
needed, cached in :func:`~step_ros.resources.default_cache_dir` and loaded with ``ctypes`` (no
Python headers, no build step at install).  Without AVX-512 the block creation's plain C is
slower than PyTorch's, so the ``native`` kernels then create blocks with PyTorch ops
(:func:`fused_create_available`); where no compiler works at all, the bfloat16 pass falls back
to PyTorch ops with the same result to float32 rounding, and says so once in the log.
"""

from __future__ import annotations

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
from typing import Any

import torch

from ..resources import default_cache_dir

log = logging.getLogger(__name__)

C_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define STEP_AVX512 1
#include <immintrin.h>
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
      __m512 mx = _mm512_set1_ps(-INFINITY);
      for (long l = 0; l < n; l += 16) mx = _mm512_mask_max_ps(mx, lanes(n - l), mx, _mm512_loadu_ps(row + l));
      const float m = _mm512_reduce_max_ps(mx);
      jb->m[j0 + r] = m;
      const __m512 mv = _mm512_set1_ps(m), fl = _mm512_set1_ps(floor);
      for (long l = 0; l < n; l += 16) {
        const __mmask16 lm = lanes(n - l);
        const __m512 e = exp512(_mm512_max_ps(_mm512_sub_ps(_mm512_loadu_ps(row + l), mv), fl));
        _mm512_mask_storeu_ps(row + l, lm, e);
        if (bf16) {
          __m512i u = _mm512_castps_si512(e);
          const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
          u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
          const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
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
    float lg[ROWS][16]; /* M = log(E u), stored transposed: M[P, j] */
    for (long r = 0; r < R; ++r) {
      const __m512 v = log512(_mm512_mask_mov_ps(_mm512_set1_ps(1.0f), tm, eu[r]));
      _mm512_storeu_ps(lg[r], v);
      jb->low[j0 + r] = _mm512_mask_reduce_min_ps(tm, v);
    }
    for (long P = 0; P < T; ++P)
      for (long r = 0; r < R; ++r) jb->M[P * jb->stride + j0 + r] = lg[r][P];
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
                        float floor, int threads) {
  const long jobs = 2 * T * O;
  const size_t es = bf16 ? 2 : 4;
#pragma omp parallel num_threads(threads)
  {
    float stripe[6 * ((n + 63) / 64 * 64)];
    float qpad[6 * d];
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
                                                  + [ctypes.c_int, ctypes.c_float, ctypes.c_int])
            native.step_create_simd.restype = ctypes.c_int
            simd = "AVX-512" if native.step_create_simd() == 512 else "plain C"
            _loaded.update(lib=native, simd=simd == "AVX-512", why=f"compiled with {cc} {' '.join(flags)} ({simd})",
                           path=str(lib))
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


def create_blocks(a: torch.Tensor, bT: torch.Tensor, Ut: torch.Tensor, E: torch.Tensor, M: torch.Tensor,
                  mr: torch.Tensor, mc: torch.Tensor, minr: torch.Tensor, minc: torch.Tensor, x: int,
                  floor: float) -> None:
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
                           int(E.dtype == torch.bfloat16), floor, torch.get_num_threads())


__all__ = ["C_SOURCE", "FLAG_SETS", "FUSED_MAX_FRAMES", "columns_bf16", "create_blocks", "fused_create_available",
           "load_native",
           "native_status"]
