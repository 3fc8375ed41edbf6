"""ONNX export of the frozen backbone and of the heads, checked against PyTorch.

* :func:`export_backbone`: ``pixels`` (1, 3, S, S) float32 -> ``tokens`` (1, 1 + n, D); or a
  dynamic batch axis, (B, 3, S, S) -> (B, 1 + n, D), for offline work in ONNX Runtime.
  Preprocessing (resize, crop, mean/std) stays outside the graph, in PyTorch: it is cheap and
  keeps the graph free of image-size-dependent resampling ops.  The input size is fixed.
* :func:`export_heads`: ``window`` (1, T, 1 + n, D) -> one output ``logits_<task>`` (1, C) per
  head, all heads in one graph sharing the same input.
* :func:`quantize_int8`: ONNX Runtime dynamic quantization (int8 weights of the MatMul/Gemm
  layers, activations quantized on the fly); the accuracy cost is measured elsewhere.

Every export is checked on real inputs with ONNX Runtime (CPU) against the PyTorch module it
came from; the max abs error per output is returned, printed and written to a sidecar JSON
(``<file>.json``) together with everything the export depends on: architecture, image size,
weights fingerprint and source, opset, library versions, input/output names and shapes.

Exporter: ``torch.onnx.export(..., dynamo=False)`` (the TorchScript tracer).  The dynamo
exporter (the default since torch 2.9) needs the ``onnxscript`` package, which the project
does not depend on; the tracer exports transformers' DINOv2 cleanly (max abs error ~1e-6).
While tracing, transformers always re-interpolates the position embeddings ("to support
dynamic shapes"); since :class:`~step_ros.model.backbone.Backbone` has already resized them to
the fixed input size, the export swaps in the identity for that step, so the graph holds no
bicubic ``Resize`` (same numbers, simpler graph for TensorRT).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import inspect
import json
import logging
import math
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from ..model.backbone import Backbone, state_fingerprint
from ..model.device import keep_denormal_mode

log = logging.getLogger(__name__)

#: Version of the layout of the exported graphs and sidecars (part of every cache key).
EXPORT_FORMAT = "step_ros.onnx/1"
DEFAULT_OPSET = 17  # LayerNormalization is a single op from 17 on (TensorRT maps it natively)
INPUT_NAME = "pixels"
OUTPUT_NAME = "tokens"
WINDOW_NAME = "window"
LOGITS_PREFIX = "logits_"


class ExportError(RuntimeError):
    """An export failed or does not reproduce PyTorch within tolerance."""


@dataclass
class ExportResult:
    """What an export produced: the graph, its sidecar and the measured error vs PyTorch."""

    path: Path
    sidecar: Path
    max_abs_error: dict[str, float]
    seconds: float
    meta: dict[str, Any] = field(repr=False, default_factory=dict)


# --------------------------------------------------------------------------- helpers


def sidecar_path(path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The sidecar of an exported graph (``path`` is the graph or the sidecar itself)."""
    path = Path(path)
    side = path if path.suffix == ".json" else sidecar_path(path)
    return json.loads(side.read_text())


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def onnx_sha256(path: str | Path) -> str:
    """sha256 of an ONNX model file and of any external-data files it references."""
    path = Path(path)
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    try:
        import onnx
    except ImportError:  # without onnx we cannot list external data; graphs < 2 GB have none
        return h.hexdigest()
    model = onnx.load(str(path), load_external_data=False)
    locations = sorted(
        {
            entry.value
            for tensor in model.graph.initializer
            if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data
            if entry.key == "location"
        }
    )
    for loc in locations:
        h.update(loc.encode())
        with (path.parent / loc).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"torch": torch.__version__}
    for name in ("transformers", "onnx", "onnxruntime"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:  # pragma: no cover - onnx/onnxruntime are required to export
            versions[name] = "not installed"
    return versions


def backbone_signature(backbone: Backbone, fingerprint: str | None = None) -> dict[str, Any]:
    """What a backbone export depends on (besides the exporter): the cache-relevant identity."""
    return {
        "arch": asdict(backbone.arch),
        "image_size": int(backbone.image_size),
        "num_patches": int(backbone.num_patches),
        "dim": int(backbone.dim),
        "fingerprint": fingerprint or state_fingerprint(backbone),
        "source": backbone.source,
    }


def sample_frames(count: int = 2, height: int = 240, width: int = 320, seed: int = 0) -> np.ndarray:
    """Deterministic image-like uint8 RGB frames (smooth gradients, blobs and noise).

    Used as the "real input" of the export checks: they go through the real preprocessing,
    so the pixels have the value range and statistics the graph sees in deployment.
    """
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for _ in range(count):
        img = np.zeros((height, width, 3), np.float32)
        for c in range(3):
            a, b = rs.uniform(-1, 1, 2)
            img[..., c] = 128 + 60 * np.sin(a * xx / 23.0 + b * yy / 17.0 + rs.uniform(0, 6))
        for _ in range(4):
            cy, cx, r = rs.uniform(0, height), rs.uniform(0, width), rs.uniform(10, 60)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            img[mask] = rs.uniform(0, 255, 3)
        img += rs.normal(0, 8, img.shape)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(frames)


@contextlib.contextmanager
def _static_position_embeddings(backbone: Backbone) -> Iterator[None]:
    """While tracing, skip transformers' always-on position-embedding interpolation.

    :class:`Backbone` resized the position grid to its fixed ``image_size`` at build time, so
    the eager forward takes the no-interpolation branch; under ``torch.jit`` tracing
    transformers interpolates anyway (a same-size bicubic ``Resize`` in the graph).  The
    instance attribute shadows the method only for the duration of the export.
    """
    emb = getattr(backbone.model, "embeddings", None)
    original = getattr(emb, "interpolate_pos_encoding", None)
    if emb is None or original is None:
        yield
        return
    expected = backbone.num_patches + 1

    def interpolate_pos_encoding(embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if emb.position_embeddings.shape[1] == expected and embeddings.shape[1] == expected:
            return emb.position_embeddings
        return original(embeddings, height, width)

    emb.interpolate_pos_encoding = interpolate_pos_encoding
    try:
        yield
    finally:
        del emb.interpolate_pos_encoding  # back to the class method


def _torch_export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                  opset: int, dynamic_axes: dict[str, dict[int, str]] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Tracing warnings (python bools of constant shapes) are expected for a fixed-shape export.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # The TorchScript exporter: ``dynamo=False`` selects it where the argument exists
        # (torch >= 2.5, where dynamo became an option); older torch has only this exporter.
        legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            do_constant_folding=True,
            dynamic_axes=dynamic_axes,
            **legacy,
        )


def _have_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _ort_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=keep_denormal_mode(opts), providers=["CPUExecutionProvider"])


def _io_spec(session) -> tuple[list[dict], list[dict]]:
    def spec(items):
        return [{"name": x.name, "shape": list(x.shape), "dtype": x.type} for x in items]

    return spec(session.get_inputs()), spec(session.get_outputs())


def max_abs_error(out: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor) -> float:
    """Largest ``|out - ref|``, or NaN when either side holds a NaN or an infinity.

    Why NaN and not a number: every parity check is written ``error <= tolerance``, which a
    NaN fails, and a NaN must never read as "exact" (an fp16 engine overflowing to inf does).
    """
    a = np.asarray(out.detach().float().cpu() if isinstance(out, torch.Tensor) else out, dtype=np.float64)
    b = np.asarray(ref.detach().float().cpu() if isinstance(ref, torch.Tensor) else ref, dtype=np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.nan
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def worst_error(errors) -> float:
    """The largest of several errors, NaN if any is NaN (Python's ``max(0.0, nan)`` is 0.0)."""
    worst = 0.0
    for e in errors:
        if math.isnan(e):
            return math.nan
        worst = max(worst, e)
    return worst


def within(error: float, tolerance: float) -> bool:
    """A parity check: False for NaN (non-finite output) as for a large error."""
    return error <= tolerance


def _max_errors(session, feeds: list[dict[str, np.ndarray]], refs: list[dict[str, np.ndarray]]) -> dict[str, float]:
    per_output: dict[str, list[float]] = {}
    names = [o.name for o in session.get_outputs()]
    for feed, ref in zip(feeds, refs):
        outs = session.run(names, feed)
        for name, out in zip(names, outs):
            if out.shape != ref[name].shape:
                raise ExportError(f"ONNX output {name!r} has shape {out.shape}, PyTorch gives {ref[name].shape}")
            per_output.setdefault(name, []).append(max_abs_error(out, ref[name]))
    return {name: worst_error(errs) for name, errs in per_output.items()}


def _finish(path: Path, meta: dict[str, Any], errors: dict[str, float], seconds: float, tolerance: float | None,
            verbose: bool) -> ExportResult:
    meta["max_abs_error"] = errors
    meta["export_seconds"] = round(seconds, 3)
    meta["onnx_sha256"] = onnx_sha256(path)
    meta["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    side = sidecar_path(path)
    _write_json_atomic(side, meta)
    msg = ", ".join(f"{k}: {v:.3g}" + (" (non-finite values)" if math.isnan(v) else "")
                    for k, v in errors.items()) or "not checked (no onnxruntime)"
    if verbose:
        print(f"[export] {path.name}: max abs error vs PyTorch ({meta['check']['inputs']} inputs) {msg}")
    log.info("exported %s in %.1f s; max abs error vs PyTorch %s", path, seconds, msg)
    if tolerance is not None and not all(within(e, tolerance) for e in errors.values()):
        raise ExportError(f"{path}: ONNX Runtime differs from PyTorch by {msg} (tolerance {tolerance})")
    return ExportResult(path, side, errors, seconds, meta)


# --------------------------------------------------------------------------- backbone


def export_backbone(
    backbone: Backbone,
    path: str | Path,
    opset: int = DEFAULT_OPSET,
    *,
    frames: np.ndarray | None = None,
    fingerprint: str | None = None,
    tolerance: float | None = None,
    verbose: bool = True,
    batch: int | None = 1,
) -> ExportResult:
    """Export ``pixels`` (B, 3, S, S) -> ``tokens`` (B, 1 + n, D) and check it with ONNX Runtime.

    ``batch``: 1, a fixed batch of one frame (the node, TensorRT engines), or None, a dynamic
    first axis named ``batch`` (offline work: replay sends many frames per call).
    ``frames``: uint8 RGB frames (B, H, W, 3) for the check (default :func:`sample_frames`);
    each goes through ``backbone.preprocess`` and is compared one by one, and with ``batch=None``
    all of them again as one batch.  ``tolerance``: raise :class:`ExportError` if any max abs
    error exceeds it.
    """
    if batch not in (1, None):
        raise ValueError(f"batch must be 1 or None (dynamic), got {batch!r}")
    path = Path(path)
    start = time.perf_counter()
    was_training = backbone.training
    device = next(backbone.parameters()).device
    module = backbone.eval()
    if device.type != "cpu":  # export and check on the CPU; never move the caller's module
        import copy

        module = copy.deepcopy(backbone).cpu().eval()
    s = module.image_size
    dynamic = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if batch is None else None
    dummy = torch.zeros(1 if batch else 2, 3, s, s)  # traced with 2: no size-1 axis to specialise on
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with _static_position_embeddings(module):
            _torch_export(module, (dummy,), tmp, [INPUT_NAME], [OUTPUT_NAME], opset, dynamic)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        backbone.train(was_training)
    frames = sample_frames() if frames is None else np.asarray(frames)
    feeds, refs = [], []
    with torch.inference_mode():
        for frame in frames:
            pixels = module.preprocess(frame[None])
            feeds.append({INPUT_NAME: pixels.numpy()})
            refs.append({OUTPUT_NAME: module(pixels).numpy()})
        if batch is None and len(frames) > 1:
            feeds.append({INPUT_NAME: np.concatenate([f[INPUT_NAME] for f in feeds])})
            refs.append({OUTPUT_NAME: np.concatenate([r[OUTPUT_NAME] for r in refs])})
    if _have_onnxruntime():
        session = _ort_session(path)
        errors = _max_errors(session, feeds, refs)
        inputs, outputs = _io_spec(session)
        check = {"inputs": len(feeds), "runtime": "onnxruntime CPUExecutionProvider"}
    else:  # e.g. a Jetson with TensorRT but no onnxruntime: the TensorRT encoder checks itself
        errors = {}
        inputs = [{"name": INPUT_NAME, "shape": [batch or "batch", 3, s, s], "dtype": "tensor(float)"}]
        outputs = [{"name": OUTPUT_NAME, "shape": list(refs[0][OUTPUT_NAME].shape), "dtype": "tensor(float)"}]
        check = {"inputs": 0, "runtime": "not checked: onnxruntime is not installed"}
    meta = {
        "format": EXPORT_FORMAT,
        "kind": "backbone",
        **backbone_signature(module, fingerprint),
        "opset": opset,
        "batch": batch or "dynamic",
        "exporter": "torch.onnx.export(dynamo=False) (TorchScript tracer)",
        "versions": library_versions(),
        "inputs": inputs,
        "outputs": outputs,
        "preprocessing": "outside the graph: Backbone.preprocess (resize shorter side to S*256/224 bicubic "
                         "antialiased, centre crop S, /255, ImageNet mean/std)",
        "check": check,
    }
    return _finish(path, meta, errors, time.perf_counter() - start, tolerance, verbose)


# --------------------------------------------------------------------------- heads


class HeadsGraph(nn.Module):
    """All heads of a :class:`~step_ros.model.multitask.MultiTaskModel` as one module with a
    tuple output (task order), which is what the exporter traces."""

    def __init__(self, heads: nn.ModuleDict) -> None:
        super().__init__()
        self.heads = heads
        self.tasks = list(heads.keys())

    def forward(self, window: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.heads[task](window) for task in self.tasks)


def export_heads(
    model,
    path: str | Path,
    opset: int = DEFAULT_OPSET,
    *,
    windows: torch.Tensor | None = None,
    tolerance: float | None = None,
    verbose: bool = True,
) -> ExportResult:
    """Export ``window`` (1, T, 1 + n, D) -> ``logits_<task>`` (1, C) for every head.

    ``windows``: (K, T, 1 + n, D) windows for the check; default: the backbone's tokens of
    ``T`` :func:`sample_frames` (one real window) plus that window reversed in time.
    """
    path = Path(path)
    start = time.perf_counter()
    backbone: Backbone = model.backbone
    manifest = model.manifest
    t, n, d = manifest.frames, backbone.num_patches, backbone.dim
    heads = model.heads
    if any(p.device.type != "cpu" for p in heads.parameters()):  # export on the CPU; never move the caller's heads
        import copy

        heads = copy.deepcopy(heads).cpu()
    graph = HeadsGraph(heads).eval()
    output_names = [LOGITS_PREFIX + task for task in graph.tasks]
    if windows is None:
        with torch.inference_mode():
            tokens = backbone.encode(sample_frames(t, seed=1)).cpu()
        windows = torch.stack([tokens, tokens.flip(0)])
    windows = torch.as_tensor(windows, dtype=torch.float32).cpu()
    if windows.ndim == 3:  # one window (T, 1 + n, D)
        windows = windows[None]
    if tuple(windows.shape[1:]) != (t, n + 1, d):
        raise ExportError(f"check windows must be (K, {t}, {n + 1}, {d}), got {tuple(windows.shape)}")
    dummy = torch.zeros(1, t, n + 1, d)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        _torch_export(graph, (dummy,), tmp, [WINDOW_NAME], output_names, opset)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    session = _ort_session(path)
    feeds, refs = [], []
    with torch.inference_mode():
        for window in windows:
            feeds.append({WINDOW_NAME: window[None].numpy()})
            refs.append({name: out.numpy() for name, out in zip(output_names, graph(window[None]))})
    errors = _max_errors(session, feeds, refs)
    inputs, outputs = _io_spec(session)
    meta = {
        "format": EXPORT_FORMAT,
        "kind": "heads",
        "manifest": manifest.name,
        "frames": t,
        "tasks": {
            spec.task: {"kind": spec.kind, "labels": list(spec.labels), "output": LOGITS_PREFIX + spec.task}
            for spec in manifest.heads
        },
        "heads_fingerprint": state_fingerprint(graph),
        "backbone": backbone_signature(backbone),
        "opset": opset,
        "exporter": "torch.onnx.export(dynamo=False) (TorchScript tracer)",
        "versions": library_versions(),
        "inputs": inputs,
        "outputs": outputs,
        "check": {"inputs": len(feeds), "runtime": "onnxruntime CPUExecutionProvider"},
    }
    return _finish(path, meta, errors, time.perf_counter() - start, tolerance, verbose)


# --------------------------------------------------------------------------- int8 / fp16


@contextlib.contextmanager
def _quiet_root_logger(prefix: str) -> Iterator[None]:
    """Drop one root-logger message of ONNX Runtime's quantizer (measured on ViT-S: its suggested
    pre-processing changes neither the int8 error nor the speed), and stop ``logging.warning``
    from installing a root handler behind the application's back (``basicConfig`` side effect)."""
    root = logging.getLogger()

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith(prefix)

    drop, guard = _Drop(), logging.NullHandler()
    added_guard = not root.handlers
    if added_guard:
        root.addHandler(guard)
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
        if added_guard:
            root.removeHandler(guard)


def quantize_int8(onnx_path: str | Path, out_path: str | Path, *, per_channel: bool = True) -> Path:
    """Dynamic int8 quantization (ONNX Runtime): MatMul/Gemm weights stored as int8, activations
    quantized per call.  Targets CPUs (AVX-512 VNNI / ARM dot-product); not for GPU providers.

    The sidecar of the source graph is copied with a ``quantization`` entry added.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    start = time.perf_counter()
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        with warnings.catch_warnings(), _quiet_root_logger("Please consider to run pre-processing"):
            warnings.simplefilter("ignore")
            quantize_dynamic(
                onnx_path,
                tmp,
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                op_types_to_quantize=["MatMul", "Gemm"],
            )
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    meta: dict[str, Any] = {}
    if sidecar_path(onnx_path).is_file():
        meta = read_sidecar(onnx_path)
        meta.pop("max_abs_error", None)
    meta["quantization"] = {
        "method": "onnxruntime.quantization.quantize_dynamic",
        "weight_type": "QInt8",
        "per_channel": per_channel,
        "op_types": ["MatMul", "Gemm"],
        "source": onnx_path.name,
        "source_sha256": meta.get("onnx_sha256") or onnx_sha256(onnx_path),
        "seconds": round(time.perf_counter() - start, 3),
    }
    meta["onnx_sha256"] = onnx_sha256(out_path)
    meta["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    _write_json_atomic(sidecar_path(out_path), meta)
    return out_path


def convert_fp16(onnx_path: str | Path, out_path: str | Path) -> Path:
    """fp16 weights and compute with fp32 inputs/outputs, via ``onnxruntime.transformers.float16``.

    Meant for GPU runtimes that want an fp16 graph (e.g. TensorRT >= 11, strongly typed).
    ONNX Runtime's CPU provider has no fp16 kernels for most of these ops, so this is no CPU
    backend; TensorRT 10 builds fp16 engines from the fp32 graph itself.
    """
    import onnx

    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:  # pragma: no cover - depends on the onnxruntime build
        raise ExportError(f"fp16 conversion needs onnxruntime.transformers.float16 ({exc})") from None
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    model = convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    with tempfile.NamedTemporaryFile(dir=out_path.parent, suffix=".tmp", delete=False) as f:
        tmp = Path(f.name)
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    meta = read_sidecar(onnx_path) if sidecar_path(onnx_path).is_file() else {}
    meta.pop("max_abs_error", None)
    meta["precision"] = {"method": "onnxruntime.transformers.float16 (keep_io_types)", "source": onnx_path.name}
    meta["onnx_sha256"] = onnx_sha256(out_path)
    _write_json_atomic(sidecar_path(out_path), meta)
    return out_path


__all__ = [
    "DEFAULT_OPSET",
    "EXPORT_FORMAT",
    "ExportError",
    "ExportResult",
    "HeadsGraph",
    "INPUT_NAME",
    "LOGITS_PREFIX",
    "OUTPUT_NAME",
    "WINDOW_NAME",
    "backbone_signature",
    "convert_fp16",
    "export_backbone",
    "export_heads",
    "library_versions",
    "max_abs_error",
    "onnx_sha256",
    "quantize_int8",
    "read_sidecar",
    "sample_frames",
    "sidecar_path",
    "within",
    "worst_error",
]
