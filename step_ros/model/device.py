"""Which device a model runs on: one resolver for the command line, the node and the backends."""

from __future__ import annotations

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


__all__ = ["DeviceError", "resolve_device"]
