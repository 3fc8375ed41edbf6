"""Streaming window: equals clip recomputation, one backbone pass per sampled frame, resets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_frames
from step_ros.model.streaming import (
    RESET_BACKWARDS,
    RESET_GAP,
    RESET_RESIZE,
    PredictionSmoother,
    StreamingEngine,
    StreamingWindow,
)


def test_ring_buffer_keeps_last_frames_oldest_first():
    w = StreamingWindow(3, (2,))
    for i in range(7):
        w.push(torch.full((2,), float(i)), stamp=i)
    assert w.window()[:, 0].tolist() == [4.0, 5.0, 6.0]
    assert w.frame_ids().tolist() == [4, 5, 6]
    w.reset()
    w.push(torch.full((2,), 9.0), stamp=9)
    assert w.window(pad_to_full=True)[:, 0].tolist() == [9.0, 9.0, 9.0]


def test_streaming_equals_clip_recomputation_past_wrap(tiny_model):
    manifest = tiny_model.manifest
    engine = StreamingEngine(tiny_model, stride=1)
    frames = random_frames(23)
    k, t = manifest.frame_interval, manifest.frames
    predictions = {}
    for i, frame in enumerate(frames):
        p = engine.push(frame, stamp=i * 0.1)
        if p is not None:
            predictions[i] = p
    # sampled frames: 0, 2, 4, ...; first full window after 4 sampled frames (frame 6)
    assert sorted(predictions) == list(range(6, 23, 2))
    assert len(predictions) > t  # several windows past the ring buffer's wrap point
    for i, p in predictions.items():
        clip = frames[i - (t - 1) * k : i + 1 : k]
        with torch.inference_mode():
            logits = tiny_model(tiny_model.backbone.encode(clip)[None])
        for task, result in p.tasks.items():
            expected = torch.softmax(logits[task][0], -1).numpy()
            np.testing.assert_allclose(result.probs, expected, rtol=1e-5, atol=1e-6)
        assert p.stamp == pytest.approx(i * 0.1)
        assert p.window_start == pytest.approx((i - (t - 1) * k) * 0.1)
    # one backbone pass per sampled frame, none for skipped frames
    assert engine.stats.backbone_passes == len(range(0, 23, k))
    steady = (engine.stats.backbone_passes - (t - 1)) / engine.stats.predictions
    assert steady == 1.0
    print(f"backbone passes per prediction (steady state, stride 1): {steady:.0f}")


def test_warm_up_sets_up_and_forgets_its_frame(tiny_model):
    """The node warms its engine up before the camera's first frame: afterwards the fast
    engine's caches exist (its kernels chosen) and nothing of the blank frame is left: the same
    predictions, the same counters as an engine that was not warmed up."""
    from step_ros.model.fast_step import FastStepRunner

    frames = random_frames(12)
    warm = StreamingEngine(tiny_model, stride=1, runner=FastStepRunner(tiny_model))
    assert warm.warm_up() > 0
    assert all(g.n is not None for g in warm.runner.groups) and warm.runner.kernels == "torch"
    assert warm.stats.backbone_passes == 0 and warm.window.size == 0
    cold = StreamingEngine(tiny_model, stride=1, runner=FastStepRunner(tiny_model))
    for i, frame in enumerate(frames):
        a, b = warm.push(frame, stamp=i * 0.1), cold.push(frame, stamp=i * 0.1)
        assert (a is None) == (b is None)
        if a is not None:
            for task in a.tasks:
                np.testing.assert_allclose(a.tasks[task].probs, b.tasks[task].probs, rtol=1e-6, atol=1e-7)
    assert warm.stats.backbone_passes == cold.stats.backbone_passes and warm.stats.predictions > 0


def test_stride_and_deferred_predictions(tiny_model):
    """stride 2 predicts every second sampled frame; a postponed prediction comes with the next
    sampled frame, whose window is still exactly the last T sampled frames."""
    t = tiny_model.manifest.frames
    frames = random_frames(12 * t)
    k = tiny_model.manifest.frame_interval
    plain = StreamingEngine(tiny_model, stride=2)
    got_plain = {i: plain.process(f, stamp=i * 0.1) for i, f in enumerate(frames) if plain.offer()}
    made = [i for i, p in got_plain.items() if p is not None]
    assert np.diff(made).tolist() == [2 * k] * (len(made) - 1)
    first = made[0]
    behind = {first, first + 5 * k}  # the caller is behind when these two predictions are due
    deferring = StreamingEngine(tiny_model, stride=2)
    got_deferring = {i: deferring.process(f, stamp=i * 0.1, predict=i not in behind)
                     for i, f in enumerate(frames) if deferring.offer()}
    deferred = [i for i, p in got_deferring.items() if p is not None]
    assert deferring.stats.deferred == 2
    # each postponed prediction comes one sampled frame later; the stride restarts from there
    assert deferred[:4] == [first + k, first + 3 * k, first + 6 * k, first + 8 * k]
    assert deferring.stats.backbone_passes == plain.stats.backbone_passes  # every sampled frame entered
    for i in deferred:  # same window content as the plain engine would have had at frame i
        ref = StreamingEngine(tiny_model, stride=1)
        expected = [ref.push(f, stamp=j * 0.1) for j, f in enumerate(frames[: i + 1])][-1]
        for task, result in got_deferring[i].tasks.items():
            np.testing.assert_allclose(result.probs, expected.tasks[task].probs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "reason, frame_fn, stamp_fn",
    [
        (RESET_GAP, lambda i, f: f, lambda i: i * 0.1 + (5.0 if i >= 10 else 0.0)),
        (RESET_BACKWARDS, lambda i, f: f, lambda i: (i % 10) * 0.1),
        (RESET_RESIZE, lambda i, f: f if i < 10 else np.pad(f, ((0, 4), (0, 0), (0, 0))), lambda i: i * 0.1),
    ],
)
def test_window_resets(tiny_model, reason, frame_fn, stamp_fn):
    engine = StreamingEngine(tiny_model)
    frames = random_frames(20)
    out = [engine.push(frame_fn(i, f), stamp_fn(i)) for i, f in enumerate(frames)]
    assert engine.stats.resets == {reason: 1}
    # after the reset at frame 10 the window refills: no prediction mixes old and new frames
    first_after = next(i for i in range(10, 20) if out[i] is not None)
    assert first_after == 10 + (tiny_model.manifest.frames - 1) * tiny_model.manifest.frame_interval
    assert out[first_after].window_start == pytest.approx(stamp_fn(10))


def test_partial_windows_are_marked_incomplete(tiny_model):
    engine = StreamingEngine(tiny_model, min_frames=1)
    p = engine.push(random_frames(1)[0], 0.0)
    assert p is not None and not p.window_complete and p.frames_in_window == 1


def test_smoother_flags_stability_and_confidence(tiny_model):
    engine = StreamingEngine(tiny_model)
    smoother = PredictionSmoother(tiny_model.manifest, alpha=0.5, threshold=0.0, stable_count=2)
    frame = random_frames(1)[0]
    outs = [smoother.update(p) for i in range(12) if (p := engine.push(frame, i * 0.1)) is not None]
    last = outs[-1]["task_step"]
    assert last.confident and last.stable  # identical frames -> identical label every time
