"""Clip sampling: which frame indices of a video (segment) form a clip. No decoding here.

A clip is ``frames`` indices ``start, start + interval, ...`` (the papers: 16 frames at
interval 2). Indices are relative to the segment; add ``Sample.start_frame`` for the file.
``interval`` may be fractional: sampling by time, a video at another rate than the model's
steps ``sample_period_s * fps`` frames, and each sample takes the nearest frame (rounded).
Videos shorter than the clip span repeat their last frame, so every clip has exactly
``frames`` entries and the temporal order is never altered.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "clip_span",
    "clip_starts",
    "clip_indices",
    "random_clip_indices",
    "uniform_indices",
    "uniform_view_indices",
]


def _check(num_frames: int, frames: int, interval: float) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if not interval > 0:
        raise ValueError(f"interval must be positive, got {interval}")


def clip_span(frames: int, interval: float) -> int:
    """Number of video frames one clip covers: ``(frames - 1) * interval + 1`` (rounded)."""
    return int(round((frames - 1) * interval)) + 1


def clip_starts(num_frames: int, frames: int, interval: float, num_clips: int) -> np.ndarray:
    """Evenly spaced clip starts for test-time multi-view ("16 x 3" views).

    ``num_clips = 3`` gives the first, the middle and the last possible start;
    ``num_clips = 1`` gives the centred clip. A video shorter than a clip gives all zeros
    (the clips then coincide; averaging them is still correct).
    """
    _check(num_frames, frames, interval)
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    max_start = max(0, num_frames - clip_span(frames, interval))
    if num_clips == 1:
        return np.array([max_start // 2], dtype=np.int64)
    return np.round(np.linspace(0, max_start, num_clips)).astype(np.int64)


def clip_indices(num_frames: int, frames: int, interval: float, start: int = 0) -> np.ndarray:
    """The ``frames`` indices of the clip starting at ``start`` (each the frame nearest its sample
    time when ``interval`` is fractional), clamped to the last frame."""
    _check(num_frames, frames, interval)
    if not 0 <= start < num_frames:
        raise ValueError(f"start {start} outside [0, {num_frames})")
    if float(interval).is_integer():
        idx = start + np.arange(frames, dtype=np.int64) * int(interval)
    else:
        idx = start + np.floor(np.arange(frames) * interval + 0.5).astype(np.int64)
    return np.minimum(idx, num_frames - 1)


def random_clip_indices(
    num_frames: int, frames: int, interval: float, rng: np.random.Generator
) -> np.ndarray:
    """A training clip at a uniformly random start (temporal jitter, order preserved)."""
    _check(num_frames, frames, interval)
    max_start = max(0, num_frames - clip_span(frames, interval))
    start = int(rng.integers(0, max_start + 1))
    return clip_indices(num_frames, frames, interval, start)


def uniform_view_indices(num_frames: int, frames: int, num_clips: int) -> np.ndarray:
    """Test views of uniform sampling: view ``j`` takes, in each of the ``frames`` equal segments,
    the frame at fraction ``(j + 0.5) / num_clips`` of it (one view: the segment centres)."""
    _check(num_frames, frames, 1)
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    edges = np.linspace(0, num_frames, frames + 1)
    lo, hi = edges[:-1], edges[1:]
    views = [lo + (j + 0.5) / num_clips * (hi - lo) for j in range(num_clips)]
    return np.clip(np.floor(np.concatenate(views)).astype(np.int64), 0, num_frames - 1)


def uniform_indices(
    num_frames: int, frames: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """NTU-style sampling: split the video into ``frames`` equal segments, one frame each.

    With ``rng`` a random frame of each segment (training), else the segment centre (test).
    Short videos repeat frames; indices never decrease.
    """
    _check(num_frames, frames, 1)
    edges = np.linspace(0, num_frames, frames + 1)
    lo, hi = edges[:-1], edges[1:]
    if rng is None:
        pos = (lo + hi) / 2
    else:
        pos = lo + rng.random(frames) * (hi - lo)
    return np.clip(np.floor(pos).astype(np.int64), 0, num_frames - 1)
