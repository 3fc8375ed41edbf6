"""TensorRT engines: built once from the ONNX graph, cached beside it, run with named bindings.

Modelled on NVIDIA Isaac ROS's TensorRT node: the input is an ONNX file; the engine is built
on the target GPU the first time (minutes on a Jetson), serialized next to the model and
reused on later starts; ``force_engine_update=True`` rebuilds it.  The engine file name holds
everything that invalidates an engine, so a stale engine is never loaded:

``<onnx stem>.<precision>.trt<TensorRT version>.<gpu>.sm<compute capability>.<key>.engine``

where ``key`` is a hash of the ONNX file's sha256 (and its external data), the TensorRT
version, the GPU name and compute capability, the precision and the workspace limit.  A JSON
sidecar (``<engine>.json``) records those fields in the clear.

Execution uses the TensorRT 10 name-based API (``set_tensor_address`` +
``execute_async_v3``) with device memory owned by PyTorch CUDA tensors (no pycuda), on a
dedicated CUDA stream.  Supported: TensorRT 8.6 (JetPack 6.0) to 10.x (JetPack 6.1/6.2, x86);
anything else is refused when ``tensorrt`` is imported, with the reason (docs/DEPLOY.md, support
matrix).  TensorRT 8.6 gets an opset-16 graph (its parser has no single-op LayerNormalization).

"fp32" means fp32: TensorRT enables TF32 for fp32 layers by default on Ampere (Orin) and newer,
which rounds matmul inputs to 10 mantissa bits; fp32 engines clear that flag.  fp16 engines keep
it for the layers that stay in fp32.  The flags are part of the engine key.

``tensorrt`` is imported lazily: the module imports everywhere, and using it without the
package raises :class:`TensorRTUnavailable` naming the ``tensorrt`` extra.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

ENGINE_FORMAT = "step_ros.trt/2"  # 2: SM count and builder flags in the key
#: TensorRT versions whose Python API and ONNX parser this module is written for: [8.6, 11).
SUPPORTED_TENSORRT = ((8, 6), (11, 0))
PRECISIONS = ("fp16", "fp32")
DEFAULT_WORKSPACE = 1 << 30  # 1 GiB of builder scratch memory

INSTALL_HINT = (
    "the TensorRT backend needs NVIDIA TensorRT's Python bindings and an NVIDIA GPU with CUDA. "
    "On a Jetson, use the bindings JetPack installs (apt package python3-libnvinfer; make them "
    "visible to the venv, e.g. create it with --system-site-packages) -- do not pip-install a "
    "desktop wheel there. On an x86 workstation: pip install 'step_ros[tensorrt]' "
    "(the 'tensorrt' wheel from PyPI / pypi.nvidia.com) with a CUDA build of torch."
)


class TensorRTUnavailable(ImportError):
    """TensorRT (or a CUDA GPU) is missing; the message says what to install."""


class TensorRTError(RuntimeError):
    """An engine could not be built, loaded or run."""


def check_tensorrt_version(version: str) -> tuple[int, int]:
    """(major, minor) of a supported TensorRT, or :class:`TensorRTUnavailable` saying why not."""
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        raise TensorRTUnavailable(f"cannot read the TensorRT version {version!r}") from None
    low, high = SUPPORTED_TENSORRT
    if (major, minor) < low:
        raise TensorRTUnavailable(
            f"TensorRT {version} is too old: step_ros needs TensorRT 8.6 or newer (JetPack 6.0 or later; "
            "JetPack 5's TensorRT 8.5 cannot parse the exported graph, and JetPack 5's Python 3.8 is below "
            "step_ros's 3.10)")
    if (major, minor) >= high:
        raise TensorRTUnavailable(
            f"TensorRT {version} is not supported yet: TensorRT 11 removed the builder's FP16 flag (weak typing) "
            "that fp16 engines are built with. Install TensorRT 10 (pip install 'tensorrt>=10,<11'), or use "
            "backend:=onnxruntime")
    return major, minor


def import_tensorrt():
    """``import tensorrt`` with an actionable error, refusing versions outside the supported range."""
    try:
        import tensorrt as trt  # noqa: PLC0415 - lazy on purpose
    except ImportError as exc:
        raise TensorRTUnavailable(f"cannot import tensorrt ({exc}): {INSTALL_HINT}") from None
    check_tensorrt_version(trt.__version__)
    return trt


def onnx_opset_for(tensorrt_version: str) -> int:
    """The ONNX opset to export for a TensorRT: 16 below TensorRT 10.

    TensorRT 8.6's ONNX parser rejects the single-op LayerNormalization of opset 17 (reported on
    JetPack 6.0's 8.6.2, NVIDIA/TensorRT#3657); opset 16 spells it with primitive ops.
    """
    major, _ = check_tensorrt_version(tensorrt_version)
    return 16 if major < 10 else 17


_LOGGER = None


def trt_logger(trt):
    """One process-wide TensorRT logger (TensorRT warns when builders/runtimes get different ones)."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def require_cuda(device: int | str | torch.device | None = None) -> torch.device:
    if not torch.cuda.is_available():
        raise TensorRTUnavailable(
            "TensorRT needs an NVIDIA GPU with CUDA; torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}). {INSTALL_HINT}"
        )
    if device is None or device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    if isinstance(device, int):
        return torch.device("cuda", device)
    dev = torch.device(device)
    if dev.type != "cuda":
        raise TensorRTError(f"TensorRT runs on a CUDA device, got {dev}")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


# --------------------------------------------------------------------------- cache key


@dataclass(frozen=True)
class EngineKey:
    """Everything that makes a serialized engine (in)valid for this machine."""

    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7"
    sm_count: int  # Orin modules share name and compute capability, not their SM count
    precision: str
    build_flags: tuple[str, ...]  # builder flags set, e.g. ("FP16", "TF32")
    workspace_bytes: int

    def digest(self) -> str:
        payload = json.dumps({"format": ENGINE_FORMAT, **self.__dict__}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def filename(self, stem: str) -> str:
        gpu = re.sub(r"[^a-z0-9]+", "-", self.gpu_name.lower()).strip("-")[:32] or "gpu"
        sm = self.compute_capability.replace(".", "")
        return f"{stem}.{self.precision}.trt{self.tensorrt_version}.{gpu}.sm{sm}.{self.digest()}.engine"


def engine_key(onnx_path: str | Path, precision: str = "fp16", device: torch.device | None = None,
               workspace_bytes: int = DEFAULT_WORKSPACE, onnx_digest: str | None = None) -> EngineKey:
    from .export import onnx_sha256

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    trt = import_tensorrt()
    dev = require_cuda(device)
    major, minor = torch.cuda.get_device_capability(dev)
    return EngineKey(
        onnx_sha256=onnx_digest or onnx_sha256(onnx_path),
        tensorrt_version=trt.__version__,
        gpu_name=torch.cuda.get_device_name(dev),
        compute_capability=f"{major}.{minor}",
        sm_count=int(torch.cuda.get_device_properties(dev).multi_processor_count),
        precision=precision,
        build_flags=builder_flags(precision),
        workspace_bytes=int(workspace_bytes),
    )


def builder_flags(precision: str) -> tuple[str, ...]:
    """The BuilderFlags an engine of ``precision`` is built with (TF32 cleared for fp32: exact fp32)."""
    return ("FP16", "TF32") if precision == "fp16" else ()


def engine_path_for(onnx_path: str | Path, key: EngineKey, cache_dir: str | Path | None = None) -> Path:
    """Where the engine for ``key`` lives: beside the ONNX file unless ``cache_dir`` is given."""
    onnx_path = Path(onnx_path)
    folder = Path(cache_dir) if cache_dir is not None else onnx_path.parent
    return folder / key.filename(onnx_path.stem)


# --------------------------------------------------------------------------- build


def _major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def build_engine(onnx_path: str | Path, engine_path: str | Path, key: EngineKey) -> Path:
    """Parse the ONNX file, build a serialized engine for ``key.precision``, write it atomically."""
    trt = import_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    # TensorRT 10: networks are always explicit-batch (flag deprecated and ignored);
    # TensorRT 8.x still needs the flag.
    flags = 0
    if _major(trt) < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, key.workspace_bytes)
    for name in ("FP16", "TF32"):  # exactly the key's flags: TF32 is on by default, cleared for fp32
        if name in key.build_flags:
            config.set_flag(getattr(trt.BuilderFlag, name))
        else:
            config.clear_flag(getattr(trt.BuilderFlag, name))
    log.warning(
        "building TensorRT %s engine for %s on %s (sm %s); this runs once and can take minutes",
        key.precision, onnx_path.name, key.gpu_name, key.compute_capability,
    )
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    seconds = time.perf_counter() - start
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_name(f".{engine_path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(serialized)  # IHostMemory supports the buffer protocol
        os.replace(tmp, engine_path)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {
        "format": ENGINE_FORMAT,
        "onnx": str(onnx_path),
        **key.__dict__,
        "key": key.digest(),
        "build_seconds": round(seconds, 1),
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    sidecar = engine_path.with_name(engine_path.name + ".json")
    tmp_side = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
    tmp_side.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp_side, sidecar)
    log.warning("TensorRT engine built in %.0f s: %s", seconds, engine_path)
    return engine_path


def ensure_engine(
    onnx_path: str | Path,
    *,
    precision: str = "fp16",
    device: torch.device | int | str | None = None,
    cache_dir: str | Path | None = None,
    force_engine_update: bool = False,
    workspace_bytes: int = DEFAULT_WORKSPACE,
    onnx_digest: str | None = None,
) -> tuple[Path, bool]:
    """The cached engine for this ONNX file / TensorRT / GPU / precision; built if missing or
    when ``force_engine_update``.  Returns ``(engine_path, built_now)``."""
    dev = require_cuda(device)
    key = engine_key(onnx_path, precision, dev, workspace_bytes, onnx_digest)
    path = engine_path_for(onnx_path, key, cache_dir)
    if path.is_file() and not force_engine_update:
        log.info("using cached TensorRT engine %s", path)
        return path, False
    with torch.cuda.device(dev):
        build_engine(onnx_path, path, key)
    return path, True


# --------------------------------------------------------------------------- run


def _torch_dtype(trt, dtype) -> torch.dtype:
    """TensorRT DataType -> torch dtype (``trt.float32`` etc. are aliases of the DataType members)."""
    table = [
        ("float32", torch.float32),
        ("float16", torch.float16),
        ("bfloat16", torch.bfloat16),  # TensorRT >= 9
        ("int32", torch.int32),
        ("int64", torch.int64),  # TensorRT >= 10
        ("int8", torch.int8),
        ("uint8", torch.uint8),
        ("bool", torch.bool),
    ]
    for name, torch_dtype in table:
        trt_dtype = getattr(trt, name, None)
        if trt_dtype is not None and dtype == trt_dtype:
            return torch_dtype
    raise TensorRTError(f"unsupported TensorRT tensor dtype {dtype}")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    is_input: bool


class TensorRTRunner:
    """One deserialized engine + execution context, run with named tensors on torch CUDA memory.

    ``runner(pixels=x)`` -> ``{"tokens": y}``: inputs are torch tensors (any device; copied to
    the engine's device and dtype), outputs are CUDA tensors owned by the caller.
    """

    def __init__(self, engine_path: str | Path, device: torch.device | int | str | None = None) -> None:
        self.trt = trt = import_tensorrt()
        self.device = require_cuda(device)
        self.engine_path = Path(engine_path)
        self._logger = trt_logger(trt)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
            if self.engine is None:
                raise TensorRTError(
                    f"{self.engine_path}: TensorRT {trt.__version__} cannot deserialize this engine "
                    "(built by another TensorRT version or GPU?); rebuild with force_engine_update=True"
                )
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise TensorRTError(f"{self.engine_path}: cannot create an execution context (GPU memory?)")
            self.stream = torch.cuda.Stream(self.device)
        self.tensors: dict[str, TensorInfo] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(int(s) for s in self.engine.get_tensor_shape(name))
            if any(s < 0 for s in shape):
                raise TensorRTError(f"{self.engine_path}: tensor {name!r} has a dynamic shape {shape}; "
                                    "step_ros exports fixed shapes")
            self.tensors[name] = TensorInfo(
                name,
                shape,
                _torch_dtype(trt, self.engine.get_tensor_dtype(name)),
                self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
            )
        self.inputs = [t for t in self.tensors.values() if t.is_input]
        self.outputs = [t for t in self.tensors.values() if not t.is_input]

    def describe(self) -> dict[str, Any]:
        return {
            "engine": str(self.engine_path),
            "tensorrt": self.trt.__version__,
            "device": str(self.device),
            "gpu": torch.cuda.get_device_name(self.device),
            "tensors": {t.name: {"shape": list(t.shape), "dtype": str(t.dtype), "input": t.is_input}
                        for t in self.tensors.values()},
        }

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        missing = {t.name for t in self.inputs} - set(inputs)
        unexpected = set(inputs) - {t.name for t in self.inputs}
        if missing or unexpected:
            raise TensorRTError(f"engine inputs are {[t.name for t in self.inputs]}; missing {sorted(missing)}, "
                                f"unexpected {sorted(unexpected)}")
        producer = torch.cuda.current_stream(self.device)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            # Work queued on the caller's stream (preprocessing, earlier reads of our outputs)
            # happens before ours.
            self.stream.wait_stream(producer)
            keep: list[torch.Tensor] = []  # device buffers stay alive until the stream is done
            for info in self.inputs:
                x = inputs[info.name]
                if tuple(x.shape) != info.shape:
                    raise TensorRTError(f"input {info.name!r} must have shape {info.shape}, got {tuple(x.shape)}")
                x = x.to(device=self.device, dtype=info.dtype, non_blocking=True).contiguous()
                keep.append(x)
                self.context.set_tensor_address(info.name, x.data_ptr())
            outputs = {}
            for info in self.outputs:
                y = torch.empty(info.shape, dtype=info.dtype, device=self.device)
                outputs[info.name] = y
                self.context.set_tensor_address(info.name, y.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise TensorRTError(f"{self.engine_path}: execute_async_v3 failed")
            self.stream.synchronize()
            del keep
        return outputs


__all__ = [
    "DEFAULT_WORKSPACE",
    "ENGINE_FORMAT",
    "EngineKey",
    "INSTALL_HINT",
    "PRECISIONS",
    "TensorInfo",
    "TensorRTError",
    "TensorRTRunner",
    "TensorRTUnavailable",
    "SUPPORTED_TENSORRT",
    "build_engine",
    "builder_flags",
    "check_tensorrt_version",
    "engine_key",
    "engine_path_for",
    "ensure_engine",
    "import_tensorrt",
    "onnx_opset_for",
    "require_cuda",
]
