"""Head cost per new frame: naive attention vs fused SDPA vs the exact streaming engine, and
the engine's levers one by one.

Side by side on the same random windows, in the same process and thread count, in blocks of
consecutive frames that take turns (so that a machine's drift slows every method alike):

* ``naive``: :func:`~step_ros.model.fast_step.reference_step_logits` -- explicit score matrix,
  softmax and ``P @ V`` over all ``1 + T n`` tokens (the ``nn.MultiheadAttention`` math path);
* ``sdpa``: the :class:`~step_ros.model.heads.StepHead` forward (fused scaled-dot-product
  attention), recomputed on the whole window for every new frame;
* one row per fast-engine variant (:func:`fast_variants`): the
  :class:`~step_ros.model.fast_step.FastStepRunner` with PyTorch kernels, with ONNX Runtime
  kernels, and optionally an earlier version of the engine loaded from a file (``before``),
  steady state: ``add_frame`` of the new frame + ``predict`` on the slid window, each timed
  (their outputs are checked against ``sdpa``).

Each for 1 head and for ``num_step_heads`` heads.  A row: name, heads, ms median / p95 per new
frame, ratio to the naive baseline, GFLOP per new frame, achieved GFLOP/s and its fraction of
the fp32 GEMM peak measured in the same run (best of PyTorch and ONNX Runtime, see
:mod:`step_ros.deploy.peak`; its own row).

Also here: :func:`bench_block_pass` (the pass over the stored blocks in fp32, bf16 and fp16:
the storage-precision lever) and :func:`sweep_fallbacks` (fallbacks and max |delta logit|
against the reference over token scales and trained heads).

``python -m step_ros.deploy.bench_heads`` prints the tables (ViT-S/14 at 224 by default).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from step_ros.deploy.export import max_abs_error, worst_error
from step_ros.deploy.peak import describe_peaks, measure_gemm_peaks, time_ms
from step_ros.model.native_kernels import amx_available, columns_bf16, load_native, native_status, without_amx
from step_ros.model.fast_kernels import cpu_session_options
from step_ros.model.fast_step import FastStepRunner, reference_step_logits
from step_ros.model.heads import StepHead


def full_head_flops(dim: int, n: int, frames: int) -> float:
    """FLOPs of one STEP head on a whole window (qkv, scores, P @ V, output projection)."""
    tokens = 1 + frames * n
    return 2.0 * tokens * dim * 3 * dim + 2 * 2.0 * tokens * tokens * dim + 2.0 * tokens * dim * dim


def load_engine_module(path: Path) -> Any:
    """An earlier ``fast_step.py`` (e.g. ``git show REV:step_ros/model/fast_step.py > f.py``),
    imported inside ``step_ros.model`` so that its relative imports resolve: the "before" rows.
    A ``fast_kernels.py`` beside it (``git show REV:step_ros/model/fast_kernels.py``) is that
    engine's kernels; without one it runs today's."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--baseline-engine: no file {path}")
    name = f"step_ros.model._baseline_{path.stem}"
    kernels_path = path.parent / "fast_kernels.py"
    own = Path(__file__).resolve().parents[1] / "model" / "fast_kernels.py"
    kernels = None
    if kernels_path.is_file() and kernels_path.resolve() != own:
        kernels = _exec_module(f"{name}_kernels", kernels_path)
    saved = sys.modules.get("step_ros.model.fast_kernels")
    try:
        if kernels is not None:  # what the engine's ``from .fast_kernels import ...`` finds
            sys.modules["step_ros.model.fast_kernels"] = kernels
        module = _exec_module(name, path)
    finally:
        if saved is not None:
            sys.modules["step_ros.model.fast_kernels"] = saved
    if not hasattr(module, "FastStepRunner"):
        raise ValueError(f"--baseline-engine: {path} has no FastStepRunner")
    return module


def _exec_module(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


#: The fast engine with bfloat16 blocks, in :func:`fast_variants`: PyTorch's block creation, and
#: step_ros's fused one (decision 38; with the AMX tile unit where the CPU has one, decision 39,
#: and without it, the lever on its own).
BF16_VARIANT = "torch kernels, bf16 blocks"
NATIVE_BF16_VARIANT = "native kernels, bf16 blocks"
NO_AMX_VARIANT = "native kernels, bf16 blocks, no AMX"


class WithoutAmx:
    """A runner whose frames are added with the AMX tile unit off (:func:`without_amx`)."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)

    def add_frame(self, *args: Any) -> None:
        with without_amx():
            self.runner.add_frame(*args)

    def predict(self, *args: Any) -> Any:
        with without_amx():  # a prediction may add the window's frames too
            return self.runner.predict(*args)


def fast_variants(baseline_engine: Path | None = None) -> dict[str, Callable[[Any], Any]]:
    """Label -> runner factory for each fast-engine configuration compared, baseline first and
    the default (``auto``: the fastest kernels, timed on this machine; float32 blocks) last."""
    variants: dict[str, Callable[[Any], Any]] = {}
    if baseline_engine is not None:
        module = load_engine_module(baseline_engine)
        label = f"before ({Path(baseline_engine).name})"
        variants[label] = lambda heads: module.FastStepRunner(heads)
        if "block_dtype" in inspect.signature(module.FastStepRunner).parameters:  # engines since decision 37
            variants[f"{label}, {NATIVE_BF16_VARIANT}"] = lambda heads: module.FastStepRunner(
                heads, kernels="native", block_dtype="bfloat16")
    variants["torch kernels"] = lambda heads: FastStepRunner(heads, kernels="torch")
    variants[BF16_VARIANT] = lambda heads: FastStepRunner(heads, kernels="torch", block_dtype="bfloat16")
    variants["native kernels"] = lambda heads: FastStepRunner(heads, kernels="native")
    variants[NATIVE_BF16_VARIANT] = lambda heads: FastStepRunner(heads, kernels="native", block_dtype="bfloat16")
    if amx_available():
        variants[NO_AMX_VARIANT] = lambda heads: WithoutAmx(
            FastStepRunner(heads, kernels="native", block_dtype="bfloat16"))
    try:
        import onnxruntime  # noqa: F401

        variants["onnxruntime kernels"] = lambda heads: FastStepRunner(heads, kernels="onnxruntime")
    except ImportError:
        pass
    variants["auto kernels"] = lambda heads: FastStepRunner(heads, kernels="auto")
    return variants


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
    variants: dict[str, Callable[[Any], Any]] | None = None,
    rounds: int = 2,
) -> list[dict]:
    """Time the ways of running STEP heads per new frame; returns one dict per row.

    Each method runs ``rounds`` blocks of ``warmup`` untimed + ``repeats / rounds`` timed new
    frames, the methods taking turns (each fast runner's cache is filled with ``frames`` frames
    first, untimed).  ``threads``: torch thread count (default:
    leave as is).  Rows: ``name, method, heads, ms_median, ms_p95, ratio_to_naive, gflop,
    gflop_s, frac_peak, threads``; fast rows add ``ms_add_frame``, ``ms_predict``,
    ``memory_mb``, ``block_pass_gb``, ``max_abs_diff_vs_sdpa``, ``fallbacks`` and
    ``exact_rows``.  The first row is the measured fp32 GEMM peak (with the thread count, CPU
    count and 1-minute load average: timings on a busy machine are not comparable with a quiet
    one's).  ``peaks``: a caller's :func:`measure_gemm_peaks` from the same run.
    ``variants``: :func:`fast_variants` (default: PyTorch, ONNX Runtime and ``auto`` kernels).
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    heads = {f"task{i}": StepHead(dim, 10, frames, n, num_heads=num_heads).eval() for i in range(num_step_heads)}
    counts = sorted({1, num_step_heads})
    subsets = {c: {t: heads[t] for t in list(heads)[:c]} for c in counts}
    variants = variants if variants is not None else fast_variants()
    runners = {(v, c): make(subsets[c]) for v, make in variants.items() for c in counts}
    steps = rounds * (warmup + math.ceil(repeats / rounds))  # new frames per method
    tokens = torch.randn(frames + steps, 1 + n, dim)
    peaks = peaks or measure_gemm_peaks(int8=False)
    peak = peaks["fp32"]

    times: dict[tuple[str, int], list[float]] = {}
    parts: dict[tuple[str, int], list[tuple[float, float]]] = {}
    diffs = {key: 0.0 for key in runners}
    methods = (["naive"] if include_naive else []) + ["sdpa", *variants]
    per_block = warmup + math.ceil(repeats / rounds)
    new_frame = {(m, c): frames for m in methods for c in counts}  # each method's next frame

    def step(method: str, c: int, timed: bool, check: bool) -> None:
        i = new_frame[(method, c)]
        new_frame[(method, c)] += 1
        ids = np.arange(i - frames + 1, i + 1)
        window, hs = tokens[ids], subsets[c]
        t0 = time.perf_counter()
        if method == "naive":
            [reference_step_logits(h, window) for h in hs.values()]
        elif method == "sdpa":
            {t: h(window[None])[0] for t, h in hs.items()}
        else:
            runner = runners[(method, c)]
            runner.add_frame(i, tokens[i])
            t1 = time.perf_counter()
            out = runner.predict(window, ids)
            if timed:
                parts.setdefault((method, c), []).append((t1 - t0, time.perf_counter() - t1))
        if timed:
            times.setdefault((method, c), []).append(time.perf_counter() - t0)
        if check and method in variants:  # against the fused forward, untimed
            ref = {t: h(window[None])[0] for t, h in hs.items()}
            diffs[(method, c)] = worst_error([diffs[(method, c)], *(max_abs_error(out[t], ref[t]) for t in hs)])

    with torch.inference_mode():
        for (v, c), runner in runners.items():
            for i in range(frames):
                runner.add_frame(i, tokens[i])
        # Blocks of consecutive frames per method, the methods taking turns (A B C A B C): each
        # engine keeps its own caches warm as in real use (interleaving single frames made every
        # engine start from the others' GB of blocks), and turns spread a machine's drift.
        for _ in range(rounds):
            for c in counts:
                for method in methods:
                    for k in range(per_block):
                        step(method, c, timed=k >= warmup, check=k == per_block - 1)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = [{"name": "fp32 GEMM peak (2048^3)", "method": "peak", "heads": 0, "gflop_s": peak, "peaks": peaks,
             "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "loadavg_1m": load}]
    labels = {"naive": "naive head (explicit softmax)", "sdpa": "StepHead forward (fused SDPA)",
              **{v: f"fast STEP engine, {v}" for v in variants}}
    for c in counts:
        naive_ms = None
        for method in ("naive", "sdpa", *variants):
            if (method, c) not in times:
                continue
            ts = np.array(times[(method, c)]) * 1e3
            ms, p95 = float(np.median(ts)), float(np.percentile(ts, 95))
            fast = method in variants
            runner = runners.get((method, c))
            flops = runner.flops_per_frame(n) if fast else c * full_head_flops(dim, n, frames)
            if method == "naive":
                naive_ms = ms
            row = {
                "name": f"{labels[method]} x{c}",
                "method": "fast" if fast else method,
                "variant": method if fast else None,
                "heads": c,
                "ms_median": ms,
                "ms_p95": p95,
                "ratio_to_naive": ms / naive_ms if naive_ms else float("nan"),
                "gflop": flops / 1e9,
                "gflop_s": flops / 1e9 / (ms / 1e3),
                "frac_peak": flops / 1e9 / (ms / 1e3) / peak,
                "threads": torch.get_num_threads(),
            }
            if fast:
                split = np.array(parts[(method, c)]) * 1e3
                row["ms_add_frame"] = float(np.median(split[:, 0]))
                row["ms_predict"] = float(np.median(split[:, 1]))
                row["memory_mb"] = runner.memory_bytes() / 2**20
                blocks = sum(g.E.numel() * g.E.element_size() for g in runner.groups)
                row["block_pass_gb"] = blocks / 1e9  # read once per prediction (memory-bound GEMV)
                row["max_abs_diff_vs_sdpa"] = diffs[(method, c)]
                row["fallbacks"] = runner.fallbacks
                row["exact_rows"] = getattr(runner, "exact_rows", 0)
                row["kernels"] = getattr(runner, "kernels", None)
            rows.append(row)
    return rows


def bench_block_pass(dim: int = 384, n: int = 256, frames: int = 16, num_heads: int = 6,
                     repeats: int = 5) -> list[dict]:
    """The pass over one head's stored blocks (``w = r' E`` for every block), by storage
    precision and library: fp32 (PyTorch, ONNX Runtime: what the engine does), bf16 (PyTorch
    ``bmm``, step_ros's compiled kernel: what the engine does for ``block_dtype="bfloat16"``)
    and fp16 (ONNX Runtime).  Half precision halves the bytes read; the rows show which code
    turns that into time on this machine.  (The step_ros kernel also weighs ``w`` by ``U`` and
    sums it over the query slots, as the engine's pass does; the others stop at ``w``.)"""
    blocks = frames * frames * num_heads
    E = torch.rand(blocks, n, n)
    r = torch.rand(blocks, 1, n)
    gb = E.numel() * 4 / 1e9
    rows = []

    def add(name: str, fn, nbytes: float) -> None:
        ms = float(np.median(time_ms(fn, repeats)))
        rows.append({"name": f"pass over 1 head's blocks: {name}", "ms_median": ms,
                     "gb_read": nbytes, "gb_s": nbytes / (ms / 1e3)})

    w = torch.empty(blocks, 1, n)
    add("fp32, PyTorch bmm", lambda: torch.bmm(r, E, out=w), gb)
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        def session(elem: int):
            graph = helper.make_graph(
                [helper.make_node("MatMul", ["r", "E"], ["w"])], "gemv",
                [helper.make_tensor_value_info("r", elem, [blocks, 1, n]),
                 helper.make_tensor_value_info("E", elem, [blocks, n, n])],
                [helper.make_tensor_value_info("w", elem, None)])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            model.ir_version = 8
            return ort.InferenceSession(model.SerializeToString(), cpu_session_options(),  # the engine's own options
                                        providers=["CPUExecutionProvider"])

        s32 = session(TensorProto.FLOAT)
        e32, r32 = E.numpy(), r.numpy()
        add("fp32, ONNX Runtime MatMul (the engine's)", lambda: s32.run(None, {"r": r32, "E": e32}), gb)
        s16 = session(TensorProto.FLOAT16)
        e16, r16 = e32.astype(np.float16), r32.astype(np.float16)
        add("fp16, ONNX Runtime MatMul", lambda: s16.run(None, {"r": r16, "E": e16}), gb / 2)
    except ImportError as exc:
        rows.append({"name": "pass over 1 head's blocks: ONNX Runtime", "skipped": str(exc)})
    Eb, rb, wb = E.bfloat16(), r.bfloat16(), w.bfloat16()
    add("bf16, PyTorch bmm", lambda: torch.bmm(rb, Eb, out=wb), gb / 2)
    U, col = torch.rand(frames, blocks // frames, n), torch.empty(blocks // frames, n)
    Eb, r = Eb.view(frames, -1, n, n), r.view(frames, -1, n)
    load_native()
    add(f"bf16, step_ros kernel ({native_status()})", lambda: columns_bf16(r, Eb, U, col), gb / 2)
    return rows


def sweep_fallbacks(heads: dict[str, torch.nn.Module], tokens: torch.Tensor, scales=(1.0, 3.0, 10.0),
                    label: str = "", predictions: int = 3,
                    make_runner: Callable[[Any], Any] = FastStepRunner) -> list[dict]:
    """For each token scale: stream ``tokens * scale`` through a fresh fast runner (every other
    window reversed) and compare each prediction with the heads' own forward (fused SDPA,
    float32).  Rows: fallbacks, exact rows, max |delta logit|, the largest |logit|, and the
    engine's median ms per new frame (``add_frame`` + ``predict``, over the ``predictions``
    frames; sharp attention once made it 9x slower: denormals, see ``fast_kernels.EXP_FLOOR``).
    ``make_runner``: e.g. an earlier engine's ``FastStepRunner`` (:func:`load_engine_module`)."""
    frames = next(h.frames for h in heads.values())
    rows = []
    with torch.inference_mode():
        for scale in scales:
            runner = make_runner(heads)
            x = tokens[: frames + predictions - 1] * scale
            worst, biggest, times = 0.0, 0.0, []
            for i in range(len(x)):
                start = time.perf_counter()
                runner.add_frame(i, x[i])
                if i < frames - 1:
                    continue
                ids = np.arange(i - frames + 1, i + 1)
                ids = ids[::-1].copy() if i % 2 else ids
                out = runner.predict(x[ids], ids)
                times.append(time.perf_counter() - start)
                for task, head in heads.items():
                    ref = head(x[ids][None])[0]
                    worst = worst_error([worst, max_abs_error(out[task], ref)])
                    biggest = max(biggest, float(ref.abs().max()))
            rows.append({"name": f"fallback sweep: {label}, tokens x{scale:g}", "scale": scale,
                         "fallbacks": runner.fallbacks, "exact_rows": getattr(runner, "exact_rows", 0),
                         "max_abs_dlogit": worst, "max_abs_logit": biggest, "predictions": predictions,
                         "ms_frame": 1e3 * float(np.median(times))})
    return rows


def format_rows(rows: list[dict]) -> str:
    out = []
    for r in rows:
        if r.get("method") == "peak":
            out.append(f"{r['name']}: {r['gflop_s']:.0f} GFLOP/s ({describe_peaks(r['peaks'])}), "
                       f"{r['threads']} threads, {r['cpus']} CPUs, load average {r['loadavg_1m']:.1f}")
        elif "skipped" in r:
            out.append(f"{r['name']}: skipped ({r['skipped']})")
        elif "gb_s" in r:
            out.append(f"{r['name']:<58} {r['ms_median']:8.1f} ms  {r['gb_read']:.2f} GB  {r['gb_s']:.1f} GB/s")
        elif "scale" in r:
            out.append(f"{r['name']:<58} fallbacks {r['fallbacks']}  exact rows {r['exact_rows']}  "
                       f"max|dlogit| {r['max_abs_dlogit']:.1e} (max|logit| {r['max_abs_logit']:.3g})  "
                       f"{r['ms_frame']:.1f} ms per frame")
        else:
            line = (f"{r['name']:<52} {r['ms_median']:8.1f} ms (p95 {r['ms_p95']:7.1f})"
                    f"  x{r['ratio_to_naive']:.3f} of naive  {r['gflop']:6.2f} GFLOP  {r['gflop_s']:6.1f} GFLOP/s"
                    f" ({100 * r['frac_peak']:4.1f}% peak)")
            if "memory_mb" in r:
                line += (f"  add {r['ms_add_frame']:.1f} + predict {r['ms_predict']:.1f} ms, cache {r['memory_mb']:.0f}"
                         f" MiB, max|diff| vs SDPA {r['max_abs_diff_vs_sdpa']:.1e}, fallbacks {r['fallbacks']}")
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
    p.add_argument("--baseline-engine", type=Path, default=None,
                   help="an earlier fast_step.py, timed as 'before' in the same run")
    a = p.parse_args(argv)
    rows = bench_heads(a.dim, a.tokens, a.frames, a.num_heads, a.step_heads, a.repeats, threads=a.threads,
                       include_naive=not a.no_naive, variants=fast_variants(a.baseline_engine))
    print(format_rows(rows))


if __name__ == "__main__":
    main()
