"""``step-ros doctor``: check a robot's install in one command and say what is wrong.

Each check prints one row: what was looked at, ``ok`` / ``warn`` / ``FAIL``, and what was found
or what to do.  The exit code is 1 when any check fails (warnings do not fail: a CPU-only
machine has no TensorRT, and that is fine there).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass
class Check:
    name: str
    status: str
    detail: str


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _run(name: str, fn: Callable[[], tuple[str, str]]) -> Check:
    try:
        status, detail = fn()
    except Exception as exc:  # noqa: BLE001 - a check that crashes is a failed check, with its reason
        status, detail = FAIL, f"{type(exc).__name__}: {exc}"
    return Check(name, status, detail)


def check_python() -> tuple[str, str]:
    from .support import problems

    found = problems()
    where = f"Python {sys.version.split()[0]}, torch {_version('torch')}, transformers {_version('transformers')}"
    return (FAIL, f"{where}: {'; '.join(found)}") if found else (OK, where)


def check_ros() -> tuple[str, str]:
    distro = os.environ.get("ROS_DISTRO")
    import rclpy  # noqa: F401 - the import itself is the check
    from rclpy.utilities import get_rmw_implementation_identifier

    rmw = get_rmw_implementation_identifier()
    return OK, f"ROS 2 {distro or '(ROS_DISTRO not set: ROS from Python wheels?)'}, rmw {rmw}"


def check_messages() -> tuple[str, str]:
    from step_ros.msg import HumanAction, LabelScore, TaskPrediction  # noqa: F401

    return OK, "step_ros/msg/HumanAction, TaskPrediction, LabelScore import"


def check_images() -> tuple[str, str]:
    from .ros.conversions import converter_name

    name = converter_name()
    if name == "cv_bridge":
        return OK, "cv_bridge (the ROS one) converts images"
    return OK, "numpy/OpenCV conversions (cv_bridge not found or not usable; same results, docs/ROS.md)"


def check_torch() -> tuple[str, str]:
    import torch

    from .model.onednn import onednn_linear_available

    if torch.cuda.is_available():
        return OK, f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {torch.cuda.get_device_name(0)}"
    linears = "the backbone's Linear layers through oneDNN" if onednn_linear_available() else \
        "the backbone's Linear layers through PyTorch's default GEMM (oneDNN linears off: not x86, " \
        "no oneDNN in this torch, or STEP_ROS_ONEDNN=0)"
    return WARN, f"torch {torch.__version__}: no CUDA GPU; backends torch / onnxruntime run on the CPU; {linears}"


def check_onnxruntime() -> tuple[str, str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return WARN, "onnxruntime not installed: backends onnxruntime / onnxruntime-int8 unavailable " \
                     "(pip install 'step_ros[onnx]')"
    return OK, f"onnxruntime {ort.__version__}, providers {', '.join(ort.get_available_providers())}"


def check_tensorrt() -> tuple[str, str]:
    from .deploy.tensorrt import TensorRTUnavailable, import_tensorrt

    try:
        trt = import_tensorrt()
    except TensorRTUnavailable as exc:
        return WARN, f"backend tensorrt unavailable: {exc}"
    import torch

    if not torch.cuda.is_available():
        return WARN, f"TensorRT {trt.__version__} imports, but PyTorch sees no CUDA GPU"
    return OK, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name(0)}"


def check_manifest(path: Path, weights: str | None) -> tuple[str, str]:
    from .model.manifest import load_manifest
    from .model.multitask import MultiTaskModel

    manifest = load_manifest(path)
    if weights:
        manifest.backbone.weights, manifest.backbone.random_seed = Path(weights).expanduser(), None
    model = MultiTaskModel.from_manifest(manifest)  # weights, fingerprint, head checkpoints and labels
    tasks = ", ".join(f"{s.task} ({s.kind}, {len(s.labels)} labels)" for s in manifest.heads)
    status = WARN if manifest.backbone.weights is None else OK
    return status, f"{path}: backbone {model.backbone.source}; heads {tasks}"


def check_cache(folder: Path | None) -> tuple[str, str]:
    from .resources import default_cache_dir

    folder = Path(folder) if folder else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".doctor-"):
        pass
    return OK, f"{folder} is writable (exported graphs and TensorRT engines go there)"


def check_native_kernels() -> tuple[str, str]:
    from .model.native_kernels import (FUSED_MAX_FRAMES, amx_available, fused_create_available, load_native,
                                       native_status)

    if load_native() is None:  # compiled here on first use, as the node does in its warm-up
        return WARN, (f"{native_status()}; head_kernels native and head_block_dtype bfloat16 then run PyTorch "
                      f"ops, slower (install a C compiler, e.g. build-essential)")
    if not fused_create_available(FUSED_MAX_FRAMES):
        return OK, (f"{native_status()}; the fused block creation needs AVX-512, so head_kernels native creates "
                    f"blocks with PyTorch ops here")
    if amx_available():
        return OK, f"{native_status()}; bfloat16 blocks are made by the AMX tile unit"
    return OK, native_status()


def run_checks(manifest: Path, weights: str | None = None, engine_cache_dir: Path | None = None) -> list[Check]:
    return [
        _run("python and libraries", check_python),
        _run("ROS 2 (rclpy, rmw)", check_ros),
        _run("step_ros messages", check_messages),
        _run("image conversion", check_images),
        _run("torch and GPU", check_torch),
        _run("ONNX Runtime", check_onnxruntime),
        _run("TensorRT", check_tensorrt),
        _run("model (manifest, weights, heads)", lambda: check_manifest(manifest, weights)),
        _run("engine cache", lambda: check_cache(engine_cache_dir)),
        _run("compiled kernels", check_native_kernels),
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", type=Path, default=None, help="model manifest (default: the demo model)")
    parser.add_argument("--weights", default=None, help="backbone weights overriding the manifest's (as the node)")
    parser.add_argument("--engine-cache-dir", type=Path, default=None,
                        help="where the node caches ONNX graphs and engines (default: $STEP_ROS_CACHE_DIR or "
                             "~/.cache/step_ros)")


def main(args: argparse.Namespace) -> int:
    from .console import print_table
    from .resources import demo_manifest

    checks = run_checks(args.manifest or demo_manifest(), args.weights, args.engine_cache_dir)
    print_table("step-ros doctor", ["check", "status", "found / what to do"],
                [[c.name, c.status, c.detail] for c in checks], text_columns=3)
    failed = [c.name for c in checks if c.status == FAIL]
    print(f"step-ros doctor: {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


__all__ = ["Check", "add_arguments", "main", "run_checks"]
