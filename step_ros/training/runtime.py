"""Where a job runs: the device, the numeric precision, and the ``torchrun`` process group.

Every workflow (extract, train, evaluate, compare) takes a :class:`Runtime`.  One process on a
CPU is the default; ``torchrun --nproc-per-node N -m step_ros <job>`` gives N ranks that
share the work through PyTorch's own ``torch.distributed`` (gloo on CPUs, NCCL on GPUs; the
c10d rendezvous of ``torchrun`` spans machines).  Nothing here starts processes itself.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..model.device import DeviceError, resolve_device

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class RuntimeConfigError(DeviceError):
    """A precision or worker count that this machine or device cannot take."""


def launched_by_torchrun() -> bool:
    """True inside a process started by ``torchrun`` (it sets RANK, WORLD_SIZE, LOCAL_RANK)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` is bf16 on GPUs that have it, else fp16 on GPUs, and fp32 on CPUs.

    Why fp32 on CPUs: few CPUs have fast bf16 matrix units, and the heads are small enough
    that exact fp32 costs little there.  ``bf16`` on a CPU is allowed when asked for.
    """
    if name not in PRECISIONS:
        raise RuntimeConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name == "fp16" and device.type != "cuda":
        raise RuntimeConfigError("--precision fp16 needs a CUDA device (CPU autocast supports bf16)")
    return name


@dataclass
class Runtime:
    """Device, precision and process group of one job (rank 0 of 1 when not under torchrun)."""

    device: torch.device
    precision: str = "fp32"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    workers: int = 1  # DataLoader worker processes per rank that read and decode ahead

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes checkpoints, logs, reports and figures, and prints."""
        return self.rank == 0

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for backbone and heads; a no-op at fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (on the device NCCL needs; gloo takes CPU tensors)."""
        if self.distributed:
            on = tensor.to(self.device) if dist.get_backend() == "nccl" else tensor
            dist.all_reduce(on, op=dist.ReduceOp.SUM)
            if on is not tensor:
                tensor.copy_(on.cpu())
        return tensor

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (in rank order); ``None`` on the other ranks."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def shard(self, n: int) -> range:
        """This rank's share of ``n`` items, interleaved so that long and short items mix."""
        return range(self.rank, n, self.world_size)

    def describe(self) -> str:
        where = f"{self.device}, {self.precision}"
        if self.distributed:
            where += f", rank {self.rank} of {self.world_size} ({dist.get_backend()})"
        return where


def make_runtime(device: str = "auto", precision: str = "auto", workers: int = 1) -> Runtime:
    """The runtime of this process; joins the torchrun process group when launched by torchrun.

    The backend follows the device: NCCL when every rank has a GPU of its own, else gloo.  ``torchrun`` provides the
    rendezvous (MASTER_ADDR/PORT or c10d), so the same command runs on one machine or many.
    """
    if workers < 0:
        raise RuntimeConfigError(f"--workers must be >= 0, got {workers}")
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        dev = resolve_device(device)
        return Runtime(dev, resolve_precision(precision, dev), workers=workers)
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" and own_gpu(device) else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60),
                                device_id=dev if backend == "nccl" else None)
    return Runtime(dev, resolve_precision(precision, dev), rank=rank, world_size=world, local_rank=local,
                   workers=workers)


def own_gpu(device: str) -> bool:
    """Whether each rank of this node has a GPU of its own (NCCL needs that; gloo does not).

    ``cuda:N`` pins every rank to one GPU, and more ranks than GPUs share them: gloo then,
    which runs the same collectives on CUDA tensors, more slowly.
    """
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return ":" not in (device or "auto") and local_ranks <= torch.cuda.device_count()


def shutdown(runtime: Runtime | None) -> None:
    """Leave the process group (torchrun expects a clean exit of every rank)."""
    if runtime is not None and runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


__all__ = [
    "DeviceError",
    "PRECISIONS",
    "Runtime",
    "RuntimeConfigError",
    "launched_by_torchrun",
    "make_runtime",
    "resolve_device",
    "resolve_precision",
    "shutdown",
]
