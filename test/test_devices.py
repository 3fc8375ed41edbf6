"""Device flow: every tensor is made on the device of the data it meets, checked without a GPU.

Under ``torch.set_default_device("meta")`` a tensor created without an explicit device lands on
the meta device, and the first operation that mixes it with the model's real (CPU) tensors
fails or makes the result meta.  So these tests run the whole streaming path there: a tensor
created with no device in the engine would break them, on any machine.  With a GPU the same
paths run on ``cuda`` and are compared with the CPU.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from conftest import ROOT, random_frames, tiny_manifest_dict
from step_ros.model.fast_step import FastStepRunner
from step_ros.model.manifest import parse_manifest
from step_ros.model.multitask import MultiTaskModel
from step_ros.model.streaming import ReferenceRunner, StreamingEngine

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA, reason="needs a CUDA GPU (none visible to PyTorch on this machine)"))]


@contextlib.contextmanager
def default_device(device: str):
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(None)


def model_on(device: str) -> MultiTaskModel:
    torch.manual_seed(0)
    data = tiny_manifest_dict(frames=4, interval=1, kinds=("step", "attentive"))
    data["heads"].append({**data["heads"][0], "task": "task_step2"})  # two STEP heads: one batched group
    manifest = parse_manifest(data, ROOT)
    return MultiTaskModel.from_manifest(manifest, load_checkpoints=False).eval().to(device)


def run_engine(model: MultiTaskModel, runner: str, frames: np.ndarray) -> list[dict[str, np.ndarray]]:
    engine = StreamingEngine(model, runner=FastStepRunner(model) if runner == "fast" else ReferenceRunner(model))
    out = []
    for i, frame in enumerate(frames):
        p = engine.push(frame, stamp=0.1 * i)
        if p is not None:
            out.append({t: r.probs for t, r in p.tasks.items()})
    return out


@pytest.mark.parametrize("runner", ["fast", "reference"])
def test_engine_makes_no_tensor_without_a_device(runner):
    frames = random_frames(9)
    expected = run_engine(model_on("cpu"), runner, frames)
    model = model_on("cpu")  # built before: its tensors are real CPU tensors
    with default_device("meta"):
        got = run_engine(model, runner, frames)
    assert len(got) == len(expected) == 6
    for a, b in zip(got, expected):
        for task in b:
            np.testing.assert_allclose(a[task], b[task], rtol=1e-5, atol=1e-6)


def test_backbone_and_training_step_make_no_tensor_without_a_device():
    """(PyTorch's DataLoader itself cannot run under a meta default device, so the training
    step is driven directly here; the loader's collate makes its tensors on the CPU explicitly.)"""
    from step_ros.training.loader import collate
    from step_ros.training.runtime import Runtime
    from step_ros.training.train import HeadSet, _train_step

    model = model_on("cpu")
    frames = random_frames(3)
    reference = model.backbone.encode(frames)
    heads = HeadSet(dict(model.heads.items())).train()
    opt = torch.optim.AdamW(heads.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    labels = {t: torch.tensor([0, 1, 2]) for t in heads}
    window = torch.randn(3, 4, 1 + model.backbone.num_patches, model.backbone.dim).half()
    with default_device("meta"):
        torch.testing.assert_close(model.backbone.encode(frames), reference)
        index, weight, batch = collate([(i, 1.0, window[i]) for i in range(3)])
        assert index.device.type == weight.device.type == "cpu"
        stats = _train_step(heads, opt, sched, scaler, Runtime(torch.device("cpu")), batch, weight, index, labels, 3)
    assert stats.device.type == "cpu" and torch.isfinite(stats).all() and stats[1] == 3
    assert all(p.device.type == "cpu" for p in heads.parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("runner", ["fast", "reference"])
def test_engine_runs_where_the_model_is(device, runner):
    frames = random_frames(9)
    expected = run_engine(model_on("cpu"), runner, frames)
    got = run_engine(model_on(device), runner, frames)
    for a, b in zip(got, expected, strict=True):
        for task in b:
            np.testing.assert_allclose(a[task], b[task], rtol=1e-4, atol=1e-5)
