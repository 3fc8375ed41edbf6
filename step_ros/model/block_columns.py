"""The pass over bfloat16 blocks: the fast STEP engine's per-prediction kernel when its block
cache is stored in bfloat16 (``block_dtype="bfloat16"``, :mod:`.fast_step`).

For every key slot, STEP head and attention head ``o`` (``O`` of them) and key ``l``::

    col[o, l] = sum_G U[G, o, l] * sum_j r[G, o, j] * E[G, o, j, l]

with ``E`` in bfloat16 and ``r``, ``U``, ``col`` and every sum in float32.  The pass is bound by
memory bandwidth (it reads each stored block once per prediction), so halving the bytes of the
blocks halves its time -- but only if nothing converts them to float32 in memory first, and
PyTorch has no matrix product of a bfloat16 matrix with a float32 vector: ``bmm`` in bfloat16
rounds its output to bfloat16 and ran no faster than float32 (41 against 43 ms for three ViT-S
heads, Intel Xeon), converting in chunks cost as much as it saved.  So this is a small C
function (C99, with AVX-512 intrinsics where the CPU has them and plain C that the compiler
vectorises elsewhere; a bfloat16 is the top half of a float32, so the conversion is a shift), compiled with the machine's C compiler the first time it is needed, cached in
:func:`~step_ros.resources.default_cache_dir` and loaded with ``ctypes`` (no Python headers,
no build step at install).  Where no compiler works it falls back to PyTorch ops, with the
same result to float32 rounding, and says so once in the log.
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
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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

#if defined(__AVX512F__)
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
#if defined(__AVX512F__)
        for (; l0 + 256 <= n; l0 += 256) block_pass_256(r + b * n, E + b * n * n, U + b * n, c, n, l0);
#endif
        if (l0 < n) block_pass(r + b * n, E + b * n * n, U + b * n, c, n, l0, w);
      }
    }
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
_loaded: dict[str, Any] = {}  # "fn": the ctypes function or None, "why": why not


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
        src = Path(tmp) / "step_columns_bf16.c"
        src.write_text(C_SOURCE)
        lib = Path(tmp) / out.name
        cmd = [cc, *flags, "-std=c99", "-shared", "-fPIC", str(src), "-o", str(lib)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(cmd)}: {exc}"
        if res.returncode != 0:
            return f"{' '.join(cmd)}: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}"
        os.replace(lib, out)  # another process may load it the moment it exists: whole or absent
    return None


def load_native(cache_dir: Path | None = None) -> Any:
    """The compiled kernel (a ``ctypes`` function), built on first use; None where no C compiler
    works here (``$CC``, else ``cc``), with the reason in :func:`native_status`."""
    with _lock:
        if "fn" in _loaded:
            return _loaded["fn"]
        cc = os.environ.get("CC") or "cc"
        if shutil.which(cc) is None:
            _loaded.update(fn=None, why=f"no C compiler ({cc!r} not found; set CC)")
            return None
        folder = (cache_dir or default_cache_dir()) / "kernels"
        errors = []
        for flags in FLAG_SETS:
            key = hashlib.sha256("\0".join([C_SOURCE, cc, *flags, _cpu_signature()]).encode()).hexdigest()[:16]
            lib = folder / f"step_columns_bf16-{key}.so"
            if not lib.exists():
                try:
                    err = _compile(cc, flags, lib)
                except OSError as exc:  # a cache folder it cannot write (a read-only home, say)
                    err = f"{folder}: {exc}"
                if err is not None:
                    errors.append(err)
                    continue
            try:
                fn = ctypes.CDLL(str(lib)).step_columns_bf16
            except OSError as exc:
                errors.append(f"{lib}: {exc}")
                continue
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
            _loaded.update(fn=fn, why=f"compiled with {cc} {' '.join(flags)}", path=str(lib))
            log.info("bfloat16 block pass: %s (%s)", native_status(), lib)
            return fn
        _loaded.update(fn=None, why="; ".join(errors))
        return None


def native_status() -> str:
    """How the bfloat16 pass runs here (after :func:`load_native`), for logs and the bench."""
    if "fn" not in _loaded:
        return "not loaded yet"
    return ("native: " if _loaded["fn"] is not None else "PyTorch fallback: ") + _loaded["why"]


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
    fn = load_native() if native and E.device.type == "cpu" else None
    if fn is not None:
        if r.dtype != torch.float32 or U.dtype != torch.float32 or out.dtype != torch.float32:
            raise ValueError("columns_bf16: r, U and out must be float32")
        fn(r.data_ptr(), E.data_ptr(), U.data_ptr(), out.data_ptr(), T, O, n, torch.get_num_threads())
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


__all__ = ["C_SOURCE", "FLAG_SETS", "columns_bf16", "load_native", "native_status"]
