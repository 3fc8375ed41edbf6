"""Shared fixtures: tiny DINOv2-architecture backbones and manifests (fast on 2 CPU cores)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class LaunchLikeLogger(logging.getLoggerClass()):  # type: ignore[misc]
    """What importing ROS 2's ``launch`` does to every logger created afterwards.

    launch/logging/__init__.py installs ``LaunchLogger`` (``propagate = False``) with
    ``logging.setLoggerClass``, and every sourced ROS install loads launch_testing's pytest
    plugin, which imports launch.  The suite always runs under that condition, before any
    step_ros module creates its logger, so no test can come to rely on log propagation
    (``caplog`` sees nothing there); tests read records with :func:`log_records` instead.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.propagate = False


logging.setLoggerClass(LaunchLikeLogger)
torch.set_num_threads(min(2, os.cpu_count() or 1))

#: A 2-layer, 64-wide ViT with DINOv2's real module layout and key names.
TINY_OVERRIDES = {"hidden_size": 64, "num_layers": 2, "num_heads": 2}


def tiny_manifest_dict(frames: int = 4, interval: int = 2, image_size: int = 42, kinds=("step", "attentive")) -> dict:
    labels = ["pick_up", "put_down", "wave"]
    heads = [
        {"task": f"task_{kind}", "kind": kind, "labels": labels, "symmetric_pairs": [["pick_up", "put_down"]]}
        for kind in kinds
    ]
    return {
        "name": "tiny",
        "backbone": {"arch": "dinov2_vitt14", "random_seed": 3, "image_size": image_size, "overrides": TINY_OVERRIDES},
        "frames": frames,
        "frame_interval": interval,
        "heads": heads,
    }


def import_through_the_cli(result, out: Path, work: Path, extract=(), train=(), evaluate=()) -> dict:
    """A dataset import's output through the real CLI, as a user runs it: write the import, a tiny
    manifest from it (``make_manifest``), then ``extract``, ``train`` (2 epochs, batch 4) and
    ``evaluate`` as subprocesses, each with its extra arguments; returns the evaluation's report."""
    import json
    import subprocess

    from step_ros.data.importers import make_manifest, write_import

    write_import(result, out)
    base = {"name": "tiny", "backbone": {"arch": "dinov2_vitt14", "random_seed": 0, "image_size": 42,
                                         "overrides": dict(TINY_OVERRIDES)}, "frames": 4, "frame_interval": 2}
    manifest = make_manifest(out, base, out / "manifest.yaml")
    csv, cache, trained, evaluated = out / "annotations.csv", work / "cache", work / "train", work / "eval"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONPATH": str(ROOT)}
    common = ["--data", csv, "--cache", cache]
    for step in (["extract", "--manifest", manifest, *common, *extract],
                 ["train", "--manifest", manifest, *common, "--out", trained, "--epochs", "2", "--batch-size", "4",
                  *train],
                 ["evaluate", "--manifest", trained / "manifest.yaml", *common, "--out", evaluated, *evaluate]):
        proc = subprocess.run([sys.executable, "-m", "step_ros", *map(str, step)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{step[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert (evaluated / "report.json").is_file()
    return json.loads((evaluated / "report.json").read_text())


def synthetic_manifest(path: Path, name: str = "tiny-synthetic") -> Path:
    """A 3-task manifest for the synthetic benchmark's labels on the tiny backbone, written to ``path``."""
    import yaml

    from step_ros.data.synthetic import ATOMIC_ACTIONS, FINE_ACTIONS, OBJECTS, SYMMETRIC_PAIRS

    manifest = {
        "name": name,
        "backbone": {"arch": "dinov2_vitt14", "random_seed": 0, "image_size": 42, "overrides": TINY_OVERRIDES},
        "frames": 4,
        "frame_interval": 2,
        "heads": [
            {"task": "fine_action", "labels": FINE_ACTIONS, "symmetric_pairs": [list(p) for p in SYMMETRIC_PAIRS]},
            {"task": "atomic_action", "labels": ATOMIC_ACTIONS},
            {"task": "object_in_use", "labels": OBJECTS},
        ],
    }
    path.write_text(yaml.safe_dump(manifest))
    return path


@pytest.fixture
def tiny_model():
    from step_ros.model.manifest import parse_manifest
    from step_ros.model.multitask import MultiTaskModel

    torch.manual_seed(0)
    manifest = parse_manifest(tiny_manifest_dict(), ROOT)
    return MultiTaskModel.from_manifest(manifest, load_checkpoints=False).eval()


def random_frames(n: int, h: int = 48, w: int = 56, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, size=(n, h, w, 3), dtype=np.uint8)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def log_records():
    """``log_records(name, level)`` -> the list of records that logger emits during the test.

    The handler sits on the named logger itself: it sees records whether or not they
    propagate (under ROS's launch they do not).
    """
    attached: list[tuple[logging.Logger, _Records, int]] = []

    def attach(name: str, level: int = logging.DEBUG) -> list[logging.LogRecord]:
        logger = logging.getLogger(name)
        handler = _Records()
        attached.append((logger, handler, logger.level))
        logger.addHandler(handler)
        logger.setLevel(level)
        return handler.records

    yield attach
    for logger, handler, level in attached:
        logger.removeHandler(handler)
        logger.setLevel(level)
