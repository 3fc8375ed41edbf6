"""The machine's matrix-multiply peak, the yardstick of every "fraction of peak" in the benchmarks.

Measured, not looked up, at the thread count the benchmark uses, with every GEMM library the
benchmarks run: PyTorch's BLAS (MKL on x86), PyTorch's oneDNN linear (what the backbone's Linear
layers use on x86 CPUs, :mod:`step_ros.model.onednn`) and ONNX Runtime's MLAS.  Why all three:
their speeds differ by CPU vendor (MKL takes AVX2 kernels on AMD CPUs).  On this project's AMD
EPYC machine MLAS multiplies fp32 matrices about 2.2x faster than MKL (~490 vs ~220 GFLOP/s at
2 threads), so a peak taken from PyTorch's BLAS alone put the ONNX Runtime backbone at 152 % of
"peak".  The fp32 peak is the best
of the libraries; int8 rows (VNNI) are measured against the int8 GEMM peak.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..model.device import keep_denormal_mode


def time_ms(fn, repeat: int, warmup: int = 1) -> list[float]:
    """Wall time of ``repeat`` calls of ``fn`` in ms, after ``warmup`` untimed calls (allocation,
    weight packing, thread pool start)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def _best_seconds(fn, repeats: int) -> float:
    return min(time_ms(fn, repeats)) / 1e3


def torch_gemm_gflops(size: int = 2048, repeats: int = 7) -> float:
    """fp32 ``torch.mm`` throughput at PyTorch's current thread count (best of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    return 2.0 * size**3 / _best_seconds(lambda: torch.mm(a, b, out=out), repeats) / 1e9


def onednn_gemm_gflops(size: int = 2048, repeats: int = 7) -> float | None:
    """fp32 throughput of the backbone's own oneDNN linear (:class:`OneDnnLinear`, weight packed
    on the untimed first call), or None where it is not available."""
    from ..model.onednn import use_onednn_linears

    layer = torch.nn.Linear(size, size, bias=False)
    if not use_onednn_linears(layer):
        return None
    a = torch.randn(size, size)
    with torch.inference_mode():
        return 2.0 * size**3 / _best_seconds(lambda: layer(a), repeats) / 1e9


def onnxruntime_gemm_gflops(size: int = 2048, repeats: int = 7, threads: int | None = None,
                            int8: bool = False) -> float:
    """ONNX Runtime CPU ``MatMul`` (fp32) or ``MatMulInteger`` (uint8 x int8, what dynamic int8
    quantization runs) throughput; ``threads`` defaults to PyTorch's thread count."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if int8:
        a = rng.integers(0, 255, (size, size), dtype=np.uint8)
        b = rng.integers(-127, 127, (size, size), dtype=np.int8)
        op, in_type, out_type = "MatMulInteger", TensorProto.UINT8, TensorProto.INT32
    else:
        a = rng.standard_normal((size, size), dtype=np.float32)
        b = rng.standard_normal((size, size), dtype=np.float32)
        op, in_type, out_type = "MatMul", TensorProto.FLOAT, TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["y"])], "gemm",
        [helper.make_tensor_value_info("a", in_type, [size, size])],
        [helper.make_tensor_value_info("y", out_type, [size, size])],
        [numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), keep_denormal_mode(opts), providers=["CPUExecutionProvider"])
    return 2.0 * size**3 / _best_seconds(lambda: session.run(None, {"a": a}), repeats) / 1e9


def measure_gemm_peaks(size: int = 2048, repeats: int = 7, int8: bool = True) -> dict[str, float]:
    """``{"torch": .., "onednn": .., "onnxruntime": .., "fp32": best fp32, "int8": ONNX Runtime
    int8}`` in GFLOP/s (int8: GOP/s).  Entries are absent where their library is."""
    peaks = {"torch": torch_gemm_gflops(size, repeats)}
    onednn = onednn_gemm_gflops(size, repeats)
    if onednn is not None:
        peaks["onednn"] = onednn
    try:
        peaks["onnxruntime"] = onnxruntime_gemm_gflops(size, repeats)
        if int8:
            peaks["int8"] = onnxruntime_gemm_gflops(size, repeats, int8=True)
    except ImportError:
        pass
    peaks["fp32"] = max(peaks["torch"], peaks.get("onednn", 0.0), peaks.get("onnxruntime", 0.0))
    return peaks


def describe_peaks(peaks: dict[str, float]) -> str:
    """Where the fp32 peak came from, for a table's notes: ``best of torch .., onnxruntime ..``."""
    parts = [f"torch {peaks['torch']:.0f}"]
    if "onednn" in peaks:
        parts.append(f"onednn {peaks['onednn']:.0f}")
    if "onnxruntime" in peaks:
        parts.append(f"onnxruntime {peaks['onnxruntime']:.0f}")
    text = f"best of {', '.join(parts)}"
    if "int8" in peaks:
        text += f"; int8 {peaks['int8']:.0f} GOP/s"
    return text
