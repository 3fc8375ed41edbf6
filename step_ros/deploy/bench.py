"""``step-ros bench``: the speed claims, measured side by side in one run on the same frames.

Rows (each with its baseline, the ratio to it, and the fraction of the machine's GEMM peak
measured in the same run: fp32 rows against the best fp32 GEMM of PyTorch and ONNX Runtime,
the int8 row against the int8 GEMM; :mod:`step_ros.deploy.peak` says why):

1. backbone: PyTorch (its Linear layers through oneDNN, see :mod:`step_ros.model.onednn`; and the
   same weights with PyTorch's default MKL GEMM, the "before") vs ONNX Runtime (and int8), ms
   per frame, preprocessing included;
2. one prediction, streaming (one new frame's backbone pass + three exact fast STEP heads) vs
   recomputing the 16-frame clip with naive heads (today's way) and with fused-SDPA heads; the
   streaming row once per fast-engine variant: PyTorch kernels, PyTorch kernels with bfloat16
   blocks (``head_block_dtype``), step_ros's native kernels (fused, compiled block creation)
   with float32 and bfloat16 blocks, ONNX Runtime kernels, ``auto`` (the fastest, timed on this
   machine, float32 blocks: what the node runs by default), and with
   ``--baseline-engine FILE`` an earlier engine ("before"), each in torch backbone passes;
3. one head vs three heads on the shared window (streaming): what the second and third head add;
   and, clearly named, the approximate ``token_pool`` heads (``--token-pool``, default 2);
4. the heads alone: naive reference vs fused SDPA vs each fast-engine variant, 1 and 3 heads,
   with add_frame / predict split, fallbacks and exact rows; then the same rows for every
   ``--extra-arch`` (default ViT-B/14: backbone, heads alone, streaming with 3 heads; float32
   and bfloat16 blocks), the fallback sweep (token scales 1, 3, 10; random and trained heads;
   float32 and bfloat16 blocks; ``--no-sweep``) and the pass over the stored blocks by storage
   precision (fp32, bf16, fp16);
5. optionally (``--node``, or ``--node-only`` to skip rows 1-4 and 6) the live node over DDS: stamp ->
   /human_action latency, sustained rate, drops, postponed predictions and memory (a short
   soak; ``step-ros soak`` runs the long one); ``--node-token-pool`` gives its heads pooling;
6. on a CUDA GPU (skipped with the reason elsewhere): backbone fp32 / bf16 / TensorRT, streaming
   with three exact fast heads on the GPU, the heads alone (``bench_cuda.py``).

Writes ``bench.json`` and ``bench_latency.png`` into ``--out`` and prints a table.  The default
is the deployment configuration of the issue: DINOv2 ViT-S/14 at 224, T = 16, frame interval 2,
three STEP heads (random weights: timings do not depend on weight values).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .peak import describe_peaks, measure_gemm_peaks, time_ms


def backbone_flops(arch, image_size: int) -> float:
    """Multiply-adds x 2 of one ViT forward at ``image_size`` (matmuls + attention)."""
    n = (image_size // arch.patch_size) ** 2
    tokens = 1 + arch.registers + n
    d = arch.hidden_size
    mlp = 2 * 3 * d * int(d * arch.mlp_ratio * 2 / 3) if arch.swiglu else 2 * d * d * arch.mlp_ratio
    per_layer = tokens * (4 * d * d + mlp) + 2 * tokens * tokens * d
    return 2.0 * (arch.num_layers * per_layer + n * 3 * arch.patch_size**2 * d)


def bench_manifest(arch: str, image_size: int, frames: int, interval: int, step_heads: int, root: Path,
                   token_pool: int = 1):
    """A manifest with ``step_heads`` STEP heads on a random-weight backbone (for timing only)."""
    from ..data.synthetic import ATOMIC_ACTIONS, FINE_ACTIONS, OBJECTS, SYMMETRIC_PAIRS
    from ..model.manifest import parse_manifest

    tasks = [("fine_action", FINE_ACTIONS), ("atomic_action", ATOMIC_ACTIONS), ("object_in_use", OBJECTS)]
    heads = [{"task": t, "kind": "step", "labels": labels} for t, labels in tasks[:step_heads]]
    if token_pool > 1:
        for h in heads:
            h["options"] = {"token_pool": token_pool}
    heads[0]["symmetric_pairs"] = [list(p) for p in SYMMETRIC_PAIRS]
    data = {"name": f"bench-{arch}", "backbone": {"arch": arch, "random_seed": 0, "image_size": image_size},
            "frames": frames, "frame_interval": interval, "heads": heads}
    return parse_manifest(data, root, "bench manifest")


def _row(name: str, times_ms: list[float], flops: float | None, peak: float, baseline: dict | None = None,
         **extra) -> dict:
    ms = statistics.median(times_ms)
    row = {"name": name, "ms_median": ms, "ms_p95": float(np.percentile(times_ms, 95)),
           "times_ms": [round(x, 3) for x in times_ms]}
    if baseline is not None:
        row["baseline"] = baseline["name"]
        row["ratio_to_baseline"] = ms / baseline["ms_median"]
    if flops:
        row["gflop"] = flops / 1e9
        row["frac_peak"] = flops / 1e9 / (ms / 1e3) / peak
    row.update(extra)
    return row


def _variant_runner(variant: str, variants: dict, heads: dict) -> Any:
    from ..model.streaming import ReferenceRunner

    if variant == "reference":
        return ReferenceRunner(heads)
    return variants[variant](heads)


def arch_rows(args: argparse.Namespace, arch: str, peaks: dict, variants: dict, full: bool) -> list[dict]:
    """Every row of one backbone architecture.  ``full``: the main architecture (clip rows,
    every fast-engine variant, 1 vs 3 heads, token pooling); otherwise (``--extra-arch``) the
    backbone, the heads alone and streaming with three heads, with the default kernels and with
    bfloat16 blocks."""
    from ..data.synthetic import render_clip
    from ..model.fast_step import reference_step_logits
    from ..model.heads import create_head
    from ..model.multitask import MultiTaskModel
    from ..model.onednn import plain_linears
    from ..model.streaming import StreamingEngine
    from .backends import create_encoder
    from .bench_heads import BF16_VARIANT, NATIVE_BF16_VARIANT, bench_block_pass, bench_heads
    from .export import max_abs_error, worst_error

    peak = peaks["fp32"]
    tmp = Path(tempfile.mkdtemp(prefix="step_ros_bench_"))
    manifest = bench_manifest(arch, args.image_size, args.frames, args.interval, 3, tmp)
    model = MultiTaskModel.from_manifest(manifest, load_checkpoints=False)
    backbone = model.backbone
    t, k = manifest.frames, manifest.frame_interval
    video = render_clip("pick_up", seed=0, size=args.frame_size, num_frames=(t - 1) * k + 1 + args.repeat * k + 8)
    n = backbone.num_patches
    tag = "" if full else f"[{arch}] "
    rows: list[dict] = []

    # 1. backbone backends ------------------------------------------------------------------
    frames = video[: max(4, args.repeat)]
    encoders = {"torch": create_encoder("torch", backbone, device="cpu")}
    if getattr(backbone, "onednn_linears", 0):  # the same weights with PyTorch's default GEMM (MKL)
        mkl = copy.deepcopy(backbone)
        plain_linears(mkl)
        encoders["torch, MKL linears (STEP_ROS_ONEDNN=0)"] = create_encoder("torch", mkl, device="cpu")
    for name in ["onnxruntime"] + (["onnxruntime-int8"] if args.int8 and full else []):
        try:
            encoders[name] = create_encoder(name, backbone, args.cache, device="cpu", threads=args.threads)
        except ImportError as exc:
            rows.append({"name": f"{tag}backbone {name}", "skipped": str(exc)})
    base = None
    reference_tokens = [backbone.encode(f[None])[0] for f in frames]
    for name, enc in encoders.items():
        it = iter(range(10**9))
        times = time_ms(lambda: enc(frames[next(it) % len(frames)]), args.repeat)
        err = worst_error(max_abs_error(enc(f), r) for f, r in zip(frames, reference_tokens))
        row = _row(f"{tag}backbone {name} (1 frame)", times, backbone_flops(backbone.arch, backbone.image_size),
                   peaks["int8" if "int8" in name else "fp32"], base, max_abs_err_vs_torch=err)
        base = base or row
        rows.append(row)
    passes = base["ms_median"]  # one torch backbone pass: the unit of every "backbone passes"

    with torch.inference_mode():
        # 2. one prediction: streaming vs clip recomputation ----------------------------------
        window_frames = video[0 : (t - 1) * k + 1 : k]
        clip_row = None
        if full:
            def clip_naive():
                window = backbone.encode(window_frames)
                return [reference_step_logits(h, window) for h in model.heads.values()]

            def clip_sdpa():
                return model(backbone.encode(window_frames)[None])

            clip_row = _row(f"clip recompute: {t} backbone passes + 3 naive heads",
                            time_ms(clip_naive, args.clip_repeat, 0), None, peak, None,
                            backbone_passes_per_prediction=t)
            rows.append(clip_row)
            rows.append(_row(f"clip recompute: {t} backbone passes + 3 SDPA heads",
                             time_ms(clip_sdpa, args.clip_repeat, 0), None, peak, clip_row,
                             backbone_passes_per_prediction=t))

        def streaming_row(step_heads: int, variant: str, token_pool: int = 1) -> dict:
            sub_manifest = copy.copy(manifest)
            sub_manifest.heads = manifest.heads[:step_heads]
            heads = {s.task: model.heads[s.task] for s in sub_manifest.heads}
            if token_pool > 1:  # same heads' shapes, pooled tokens: the approximate mode
                heads = {s.task: create_head("step", backbone.dim, len(s.labels), t, n,
                                             {"token_pool": token_pool}).eval() for s in sub_manifest.heads}
            sub = MultiTaskModel(sub_manifest, backbone, heads)
            runner = _variant_runner(variant, variants, sub)
            engine = StreamingEngine(sub, frame_interval=1, runner=runner)
            stamps = iter(np.arange(10**6) * 0.1)
            sampled = iter(video[::k])
            for _ in range(t - 1):  # fill the window
                engine.push(next(sampled), next(stamps))
            times = time_ms(lambda: engine.push(next(sampled), next(stamps)), args.repeat, warmup=1)
            calls = engine.stats.backbone_passes / max(1, engine.stats.predictions + t - 1)
            mode = f", token_pool {token_pool} (approximate)" if token_pool > 1 else ""
            what = "reference heads" if variant == "reference" else f"fast heads, {variant}"
            return _row(f"{tag}streaming: 1 backbone pass + {step_heads} {what}{mode}", times, None, peak,
                        clip_row, backbone_calls_per_new_frame=round(calls, 3),
                        backbone_passes=statistics.median(times) / passes, fallbacks=getattr(runner, "fallbacks", 0),
                        **({"kernels": runner.kernels} if hasattr(runner, "kernel_timings") else {}))

        default = list(variants)[-1]  # auto: what the node runs
        # the other architectures: the default, and the PyTorch and native kernels with both storages
        short = [v for v in ("torch kernels", BF16_VARIANT, "native kernels", NATIVE_BF16_VARIANT) if v in variants]
        short.append(default)
        stream3 = {v: streaming_row(3, v) for v in (variants if full else short)}
        rows += stream3.values()
        if full:
            stream1 = streaming_row(1, default)
            rows += [stream1, streaming_row(3, "reference")]
            if args.token_pool > 1:
                try:
                    rows.append(streaming_row(3, "auto kernels", args.token_pool))
                except ValueError as exc:  # the patch grid does not divide
                    rows.append({"name": f"streaming, token_pool {args.token_pool}", "skipped": str(exc)})
            added = stream3[default]["ms_median"] - stream1["ms_median"]
            rows.append({"name": "heads 2+3 add (streaming, fast)", "ms_median": added,
                         "baseline": "1-head pipeline", "ratio_to_baseline": added / stream1["ms_median"],
                         "note": "< 1: the second and third head cost less than the first head's whole pipeline"})

    # 4. heads alone ------------------------------------------------------------------------
    head_variants = variants if full else {v: variants[v] for v in short}
    for r in bench_heads(backbone.dim, n, t, backbone.arch.num_heads, 3, repeats=args.repeat,
                         include_naive=full, peaks=peaks, variants=head_variants)[1:]:
        extra = {key: r[key] for key in ("kernels", "memory_mb", "fallbacks", "exact_rows", "ms_add_frame",
                                         "ms_predict", "max_abs_diff_vs_sdpa") if key in r}
        rows.append({"name": f"{tag}heads only: " + r["name"], "ms_median": r["ms_median"], "ms_p95": r["ms_p95"],
                     **({"baseline": f"naive head x{r['heads']}", "ratio_to_baseline": r["ratio_to_naive"]}
                        if full else {}),
                     "gflop": r["gflop"], "frac_peak": r["frac_peak"], "backbone_passes": r["ms_median"] / passes,
                     **extra})
    if full:
        rows += bench_block_pass(backbone.dim, n, t, backbone.arch.num_heads, repeats=args.repeat)
        rows.append({"model": model, "video": video})  # for the GPU rows; dropped before returning
    return rows


def run_bench(args: argparse.Namespace) -> dict:
    from ..model.multitask import MultiTaskModel
    from .bench_heads import fast_variants

    if args.node_token_pool != 1 and not args.node_only:
        raise ValueError("--node-token-pool needs --node-only (the other rows time the exact heads)")
    torch.set_num_threads(args.threads)
    peaks = measure_gemm_peaks(int8=args.int8)
    peak = peaks["fp32"]
    rows: list[dict] = [{"name": "GEMM peak (2048^3)", "gflop_s": peak, "peaks": peaks, "threads": args.threads,
                         "flush_denormals": getattr(args, "flush_denormals", True)}]
    variants = fast_variants(args.baseline_engine)
    t, k = args.frames, args.interval
    if not args.node_only:  # rows 1-4, 6
        main_rows = arch_rows(args, args.arch, peaks, variants, full=True)
        gpu = main_rows.pop()
        rows += main_rows
        for arch in args.extra_arch:
            if arch != args.arch:
                rows += arch_rows(args, arch, peaks, variants, full=False)
        if args.sweep:
            rows += fallback_sweep_rows(args)

        # 6. the GPU (skipped with the reason on machines without one) ----------------------
        from .bench_cuda import cuda_rows

        rows += cuda_rows(gpu["model"], gpu["video"], t, k, args.repeat, args.cache)

    # 5. the live node ----------------------------------------------------------------------
    if args.node or args.node_only:
        from ..model.multitask import save_head
        from ..ros.soak import run_soak

        tmp = Path(tempfile.mkdtemp(prefix="step_ros_bench_"))
        manifest = bench_manifest(args.arch, args.image_size, t, k, 3, tmp,
                                  token_pool=args.node_token_pool if args.node_only else 1)
        model = MultiTaskModel.from_manifest(manifest, load_checkpoints=False)
        backbone = model.backbone
        for spec in manifest.heads:
            spec.checkpoint = save_head(model.heads[spec.task], spec, tmp / f"{spec.task}.safetensors",
                                        dim=backbone.dim, frames=t, num_tokens=backbone.num_patches)
        path = manifest.save(tmp / "manifest.yaml")
        node = run_soak(path, args.node_frames, args.node_fps, args.out / "node", size=args.frame_size,
                        node_params=[f"num_threads:={args.threads}", *args.node_param])
        rows.append({"name": f"node over DDS @ {args.node_fps:g} fps, interval {k}", "node": node})
    config = {key: (str(v) if isinstance(v, Path) else v) for key, v in vars(args).items() if key != "func"}
    return {"config": config, "machine_peak_gflop_s": peak, "machine_peaks": peaks,
            "rows": rows}


def fallback_sweep_rows(args: argparse.Namespace) -> list[dict]:
    """The exact engine against the heads' own forward at token scales 1, 3 and 10: three
    random ViT-S-shaped heads on random tokens, and the demo model's trained heads on the
    tokens of its own backbone (the only trained heads shipped); each with PyTorch's and the
    native kernels, float32 and bfloat16 blocks; with ``--baseline-engine`` the earlier engine
    too, on the same tokens."""
    from ..data.synthetic import render_clip
    from ..model.fast_step import FastStepRunner
    from ..model.heads import StepHead
    from ..model.manifest import load_manifest
    from ..model.multitask import MultiTaskModel
    from ..resources import demo_manifest
    from .bench_heads import load_engine_module, sweep_fallbacks

    t = args.frames
    torch.manual_seed(0)
    heads = {f"task{i}": StepHead(384, 10, t, 256, num_heads=6).eval() for i in range(3)}
    random_tokens = torch.randn(t + 2, 257, 384)
    demo = MultiTaskModel.from_manifest(load_manifest(demo_manifest())).eval()
    m = demo.manifest
    video = render_clip("pick_up", seed=1, size=m.backbone.image_size * 2, num_frames=(m.frames + 2) * 2)
    with torch.inference_mode():
        demo_tokens = demo.backbone.encode(video[::2][: m.frames + 2])
    engines = {f"{kernels} kernels{', bf16 blocks' if dtype == 'bfloat16' else ''}: ":
               (lambda heads, kernels=kernels, dtype=dtype: FastStepRunner(heads, kernels=kernels, block_dtype=dtype))
               for kernels in ("torch", "native") for dtype in ("float32", "bfloat16")}
    if args.baseline_engine is not None:
        engines[f"before ({args.baseline_engine.name}): "] = load_engine_module(args.baseline_engine).FastStepRunner
    rows = []
    for prefix, make in engines.items():
        rows += sweep_fallbacks(heads, random_tokens, label=f"{prefix}3 random ViT-S heads", make_runner=make)
        rows += sweep_fallbacks(dict(demo.heads.items()), demo_tokens, label=f"{prefix}demo model's trained heads",
                                make_runner=make)
    return rows


NOTE_KEYS = ("backbone_passes_per_prediction", "backbone_calls_per_new_frame", "backbone_passes", "fallbacks", "exact_rows", "ms_add_frame",
             "ms_predict", "max_abs_err_vs_torch", "max_abs_diff_vs_sdpa", "memory_mb")


def print_bench(result: dict) -> None:
    from ..console import print_table

    table = []
    for r in result["rows"]:
        if "gflop_s" in r and "ms_median" not in r:
            ftz = "" if r.get("flush_denormals", True) else "; denormals NOT flushed (--no-flush-denormals)"
            table.append([r["name"], f"{r['gflop_s']:.0f} GFLOP/s", "", "", "", describe_peaks(r["peaks"]) + ftz])
            continue
        if "skipped" in r or "node" in r:
            table.append([r["name"], r.get("skipped", "see node table"), "", "", "", ""])
            continue
        if "scale" in r:  # fallback sweep
            table.append([r["name"], f"{r['ms_frame']:.1f}", "-", "-", "-",
                          f"fallbacks={r['fallbacks']}, exact_rows={r['exact_rows']}, "
                          f"max|dlogit|={r['max_abs_dlogit']:.2g} (max|logit| {r['max_abs_logit']:.3g})"])
            continue
        if "gb_s" in r:  # the pass over the blocks, by storage precision
            table.append([r["name"], f"{r['ms_median']:.1f}", "-", "-", "-",
                          f"{r['gb_read']:.2f} GB read, {r['gb_s']:.1f} GB/s"])
            continue
        ratio = f"x{r['ratio_to_baseline']:.3f} of {r['baseline']}" if "baseline" in r else "baseline"
        frac = f"{100 * r['frac_peak']:.1f}%" if "frac_peak" in r else "-"
        p95 = f"{r['ms_p95']:.1f}" if "ms_p95" in r else "-"
        table.append([r["name"], f"{r['ms_median']:.1f}", p95, ratio, frac,
                      ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in r.items() if k in NOTE_KEYS)])
    print_table("step-ros bench (same run, same frames; backbone_passes = ms / one torch backbone pass)",
                ["row", "ms median", "ms p95", "ratio", "of peak", "notes"], table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..bags import bench_replay
    from ..training import bench_data

    parser.add_argument("--suite", choices=["speed", "data", "replay"], default="speed",
                        help="speed: inference (rows 1-5 above); data: the training pipeline at scale "
                             "(cache bytes, train memory and throughput, extraction; step_ros/training/bench_data.py); "
                             "replay: replay-eval's stream vs batched pipelines (step_ros/bags/bench_replay.py)")
    parser.add_argument("--arch", default="dinov2_vits14")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--frames", type=int, default=16, help="T")
    parser.add_argument("--interval", type=int, default=2, help="frame interval")
    parser.add_argument("--frame-size", type=int, default=256, help="camera frame side in pixels")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=8, help="timed repetitions per row")
    parser.add_argument("--clip-repeat", type=int, default=3, help="timed repetitions of the (slow) clip rows")
    parser.add_argument("--int8", action="store_true", help="include the int8 ONNX Runtime backbone")
    parser.add_argument("--node", action="store_true", help="also run the live node over DDS (short soak)")
    parser.add_argument("--node-only", action="store_true", help="only the live node row (implies --node)")
    parser.add_argument("--token-pool", type=int, default=2,
                        help="also time the approximate token-pooled heads (k x k patch averages); 1 = skip")
    parser.add_argument("--node-token-pool", type=int, default=1,
                        help="token_pool of the node run's heads (with --node-only; 1 = exact STEP heads)")
    parser.add_argument("--node-frames", type=int, default=600)
    parser.add_argument("--node-fps", type=float, default=10.0)
    parser.add_argument("--node-param", action="append", default=[], metavar="NAME:=VALUE",
                        help="node parameter for the --node run, e.g. prediction_stride:=2")
    parser.add_argument("--extra-arch", nargs="*", default=["dinov2_vitb14"],
                        help="also time these backbones (backbone, fast heads, streaming with 3 heads); "
                             "none: --extra-arch with no value")
    parser.add_argument("--baseline-engine", type=Path, default=None,
                        help="an earlier step_ros/model/fast_step.py, timed as 'before' in the same run "
                             "(git show REV:step_ros/model/fast_step.py > before.py)")
    parser.add_argument("--flush-denormals", action=argparse.BooleanOptionalAction, default=True,
                        help="FTZ/DAZ in PyTorch's threads, as every step-ros command and the node run "
                             "(step_ros.model.device.flush_denormals); --no-flush-denormals shows what it buys")
    parser.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                        help="fallback sweep over token scales 1, 3, 10 and the demo model's trained heads")
    parser.add_argument("--cache", type=Path, default=Path("runs/onnx-cache"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    bench_data.add_arguments(parser)
    bench_replay.add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from ..console import write_json
    from ..figures import plot_histogram

    if args.suite == "data":
        from ..training.bench_data import main as data_main

        return data_main(args)
    if args.suite == "replay":
        from ..bags.bench_replay import main as replay_main

        return replay_main(args)
    result = run_bench(args)
    print_bench(result)
    write_json(result, args.out / "bench.json")
    hist = {r["name"]: r["times_ms"] for r in result["rows"]
            if "times_ms" in r and r["name"].startswith(("streaming", "clip"))}
    if hist:
        plot_histogram(hist, args.out / "bench_latency.png", "ms per prediction: streaming vs clip recomputation")
    print(f"wrote {args.out / 'bench.json'}")
    return 0
