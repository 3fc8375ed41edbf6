"""Streaming inference: camera frames in, per-task predictions out, one backbone pass per frame.

:class:`StreamingWindow` is a ring buffer of the last ``T`` sampled frames' tokens.
:class:`StreamingEngine` samples every k-th frame, encodes it once, pushes it, and runs every
head on the shared window.  Its output equals recomputing the same ``T`` frames as a clip
(tested), and the window is reset -- never silently mixed -- on a time gap, a timestamp going
backwards (a bag looping) or a change of image size.

This module is ROS-free: the ROS node and ``replay-eval`` both wrap the same engine and
:class:`PredictionSmoother`, so offline replay is the node's pipeline.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch

from .manifest import HeadSpec, Manifest
from .multitask import MultiTaskModel

RESET_GAP = "gap"
RESET_BACKWARDS = "backwards"
RESET_RESIZE = "resize"


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's heads (else its first parameter) live."""
    for module in (getattr(model, "heads", None), model):
        if module is not None:
            for p in module.parameters():
                return p.device
    return torch.device("cpu")


class StreamingWindow:
    """Fixed-size ring buffer of per-frame tokens (no per-frame allocation)."""

    def __init__(self, frames: int, token_shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        self.frames = frames
        self.buffer = torch.zeros((frames, *token_shape), dtype=dtype, device=device)
        self.stamps = np.zeros(frames, dtype=np.float64)
        self.slot_ids = np.full(frames, -1, dtype=np.int64)
        self.count = 0  # frames pushed since the last reset
        self.next_id = 0  # monotonic frame id, never reused (caches key on it)

    def reset(self) -> None:
        self.count = 0
        self.slot_ids[:] = -1

    @property
    def size(self) -> int:
        return min(self.count, self.frames)

    @property
    def full(self) -> bool:
        return self.count >= self.frames

    def push(self, tokens: torch.Tensor, stamp: float) -> int:
        """Store one frame's tokens; returns its frame id."""
        slot = self.count % self.frames
        self.buffer[slot].copy_(tokens)
        self.stamps[slot] = stamp
        frame_id = self.next_id
        self.slot_ids[slot] = frame_id
        self.count += 1
        self.next_id += 1
        return frame_id

    def order(self) -> np.ndarray:
        """Slots oldest first (only the filled ones)."""
        n = self.size
        start = (self.count - n) % self.frames
        return (start + np.arange(n)) % self.frames

    def window(self, pad_to_full: bool = False) -> torch.Tensor:
        """Tokens oldest first, (size, ...) -- or (T, ...) padding the front with the oldest frame."""
        order = self.order()
        if pad_to_full and len(order) < self.frames:
            order = np.concatenate([np.full(self.frames - len(order), order[0]), order])
        return self.buffer[torch.from_numpy(order).to(self.buffer.device)]

    def frame_ids(self) -> np.ndarray:
        return self.slot_ids[self.order()]

    def window_stamps(self) -> np.ndarray:
        return self.stamps[self.order()]


class HeadRunner(Protocol):
    """Runs all heads on the window. The exact fast engine keeps per-frame caches through
    ``add_frame``; the reference runner just calls the heads."""

    def reset(self) -> None: ...

    def add_frame(self, frame_id: int, tokens: torch.Tensor) -> None: ...

    def predict(self, window: torch.Tensor, frame_ids: np.ndarray) -> dict[str, torch.Tensor]: ...


class ReferenceRunner:
    """Every head's plain forward on the window (the definition the others must match)."""

    def __init__(self, model: MultiTaskModel) -> None:
        self.model = model

    def reset(self) -> None:
        pass

    def add_frame(self, frame_id: int, tokens: torch.Tensor) -> None:
        pass

    @torch.inference_mode()
    def predict(self, window: torch.Tensor, frame_ids: np.ndarray) -> dict[str, torch.Tensor]:
        return {task: logits[0] for task, logits in self.model(window[None]).items()}


@dataclass
class TaskResult:
    task: str
    probs: np.ndarray
    index: int
    label: str
    confidence: float
    top_k: list[tuple[int, str, float]]


@dataclass
class Prediction:
    """One prediction of all tasks for the window ending at ``stamp``."""

    stamp: float
    window_start: float
    frames_in_window: int
    frames_expected: int
    sequence: int
    tasks: dict[str, TaskResult]
    compute_s: float = 0.0

    @property
    def window_complete(self) -> bool:
        return self.frames_in_window >= self.frames_expected


def task_result(spec: HeadSpec, probs: np.ndarray, k: int = 3) -> TaskResult:
    order = np.argsort(-probs)[: max(1, k)]
    top = [(int(i), spec.labels[int(i)], float(probs[i])) for i in order]
    return TaskResult(spec.task, probs, top[0][0], top[0][1], top[0][2], top)


@dataclass
class EngineStats:
    frames_in: int = 0
    frames_sampled: int = 0
    backbone_passes: int = 0
    predictions: int = 0
    deferred: int = 0  # due predictions postponed by the caller (``process(predict=False)``)
    repeated: int = 0  # time sampling: window slots filled again by the nearest frame (camera too slow)
    resets: Counter = field(default_factory=Counter)


#: How cameras are sampled: by time (every ``sample_period_s``, the model's) or every k-th frame.
SAMPLING_MODES = ("time", "frames")


class WindowSchedule:
    """The engine's decisions without tensors: which camera frames are sampled, when the window
    resets, and when a prediction is due.

    One object decides for the live :class:`StreamingEngine` and for the batched offline engine
    (``step_ros.model.batched``), so both see the same windows by construction.

    Sampling (docs/ROS.md, "Sampling by time"):

    - ``sample_period_s`` given: by time.  Sample times lie on a grid ``period`` apart; each takes
      the first frame at or after ``target - h``, ``h`` being half the smaller of the period and
      the camera's frame period (measured from the stamps).  At the camera's rate, jittered or
      not, that is the frame nearest the sample time; after a dropped frame it may be one frame
      further, and after a run of them the first frame after the hole, because the decision is
      made when a frame arrives, without waiting for the next one (no added latency).  The grid
      does not drift.  A camera slower than the model needs leaves sample times without a frame
      of their own; the nearest frame then fills them too (``offer`` returns 2 or more slots,
      counted in ``stats.repeated``), so a window still spans the time the model was trained on.
      A jump of more than ``max_gap_s`` restarts the grid.
    - otherwise every ``frame_interval``-th frame, whatever its stamp (old manifests, or
      ``sampling: frames`` on purpose).
    """

    def __init__(self, frames: int, frame_interval: int, *, stride: int = 1, max_gap_s: float = 1.0,
                 min_frames: int | None = None, sample_period_s: float | None = None) -> None:
        if frame_interval < 1:
            raise ValueError(f"frame_interval must be >= 1, got {frame_interval}")
        if sample_period_s is not None and not sample_period_s > 0:
            raise ValueError(f"sample_period_s must be positive, got {sample_period_s}")
        self.frames = frames
        self.frame_interval = frame_interval
        self.sample_period_s = sample_period_s
        self.stride = max(1, stride)
        self.max_gap_s = max_gap_s
        self.min_frames = min(frames, min_frames or frames)
        self.stats = EngineStats()
        self.count = 0  # sampled frames since the last reset
        self._image_size: tuple[int, int] | None = None
        self._last_stamp: float | None = None  # previous sampled frame
        self._since_offer = 0  # camera frames offered (sampling phase)
        self._since_prediction = self.stride - 1  # the first complete window predicts
        self._next_t: float | None = None  # time sampling: the next sample time
        self._last_offer_t: float | None = None
        self.camera_period_s: float | None = None  # the camera's frame period from stamps (moving average)

    @property
    def mode(self) -> str:
        return "frames" if self.sample_period_s is None else "time"

    @property
    def size(self) -> int:
        """Frames in the window now."""
        return min(self.count, self.frames)

    def reset(self, reason: str | None = None) -> None:
        if reason:
            self.stats.resets[reason] += 1
        self.count = 0
        self._since_prediction = self.stride - 1

    def offer(self, stamp: float | None = None) -> int:
        """Count one camera frame; the number of window slots it fills: 0 (not sampled), 1, or
        more (time sampling, a camera slower than the model's period)."""
        self.stats.frames_in += 1
        last = self._last_offer_t
        if stamp is not None:
            stamp = float(stamp)
            self._last_offer_t = stamp
            if last is not None and 0 < stamp - last <= self.max_gap_s:
                dt = stamp - last  # a slow exponential average of the camera's frame period
                self.camera_period_s = dt if self.camera_period_s is None else 0.9 * self.camera_period_s + 0.1 * dt
        if self.sample_period_s is None or stamp is None:
            sampled = self._since_offer % self.frame_interval == 0
            self._since_offer += 1
            return int(sampled)
        return self._offer_time(stamp, last)

    def _offer_time(self, t: float, last: float | None) -> int:
        period = self.sample_period_s
        if self._next_t is None or last is None or t < last or t - self._next_t > self.max_gap_s:
            self._next_t = t + period  # (re)start the grid on this frame
            return 1
        half = 0.5 * min(period, self.camera_period_s or period)
        if t < self._next_t - half:
            return 0
        slots = 0
        while self._next_t <= t + half and slots < self.frames:  # every sample time this frame is nearest to
            self._next_t += period
            slots += 1
        if self._next_t <= t + half:  # more than a window's worth missed: restart the grid here
            self._next_t = t + period
        self.stats.repeated += slots - 1
        return slots

    def admit(self, size: tuple[int, int], stamp: float, slots: int = 1) -> str | None:
        """One sampled frame of image ``size`` (H, W) enters the window (``slots`` times); returns
        the reason the window was reset first (a gap, time going backwards, a new image size)."""
        reason = None
        if self._image_size is not None and size != self._image_size:
            reason = RESET_RESIZE
        self._image_size = size
        last, self._last_stamp = self._last_stamp, stamp
        if reason is None and last is not None and self.count:
            if stamp < last:
                reason = RESET_BACKWARDS
            elif stamp - last > self.max_gap_s:
                reason = RESET_GAP
        if reason is not None:
            self.reset(reason)
        self.count += slots
        self.stats.frames_sampled += 1
        return reason

    def due(self, predict: bool = True, slots: int = 1) -> bool:
        """After :meth:`admit`: is a prediction due now?  ``predict=False`` postpones a due one
        to the next sampled frame (counted in ``stats.deferred``)."""
        if self.size < self.min_frames:
            return False
        self._since_prediction += slots
        if self._since_prediction < self.stride:
            return False
        if not predict:
            self.stats.deferred += 1
            return False
        self._since_prediction = 0
        self.stats.predictions += 1
        return True


def sampling_period(manifest: Manifest, mode: str = "auto") -> float | None:
    """The sample period to run ``manifest`` with: ``auto`` / ``time`` -> the manifest's
    ``sample_period_s`` (an old manifest without it: a warning, then every k-th frame);
    ``frames`` -> None (every ``frame_interval``-th frame, on purpose)."""
    if mode not in ("auto", *SAMPLING_MODES):
        raise ValueError(f"sampling must be auto, time or frames, got {mode!r}")
    if manifest.clip_sampling == "uniform":
        import logging

        logging.getLogger(__name__).warning(
            "model %s was trained on uniform clips (one frame from each of %d equal parts of a whole video), "
            "which a camera stream cannot give: it is sampled every sample period / frame interval instead",
            manifest.name, manifest.frames)
    if mode == "frames":
        return None
    if manifest.sample_period_s is None:
        import logging

        logging.getLogger(__name__).warning(
            "model %s has no sample_period_s (an old manifest): sampling one camera frame in %d, whatever the "
            "camera's rate; a camera at another rate than the training videos shows the model faster or slower "
            "motion. Add sample_period_s = frame_interval / the training videos' fps to the manifest",
            manifest.name, manifest.frame_interval)
        return None
    return manifest.sample_period_s


class ScheduledEngine:
    """What an engine driven by a :class:`WindowSchedule` shows of it: its settings and counters,
    under the names callers have always used (the live and the batched engine share them)."""

    schedule: WindowSchedule

    frame_interval = property(lambda self: self.schedule.frame_interval)
    sample_period_s = property(lambda self: self.schedule.sample_period_s)
    stride = property(lambda self: self.schedule.stride)
    max_gap_s = property(lambda self: self.schedule.max_gap_s)
    min_frames = property(lambda self: self.schedule.min_frames)
    stats = property(lambda self: self.schedule.stats)


class StreamingEngine(ScheduledEngine):
    """Frames (uint8 RGB) with stamps in, :class:`Prediction` out.

    ``stride``: predict every ``stride``-th sampled frame once the window holds ``min_frames``
    frames (default ``T``: only complete windows; fewer pads the front with the oldest frame
    and marks the prediction incomplete).  A caller that is falling behind may postpone a due
    prediction (``process(..., predict=False)``): the frame still enters the window and the
    next sampled frame predicts.  ``max_gap_s``: a larger jump between sampled frames resets
    the window.
    """

    def __init__(
        self,
        model: MultiTaskModel,
        *,
        frame_interval: int | None = None,
        stride: int = 1,
        max_gap_s: float = 1.0,
        min_frames: int | None = None,
        top_k: int = 3,
        runner: HeadRunner | None = None,
        encode: Callable[[np.ndarray], torch.Tensor] | None = None,
        sample_period_s: float | None = None,
    ) -> None:
        manifest: Manifest = model.manifest
        self.model = model
        self.schedule = WindowSchedule(manifest.frames, frame_interval or manifest.frame_interval, stride=stride,
                                       max_gap_s=max_gap_s, min_frames=min_frames, sample_period_s=sample_period_s)
        self.top_k = top_k
        self.runner = runner or ReferenceRunner(model)
        self.encode = encode or (lambda frame: model.backbone.encode(frame)[0])
        shape = (model.backbone.num_patches + 1, model.backbone.dim)
        # The window lives with the heads: tokens cross to their device once, when pushed.
        self.window = StreamingWindow(manifest.frames, shape, device=model_device(model))

    def warm_up(self) -> float:
        """One blank frame through the backbone and the head runner, then forgotten: the lazy
        set-up (graph sessions, packed weights, the fast engine's caches and its kernel timing,
        seconds for ViT-S heads) happens here instead of on the first camera frame, where it
        would hold up the frames behind it.  Counts nothing; returns the seconds it took."""
        start = time.perf_counter()
        size = self.model.backbone.image_size
        tokens = self.encode(np.zeros((size, size, 3), dtype=np.uint8))
        self.runner.add_frame(-1, tokens)
        self.runner.reset()
        return time.perf_counter() - start

    def reset(self, reason: str | None = None) -> None:
        self.schedule.reset(reason)
        self._clear()

    def _clear(self) -> None:
        self.window.reset()
        self.runner.reset()

    def push(self, frame: np.ndarray, stamp: float) -> Prediction | None:
        """Feed one camera frame; returns a prediction when one is due."""
        slots = self.offer(stamp)
        if not slots:
            return None
        return self.process(frame, stamp, slots=slots)

    def offer(self, stamp: float | None = None) -> int:
        """Count one camera frame; the window slots it fills (0: not sampled; see WindowSchedule).

        Split from :meth:`process` so a ROS callback can decide cheaply, before converting
        the image, and hand only sampled frames to the inference thread.
        """
        return self.schedule.offer(stamp)

    def process(self, frame: np.ndarray, stamp: float, predict: bool = True, slots: int = 1) -> Prediction | None:
        """One sampled frame: continuity check, one backbone pass, heads when due.

        ``predict=False`` postpones a due prediction to the next sampled frame (counted in
        ``stats.deferred``): how a live node behind its input keeps every sampled frame in the
        window, at the cost of fewer predictions rather than of gaps in the window.
        """
        start = time.perf_counter()
        if self.schedule.admit((int(frame.shape[0]), int(frame.shape[1])), stamp, slots) is not None:
            self._clear()
        tokens = self.encode(frame)
        self.stats.backbone_passes += 1
        for _ in range(min(slots, self.window.frames)):  # a slow camera's frame fills missed sample times
            frame_id = self.window.push(tokens, stamp)
            self.runner.add_frame(frame_id, tokens)
        if not self.schedule.due(predict, slots):
            return None
        return self._predict(start)

    def _predict(self, start: float) -> Prediction:
        window = self.window.window(pad_to_full=True)
        ids = self.window.frame_ids()
        logits = self.runner.predict(window, ids)
        tasks = {}
        for spec in self.model.manifest.heads:
            probs = torch.softmax(logits[spec.task].float(), dim=-1).cpu().numpy()
            tasks[spec.task] = task_result(spec, probs, self.top_k)
        stamps = self.window.window_stamps()
        return Prediction(
            stamp=float(stamps[-1]),
            window_start=float(stamps[0]),
            frames_in_window=self.window.size,
            frames_expected=self.window.frames,
            sequence=self.stats.predictions,
            tasks=tasks,
            compute_s=time.perf_counter() - start,
        )


@dataclass
class SmoothedTask:
    result: TaskResult
    confident: bool
    stable: bool


class PredictionSmoother:
    """Exponential moving average of class probabilities, per task, so planners see no flicker.

    ``alpha`` = weight of the newest prediction (1 = no smoothing).  A task is *stable* when
    its smoothed label has not changed for ``stable_count`` predictions, *confident* when the
    smoothed confidence reaches ``threshold``.  Reset with the engine's window.
    """

    def __init__(self, manifest: Manifest, alpha: float = 0.5, threshold: float = 0.5, stable_count: int = 3,
                 top_k: int = 3) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"smoothing alpha must be in (0, 1], got {alpha}")
        self.specs = {h.task: h for h in manifest.heads}
        self.alpha, self.threshold, self.stable_count, self.top_k = alpha, threshold, stable_count, top_k
        self._ema: dict[str, np.ndarray] = {}
        self._history: dict[str, deque] = {}

    def reset(self) -> None:
        self._ema.clear()
        self._history.clear()

    def update(self, prediction: Prediction) -> dict[str, SmoothedTask]:
        out = {}
        for task, result in prediction.tasks.items():
            prev = self._ema.get(task)
            ema = result.probs if prev is None else self.alpha * result.probs + (1 - self.alpha) * prev
            self._ema[task] = ema
            smoothed = task_result(self.specs[task], ema, self.top_k)
            hist = self._history.setdefault(task, deque(maxlen=self.stable_count))
            hist.append(smoothed.index)
            stable = len(hist) == self.stable_count and len(set(hist)) == 1
            out[task] = SmoothedTask(smoothed, smoothed.confidence >= self.threshold, stable)
        return out


__all__ = [
    "EngineStats",
    "HeadRunner",
    "Prediction",
    "PredictionSmoother",
    "RESET_BACKWARDS",
    "RESET_GAP",
    "RESET_RESIZE",
    "ReferenceRunner",
    "SmoothedTask",
    "StreamingEngine",
    "StreamingWindow",
    "SAMPLING_MODES",
    "ScheduledEngine",
    "TaskResult",
    "WindowSchedule",
    "sampling_period",
    "model_device",
    "task_result",
]
