"""The GPU rows of ``step-ros bench``: backbone and exact STEP heads on CUDA, and TensorRT.

Rows (each skipped with its reason where the machine cannot run it):

* backbone, PyTorch on CUDA, fp32 and bf16 autocast, ms per frame;
* backbone, TensorRT fp16 engine (needs the ``tensorrt`` package);
* streaming on CUDA: one backbone pass (fp32, bf16) + three exact fast STEP heads (fp32), the
  tokens staying on the GPU until the final probabilities;
* the three fast heads alone per new frame on CUDA, with their fallback count.

Timings synchronise the GPU after every call, so they are end-to-end latencies of one frame.
"""

from __future__ import annotations

import copy
import statistics

import numpy as np
import torch


def _timed(fn, repeat: int) -> list[float]:
    from .peak import time_ms

    def call():
        fn()
        torch.cuda.synchronize()

    return time_ms(call, repeat, warmup=2)


def _row(name: str, times: list[float], base: float | None = None, **extra) -> dict:
    ms = statistics.median(times)
    row = {"name": name, "ms_median": ms, "ms_p95": float(np.percentile(times, 95)),
           "times_ms": [round(x, 3) for x in times], **extra}
    if base:
        row["baseline"] = "CUDA backbone fp32"
        row["ratio_to_baseline"] = ms / base
    return row


def cuda_rows(model, video: np.ndarray, frames: int, interval: int, repeat: int, cache) -> list[dict]:
    """Rows for the model's backbone and STEP heads on the first CUDA GPU, or one skipped row."""
    if not torch.cuda.is_available():
        return [{"name": "CUDA rows (backbone, fast heads, TensorRT)",
                 "skipped": f"no CUDA GPU visible to PyTorch here (torch {torch.__version__}, "
                            f"CUDA build: {torch.version.cuda or 'no'})"}]
    from ..model.fast_step import FastStepRunner
    from ..model.streaming import StreamingEngine
    from .backends import BackendUnavailable, create_encoder

    dev = torch.device("cuda", torch.cuda.current_device())
    gpu = copy.deepcopy(model).to(dev).eval()
    gpu_name = torch.cuda.get_device_name(dev)
    rows: list[dict] = []
    sample = video[:4]
    it = iter(range(10**9))

    def frame():
        return sample[next(it) % len(sample)]

    with torch.inference_mode():
        fp32 = _row(f"CUDA backbone fp32 ({gpu_name})", _timed(lambda: gpu.backbone.encode(frame()[None]), repeat))
        rows.append(fp32)

        def bf16_encode(f):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return gpu.backbone.encode(f[None])[0].float()

        rows.append(_row("CUDA backbone bf16 autocast", _timed(lambda: bf16_encode(frame()), repeat), fp32["ms_median"]))
        try:
            trt = create_encoder("tensorrt", gpu.backbone, cache, device=dev, precision="fp16")
            rows.append(_row("TensorRT backbone fp16", _timed(lambda: trt(frame()), repeat), fp32["ms_median"],
                             max_abs_err_vs_torch=trt.info.get("max_abs_error_vs_torch")))
        except BackendUnavailable as exc:
            rows.append({"name": "TensorRT backbone fp16", "skipped": str(exc)})

        for label, encode in (("fp32", None), ("bf16", bf16_encode)):
            runner = FastStepRunner(gpu)
            engine = StreamingEngine(gpu, frame_interval=1, runner=runner, encode=encode)
            stamps = iter(np.arange(10**6) * 0.1)
            sampled = iter(video[::interval])
            for _ in range(frames - 1):
                engine.push(next(sampled), next(stamps))
            times = _timed(lambda: engine.push(next(sampled), next(stamps)), repeat)
            rows.append(_row(f"CUDA streaming: backbone {label} + {len(runner.fast_tasks)} fast heads fp32", times,
                             fp32["ms_median"], fallbacks=runner.fallbacks,
                             backbone_passes_per_new_frame=round(statistics.median(times) / fp32["ms_median"], 3)))

        runner = FastStepRunner(gpu)
        tokens = torch.randn(frames + repeat + 4, 1 + gpu.backbone.num_patches, gpu.backbone.dim, device=dev)
        for i in range(frames - 1):
            runner.add_frame(i, tokens[i])
        step = iter(range(frames - 1, 10**9))

        def new_frame():
            i = next(step)
            runner.add_frame(i, tokens[i])
            ids = np.arange(i - frames + 1, i + 1)
            return runner.predict(tokens[torch.from_numpy(ids).to(dev)], ids)

        rows.append(_row(f"CUDA heads only: {len(runner.fast_tasks)} fast STEP heads per new frame",
                         _timed(new_frame, repeat), fp32["ms_median"], fallbacks=runner.fallbacks))
    return rows


__all__ = ["cuda_rows"]
