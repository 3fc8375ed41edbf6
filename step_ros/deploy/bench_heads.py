"""Head cost per new frame: naive attention vs fused SDPA vs the exact streaming engine.

Side by side on the same random windows, in the same process and thread count, interleaved
step by step (so that a busy machine slows every method alike):

* ``naive``: :func:`~step_ros.model.fast_step.reference_step_logits` -- explicit score matrix,
  softmax and ``P @ V`` over all ``1 + T n`` tokens (the ``nn.MultiheadAttention`` math path);
* ``sdpa``: the :class:`~step_ros.model.heads.StepHead` forward (fused scaled-dot-product
  attention), recomputed on the whole window for every new frame;
* ``fast``: :class:`~step_ros.model.fast_step.FastStepRunner`, steady state: ``add_frame``
  of the new frame + ``predict`` on the slid window (its outputs are checked against ``sdpa``).

Each for 1 head and for ``num_step_heads`` heads.  A row: name, heads, ms median / p95 per new
frame, ratio to the naive baseline, GFLOP per new frame, achieved GFLOP/s and its fraction of
the fp32 GEMM peak measured in the same run (best of PyTorch and ONNX Runtime, see
:mod:`step_ros.deploy.peak`; its own row).

``python -m step_ros.deploy.bench_heads`` prints the table (ViT-S/14 at 224 by default).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from step_ros.deploy.export import max_abs_error, worst_error
from step_ros.deploy.peak import describe_peaks, measure_gemm_peaks
from step_ros.model.fast_step import FastStepRunner, reference_step_logits
from step_ros.model.heads import StepHead


def full_head_flops(dim: int, n: int, frames: int) -> float:
    """FLOPs of one STEP head on a whole window (qkv, scores, P @ V, output projection)."""
    tokens = 1 + frames * n
    return 2.0 * tokens * dim * 3 * dim + 2 * 2.0 * tokens * tokens * dim + 2.0 * tokens * dim * dim


def bench_heads(
    dim: int = 384,
    n: int = 256,
    frames: int = 16,
    num_heads: int = 6,
    num_step_heads: int = 3,
    repeats: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    seed: int = 0,
    include_naive: bool = True,
    peaks: dict[str, float] | None = None,
) -> list[dict]:
    """Time the three ways of running STEP heads per new frame; returns one dict per row.

    ``repeats`` new frames are timed after ``warmup`` untimed ones (the fast runner's cache is
    filled with ``frames`` frames first, untimed).  ``threads``: torch thread count (default:
    leave as is).  Rows: ``name, method, heads, ms_median, ms_p95, ratio_to_naive, gflop,
    gflop_s, frac_peak, threads`` (+ ``memory_mb``, ``block_pass_gb``, ``max_abs_diff_vs_sdpa``,
    ``fallbacks`` for the fast runner); the first row is the measured fp32 GEMM peak (with the
    thread count, CPU count and 1-minute load average: timings on a busy machine are not
    comparable with a quiet one's).  ``peaks``: a caller's :func:`measure_gemm_peaks` from the
    same run (measured here when not given).
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    heads = {f"task{i}": StepHead(dim, 10, frames, n, num_heads=num_heads).eval() for i in range(num_step_heads)}
    counts = sorted({1, num_step_heads})
    subsets = {c: {t: heads[t] for t in list(heads)[:c]} for c in counts}
    runners = {c: FastStepRunner(subsets[c]) for c in counts}
    steps = warmup + repeats
    tokens = torch.randn(frames + steps, 1 + n, dim)
    peaks = peaks or measure_gemm_peaks(int8=False)
    peak = peaks["fp32"]

    times: dict[tuple[str, int], list[float]] = {}
    diffs = {c: 0.0 for c in counts}

    def timed(key, fn):
        start = time.perf_counter()
        result = fn()
        times.setdefault(key, []).append(time.perf_counter() - start)
        return result

    with torch.inference_mode():
        for c in counts:
            for i in range(frames):
                runners[c].add_frame(i, tokens[i])
        for step in range(steps):
            i = frames + step  # the new frame
            ids = np.arange(i - frames + 1, i + 1)
            window = tokens[ids]
            for c in counts:
                hs = subsets[c]
                if include_naive:
                    timed(("naive", c), lambda: [reference_step_logits(h, window) for h in hs.values()])
                ref = timed(("sdpa", c), lambda: {t: h(window[None])[0] for t, h in hs.items()})

                def fast(c=c):
                    runners[c].add_frame(i, tokens[i])
                    return runners[c].predict(window, ids)

                out = timed(("fast", c), fast)
                diffs[c] = worst_error([diffs[c], *(max_abs_error(out[t], ref[t]) for t in hs)])

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = [{"name": "fp32 GEMM peak (2048^3)", "method": "peak", "heads": 0, "gflop_s": peak, "peaks": peaks,
             "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "loadavg_1m": load}]
    labels = {"naive": "naive head (explicit softmax)", "sdpa": "StepHead forward (fused SDPA)",
              "fast": "FastStepRunner (per new frame)"}
    for c in counts:
        naive_ms = None
        for method in ("naive", "sdpa", "fast"):
            if (method, c) not in times:
                continue
            ts = np.array(times[(method, c)][warmup:]) * 1e3
            ms, p95 = float(np.median(ts)), float(np.percentile(ts, 95))
            flops = c * full_head_flops(dim, n, frames) if method != "fast" else runners[c].flops_per_frame(n)
            if method == "naive":
                naive_ms = ms
            row = {
                "name": f"{labels[method]} x{c}",
                "method": method,
                "heads": c,
                "ms_median": ms,
                "ms_p95": p95,
                "ratio_to_naive": ms / naive_ms if naive_ms else float("nan"),
                "gflop": flops / 1e9,
                "gflop_s": flops / 1e9 / (ms / 1e3),
                "frac_peak": flops / 1e9 / (ms / 1e3) / peak,
                "threads": torch.get_num_threads(),
            }
            if method == "fast":
                row["memory_mb"] = runners[c].memory_bytes() / 2**20
                blocks = sum(g.E.numel() * g.E.element_size() for g in runners[c].groups)
                row["block_pass_gb"] = blocks / 1e9  # read once per prediction (memory-bound GEMV)
                row["max_abs_diff_vs_sdpa"] = diffs[c]
                row["fallbacks"] = runners[c].fallbacks
            rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    out = []
    for r in rows:
        if r["method"] == "peak":
            out.append(f"{r['name']}: {r['gflop_s']:.0f} GFLOP/s ({describe_peaks(r['peaks'])}), "
                       f"{r['threads']} threads, {r['cpus']} CPUs, load average {r['loadavg_1m']:.1f}")
            continue
        line = (f"{r['name']:<40} {r['ms_median']:9.1f} ms (p95 {r['ms_p95']:8.1f})"
                f"  x{r['ratio_to_naive']:.3f} of naive  {r['gflop']:7.2f} GFLOP  {r['gflop_s']:6.1f} GFLOP/s ({100 * r['frac_peak']:4.1f}% peak)")
        if "memory_mb" in r:
            line += (f"  cache {r['memory_mb']:.0f} MiB (block pass {r['block_pass_gb']:.2f} GB/frame),"
                     f" max|diff| vs SDPA {r['max_abs_diff_vs_sdpa']:.1e}")
        out.append(line)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--num-heads", type=int, default=6)
    p.add_argument("--step-heads", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-naive", action="store_true")
    a = p.parse_args(argv)
    rows = bench_heads(a.dim, a.tokens, a.frames, a.num_heads, a.step_heads, a.repeats, threads=a.threads,
                       include_naive=not a.no_naive)
    print(format_rows(rows))


if __name__ == "__main__":
    main()
