"""Inference backends for the backbone, picked by name: one interface for the node and the tools.

``create_encoder(name, backbone, cache_dir)`` returns an :class:`Encoder`: a callable taking
one uint8 RGB frame ``(H, W, 3)`` and returning its tokens ``(1 + n, D)`` as a float32 CPU
torch tensor -- exactly what :class:`~step_ros.model.streaming.StreamingEngine` takes as
``encode=``.  Every encoder does the same preprocessing (``Backbone.preprocess``, in torch);
only the ViT forward differs.

==================== ==========================================================================
name                 what runs the ViT
==================== ==========================================================================
``torch``            the PyTorch module (CUDA if available, else CPU); the reference
``onnxruntime``      the exported ONNX graph in ONNX Runtime; providers: TensorRT / CUDA when the
                     installed onnxruntime has them, else CPU
``onnxruntime-int8`` the same graph with int8 weights (dynamic quantization), CPU provider
``tensorrt``         a TensorRT engine built from the ONNX graph (fp16 by default), cached
==================== ==========================================================================

Artefacts are cached under ``cache_dir`` in a folder named by a hash of what they depend on
(backbone weights fingerprint, architecture, image size, opset, export format): the ONNX
graph is exported on first use and reused afterwards; new weights give a new folder.  The
TensorRT engine sits beside its ONNX file with its own key (ONNX sha256, TensorRT version,
GPU, precision).  ``force_engine_update=True`` regenerates the backend's artefacts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..model.backbone import Backbone, as_frames, preprocess_frames, state_fingerprint
from ..model.device import keep_denormal_mode
from ..resources import default_cache_dir
from .export import (
    DEFAULT_OPSET,
    EXPORT_FORMAT,
    INPUT_NAME,
    OUTPUT_NAME,
    export_backbone,
    library_versions,
    max_abs_error,
    quantize_int8,
    read_sidecar,
    sample_frames,
    sidecar_path,
    within,
    worst_error,
)

log = logging.getLogger(__name__)

#: Backend names accepted by :func:`create_encoder`, in order of increasing setup cost.
BACKENDS = ["torch", "onnxruntime", "onnxruntime-int8", "tensorrt"]

#: pip extra that provides each backend's dependencies (``pip install 'step_ros[<extra>]'``).
EXTRAS = {"torch": None, "onnxruntime": "onnx", "onnxruntime-int8": "onnx", "tensorrt": "tensorrt"}

DEFAULT_PRECISION = {"torch": "fp32", "onnxruntime": "fp32", "onnxruntime-int8": "int8", "tensorrt": "fp16"}


class BackendUnavailable(ImportError):
    """A backend's dependency (package or hardware) is missing; the message says what to install."""


# --------------------------------------------------------------------------- preprocessing


class Preprocessor:
    """``Backbone.preprocess`` without holding the backbone's weights: image size and ImageNet
    mean/std on a chosen device (frames are uploaded as uint8, the smallest form)."""

    def __init__(self, backbone: Backbone, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.image_size = backbone.image_size
        self.mean = backbone.mean.detach().to(self.device)
        self.std = backbone.std.detach().to(self.device)

    def __call__(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        return preprocess_frames(as_frames(frames, self.device), self.image_size, self.mean, self.std)


# --------------------------------------------------------------------------- encoders


class Encoder:
    """Frame ``(H, W, 3)`` uint8 RGB -> tokens ``(1 + n, D)`` float32, on the backend's device
    (a GPU backend's tokens stay on the GPU, where the heads can read them)."""

    name = "base"

    def __init__(self, backbone: Backbone, preprocess: Callable[[Any], torch.Tensor], precision: str) -> None:
        self.image_size = int(backbone.image_size)
        self.num_tokens = int(backbone.num_patches) + 1
        self.dim = int(backbone.dim)
        self.arch = backbone.arch.name
        self.precision = precision
        self.preprocess = preprocess
        self.info: dict[str, Any] = {}

    def run(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels (1, 3, S, S) -> tokens (1, 1 + n, D), on the backend's device."""
        raise NotImplementedError

    @torch.inference_mode()
    def __call__(self, frame: np.ndarray | torch.Tensor) -> torch.Tensor:
        frame = as_frames(frame)
        if frame.ndim != 3:
            raise ValueError(f"an encoder takes one frame (H, W, 3), got shape {tuple(frame.shape)}")
        tokens = self.run(self.preprocess(frame[None]))
        return tokens[0].float()  # on the backend's device: no round trip through the CPU

    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Frames (B, H, W, 3) -> tokens (B, 1 + n, D), one frame at a time (the batch-1 graph;
        the torch and ONNX Runtime encoders override this with one call per batch)."""
        return torch.stack([self(f) for f in frames])

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "arch": self.arch,
            "image_size": self.image_size,
            "tokens": [self.num_tokens, self.dim],
            "precision": self.precision,
            **self.info,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(self.describe(), default=str)})"


class TorchEncoder(Encoder):
    name = "torch"

    def __init__(self, backbone: Backbone, device: str | torch.device | None = None,
                 threads: int | None = None) -> None:
        if device in (None, "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("backend 'torch' on device 'cuda': torch.cuda.is_available() is False "
                                     f"(torch {torch.__version__}); use device='cpu' or a CUDA build of torch")
        # The backbone moves to the device itself, not a copy of it: a copy would keep the CPU
        # weights alive beside the GPU ones, twice the memory on a Jetson, where CPU and GPU
        # share one memory.  Whoever shares the model sees it there too.
        module = backbone.to(device).eval()
        if threads and device.type == "cpu":
            torch.set_num_threads(threads)  # process-wide in PyTorch
        super().__init__(backbone, Preprocessor(module, next(module.parameters()).device), "fp32")
        self.module = module
        self.device = next(module.parameters()).device
        self.info = {"device": str(self.device), "threads": torch.get_num_threads() if self.device.type == "cpu" else None}

    def run(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.module(pixels)

    @torch.inference_mode()
    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Frames (B, H, W, 3) -> tokens (B, 1 + n, D), one forward for the batch."""
        frames = as_frames(frames)
        if frames.ndim != 4:
            return super().encode(frames)
        return self.run(self.preprocess(frames)).float()


def _require_onnxruntime(name: str):
    try:
        import onnx  # noqa: F401
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailable(
            f"backend {name!r} needs the onnx and onnxruntime packages ({exc}): "
            f"pip install 'step_ros[{EXTRAS[name]}]' (for the CUDA/TensorRT providers install "
            "onnxruntime-gpu instead of onnxruntime; on a Jetson, the onnxruntime-gpu wheel built for "
            "your JetPack)"
        ) from None
    return ort


def ort_providers(ort, device: str | None, precision: str, trt_cache: Path | None) -> list:
    """Execution providers, best first: TensorRT, CUDA, CPU (GPU ones only when installed).

    ``device``: None (best available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (GPU required).
    """
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    gpu_required = device is not None and device.startswith("cuda")
    if device is not None and not gpu_required:
        raise ValueError(f"backend 'onnxruntime': device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    device_id = int(device.split(":")[1]) if gpu_required and ":" in device else 0
    chosen: list = []
    if "TensorrtExecutionProvider" in available and trt_cache is not None:
        chosen.append(("TensorrtExecutionProvider", {
            "device_id": device_id,
            "trt_fp16_enable": precision == "fp16",
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(trt_cache),
        }))
    if "CUDAExecutionProvider" in available:
        chosen.append(("CUDAExecutionProvider", {"device_id": device_id}))
    if gpu_required and not chosen:
        raise BackendUnavailable(
            f"backend 'onnxruntime' on device {device!r}: this onnxruntime has only {available}; "
            "install onnxruntime-gpu (pip install 'step_ros[onnx]' installs the CPU build)"
        )
    return chosen + ["CPUExecutionProvider"]


class OnnxRuntimeEncoder(Encoder):
    name = "onnxruntime"

    def __init__(self, backbone: Backbone, onnx_path: Path, *, providers: list, threads: int | None,
                 precision: str, exported: bool, name: str | None = None,
                 batched_graph: Callable[[], Path] | None = None) -> None:
        ort = _require_onnxruntime(name or self.name)
        super().__init__(backbone, Preprocessor(backbone, "cpu"), precision)
        if name:
            self.name = name
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        # No busy-waiting after a run: the STEP heads (PyTorch) run on the same cores right after
        # the backbone, and ONNX Runtime's spinning workers would take their CPU time.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        keep_denormal_mode(opts)
        self.onnx_path = Path(onnx_path)
        self.session = ort.InferenceSession(str(self.onnx_path), sess_options=opts, providers=providers)
        self._new_session = lambda path: ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self._batched_graph = batched_graph
        self._batch_session: Any = None
        shape = self.session.get_inputs()[0].shape
        if list(shape) != [1, 3, self.image_size, self.image_size]:
            raise ValueError(f"{onnx_path}: input shape {shape} does not fit image size {self.image_size}")
        self.info = {
            "onnx": str(self.onnx_path),
            "providers": self.session.get_providers(),
            "threads": threads,
            "exported": exported,
            "onnxruntime": ort.__version__,
        }

    def run(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run(self.session, pixels)

    @staticmethod
    def _run(session: Any, pixels: torch.Tensor) -> torch.Tensor:
        feed = {INPUT_NAME: np.ascontiguousarray(pixels.detach().cpu().numpy(), dtype=np.float32)}
        (tokens,) = session.run([OUTPUT_NAME], feed)
        return torch.from_numpy(tokens)

    @torch.inference_mode()
    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Frames (B, H, W, 3) -> tokens (B, 1 + n, D) in one call of the dynamic-batch graph
        (exported and loaded on the first batch: a node, which sends single frames, never pays for
        it).  Demo backbone, 640 frames of 128 x 128 in calls of 32, preprocessing included (best of
        5): 205 ms, against 401 ms frame by frame and 262 ms for PyTorch's batched forward."""
        frames = as_frames(frames)
        if frames.ndim != 4 or frames.shape[0] < 2 or self._batched_graph is None:
            return super().encode(frames)
        if self._batch_session is None:
            path = self._batched_graph()
            self._batch_session = self._new_session(path)
            self.info["onnx_batched"] = str(path)
        return self._run(self._batch_session, self.preprocess(frames)).float()


class TensorRTEncoder(Encoder):
    name = "tensorrt"

    def __init__(self, backbone: Backbone, engine_path: Path, *, device: torch.device, precision: str,
                 built: bool, onnx_path: Path, exported: bool) -> None:
        from .tensorrt import TensorRTRunner

        super().__init__(backbone, Preprocessor(backbone, device), precision)
        self.runner = TensorRTRunner(engine_path, device)
        names = {t.name for t in self.runner.inputs}, {t.name for t in self.runner.outputs}
        if names != ({INPUT_NAME}, {OUTPUT_NAME}):
            raise ValueError(f"{engine_path}: engine tensors {names}, expected input {INPUT_NAME!r} "
                             f"and output {OUTPUT_NAME!r}")
        self.info = {
            "engine": str(engine_path),
            "onnx": str(onnx_path),
            "built": built,
            "exported": exported,
            "device": str(self.runner.device),
            "gpu": torch.cuda.get_device_name(self.runner.device),
            "tensorrt": self.runner.trt.__version__,
        }

    def run(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.runner(**{INPUT_NAME: pixels})[OUTPUT_NAME]


# --------------------------------------------------------------------------- cache


def export_key(backbone: Backbone, opset: int = DEFAULT_OPSET, fingerprint: str | None = None) -> str:
    """Hash of what the exported graph depends on (weights, architecture, size, opset, format)."""
    payload = {
        "format": EXPORT_FORMAT,
        "fingerprint": fingerprint or state_fingerprint(backbone),
        "arch": asdict(backbone.arch),
        "image_size": int(backbone.image_size),
        "opset": int(opset),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _cached(path: Path) -> bool:
    """A graph counts as cached only with its sidecar (written last, after the check)."""
    return path.is_file() and sidecar_path(path).is_file()


def _warn_if_versions_changed(path: Path) -> None:
    try:
        recorded = read_sidecar(path).get("versions", {})
    except (OSError, ValueError):
        return
    now = library_versions()
    changed = {k: (recorded[k], now.get(k)) for k in ("torch", "transformers") if k in recorded and recorded[k] != now.get(k)}
    if changed:
        log.warning("%s was exported with other library versions %s; if the backbone's forward changed, "
                    "recreate it with force_engine_update=True", path, changed)


def exported_backbone(
    backbone: Backbone,
    cache_dir: str | Path | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    int8: bool = False,
    force: bool = False,
    fingerprint: str | None = None,
    batched: bool = False,
) -> tuple[Path, bool]:
    """The cached ONNX graph of ``backbone`` (exported now if missing or ``force``).

    Returns ``(path, exported_now)``; with ``int8`` the path is the quantized graph.  With
    ``batched`` it is the graph with a dynamic batch axis (``backbone.batched.onnx``, beside the
    batch-1 graph that the node and TensorRT use).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = export_key(backbone, opset, fingerprint)
    folder = cache_dir / f"{backbone.arch.name}-{backbone.image_size}px-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    stem = "backbone.batched" if batched else "backbone"
    fp32 = folder / f"{stem}.onnx"
    exported = False
    if force or not _cached(fp32):
        log.warning("exporting %s backbone to ONNX: %s", backbone.arch.name, fp32)
        export_backbone(backbone, fp32, opset, fingerprint=fingerprint, tolerance=1e-2, verbose=False,
                        batch=None if batched else 1)
        exported = True
    else:
        _warn_if_versions_changed(fp32)
    if not int8:
        return fp32, exported
    q = folder / f"{stem}.int8.onnx"
    if exported or force or not _cached(q):
        quantize_int8(fp32, q)
        exported = True
    return q, exported


# --------------------------------------------------------------------------- factory


def create_encoder(
    name: str,
    backbone: Backbone,
    cache_dir: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    threads: int | None = None,
    precision: str | None = None,
    force_engine_update: bool = False,
    opset: int | None = None,
    fingerprint: str | None = None,
    check_tolerance: float | None = None,
) -> Encoder:
    """Build the encoder ``name`` (one of :data:`BACKENDS`) for ``backbone``.

    ``cache_dir``: where exported graphs and engines live (default :func:`default_cache_dir`;
    a model folder's ``engines/`` is a good choice on a robot).  ``device``: ``None`` picks
    the best available (``cuda`` if present for torch / ONNX Runtime GPU providers), or
    ``"cpu"`` / ``"cuda"`` / ``"cuda:N"``.  ``threads``: CPU intra-op threads (ONNX Runtime
    session option; ``torch.set_num_threads`` for torch, process-wide).  ``precision``:
    ``fp16`` / ``fp32`` for tensorrt (default fp16) and ONNX Runtime's TensorRT provider
    (default fp32).  ``force_engine_update``: re-export the ONNX graph and rebuild the
    TensorRT engine even if cached.  ``fingerprint``: the backbone weights fingerprint if
    already known (saves hashing the weights).  ``opset``: of the exported graph (default 17;
    16 for TensorRT 8.6, whose parser lacks LayerNormalization).  ``check_tolerance``
    (tensorrt): after building
    an engine its tokens are compared to torch on sample frames; raise if the max abs error
    exceeds this (default: only log it).
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown inference backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    precision = precision or DEFAULT_PRECISION[name]
    if name == "torch":
        if precision != "fp32":
            raise ValueError("backend 'torch' runs fp32 only; use 'tensorrt' for fp16")
        return TorchEncoder(backbone, device, threads)

    if name in ("onnxruntime", "onnxruntime-int8"):
        ort = _require_onnxruntime(name)
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        int8 = name == "onnxruntime-int8"
        if int8:
            if device not in (None, "cpu"):
                raise ValueError("backend 'onnxruntime-int8' is a CPU backend (dynamic int8 quantization); "
                                 "on a GPU use 'tensorrt' (fp16) or 'onnxruntime'")
            if precision != "int8":
                raise ValueError("backend 'onnxruntime-int8' has precision int8")
        elif precision not in ("fp32", "fp16"):
            raise ValueError(f"backend 'onnxruntime': precision must be fp32 or fp16, got {precision!r}")
        if fingerprint is None:
            fingerprint = state_fingerprint(backbone)
        path, exported = exported_backbone(backbone, cache_dir, opset=opset or DEFAULT_OPSET, int8=int8,
                                           force=force_engine_update, fingerprint=fingerprint)

        def batched_graph() -> Path:  # exported on the first batch of frames, not before
            return exported_backbone(backbone, cache_dir, opset=opset or DEFAULT_OPSET,
                                     force=force_engine_update, fingerprint=fingerprint, batched=True)[0]

        trt_cache = path.parent / "ort_tensorrt"
        if force_engine_update and trt_cache.exists():
            shutil.rmtree(trt_cache)
        providers = ["CPUExecutionProvider"] if int8 else ort_providers(ort, None if device is None else str(device),
                                                                          precision, trt_cache)
        if any(isinstance(p, tuple) for p in providers):
            trt_cache.mkdir(parents=True, exist_ok=True)
        return OnnxRuntimeEncoder(backbone, path, providers=providers, threads=threads, precision=precision,
                                  exported=exported, name=name,
                                  # int8 stays one frame per call: dynamic quantization scales the
                                  # activations by the range of the whole input, so a batched frame's
                                  # tokens would depend on the other frames of its batch
                                  batched_graph=None if int8 else batched_graph)

    # tensorrt
    from .tensorrt import PRECISIONS, TensorRTUnavailable, ensure_engine, import_tensorrt, onnx_opset_for, require_cuda

    if precision not in PRECISIONS:
        raise ValueError(f"backend 'tensorrt': precision must be one of {PRECISIONS}, got {precision!r}")
    try:
        trt = import_tensorrt()
        dev = require_cuda(device)
    except TensorRTUnavailable as exc:
        raise BackendUnavailable(f"backend 'tensorrt': {exc}") from None
    if fingerprint is None:
        fingerprint = state_fingerprint(backbone)
    onnx_path, exported = exported_backbone(backbone, cache_dir, opset=opset or onnx_opset_for(trt.__version__),
                                            force=force_engine_update, fingerprint=fingerprint)
    engine_path, built = ensure_engine(onnx_path, precision=precision, device=dev,
                                       force_engine_update=force_engine_update)
    encoder = TensorRTEncoder(backbone, engine_path, device=dev, precision=precision, built=built,
                              onnx_path=onnx_path, exported=exported)
    if built or check_tolerance is not None:
        error = compare_to_torch(encoder, backbone)
        encoder.info["max_abs_error_vs_torch"] = error
        log.warning("TensorRT %s engine vs torch fp32 on sample frames: max abs error %.3g", precision, error)
        if check_tolerance is not None and not within(error, check_tolerance):
            raise RuntimeError(f"{engine_path}: tokens differ from torch by {error:.3g} "
                               f"(tolerance {check_tolerance})")
    return encoder


# --------------------------------------------------------------------------- measuring


@torch.inference_mode()
def compare_to_torch(encoder: Encoder, backbone: Backbone, frames: np.ndarray | None = None) -> float:
    """Max abs difference between ``encoder`` and the torch backbone's tokens on ``frames``;
    NaN if either produced a non-finite value (no tolerance passes it)."""
    frames = sample_frames(2) if frames is None else frames
    return worst_error(max_abs_error(encoder(frame), backbone.encode(frame[None])[0]) for frame in frames)


def time_encoder(encoder: Callable[[np.ndarray], torch.Tensor], frames: np.ndarray | None = None,
                 warmup: int = 2, repeat: int = 10) -> dict[str, float]:
    """Wall-clock milliseconds per frame (preprocessing included): median, mean, min, max."""
    frames = sample_frames(4) if frames is None else frames
    for i in range(warmup):
        encoder(frames[i % len(frames)])
    times = []
    for i in range(repeat):
        start = time.perf_counter()
        encoder(frames[i % len(frames)])
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times),
            "min_ms": min(times), "max_ms": max(times), "repeat": repeat}


__all__ = [
    "BACKENDS",
    "DEFAULT_PRECISION",
    "EXTRAS",
    "BackendUnavailable",
    "Encoder",
    "OnnxRuntimeEncoder",
    "Preprocessor",
    "TensorRTEncoder",
    "TorchEncoder",
    "compare_to_torch",
    "create_encoder",
    "default_cache_dir",
    "export_key",
    "exported_backbone",
    "ort_providers",
    "time_encoder",
]
