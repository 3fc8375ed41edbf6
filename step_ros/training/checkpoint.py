"""Resume checkpoints as one safetensors file: tensors in the body, everything else as JSON.

Why not ``torch.save``: a pickle runs code when loaded.  A training state (heads, optimizer
moments, scheduler, position in the epoch) is nested dicts and lists of tensors and plain
values; :func:`save_state` stores each tensor under its path and the structure as JSON in the
file's metadata, in one file written atomically, so a checkpoint is whole or absent.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


class CheckpointFormatError(ValueError):
    """A resume checkpoint that is unreadable or not one of ours."""


def _flatten(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").clone().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):  # keys keep their type (optimizer state is keyed by int)
        return {"__dict__": [[k, _flatten(v, f"{path}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} in a checkpoint")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, "s", tensors)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"step_ros_state": json.dumps(tree)})
    os.replace(tmp, path)
    return path


def load_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointFormatError(f"unreadable checkpoint {path} ({exc})") from exc
    if "step_ros_state" not in meta:
        raise CheckpointFormatError(f"{path} is not a step_ros resume checkpoint")
    return _unflatten(json.loads(meta["step_ros_state"]), tensors)


__all__ = ["CheckpointFormatError", "load_state", "save_state"]
