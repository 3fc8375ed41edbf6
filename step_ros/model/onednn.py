"""Inference-time float32 ``nn.Linear`` layers through oneDNN on x86 CPUs.

Why: PyTorch's x86 wheels run float32 GEMMs through MKL, and MKL takes its AVX2 kernels on AMD
CPUs.  On this project's AMD EPYC VM (AVX-512) that is 186 GFLOP/s against 427 GFLOP/s for
oneDNN on the backbone's shapes (257 x 384 @ 384 x 1152; ONNX Runtime's MLAS: 454).  PyTorch
ships oneDNN as well: ``torch.ops.mkldnn._linear_pointwise`` with a weight packed once by
``torch.ops.mkldnn._reorder_linear_weight`` is the CPU linear that ``torch.compile`` emits, and
it dispatches on the instruction set, not on the vendor.  Results equal ``F.linear`` to float32
rounding (relative ~1e-6, as ONNX Runtime's do), not bit for bit.

:func:`use_onednn_linears` switches the ``nn.Linear`` layers of a frozen module (the backbone)
to :class:`OneDnnLinear`: same parameters and state-dict keys, and the plain ``F.linear``
whenever the fast path does not apply (not float32 on the CPU, autograd recording the weight,
tracing or ONNX export, an old PyTorch without the op).  ``STEP_ROS_ONEDNN=0`` turns it off.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OneDnnLinear", "onednn_linear_available", "plain_linears", "use_onednn_linears"]


def onednn_linear_available() -> bool:
    """An x86 CPU (where MKL is PyTorch's GEMM and oneDNN was measured faster; on ARM PyTorch
    has no MKL to replace), PyTorch with oneDNN and its packed-weight linear op, and
    ``STEP_ROS_ONEDNN`` not 0."""
    if os.environ.get("STEP_ROS_ONEDNN", "1").strip() in ("0", "false", "no", "off"):
        return False
    if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i686"):
        return False
    ops = getattr(torch.ops, "mkldnn", None)
    return bool(torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
                and hasattr(ops, "_reorder_linear_weight"))


class OneDnnLinear(nn.Linear):
    """``nn.Linear`` whose CPU float32 inference runs oneDNN with a weight packed once (repacked
    when the weight changes: a new tensor, or an in-place update of a normal tensor; a weight
    made under ``torch.inference_mode`` has no version counter, so only a new tensor counts)."""

    _packed: Any = None  # (weight data_ptr, weight version) -> packed weight; never saved or copied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.device.type != "cpu" or x.dtype != torch.float32 or w.device.type != "cpu" or w.dtype != torch.float32
                or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
                or torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()):
            return F.linear(x, w, self.bias)
        key = (w.data_ptr(), -1 if w.is_inference() else w._version)  # inference tensors have no version
        if self._packed is None or self._packed[0] != key:
            with torch.no_grad():
                self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), None))
        return torch.ops.mkldnn._linear_pointwise(x, self._packed[1], self.bias, "none", [], "")

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half(): the pack is of the old weight
        self.__dict__.pop("_packed", None)
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:  # deepcopy / pickle: an opaque oneDNN tensor cannot be copied
        state = self.__dict__.copy()
        state.pop("_packed", None)
        return state


def use_onednn_linears(module: nn.Module) -> int:
    """Switch every ``nn.Linear`` in ``module`` to :class:`OneDnnLinear` in place; returns how many
    (0 when oneDNN's linear is not available).  Meant for frozen modules used for inference."""
    if not onednn_linear_available():
        return 0
    count = 0
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = OneDnnLinear
            count += 1
    return count


def plain_linears(module: nn.Module) -> int:
    """Undo :func:`use_onednn_linears` (PyTorch's own ``F.linear``, MKL on x86); returns how many.
    For comparisons: the benchmark times the backbone both ways in one run."""
    count = 0
    for m in module.modules():
        if type(m) is OneDnnLinear:
            m.__dict__.pop("_packed", None)
            m.__class__ = nn.Linear
            count += 1
    return count
