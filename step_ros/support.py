"""What step_ros runs on, checked once at start-up with a message that says what to change.

The supported ranges (docs/DEPLOY.md has the Jetson matrix behind them):

* Python >= 3.10 (JetPack 6's Python; JetPack 5's 3.8 is not supported);
* torch >= 2.3 (JetPack 6.0's NVIDIA wheel is 2.3.0; ``torch.amp.GradScaler`` for a device
  and ``init_process_group(device_id=...)`` are from 2.3);
* transformers >= 4.47, and < 5 with torch < 2.6 (transformers 5 needs torch 2.6);
* TensorRT [8.6, 11), checked where it is imported (:mod:`step_ros.deploy.tensorrt`).
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

MIN_PYTHON = (3, 10)
MIN_TORCH = (2, 3)
MIN_TRANSFORMERS = (4, 47)


class UnsupportedEnvironment(RuntimeError):
    """A Python or library version step_ros does not work with."""


def _release(text: str) -> tuple[int, ...]:
    """(2, 3, 0) from '2.3.0+nv24.05', '2.6.0a0+git...' or '2.13.0+cpu'."""
    return Version(text).release


def problems(python: tuple[int, int] | None = None, torch_version: str | None = None,
             transformers_version: str | None = None) -> list[str]:
    """Everything wrong with this environment (or with the versions given), one line each."""
    out = []
    py = python or sys.version_info[:2]
    if tuple(py) < MIN_PYTHON:
        out.append(f"Python {py[0]}.{py[1]}: step_ros needs Python 3.10 or newer (JetPack 6 or Ubuntu 22.04)")
    tv = torch_version or _installed("torch")
    if tv is not None and _release(tv)[:2] < MIN_TORCH:
        out.append(f"torch {tv}: step_ros needs torch 2.3 or newer (on JetPack 6.0, NVIDIA's torch 2.3.0 wheel)")
    hv = transformers_version or _installed("transformers")
    if hv is not None:
        if _release(hv)[:2] < MIN_TRANSFORMERS:
            out.append(f"transformers {hv}: step_ros needs transformers 4.47 or newer")
        elif tv is not None and _release(hv)[0] >= 5 and _release(tv)[:2] < (2, 6):
            out.append(f"transformers {hv} needs torch 2.6 or newer, this is torch {tv}: "
                       "pip install 'transformers>=4.47,<5'")
    return out


def _installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def check_environment() -> None:
    """Raise :class:`UnsupportedEnvironment` naming every unsupported version at once."""
    found = problems()
    if found:
        raise UnsupportedEnvironment("unsupported environment: " + "; ".join(found))


__all__ = ["MIN_PYTHON", "MIN_TORCH", "MIN_TRANSFORMERS", "UnsupportedEnvironment", "check_environment", "problems"]
