"""Tests for step_ros.data: video IO, annotations, clip sampling, the synthetic benchmark."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from step_ros.data import synthetic as syn
from step_ros.data.annotations import (
    AnnotationError,
    Dataset,
    check_labels,
    load_annotations,
)
from step_ros.data.clips import (
    clip_indices,
    clip_span,
    clip_starts,
    random_clip_indices,
    uniform_indices,
)
from step_ros.data.video import VideoError, iter_frames, read_video, video_info, write_video

# ----------------------------------------------------------------------------- video IO


def _ramp_frames(n: int = 6, h: int = 32, w: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    frames = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        frames[i, ..., 0] = (x * 4 + i * 20) % 256
        frames[i, ..., 1] = (y * 6) % 256
        frames[i, ..., 2] = 40 * i
    return frames


def test_write_read_roundtrip(tmp_path: Path) -> None:
    frames = _ramp_frames()
    path = write_video(tmp_path / "v.mp4", frames, fps=10)
    info = video_info(path)
    assert (info.num_frames, info.width, info.height) == (6, 48, 32)
    assert info.fps == pytest.approx(10)
    out = read_video(path)
    assert out.shape == frames.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - frames).mean() < 6
    part = read_video(path, 2, 5)
    assert np.array_equal(part, out[2:5])
    assert read_video(path, 4, 100).shape[0] == 2  # end past the video truncates
    stream = list(iter_frames(path))
    assert [i for i, _, _ in stream] == list(range(6))
    assert [t for _, _, t in stream] == pytest.approx([i / 10 for i in range(6)])
    assert not list(tmp_path.glob(".*partial*"))


def test_container_without_frame_count(tmp_path: Path) -> None:
    frames = _ramp_frames(5)
    path = write_video(tmp_path / "v.mkv", frames, fps=12.5)  # mkv does not store a count
    info = video_info(path)
    assert (info.num_frames, info.fps, info.width, info.height) == (5, 12.5, 48, 32)
    with pytest.raises(VideoError, match="v.webm"):
        write_video(tmp_path / "v.webm", frames, fps=10)  # no H.264 in webm


def test_write_is_deterministic(tmp_path: Path) -> None:
    frames = _ramp_frames()
    a = write_video(tmp_path / "a.mp4", frames, fps=15).read_bytes()
    b = write_video(tmp_path / "b.mp4", frames, fps=15).read_bytes()
    assert a == b


def test_write_rejects_odd_size_and_bad_frames(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 33, 32, 3), np.uint8), fps=10)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "f.mp4", np.zeros((2, 32, 32, 3), np.float32), fps=10)
    assert not (tmp_path / "odd.mp4").exists()


def test_video_errors_name_the_file(tmp_path: Path) -> None:
    text = tmp_path / "not_a_video.mp4"
    text.write_text("this is plain text, not an mp4\n" * 10)
    missing = tmp_path / "missing.mp4"
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    for path in (text, missing, empty):
        with pytest.raises(VideoError) as err:
            read_video(path)
        assert str(path) in str(err.value)
        with pytest.raises(VideoError, match=path.name):
            video_info(path)
        with pytest.raises(VideoError, match=path.name):
            next(iter_frames(path))
    good = write_video(tmp_path / "good.mp4", _ramp_frames(), fps=10)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(VideoError, match="truncated.mp4"):
        read_video(truncated)
    with pytest.raises(VideoError, match="good.mp4"):
        read_video(good, start=50)


# ----------------------------------------------------------------------------- clips


def test_clip_starts() -> None:
    # 40 frames, 16 x interval 2 -> span 31, last start 9
    assert clip_span(16, 2) == 31
    assert clip_starts(40, 16, 2, 3).tolist() == [0, 4, 9]
    assert clip_starts(40, 16, 2, 1).tolist() == [4]
    assert clip_starts(40, 16, 2, 2).tolist() == [0, 9]
    assert clip_starts(20, 16, 2, 3).tolist() == [0, 0, 0]  # shorter than a clip


def test_clip_indices_and_clamping() -> None:
    assert clip_indices(40, 16, 2, 9).tolist() == list(range(9, 40, 2))
    idx = clip_indices(10, 8, 2, 0)
    assert idx.tolist() == [0, 2, 4, 6, 8, 9, 9, 9]  # repeats the last frame
    assert np.all(np.diff(idx) >= 0)
    assert clip_indices(1, 4, 3).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        clip_indices(10, 4, 2, 10)
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(200):
        r = random_clip_indices(40, 16, 2, rng)
        assert len(r) == 16 and r[-1] <= 39 and np.all(np.diff(r) == 2)
        starts.add(int(r[0]))
    assert starts == set(range(10))
    u = uniform_indices(100, 16)
    assert len(u) == 16 and np.all(np.diff(u) > 0) and u[-1] < 100
    ur = uniform_indices(5, 16, np.random.default_rng(1))
    assert len(ur) == 16 and np.all(np.diff(ur) >= 0) and ur.max() <= 4


# ----------------------------------------------------------------------------- synthetic


def test_class_lists_are_consistent() -> None:
    assert len(syn.SYMMETRIC_PAIRS) == 6
    assert len(syn.PALINDROMIC_ACTIONS) >= 4
    assert len(set(syn.FINE_ACTIONS)) == len(syn.FINE_ACTIONS) == 16
    assert set(syn.ATOMIC_OF) == set(syn.FINE_ACTIONS)
    assert set(syn.ATOMIC_ACTIONS) == set(syn.ATOMIC_OF.values())
    for a, b in syn.SYMMETRIC_PAIRS:
        assert syn.ATOMIC_OF[a] == syn.ATOMIC_OF[b]  # atomic action is reversal-invariant
        assert syn.reverse_of(a) == b and syn.reverse_of(b) == a
    for c in syn.PALINDROMIC_ACTIONS:
        assert syn.reverse_of(c) == c


@pytest.mark.parametrize("context", syn.CONTEXTS)
def test_pairs_are_exact_time_reversals(context: str) -> None:
    for i, (a, b) in enumerate(syn.SYMMETRIC_PAIRS):
        for kind in syn.OBJECTS:
            p = syn.sample_params(context, 100 * i + len(kind), kind)
            fa = syn.render_clip(a, p, size=64, num_frames=20)
            fb = syn.render_clip(b, p, size=64, num_frames=20)
            assert fa.shape == (20, 64, 64, 3) and fa.dtype == np.uint8
            assert np.array_equal(fa[::-1], fb), (a, b, kind)
            clean = syn.render_clip(a, p, size=64, num_frames=20, noise=False)
            # a real motion: not palindromic, first and last frames differ
            assert not np.array_equal(clean, clean[::-1]), (a, kind)
            assert np.abs(clean[0].astype(int) - clean[-1]).max() > 30, (a, kind)


@pytest.mark.parametrize("context", syn.CONTEXTS)
def test_palindromic_classes_survive_reversal(context: str) -> None:
    for c in syn.PALINDROMIC_ACTIONS:
        for seed in range(4):
            p = syn.sample_params(context, seed)
            clean = syn.render_clip(c, p, size=64, num_frames=21, noise=False)
            assert np.array_equal(clean[::-1], clean), (c, seed)
            clean40 = syn.render_clip(c, p, size=64, num_frames=40, noise=False)
            assert np.array_equal(clean40[::-1], clean40), (c, seed)
            noisy = syn.render_clip(c, p, size=64, num_frames=21)
            assert np.abs(noisy.astype(int) - clean).mean() < 4  # noise is small


def test_motion_visible_in_every_31_frame_window() -> None:
    """Any 16x2 clip of a 40-frame video still shows the motion (first != last frame)."""
    for a, _ in syn.SYMMETRIC_PAIRS:
        for seed in range(4):
            clip = syn.render_clip(a, seed=seed, context="known", noise=False).astype(int)
            for start in range(10):
                w = clip[start : start + 31]
                changed = (np.abs(w[0] - w[-1]).max(-1) > 20).mean()
                assert changed > 0.01, (a, seed, start)


def test_render_is_deterministic_and_seed_dependent() -> None:
    a = syn.render_clip("pick_up", seed=3, context="unknown", size=64, num_frames=16)
    b = syn.render_clip("pick_up", seed=3, context="unknown", size=64, num_frames=16)
    c = syn.render_clip("pick_up", seed=4, context="unknown", size=64, num_frames=16)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert syn.video_params(0, "train", "known", "rise", 5) == syn.video_params(0, "train", "known", "rise", 5)
    assert syn.video_params(0, "train", "known", "rise", 5) != syn.video_params(1, "train", "known", "rise", 5)


def test_contexts_are_disjoint() -> None:
    known = [syn.sample_params("known", s) for s in range(60)]
    unknown = [syn.sample_params("unknown", s) for s in range(60)]
    assert {p.background for p in known}.isdisjoint({p.background for p in unknown})
    assert {p.variant for p in known}.isdisjoint({p.variant for p in unknown})
    bases = [(ctx, np.array(c)) for ctx in syn.CONTEXTS for c in syn._COLORS[ctx]]
    for ctx, params in (("known", known), ("unknown", unknown)):
        for p in params:  # each colour is a jittered base colour of its own context's palette
            nearest = min(bases, key=lambda b: np.abs(np.array(p.color) - b[1]).sum())
            assert nearest[0] == ctx and np.abs(np.array(p.color) - nearest[1]).max() <= 15


def test_objects_are_large_enough() -> None:
    for kind in syn.OBJECTS:
        p = syn.sample_params("known", 7, kind)
        clip = syn.render_clip("hold", p, size=128, num_frames=4, noise=False).astype(int)
        bg = syn.render_clip("appear", p, size=128, num_frames=40, noise=False)[0].astype(int)
        covered = (np.abs(clip[0] - bg).max(-1) > 20).mean()
        assert covered > 0.02, (kind, covered)


def _tiny(tmp: Path, workers: int = 1) -> Path:
    return syn.generate(
        tmp,
        seed=5,
        videos_per_class={"train": 1, "val": 1, "test": 1},
        unknown_per_class=1,
        size=48,
        num_frames=12,
        fps=10,
        progress=False,
        workers=workers,
    )


def test_generate_writes_readable_videos_and_csv(tmp_path: Path) -> None:
    csv_path = _tiny(tmp_path / "a")
    assert csv_path == tmp_path / "a" / "annotations.csv"
    with csv_path.open() as f:
        header = next(csv.reader(f))
    assert header == ["video", "fine_action", "atomic_action", "object_in_use", "split", "context"]

    ds = load_annotations(csv_path)
    assert isinstance(ds, Dataset)
    assert ds.tasks == ["fine_action", "atomic_action", "object_in_use"]
    assert len(ds) == 16 * 4
    assert ds.labels("fine_action") == sorted(syn.FINE_ACTIONS)
    assert ds.labels("atomic_action") == sorted(syn.ATOMIC_ACTIONS)
    assert ds.labels("object_in_use") == sorted(syn.OBJECTS)
    assert ds.contexts == ["known", "unknown"]
    assert ds.splits == ["test", "train", "val"]
    unknown = ds.filter(split="test", context="unknown")
    assert len(unknown) == 16 and all(s.context == "unknown" for s in unknown)
    assert len(ds.filter(split="test")) == 32
    for ctx in syn.CONTEXTS:
        assert set(ds.filter(context=ctx).labels("object_in_use")) == set(syn.OBJECTS)
    for s in ds:
        assert s.labels["atomic_action"] == syn.ATOMIC_OF[s.labels["fine_action"]]

    # decoded frames are close to the rendered ones
    for s in ds.samples[::9]:
        idx = int(s.video.stem.rsplit("_", 1)[1])
        p = syn.video_params(5, s.split, s.context, s.labels["fine_action"], idx)
        assert p.object_kind == s.labels["object_in_use"]
        rendered = syn.render_clip(s.labels["fine_action"], p, size=48, num_frames=12)
        decoded = read_video(s.video)
        assert decoded.shape == rendered.shape
        assert np.abs(decoded.astype(int) - rendered).mean() < 6, s.video


def test_generate_is_deterministic(tmp_path: Path) -> None:
    a = _tiny(tmp_path / "a")
    b = _tiny(tmp_path / "b", workers=2)  # process pool: same output
    assert a.read_text() == b.read_text()
    for va in sorted((tmp_path / "a" / "videos").glob("*.mp4"))[::7]:
        vb = tmp_path / "b" / "videos" / va.name
        assert va.read_bytes() == vb.read_bytes(), va.name


# ----------------------------------------------------------------------------- annotations


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_csv_loads_segments_splits_and_absolute_paths(tmp_path: Path) -> None:
    _touch(tmp_path / "videos" / "a.mp4")
    absolute = _touch(tmp_path / "elsewhere" / "b.mp4")
    ann = _write_csv(
        tmp_path / "ann.csv",
        "video,start_frame,end_frame,fine_action,object,split,context,_note\n"
        "videos/a.mp4,10,30,pick_up,leg,train,known,first\n"
        "\n"
        f"{absolute}, , ,put_down ,leg,test,unknown,\n",
    )
    ds = load_annotations(ann)
    assert ds.tasks == ["fine_action", "object"]
    s0, s1 = ds.samples
    assert s0.video == (tmp_path / "videos" / "a.mp4").resolve()
    assert (s0.start_frame, s0.end_frame, s0.split, s0.context) == (10, 30, "train", "known")
    assert s1.video == absolute and (s1.start_frame, s1.end_frame) == (0, None)
    assert s1.labels == {"fine_action": "put_down", "object": "leg"}
    assert ds.labels("fine_action") == ["pick_up", "put_down"]
    assert [s.video.name for s in ds.filter(split="test")] == ["b.mp4"]
    assert len(ds.filter(split=["train", "test"], context="known")) == 1
    check_labels(ds, "fine_action", ["pick_up", "put_down", "other"])


def test_csv_minimal_columns(tmp_path: Path) -> None:
    _touch(tmp_path / "x.mp4")
    ds = load_annotations(_write_csv(tmp_path / "m.csv", "video,action\nx.mp4,wave\n"))
    s = ds.samples[0]
    assert (s.start_frame, s.end_frame, s.split, s.context) == (0, None, None, None)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("path,fine_action\nx.mp4,a\n", ["bad.csv", "'video'"]),
        ("video,fine_action\nx.mp4,a\nx.mp4,\n", ["bad.csv", "row 2", "line 3", "'fine_action'", "empty label"]),
        ("video,start_frame,fine_action\nx.mp4,1o,a\n", ["bad.csv", "row 1", "'start_frame'", "'1o'"]),
        ("video,end_frame,fine_action\nx.mp4,2.5,a\n", ["row 1", "'end_frame'", "integer"]),
        ("video,start_frame,end_frame,fine_action\nx.mp4,0,5,a\nx.mp4,9,9,b\n", ["row 2", "'start_frame'", "end_frame 9"]),
        ("video,start_frame,fine_action\nx.mp4,-3,a\n", ["row 1", "'start_frame'", ">= 0"]),
        ("video,fine_action\nx.mp4,a\nmissing.mp4,b\n", ["bad.csv", "row 2", "'video'", "missing.mp4", "not found"]),
        ("video,split,context,start_frame\nx.mp4,train,known,0\n", ["bad.csv", "no task column"]),
        ("video,fine_action\nx.mp4,a,extra\n", ["row 1", "3 fields"]),
        ("video,fine_action,fine_action\nx.mp4,a,b\n", ["'fine_action'", "twice"]),
        ("", ["bad.csv", "empty"]),
        ("video,fine_action\n", ["bad.csv", "no annotation rows"]),
    ],
)
def test_csv_errors_name_file_row_and_column(tmp_path: Path, body: str, expected: list[str]) -> None:
    _touch(tmp_path / "x.mp4")
    ann = _write_csv(tmp_path / "bad.csv", body)
    with pytest.raises(AnnotationError) as err:
        load_annotations(ann)
    for part in expected:
        assert part in str(err.value), (part, str(err.value))


def test_missing_annotation_path(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match="nope.csv"):
        load_annotations(tmp_path / "nope.csv")


def test_check_labels_names_label_task_and_row(tmp_path: Path) -> None:
    _touch(tmp_path / "x.mp4")
    ann = _write_csv(tmp_path / "ann.csv", "video,fine_action\nx.mp4,pick_up\nx.mp4,pikc_up\nx.mp4,pikc_up\n")
    ds = load_annotations(ann)
    with pytest.raises(AnnotationError) as err:
        check_labels(ds, "fine_action", ["pick_up", "put_down"])
    msg = str(err.value)
    assert "'pikc_up'" in msg and "'fine_action'" in msg and "ann.csv" in msg and "row 2" in msg
    assert "1 more" in msg
    with pytest.raises(AnnotationError, match="'object_in_use'"):
        check_labels(ds, "object_in_use", ["leg"])


def test_folder_per_class(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    _touch(root / "pick_up" / "a.mp4")
    _touch(root / "pick_up" / "b.MOV")
    _touch(root / "put_down" / "sub" / "c.mkv")
    _touch(root / "put_down" / "notes.txt")
    _touch(root / "put_down" / ".hidden.mp4")
    ds = load_annotations(root)
    assert ds.tasks == ["fine_action"]
    assert [(s.video.name, s.labels["fine_action"]) for s in ds] == [
        ("a.mp4", "pick_up"),
        ("b.MOV", "pick_up"),
        ("c.mkv", "put_down"),
    ]
    assert all(s.split is None and s.end_frame is None for s in ds)

    split_root = tmp_path / "split"
    _touch(split_root / "train" / "wave" / "a.mp4")
    _touch(split_root / "train" / "clap" / "b.webm")
    _touch(split_root / "test" / "wave" / "c.avi")
    ds = load_annotations(split_root, task="gesture")
    assert ds.tasks == ["gesture"]
    assert ds.labels("gesture") == ["clap", "wave"]
    assert ds.splits == ["test", "train"]
    assert [s.video.name for s in ds.filter(split="test")] == ["c.avi"]

    loose = tmp_path / "loose"
    _touch(loose / "x.mp4")
    _touch(loose / "wave" / "y.mp4")
    with pytest.raises(AnnotationError, match="subfolder per label"):
        load_annotations(loose)
    with pytest.raises(AnnotationError, match="no label folders"):
        load_annotations(_touch(tmp_path / "emptyroot" / "f.txt").parent)


def test_rewriting_the_same_video_keeps_the_file(tmp_path: Path) -> None:
    """Token caches are keyed on a video's mtime: regenerating identical data must not void them."""
    frames = _ramp_frames()
    path = write_video(tmp_path / "v.mp4", frames, fps=10)
    os.utime(path, ns=(10**18, 10**18))  # an old file: any rewrite would show
    stamp = path.stat().st_mtime_ns
    write_video(path, frames, fps=10)
    assert path.stat().st_mtime_ns == stamp
    write_video(path, frames[::-1], fps=10)  # other content: replaced
    assert path.stat().st_mtime_ns != stamp and np.abs(read_video(path)[0].astype(int) - frames[-1]).mean() < 6
    assert not list(tmp_path.glob(".*partial*"))
