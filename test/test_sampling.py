"""Sampling cameras by time: the model sees the same motion whatever the camera's rate.

The ``WindowSchedule`` picks the frame nearest each sample time (``sample_period_s`` apart), robust
to jitter and dropped frames, fills sample times a slow camera misses with the nearest frame, and
restarts its grid after a gap.  Engine level: a 30 fps stream and a 15 fps stream of the same
frames give identical predictions under time sampling.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from conftest import tiny_manifest_dict
from step_ros.model.manifest import parse_manifest
from step_ros.model.multitask import MultiTaskModel
from step_ros.model.streaming import StreamingEngine, WindowSchedule, sampling_period


def _run(stamps, period, frames=16, max_gap_s=1.0):
    sched = WindowSchedule(frames, 2, sample_period_s=period, max_gap_s=max_gap_s)
    return [(t, sched.offer(t)) for t in stamps], sched


def test_faster_camera_takes_the_frame_nearest_each_sample_time():
    # model: 15 samples/s; cameras at 30 and 60 fps -> every 2nd / 4th frame, exactly
    for fps, every in ((30.0, 2), (60.0, 4)):
        stamps = 100.0 + np.arange(600) / fps
        picks, _ = _run(stamps, 1 / 15)
        chosen = [i for i, (_, n) in enumerate(picks) if n]
        assert chosen == list(range(0, 600, every)) and all(n == 1 for _, n in picks if n)


def test_jitter_and_dropped_frames_keep_samples_on_the_grid():
    rng = np.random.default_rng(0)
    fps, period = 30.0, 2 / 30
    base = 50.0 + np.arange(6000) / fps
    jittered = base + rng.uniform(-0.2, 0.2, base.size) / fps  # +-20 % of a frame
    kept = np.sort(jittered[rng.random(base.size) >= 0.2])  # 20 % of the frames dropped at random
    picks, sched = _run(kept, period)
    assigned = np.array([t for t, n in picks for _ in range(n)])  # the frame each sample time got
    targets = assigned[0] + period * np.arange(len(assigned))
    # every sample time got the nearest frame, or one at most a frame further (the schedule decides
    # when a frame arrives, without waiting for the next: no added latency), or, when the frames
    # around it were dropped, the first frame after the hole
    nearest = np.abs(kept[:, None] - targets[None, :]).min(axis=0)
    got = np.abs(assigned - targets)
    idx = np.clip(np.searchsorted(kept, targets), 1, kept.size - 1)
    hole = kept[idx] - kept[idx - 1]
    assert np.all(got - nearest <= np.maximum(1.2 / fps, hole) + 1e-9)
    assert np.mean(got == nearest) > 0.9  # and mostly exactly the nearest
    # no drift: 200 s later the window slots still come at the model's rate, 15 per second
    assert abs((len(assigned) - 1) / (assigned[-1] - assigned[0]) - 15.0) < 0.02
    assert 0.9 / fps < sched.camera_period_s < 1.1 / (0.8 * fps)  # the camera's frame step, measured


def test_slower_camera_fills_missed_sample_times_with_the_nearest_frame():
    stamps = 10.0 + np.arange(100) / 15.0  # a 15 fps camera, a model trained at 30 samples/s
    picks, sched = _run(stamps, 1 / 30)
    slots = [n for _, n in picks]
    assert slots[0] == 1 and set(slots[2:]) == {2}  # each frame fills two sample times
    assert sched.stats.repeated == sum(slots) - len(slots)


def test_a_gap_restarts_the_grid():
    stamps = list(10.0 + np.arange(30) / 30.0) + list(20.0 + np.arange(30) / 30.0)
    picks, _ = _run(stamps, 1 / 15)
    after = [i for i, (t, n) in enumerate(picks) if n and t >= 20.0]
    assert after[0] == 30 and picks[30][1] == 1  # the first frame after the gap starts a new grid


def test_frame_count_sampling_ignores_stamps():
    sched = WindowSchedule(16, 3)
    assert [sched.offer(t) for t in (0.0, 0.01, 5.0, 5.01, 9.0, 9.5)] == [1, 0, 0, 1, 0, 0]


def _model(period):
    data = tiny_manifest_dict(frames=4, interval=1, kinds=("step",))
    if period is not None:
        data["sample_period_s"] = period
    manifest = parse_manifest(data, __import__("pathlib").Path("."))
    torch.manual_seed(0)
    return MultiTaskModel.from_manifest(manifest, load_checkpoints=False).eval()


def test_a_30fps_and_a_15fps_camera_give_the_same_predictions_by_time():
    model = _model(1 / 15)
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (24, 42, 42, 3), dtype=np.uint8)
    between = rng.integers(0, 256, (24, 42, 42, 3), dtype=np.uint8)  # frames only the fast camera sees

    def run(stream):
        engine = StreamingEngine(model, sample_period_s=sampling_period(model.manifest))
        out = []
        for frame, t in stream:
            p = engine.push(frame, t)
            if p is not None:
                out.append((round(p.stamp, 6), {k: r.probs for k, r in p.tasks.items()}))
        return out

    slow = run((frames[i], 1.0 + i / 15) for i in range(24))
    fast = run((f, 1.0 + j / 30) for i in range(24) for j, f in ((2 * i, frames[i]), (2 * i + 1, between[i])))
    assert len(slow) == len(fast) == 24 - 3
    for (ts, ps), (tf, pf) in zip(slow, fast):
        assert ts == tf
        for task in ps:
            np.testing.assert_allclose(ps[task], pf[task], atol=1e-6)
    # frame-count sampling (every frame) sees the 30 fps camera's extra frames: different windows
    by_count = StreamingEngine(model)
    counted = [by_count.push(f, 1.0 + j / 30) for i in range(24) for j, f in ((2 * i, frames[i]), (2 * i + 1, between[i]))]
    assert sum(p is not None for p in counted) == 48 - 3


def test_old_manifest_loads_with_a_warning_and_counts_frames(log_records):
    model = _model(None)
    records = log_records("step_ros.model.streaming", logging.WARNING)
    period = sampling_period(model.manifest)
    assert period is None and any("has no sample_period_s" in r.getMessage() for r in records)
    assert sampling_period(_model(0.1).manifest, "frames") is None
    with pytest.raises(ValueError, match="auto, time or frames"):
        sampling_period(model.manifest, "seconds")


# --------------------------------------------------------------------------- training and evaluation


def test_fractional_intervals_take_the_nearest_frame():
    from step_ros.data.clips import clip_indices, clip_span, clip_starts

    assert clip_indices(100, 4, 2.5, 0).tolist() == [0, 3, 5, 8]  # sample times 0, 2.5, 5, 7.5 frames
    assert clip_indices(100, 4, 2.0, 3).tolist() == [3, 5, 7, 9]  # whole intervals: unchanged
    assert clip_indices(100, 16, 2 * (1 - 1e-9), 0).tolist() == list(range(0, 32, 2))  # P * fps in floats
    assert clip_span(16, 2.5) == 39 and clip_starts(39, 16, 2.5, 3).tolist() == [0, 0, 0]


def test_row_steps_follow_each_videos_rate():
    """One model period, videos at 15, 30 and 60 fps (and one whose rate is unknown): each steps
    the rows that keep the same time between two samples."""
    from step_ros.training.loader import TokensInRam, ViewDataset, row_steps

    tokens = [torch.zeros(n, 2, 3) for n in (40, 80, 160, 40)]
    source = TokensInRam(tokens, rates=[15.0, 30.0, 60.0, None])
    assert row_steps(source, 2, 2 / 15) == pytest.approx([2.0, 4.0, 8.0, 2.0])  # unknown rate: frame count
    assert row_steps(source, 2, None) == [2.0] * 4  # an old manifest: every 2nd frame, whatever the rate
    strided = TokensInRam(tokens, rates=[15.0, 30.0, 60.0, None], frame_stride=2)
    assert row_steps(strided, 2, 2 / 15) == pytest.approx([1.0, 2.0, 4.0, 1.0])
    views = ViewDataset(source, 4, 2, num_clips=1, sample_period_s=2 / 15)
    spans = []
    for i, fps in enumerate((15.0, 30.0, 60.0)):
        rows = views._rows(len(tokens[i]), views.steps[i])
        spans.append((rows[-1] - rows[0]) / fps)
    assert spans == pytest.approx([0.4, 0.4, 0.4])  # 3 sample periods of 0.133 s at every rate


def test_cache_knows_each_videos_rate(tmp_path):
    from step_ros.data.annotations import Sample
    from step_ros.data.video import write_video
    from step_ros.training.cache import TokenCache

    video = write_video(tmp_path / "v.mp4", np.zeros((6, 16, 16, 3), np.uint8), fps=24)
    cache = TokenCache(tmp_path / "cache", "x")
    # not extracted yet (or extracted before the rate was recorded): the video's header says
    assert cache.fps(Sample(video=video, labels={"t": "a"})) == pytest.approx(24.0)


def test_the_tools_expect_the_rate_the_node_samples_at():
    """``soak`` and the live demo compute what the node should do from how it will sample."""
    from step_ros.resources import demo_manifest
    from step_ros.ros.soak import sampled_period_s

    demo = demo_manifest()  # sample_period_s 2/15 s
    assert sampled_period_s(demo, [], 10.0) == pytest.approx(2 / 15)
    assert sampled_period_s(demo, [], 5.0) == pytest.approx(0.2)  # a slower camera: every frame
    assert sampled_period_s(demo, ["frame_interval:=3"], 10.0) == pytest.approx(0.3)
    assert sampled_period_s(demo, ["sampling:=frames"], 10.0) == pytest.approx(0.2)  # every 2nd frame


def test_the_annotation_csv_may_give_a_videos_rate(tmp_path):
    from step_ros.data.annotations import AnnotationError, load_annotations
    from step_ros.data.video import write_video
    from step_ros.training.cache import TokenCache

    write_video(tmp_path / "v.mp4", np.zeros((6, 16, 16, 3), np.uint8), fps=24)
    (tmp_path / "a.csv").write_text("video,fps,action\nv.mp4,29.97,wave\nv.mp4,,wave\n")
    data = load_annotations(tmp_path / "a.csv")
    cache = TokenCache(tmp_path / "cache", "x")
    assert [cache.fps(s) for s in data] == pytest.approx([29.97, 24.0])  # the CSV wins, else the header
    (tmp_path / "b.csv").write_text("video,fps,action\nv.mp4,fast,wave\n")
    with pytest.raises(AnnotationError, match=r"b.csv: row 1.*column 'fps'.*frame rate.*'fast'"):
        load_annotations(tmp_path / "b.csv")


def test_uniform_clips_cover_the_whole_video():
    """The papers' NTU protocol (``clip_sampling: uniform``): one frame from each of T equal parts
    of the video, random in training, evenly spaced test views; a bad value names the field."""
    from step_ros.model.manifest import ManifestError
    from step_ros.training.loader import TokensInRam, ViewDataset, WindowDataset

    tokens = [torch.arange(40.0)[:, None, None].expand(40, 2, 3).clone(), torch.arange(64.0)[:, None, None].expand(64, 2, 3).clone()]
    source = TokensInRam(tokens, rates=[30.0, 30.0])
    train = WindowDataset(source, 4, 2, seed=0, clip_sampling="uniform")
    for index, n in ((0, 40), (1, 64)):
        rows = train[(0, index, 1.0)][2][:, 0, 0].long().tolist()
        edges = np.linspace(0, n, 5)
        assert all(lo <= r < hi for r, lo, hi in zip(rows, edges[:-1], edges[1:])), rows
    views = ViewDataset(source, 4, 2, num_clips=1, clip_sampling="uniform")
    assert views[0][1][0, :, 0, 0].long().tolist() == [5, 15, 25, 35]  # the centres of the 4 parts
    data = tiny_manifest_dict()
    data["clip_sampling"] = "segments"
    with pytest.raises(ManifestError, match="clip_sampling: must be one of interval, uniform"):
        parse_manifest(data, __import__("pathlib").Path("."))
