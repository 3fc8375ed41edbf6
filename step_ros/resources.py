"""Where the files that ship with step_ros are: the demo model, in a checkout or an install.

A source checkout (and the venv build) has them beside the package: ``<checkout>/models``.
A colcon install puts the package in ``lib/python3.X/site-packages`` and the data in
``share/step_ros/``, found through the ament index; every entry point (the node, the CLI,
the tools) asks here, so each finds the same model either way.
"""

from __future__ import annotations

import os
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def share_dir() -> Path | None:
    """``share/step_ros`` of an installed ROS package, or None (no ament index, or not installed)."""
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory("step_ros"))
    except Exception:  # noqa: BLE001 - no ROS, or the package is not in the index
        return None


def models_dir() -> Path:
    """``share/step_ros/models`` when installed with its models, else the checkout's ``models``."""
    share = share_dir()
    if share is not None and (share / "models" / "demo" / "manifest.yaml").is_file():
        return share / "models"
    return CHECKOUT / "models"


def demo_manifest() -> Path:
    return models_dir() / "demo" / "manifest.yaml"


def demo_template() -> Path:
    return models_dir() / "demo" / "template.yaml"


def default_cache_dir() -> Path:
    """Where step_ros keeps what it builds on this machine (exported graphs, TensorRT engines,
    compiled kernels): ``$STEP_ROS_CACHE_DIR``, else ``$XDG_CACHE_HOME/step_ros``, else
    ``~/.cache/step_ros``."""
    if os.environ.get("STEP_ROS_CACHE_DIR"):
        return Path(os.environ["STEP_ROS_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "step_ros"


__all__ = ["CHECKOUT", "default_cache_dir", "demo_manifest", "demo_template", "models_dir", "share_dir"]
