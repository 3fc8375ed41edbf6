"""Which device a model runs on (one resolver for the command line, the node and the backends),
and the CPU's handling of denormal numbers."""

from __future__ import annotations

from typing import Any

import torch


class DeviceError(ValueError):
    """A device this machine cannot give (the message says what it has)."""


def resolve_device(name: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """``auto | cpu | cuda | cuda:N`` -> a device this process may use.

    ``auto`` takes the GPU when PyTorch sees one.  Under torchrun, ``auto`` and ``cuda`` mean
    "the GPU of my LOCAL_RANK" (modulo the GPU count), the usual one GPU per process;
    ``cuda:N`` pins to GPU N.
    """
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not name.startswith("cuda"):
        raise DeviceError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device {name}: no CUDA GPU is visible to PyTorch here (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda or 'no'}); use device cpu")
    if name == "cuda":
        index = local_rank % torch.cuda.device_count()  # more ranks than GPUs share them
    else:
        try:
            index = int(name.split(":", 1)[1])
        except ValueError:
            raise DeviceError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if not 0 <= index < torch.cuda.device_count():
        raise DeviceError(f"device {name}: GPU {index} does not exist ({torch.cuda.device_count()} visible)")
    return torch.device("cuda", index)


_flushing = False  # set by flush_denormals(): ONNX Runtime sessions are told to keep it


def flush_denormals() -> bool:
    """Flush denormal floats to zero (FTZ/DAZ) in this thread and in the threads it starts later.

    Call it first thing in a program, before any PyTorch op: the flag lives in each thread's
    MXCSR, and PyTorch's OpenMP workers copy their creator's when the first parallel op starts
    them; workers that already exist keep theirs.  Why: an x86 core takes a microcode assist for
    every denormal operand or result, ~20x slower (a multiply with denormal results, 2.5 against
    0.2 ms per 1.2M values, two threads, Intel Xeon).  Sharp attention makes many of them in the
    fast STEP engine's products (weights of 1e-20 times 1e-25), and the engine's error bound
    already treats every entry under 1e-38 as lost (:mod:`step_ros.model.fast_step`,
    "Numerical safety"); a ViT's activations are nowhere near 1e-38.  The ``step-ros`` command,
    the node and the benchmarks call it; ONNX Runtime sessions get the same with
    ``session.set_denormal_as_zero`` (:func:`keep_denormal_mode`).  Returns False where the CPU
    cannot (then nothing changes).
    """
    global _flushing
    _flushing = bool(torch.set_flush_denormal(True))
    return _flushing


def keep_denormal_mode(options: Any) -> Any:
    """ONNX Runtime ``SessionOptions`` that keep this process's denormal mode.

    The first ONNX Runtime session a process creates sets the creating thread's FTZ/DAZ from its
    ``session.set_denormal_as_zero``, off unless asked: one session without it (the GEMM peak
    probe, say) turned :func:`flush_denormals` off again in the main thread, and the engine ran
    half-flushed (332 instead of 105 ms per frame on sharp heads).  Every session step_ros makes
    goes through here."""
    options.add_session_config_entry("session.set_denormal_as_zero", "1" if _flushing else "0")
    return options


__all__ = ["DeviceError", "flush_denormals", "keep_denormal_mode", "resolve_device"]
