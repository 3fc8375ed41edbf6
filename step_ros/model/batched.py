"""Offline inference in batches: the :class:`~step_ros.model.streaming.StreamingEngine`'s windows,
many at a time.

Live, a frame must be encoded the moment it arrives and the heads run on every due window one
by one.  Offline (replaying a bag, where every frame is already recorded) nothing waits: this
engine lets the same :class:`~step_ros.model.streaming.WindowSchedule` decide which frames are
sampled, when the window resets and when a prediction is due, collects ``batch_size`` sampled
frames, runs the backbone on them in one batch, then the heads' plain forward on every window
that became complete, also in one batch.  The windows and their order are the live engine's, so
the predictions equal the live pipeline's up to float rounding (tested); only tokens of the
current window are kept, so memory stays O(batch + window) over a bag of any length.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .indexed_onnx import indexed_heads
from .multitask import MultiTaskModel
from .streaming import HeadRunner, Prediction, ScheduledEngine, WindowSchedule, model_device, task_result

_RESET = object()

__all__ = ["BatchedEngine", "BatchTimes", "batch_encoder"]


def batch_encoder(model: MultiTaskModel, encode: Callable | None = None) -> Callable[[Sequence[np.ndarray]], torch.Tensor]:
    """``frames -> tokens (B, 1 + n, D)`` for frames of one size: the torch backbone in one batch,
    an inference backend's own ``encode`` (graphs of batch 1 loop inside), or a per-frame callable."""
    if encode is None:
        return lambda frames: model.backbone.encode(np.stack(frames))
    if hasattr(encode, "encode"):
        return lambda frames: encode.encode(np.stack(frames))
    return lambda frames: torch.stack([encode(f) for f in frames])


@dataclass
class BatchTimes:
    """Where a batched replay spends its compute (s)."""

    backbone_s: float = 0.0
    heads_s: float = 0.0
    backbone_batches: int = 0
    head_batches: int = 0


@dataclass
class _Due:
    ids: list[int]  # sampled-frame ids, oldest first, front padded with the oldest (as the live engine)
    stamps: list[float]
    frames_in_window: int
    sequence: int
    resets_before: int


class BatchedEngine(ScheduledEngine):
    """Sampled frames in, :class:`Prediction` out, in the live engine's order, computed in batches.

    ``head_kernels``: who runs the batched heads when there is no ``runner``: ``onnxruntime``,
    ``torch`` or ``auto`` (ONNX Runtime on the CPU when installed); same numbers to float32
    rounding.

    Use: ``offer(stamp)`` for every valid camera frame (the window slots it fills; 0: not
    sampled), ``add(frame, stamp, slots)`` for the sampled ones, ``flush()`` at the end.  ``add`` / ``flush`` return ``(resets, prediction)``
    pairs, ``resets`` being the number of window resets before the prediction (a caller resets
    its smoother when it changes, as the node does).
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
        encode: Callable | None = None,
        runner: HeadRunner | None = None,
        batch_size: int = 32,
        sample_period_s: float | None = None,
        head_kernels: str = "auto",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        manifest = model.manifest
        self.model = model
        self.specs = list(manifest.heads)
        self.schedule = WindowSchedule(manifest.frames, frame_interval or manifest.frame_interval, stride=stride,
                                       max_gap_s=max_gap_s, min_frames=min_frames, sample_period_s=sample_period_s)
        self.top_k = top_k
        self.batch_size = batch_size
        self.device = model_device(model)
        self._encode = batch_encoder(model, encode)
        self.times = BatchTimes()
        self._window: deque[int] = deque(maxlen=manifest.frames)
        self._frames: list[tuple[int, np.ndarray]] = []  # sampled, not yet encoded
        self._tokens: dict[int, torch.Tensor] = {}
        self._stamps: dict[int, float] = {}
        self.runner = runner
        # without a runner: every due window's heads in batches, through ONNX Runtime graphs
        # (``auto`` on a CPU) or the heads' own forward_indexed (see .indexed_onnx)
        if runner is None:
            self._indexed, self.head_kernels = indexed_heads(model.heads, head_kernels)
        else:
            self._indexed, self.head_kernels = {}, getattr(runner, "kernels", "none")
        self._events: list[Any] = []  # in order: _RESET, a frame id, a _Due
        self._next_id = 0
        self._alias: dict[int, int] = {}  # window slot id -> the id whose frame was encoded
        self._pending = 0  # due predictions not computed yet


    def offer(self, stamp: float | None = None) -> int:
        return self.schedule.offer(stamp)

    def add(self, frame: np.ndarray, stamp: float, slots: int = 1) -> list[tuple[int, Prediction]]:
        """One sampled frame (filling ``slots`` window slots, see ``WindowSchedule``); returns the
        predictions that are now computed (maybe none)."""
        if self.schedule.admit((int(frame.shape[0]), int(frame.shape[1])), stamp, slots) is not None:
            self._window.clear()
            self._events.append(_RESET)
        first = self._next_id
        self._frames.append((first, frame))
        for i in range(min(slots, self.schedule.frames)):  # repeats share the first one's tokens
            sid = self._next_id
            self._next_id += 1
            self._window.append(sid)
            self._stamps[sid] = stamp
            self._alias[sid] = first
            self._events.append(sid)
        if self.schedule.due(slots=slots):
            ids = list(self._window)
            padded = [ids[0]] * (self.schedule.frames - len(ids)) + ids
            self._events.append(_Due(padded, [self._stamps[i] for i in ids], len(ids), self.stats.predictions,
                                     sum(self.stats.resets.values())))
            self._pending += 1
        if len(self._frames) >= self.batch_size or self._pending >= self.batch_size:
            return self.flush()
        return []

    def flush(self) -> list[tuple[int, Prediction]]:
        """Encode the waiting frames and compute every due prediction."""
        self._encode_waiting()
        events, self._events, self._pending = self._events, [], 0
        out = self._run_heads(events) if self.runner is None else self._run_runner(events)
        keep = set(self._window)
        for sid in [s for s in self._stamps if s not in keep]:
            del self._stamps[sid]
            del self._alias[sid]
        used = {self._alias[s] for s in keep}
        for sid in [s for s in self._tokens if s not in used]:
            del self._tokens[sid]
        return out

    def _token(self, sid: int) -> torch.Tensor:
        return self._tokens[self._alias[sid]]

    @torch.inference_mode()
    def _encode_waiting(self) -> None:
        started = time.perf_counter()
        frames, self._frames = self._frames, []
        i = 0
        while i < len(frames):  # runs of one image size (a resize resets the window anyway)
            j = i + 1
            while j < len(frames) and frames[j][1].shape == frames[i][1].shape:
                j += 1
            tokens = self._encode([f for _, f in frames[i:j]]).to(self.device, torch.float32)
            for (sid, _), tok in zip(frames[i:j], tokens):
                self._tokens[sid] = tok
            self.stats.backbone_passes += j - i
            self.times.backbone_batches += 1
            i = j
        self.times.backbone_s += time.perf_counter() - started

    def _prediction(self, d: _Due, probs: dict[str, np.ndarray]) -> tuple[int, Prediction]:
        tasks = {spec.task: task_result(spec, probs[spec.task], self.top_k) for spec in self.specs}
        return d.resets_before, Prediction(
            stamp=float(d.stamps[-1]), window_start=float(d.stamps[0]), frames_in_window=d.frames_in_window,
            frames_expected=self.schedule.frames, sequence=d.sequence, tasks=tasks)

    @torch.inference_mode()
    def _run_runner(self, events: list[Any]) -> list[tuple[int, Prediction]]:
        """The heads through a streaming HeadRunner (the exact fast engine), in the live order."""
        started = time.perf_counter()
        out = []
        for e in events:
            if e is _RESET:
                self.runner.reset()
            elif isinstance(e, int):
                self.runner.add_frame(e, self._token(e))
            else:
                window = torch.stack([self._token(sid) for sid in e.ids])
                logits = self.runner.predict(window, np.asarray(e.ids))
                out.append(self._prediction(e, {spec.task: torch.softmax(logits[spec.task].float(), dim=-1).cpu().numpy()
                                                for spec in self.specs}))
        self.times.heads_s += time.perf_counter() - started
        return out

    @torch.inference_mode()
    def _run_heads(self, events: list[Any]) -> list[tuple[int, Prediction]]:
        """Every due window's heads in batches, each frame projected once per batch."""
        started = time.perf_counter()
        due = [e for e in events if isinstance(e, _Due)]
        out: list[tuple[int, Prediction]] = []
        for i in range(0, len(due), self.batch_size):
            chunk = due[i : i + self.batch_size]
            sids = sorted({self._alias[sid] for d in chunk for sid in d.ids})
            where = {sid: i for i, sid in enumerate(sids)}
            frames = torch.stack([self._tokens[sid] for sid in sids])  # each frame once
            index = torch.tensor([[where[self._alias[sid]] for sid in d.ids] for d in chunk], device=frames.device)
            probs = {}
            for spec in self.specs:
                logits = self._indexed[spec.task](frames, index)
                probs[spec.task] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
            for row, d in enumerate(chunk):
                out.append(self._prediction(d, {task: p[row] for task, p in probs.items()}))
            self.times.head_batches += 1
        self.times.heads_s += time.perf_counter() - started
        return out
