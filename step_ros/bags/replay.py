"""``step-ros replay-eval``: run the node's exact pipeline over a bag, as fast as possible, and score it.

No ROS is involved: the bag is read with ``rosbags``, images are decoded to RGB, and every
frame goes through the same :class:`~step_ros.model.streaming.StreamingEngine` (window
sampling, resets on gaps / time going backwards / size changes, one backbone pass per sampled
frame) and :class:`~step_ros.model.streaming.PredictionSmoother` as in the node. Each
prediction is matched to the ground-truth segment (``/ground_truth``, written by
``step-ros record``) whose ``[window_start, stamp]`` contains the prediction's window.

Report (JSON + console tables): per task, accuracy overall / on nearly symmetric / on
non-symmetric classes / within symmetric pairs, per context; coverage and accuracy of the
confident predictions; window resets by reason; undecodable images; compute latency per
prediction (median, p95, max); replay throughput; the list of predictions. Figures: a timeline
per task (predicted vs true label over bag time) and a latency histogram.

Any other ``step_ros/msg/HumanAction`` topic in the bag (a live ``/human_action`` recording of
the node) is scored against the same ground truth, in ``report["recorded"]``.
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..model.manifest import HeadSpec, Manifest, load_manifest
from ..model.streaming import PredictionSmoother, ReferenceRunner, StreamingEngine
from .common import (
    DEFAULT_IMAGE_TOPIC,
    GROUND_TRUTH_TOPIC,
    HUMAN_ACTION_TYPE,
    IMAGE_TYPE,
    IMAGE_TYPES,
    SEGMENT_TOPIC,
    STRING_TYPE,
    BagError,
    ImageDecodeError,
    deserialize,
    iter_messages,
    msg_to_rgb,
    ns_to_seconds,
    open_bag,
    time_to_seconds,
)

log = logging.getLogger(__name__)

__all__ = ["replay_eval", "Segment", "read_ground_truth", "find_image_topic", "plot_timeline",
           "add_arguments", "main"]

#: Stamps are compared after a float conversion of integer nanoseconds; allow for rounding.
_EPS = 1e-6
_PREFETCH = 64


@dataclass
class Segment:
    """One ground-truth segment: true labels over ``[window_start, stamp]`` (bag time, s)."""

    index: int
    window_start: float
    stamp: float
    labels: dict[str, str]
    context: str | None = None
    split: str | None = None
    video: str | None = None
    start_frame: int | None = None
    fps: float | None = None
    num_frames: int | None = None


@dataclass
class _Record:
    """One prediction (replayed or recorded) with its match."""

    stamp: float
    window_start: float
    complete: bool
    labels: dict[str, str]  # task -> predicted label (top-1 after smoothing)
    confidence: dict[str, float]
    confident: dict[str, bool]
    stable: dict[str, bool] = field(default_factory=dict)
    probs: dict[str, np.ndarray] = field(default_factory=dict)
    top_k: dict[str, list] = field(default_factory=dict)
    compute_ms: float | None = None
    segment: Segment | None = None


# --------------------------------------------------------------------------- bag contents


def find_image_topic(topics: dict[str, tuple[str | None, int]], bag: str, requested: str | None) -> tuple[str, str]:
    """``(topic, msgtype)`` of the image topic: ``requested`` (checked), or the only / the
    default / the largest Image or CompressedImage topic."""
    images = {t: (ty, n) for t, (ty, n) in topics.items() if ty in IMAGE_TYPES}
    listing = ", ".join(f"{t} [{ty}]" for t, (ty, _) in sorted(topics.items())) or "none"
    if requested is not None:
        if requested not in topics:
            raise BagError(f"bag {bag} has no topic {requested!r}; its topics: {listing}")
        if requested not in images:
            raise BagError(f"topic {requested!r} of bag {bag} is {topics[requested][0]}, not an image "
                           f"({' or '.join(IMAGE_TYPES)})")
        return requested, images[requested][0]
    if not images:
        raise BagError(f"bag {bag} has no image topic ({' or '.join(IMAGE_TYPES)}); its topics: {listing}")
    if len(images) == 1:
        topic = next(iter(images))
    else:
        preferred = [t for t in (DEFAULT_IMAGE_TOPIC, DEFAULT_IMAGE_TOPIC + "/compressed") if t in images]
        topic = preferred[0] if preferred else max(images, key=lambda t: (images[t][0] == IMAGE_TYPE, images[t][1]))
        log.warning("bag %s has several image topics (%s); using %s (choose with image_topic=)", bag,
                    ", ".join(sorted(images)), topic)
    return topic, images[topic][0]


def _action_record(msg: Any) -> _Record:
    """A recorded HumanAction as a prediction: the label, or its best guess top_k[0] if not confident."""
    labels, conf, confident, stable, top = {}, {}, {}, {}, {}
    for tp in msg.tasks:
        best = tp.label or (tp.top_k[0].label if len(tp.top_k) else "")
        labels[tp.task] = best
        conf[tp.task] = float(tp.confidence)
        confident[tp.task] = bool(tp.confident)
        stable[tp.task] = bool(tp.stable)
        top[tp.task] = [(str(s.label), round(float(s.score), 6)) for s in tp.top_k]
    return _Record(stamp=time_to_seconds(msg.header.stamp), window_start=time_to_seconds(msg.window_start),
                   complete=bool(msg.window_complete), labels=labels, confidence=conf, confident=confident,
                   stable=stable, top_k=top)


def read_ground_truth(
    bag_path: str | os.PathLike[str],
    ground_truth_topic: str = GROUND_TRUTH_TOPIC,
    segment_topic: str = SEGMENT_TOPIC,
) -> tuple[list[Segment], dict[str, list[_Record]]]:
    """Ground-truth segments (sorted by time) and the recorded HumanAction topics' predictions.

    Segments come from ``ground_truth_topic`` (HumanAction: true label per task, the segment's
    first and last frame stamps); ``segment_topic`` (JSON strings, matched by segment index =
    ``HumanAction.sequence``) adds video, frame range, fps, split and context when present.
    """
    gt_msgs: list[Any] = []
    info: dict[int, dict] = {}
    recorded: dict[str, list[_Record]] = {}
    with open_bag(bag_path) as reader:
        wanted = [c for c in reader.connections if c.msgtype == HUMAN_ACTION_TYPE
                  or (c.topic == segment_topic and c.msgtype == STRING_TYPE)]
        if not wanted:
            return [], {}
        for conn, _, raw in iter_messages(reader, bag_path, wanted):
            try:
                msg = deserialize(raw, conn.msgtype)
            except Exception as exc:  # noqa: BLE001 - any CDR decoding failure
                raise BagError(f"bag {bag_path}, topic {conn.topic}: cannot decode a {conn.msgtype} message "
                               f"({type(exc).__name__}: {exc})") from exc
            if conn.topic == segment_topic:
                try:
                    d = json.loads(msg.data)
                    info[int(d["segment"])] = d
                except (ValueError, KeyError, TypeError):
                    log.warning("bag %s, topic %s: ignoring a message that is not segment JSON", bag_path,
                                segment_topic)
            elif conn.topic == ground_truth_topic:
                gt_msgs.append(msg)
            else:
                recorded.setdefault(conn.topic, []).append(_action_record(msg))
    segments = []
    for m in gt_msgs:
        d = info.get(int(m.sequence), {})
        segments.append(Segment(
            index=int(m.sequence), window_start=time_to_seconds(m.window_start), stamp=time_to_seconds(m.header.stamp),
            labels={tp.task: tp.label for tp in m.tasks}, context=d.get("context"), split=d.get("split"),
            video=d.get("video"), start_frame=d.get("start_frame"), fps=d.get("fps"), num_frames=d.get("num_frames"),
        ))
    segments.sort(key=lambda s: (s.window_start, s.stamp))
    return segments, recorded


class _Matcher:
    """Finds the segment whose [window_start, stamp] contains a prediction's window."""

    def __init__(self, segments: list[Segment]) -> None:
        self.segments = segments  # sorted by window_start
        self.starts = [s.window_start for s in segments]
        self.max_stamp = np.maximum.accumulate([s.stamp for s in segments]) if segments else np.zeros(0)

    def __call__(self, window_start: float, stamp: float) -> Segment | None:
        i = bisect.bisect_right(self.starts, window_start + _EPS) - 1
        # the latest-starting candidate first (segments may overlap in hand-made bags)
        while i >= 0 and self.max_stamp[i] + _EPS >= stamp:
            seg = self.segments[i]
            if stamp <= seg.stamp + _EPS:
                return seg
            i -= 1
        return None


# --------------------------------------------------------------------------- frames


def _decoded_frames(bag_path: Path, topic: str, stop: threading.Event, use_log_time: bool
                    ) -> Iterator[tuple[float | None, np.ndarray | None, str | None]]:
    """``(stamp_s, frame, None)`` per decodable image, ``(stamp_s | None, None, reason)`` otherwise."""
    with open_bag(bag_path) as reader:
        conns = [c for c in reader.connections if c.topic == topic]
        for conn, log_ns, raw in iter_messages(reader, bag_path, conns):
            if stop.is_set():
                return
            try:
                msg = deserialize(raw, conn.msgtype)
            except Exception as exc:  # noqa: BLE001 - corrupt CDR payload
                yield None, None, f"undeserializable {conn.msgtype} ({type(exc).__name__})"
                continue
            stamp = ns_to_seconds(log_ns) if use_log_time else time_to_seconds(msg.header.stamp)
            try:
                frame = msg_to_rgb(msg, conn.msgtype)
            except ImageDecodeError as exc:
                yield stamp, None, str(exc)
                continue
            yield stamp, frame, None


def _prefetch(make: Callable[[threading.Event], Iterator[Any]], size: int = _PREFETCH) -> Iterator[Any]:
    """Run a generator in a thread (reading + decoding overlaps the model's compute)."""
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in make(stop):
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", done))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(("error", exc))

    thread = threading.Thread(target=produce, name="bag-reader", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


# --------------------------------------------------------------------------- scoring


def _acc(mask: np.ndarray, correct: np.ndarray) -> float | None:
    return round(float(correct[mask].mean()), 4) if mask.any() else None


def _score_labels(spec: HeadSpec | None, pred: list[str], true: list[str], confident: list[bool],
                  probs: np.ndarray | None) -> dict:
    """Accuracy overall / nearly symmetric / non-symmetric (+ within pair from probs)."""
    pred_a, true_a = np.array(pred, dtype=object), np.array(true, dtype=object)
    correct = pred_a == true_a
    sym_labels = spec.symmetric_labels if spec is not None else set()
    is_sym = np.array([t in sym_labels for t in true], dtype=bool)
    conf = np.array(confident, dtype=bool)
    out = {
        "n": int(len(true)),
        "top1": _acc(np.ones(len(true), bool), correct),
        "symmetric": _acc(is_sym, correct),
        "non_symmetric": _acc(~is_sym, correct),
        "n_symmetric": int(is_sym.sum()),
        "confident_coverage": round(float(conf.mean()), 4) if len(conf) else None,
        "confident_accuracy": _acc(conf, correct),
        "within_pair": None,
    }
    if spec is not None and probs is not None and spec.symmetric_pairs and len(true):
        within = []
        for a, b in spec.symmetric_pairs:
            ia, ib = spec.labels.index(a), spec.labels.index(b)
            for own, twin, name in ((ia, ib, a), (ib, ia, b)):
                rows = true_a == name
                within.extend((probs[rows, own] > probs[rows, twin]).tolist())
        out["within_pair"] = round(float(np.mean(within)), 4) if within else None
    return out


def _score(records: list[_Record], manifest: Manifest, gt_tasks: list[str], contexts: list[str]) -> dict:
    """Per task and context scores of the matched, complete-window records."""
    tasks: dict[str, dict] = {}
    specs = {h.task: h for h in manifest.heads}
    for task in gt_tasks:
        spec = specs.get(task)
        rows = [r for r in records if r.segment is not None and r.complete and task in r.labels
                and task in r.segment.labels]
        if spec is not None:
            unknown = sum(1 for r in rows if r.segment.labels[task] not in spec.labels)
            rows = [r for r in rows if r.segment.labels[task] in spec.labels]
        else:
            unknown = 0
        by_ctx = {}
        for ctx in ["all", *contexts]:
            sel = rows if ctx == "all" else [r for r in rows if r.segment.context == ctx]
            if not sel:
                continue
            probs = None
            if spec is not None and all(task in r.probs for r in sel):
                probs = np.stack([r.probs[task] for r in sel])
            by_ctx[ctx] = _score_labels(spec, [r.labels[task] for r in sel], [r.segment.labels[task] for r in sel],
                                        [r.confident.get(task, False) for r in sel], probs)
        per_class = []
        if spec is not None and rows:
            for label in spec.labels:
                sel = [r for r in rows if r.segment.labels[task] == label]
                if not sel:
                    continue
                wrong = Counter(r.labels[task] for r in sel if r.labels[task] != label)
                confused, count = wrong.most_common(1)[0] if wrong else (None, 0)
                per_class.append({"label": label, "support": len(sel), "symmetric": label in spec.symmetric_labels,
                                  "accuracy": round(sum(r.labels[task] == label for r in sel) / len(sel), 4),
                                  "confused_with": confused, "confusion_rate": round(count / len(sel), 4)})
        tasks[task] = {"contexts": by_ctx, "true_label_not_in_manifest": unknown, "per_class": per_class,
                       "in_manifest": spec is not None}
    return tasks


def _latency(ms: list[float]) -> dict:
    if not ms:
        return {"n": 0, "median_ms": None, "p95_ms": None, "max_ms": None, "mean_ms": None}
    a = np.asarray(ms)
    return {"n": int(a.size), "median_ms": round(float(np.median(a)), 3),
            "p95_ms": round(float(np.percentile(a, 95)), 3), "max_ms": round(float(a.max()), 3),
            "mean_ms": round(float(a.mean()), 3)}


# --------------------------------------------------------------------------- figures


def plot_timeline(spec: HeadSpec, records: list[dict], segments: list[Segment], path: str | Path,
                  t0: float, title: str = "") -> Path:
    """Predicted (dots: green right, red wrong) vs true label (grey bars) of one task over bag time.

    Nearly symmetric classes are shaded orange and their names drawn in orange.
    """
    from ..figures import plt, save_figure

    task = spec.task
    labels = list(spec.labels)
    extra = sorted({s.labels[task] for s in segments if task in s.labels} - set(labels))
    labels += extra  # true labels the model does not know, so they still show up
    row = {lab: i for i, lab in enumerate(labels)}
    duration = max([r["stamp"] for r in records] + [s.stamp for s in segments] + [t0]) - t0
    fig, ax = plt.subplots(figsize=(min(30.0, max(8.0, 6 + duration / 8)), max(3.0, 0.28 * len(labels) + 1.5)))
    for lab in spec.symmetric_labels:
        ax.axhspan(row[lab] - 0.5, row[lab] + 0.5, color="orange", alpha=0.12, lw=0)
    for s in segments:
        if task in s.labels:
            ax.plot([s.window_start - t0, s.stamp - t0], [row[s.labels[task]]] * 2, color="0.35", lw=6, alpha=0.45,
                    solid_capstyle="butt", label="true label" if s is segments[0] else None)
    xs = np.array([r["stamp"] - t0 for r in records])
    ys = np.array([row.get(r["tasks"][task]["label"], -1) for r in records]) if records else np.zeros(0)
    true = [r["tasks"][task].get("true") for r in records]
    ok = np.array([t is not None and r["tasks"][task]["label"] == t for r, t in zip(records, true)], dtype=bool)
    bad = np.array([t is not None and r["tasks"][task]["label"] != t for r, t in zip(records, true)], dtype=bool)
    if len(xs):
        ax.scatter(xs[ok], ys[ok], s=10, color="tab:green", zorder=3, label="predicted, right")
        ax.scatter(xs[bad], ys[bad], s=10, color="tab:red", zorder=3, label="predicted, wrong")
        if (~ok & ~bad).any():
            ax.scatter(xs[~ok & ~bad], ys[~ok & ~bad], s=10, color="tab:blue", zorder=3,
                       label="predicted, no ground truth")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for tick, lab in zip(ax.get_yticklabels(), labels):
        if lab in spec.symmetric_labels:
            tick.set_color("darkorange")
    ax.set_ylim(-0.7, len(labels) - 0.3)
    ax.set_xlabel("bag time (s since the first image)")
    ax.set_title(title or f"{task}: predicted vs true label (orange: nearly symmetric classes)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- main entry


def _make_runner(runner: Any, model: Any) -> Any:
    if runner is None or runner == "reference":
        return ReferenceRunner(model)
    if runner == "fast":
        from ..model.fast_step import FastStepRunner

        return FastStepRunner(model)
    if isinstance(runner, str):
        raise ValueError(f"runner must be 'reference', 'fast' or a HeadRunner object, got {runner!r}")
    return runner


def _make_encode(encode: Any, model: Any, device: Any = None) -> Callable | None:
    if encode is None or callable(encode):
        return encode
    if isinstance(encode, str):
        from ..deploy.backends import create_encoder

        return create_encoder(encode, model.backbone, device=device)
    raise ValueError(f"encode must be a callable, an inference backend name or None, got {encode!r}")


def replay_eval(
    bag_path: str | os.PathLike[str],
    manifest_path: str | os.PathLike[str] | Manifest,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    image_topic: str | None = None,
    stride: int = 1,
    alpha: float = 1.0,
    threshold: float = 0.5,
    stable_count: int = 3,
    max_gap_s: float | None = None,
    min_frames: int | None = None,
    top_k: int = 3,
    runner: Any = None,
    encode: Any = None,
    model: Any = None,
    ground_truth_topic: str | None = None,
    segment_topic: str = SEGMENT_TOPIC,
    use_log_time: bool = False,
    save_probs: bool = False,
    progress: bool = True,
    quiet: bool = False,
    device: str | None = None,
) -> dict:
    """Replay ``bag_path`` through the node's pipeline for the model of ``manifest_path``; score it.

    ``image_topic``: default auto-detects the bag's Image / CompressedImage topic.
    ``stride``, ``max_gap_s`` (window reset gap; default the StreamingEngine's), ``min_frames``,
    ``top_k``: as the StreamingEngine / node parameters. ``alpha`` (1 = no smoothing), ``threshold``,
    ``stable_count``: as the PredictionSmoother / node parameters. ``runner``: ``None`` or
    ``"reference"`` (plain head forward), ``"fast"`` (exact streaming STEP engine) or a
    HeadRunner. ``encode``: ``None`` (torch backbone), an inference backend name
    (``step_ros.deploy.backends.BACKENDS``) or a callable frame -> tokens. ``model``: an
    already built MultiTaskModel for this manifest (skips loading). ``ground_truth_topic``:
    default ``/ground_truth`` (missing -> a warning and no accuracy; an explicitly named topic
    that is missing is an error). ``use_log_time``: stamp frames with the bag's receive time
    instead of ``header.stamp`` (for cameras that leave stamps empty). ``save_probs``: keep every
    prediction's full probability vectors in the report.  ``device``: where heads and the torch
    backbone run (``auto``, ``cpu``, ``cuda``, ``cuda:N``; default: where the model already is).

    Undecodable images are skipped and counted; a bag without any decodable image on the
    topic, a missing topic or a corrupt bag raise :class:`BagError`. With ``out_dir`` writes
    ``report.json``, ``timeline_<task>.png`` and ``latency.png``. Returns the report dict.
    """
    from ..model.multitask import MultiTaskModel
    from ..console import console, pct, print_table, write_json
    from ..figures import plot_histogram

    bag_path = Path(bag_path)
    manifest = manifest_path if isinstance(manifest_path, Manifest) else load_manifest(manifest_path)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")

    # -- what is in the bag (fails early, before loading a model)
    with open_bag(bag_path) as reader:
        topics = {t: (info.msgtype, info.msgcount) for t, info in reader.topics.items()}
        bag_start_ns = reader.start_time
    topic, msgtype = find_image_topic(topics, str(bag_path), image_topic)
    gt_topic = ground_truth_topic or GROUND_TRUTH_TOPIC
    if gt_topic not in topics:
        if ground_truth_topic is not None:
            raise BagError(f"bag {bag_path} has no ground-truth topic {gt_topic!r}; its topics: "
                           f"{', '.join(sorted(topics))}")
        log.warning("bag %s has no %s topic: replaying without accuracy", bag_path, gt_topic)
    elif topics[gt_topic][0] != HUMAN_ACTION_TYPE:
        raise BagError(f"topic {gt_topic!r} of bag {bag_path} is {topics[gt_topic][0]}, expected {HUMAN_ACTION_TYPE}")
    segments, recorded = read_ground_truth(bag_path, gt_topic, segment_topic)
    match = _Matcher(segments)
    gt_tasks = list(dict.fromkeys(t for s in segments for t in s.labels))
    contexts = sorted({s.context for s in segments if s.context is not None})

    # -- the node's pipeline
    if model is None:
        model = MultiTaskModel.from_manifest(manifest)
    else:  # a prebuilt model: its own manifest (heads, labels) is what runs
        manifest = getattr(model, "manifest", None) or manifest
    model.eval()
    if device is not None:
        from ..model.device import resolve_device

        device = resolve_device(device)
        model.to(device)
    runner_obj = _make_runner(runner, model)
    engine_kwargs: dict[str, Any] = {} if max_gap_s is None else {"max_gap_s": max_gap_s}
    engine = StreamingEngine(model, stride=stride, min_frames=min_frames, top_k=top_k, runner=runner_obj,
                             encode=_make_encode(encode, model, device), **engine_kwargs)
    smoother = PredictionSmoother(manifest, alpha=alpha, threshold=threshold, stable_count=stable_count, top_k=top_k)

    records: list[_Record] = []
    undecodable: Counter = Counter()
    resets_seen = 0
    sizes: Counter = Counter()
    started = time.perf_counter()
    total = topics[topic][1]
    frames_iter = _prefetch(lambda stop: _decoded_frames(bag_path, topic, stop, use_log_time))
    first_stamp: float | None = None
    with tqdm(total=total, desc=f"replay {bag_path.name}", unit="frame", disable=not progress) as bar:
        for stamp, frame, reason in frames_iter:
            bar.update()
            if frame is None:
                if not undecodable:
                    log.warning("bag %s, topic %s: skipping an undecodable image: %s", bag_path, topic, reason)
                undecodable[reason] += 1
                continue
            if first_stamp is None:
                first_stamp = stamp
            sizes[f"{frame.shape[1]}x{frame.shape[0]}"] += 1
            pred = engine.push(frame, stamp)
            resets = sum(engine.stats.resets.values())
            if resets != resets_seen:  # the node resets its smoother with the window
                smoother.reset()
                resets_seen = resets
            if pred is None:
                continue
            smoothed = smoother.update(pred)
            rec = _Record(
                stamp=pred.stamp, window_start=pred.window_start, complete=pred.window_complete,
                labels={t: s.result.label for t, s in smoothed.items()},
                confidence={t: float(s.result.confidence) for t, s in smoothed.items()},
                confident={t: s.confident for t, s in smoothed.items()},
                stable={t: s.stable for t, s in smoothed.items()},
                probs={t: np.asarray(s.result.probs, dtype=np.float64) for t, s in smoothed.items()},
                top_k={t: [(lab, round(float(p), 6)) for _, lab, p in s.result.top_k] for t, s in smoothed.items()},
                compute_ms=pred.compute_s * 1e3,
            )
            rec.segment = match(rec.window_start, rec.stamp)
            records.append(rec)
    wall_s = time.perf_counter() - started
    decoded = engine.stats.frames_in
    if decoded == 0:
        why = "; ".join(f"{n} x {r}" for r, n in undecodable.most_common(3)) or "no messages"
        raise BagError(f"bag {bag_path}, topic {topic}: no decodable image ({why})")

    for rec_list in recorded.values():
        for r in rec_list:
            r.segment = match(r.window_start, r.stamp)

    # -- report
    t0 = first_stamp if first_stamp is not None else ns_to_seconds(bag_start_ns)
    pred_rows = []
    for r in records:
        seg = r.segment
        row: dict[str, Any] = {
            "stamp": round(r.stamp, 9), "window_start": round(r.window_start, 9), "t": round(r.stamp - t0, 6),
            "complete": r.complete, "compute_ms": round(r.compute_ms or 0.0, 3),
            "segment": None if seg is None else seg.index,
        }
        if seg is not None and seg.fps and seg.start_frame is not None:
            row["video_frame"] = int(seg.start_frame + round((r.stamp - seg.window_start) * seg.fps))
        row["tasks"] = {}
        for task in r.labels:
            entry = {"label": r.labels[task], "confidence": round(r.confidence[task], 6),
                     "confident": r.confident[task], "stable": r.stable.get(task, False),
                     "true": None if seg is None else seg.labels.get(task), "top_k": r.top_k.get(task, [])}
            if save_probs:
                entry["probs"] = [float(x) for x in r.probs[task]]
            row["tasks"][task] = entry
        pred_rows.append(row)

    used = {id(r.segment) for r in records if r.segment is not None}
    latency = _latency([r.compute_ms for r in records if r.compute_ms is not None])
    report: dict[str, Any] = {
        "bag": str(bag_path),
        "manifest": str(manifest.path) if manifest.path else manifest.name,
        "image_topic": topic,
        "image_type": msgtype,
        "ground_truth_topic": gt_topic if segments else None,
        "settings": {"frames": manifest.frames, "frame_interval": engine.frame_interval, "stride": stride,
                     "alpha": alpha, "threshold": threshold, "stable_count": stable_count,
                     "max_gap_s": engine.max_gap_s,
                     "min_frames": engine.min_frames, "runner": type(runner_obj).__name__,
                     "encode": "torch" if encode is None else (encode if isinstance(encode, str) else "custom"),
                     "stamps": "log_time" if use_log_time else "header"},
        "frames": {"messages": sum(undecodable.values()) + decoded, "decoded": decoded,
                   "undecodable": sum(undecodable.values()), "undecodable_reasons": dict(undecodable),
                   "sampled": engine.stats.frames_sampled, "backbone_passes": engine.stats.backbone_passes,
                   "sizes": dict(sizes)},
        "resets": {k: int(v) for k, v in engine.stats.resets.items()},
        "num_predictions": len(records),
        "num_matched": sum(r.segment is not None for r in records),
        "num_unmatched": sum(r.segment is None for r in records),
        "num_incomplete": sum(not r.complete for r in records),
        "segments": {"total": len(segments), "with_predictions": len(used),
                     "without_predictions": [s.index for s in segments if id(s) not in used]},
        "contexts": contexts,
        "tasks": _score(records, manifest, gt_tasks, contexts),
        "tasks_without_ground_truth": [t for t in manifest.tasks if t not in gt_tasks],
        "latency": latency,
        "timing": {"wall_s": round(wall_s, 3), "frames_per_s": round(decoded / wall_s, 2) if wall_s > 0 else None,
                   "predictions_per_s": round(len(records) / wall_s, 2) if wall_s > 0 else None},
        "recorded": {},
        "predictions": pred_rows,
    }
    for rtopic, rlist in recorded.items():
        report["recorded"][rtopic] = {
            "num_messages": len(rlist), "num_matched": sum(r.segment is not None for r in rlist),
            "num_incomplete": sum(not r.complete for r in rlist),
            "tasks": _score(rlist, manifest, gt_tasks, contexts),
        }

    # -- console
    if not quiet:
        for task, tr in report["tasks"].items():
            rows = [[ctx, pct(s["top1"]), pct(s["symmetric"]), pct(s["non_symmetric"]), pct(s["within_pair"]),
                     pct(s["confident_coverage"]), pct(s["confident_accuracy"]), s["n"]]
                    for ctx, s in tr["contexts"].items()]
            print_table(f"replay {bag_path.name} - {task}: top-1 % per window",
                        ["context", "all", "nearly symmetric", "non-symmetric", "within pair", "confident %",
                         "acc. if confident", "predictions"], rows)
        for rtopic, rr in report["recorded"].items():
            for task, tr in rr["tasks"].items():
                s = tr["contexts"].get("all")
                if s:
                    console.print(f"recorded {rtopic} {task}: top-1 {pct(s['top1'])} % "
                                  f"(nearly symmetric {pct(s['symmetric'])}, n={s['n']})")
        lat = report["latency"]
        print_table(f"replay {bag_path.name}: pipeline", ["item", "value"], [
            ["image topic", f"{topic} [{msgtype.split('/')[-1]}]"],
            ["frames decoded / undecodable", f"{decoded} / {report['frames']['undecodable']}"],
            ["backbone passes", engine.stats.backbone_passes],
            ["predictions (matched / unmatched)",
             f"{len(records)} ({report['num_matched']} / {report['num_unmatched']})"],
            ["window resets", ", ".join(f"{k} {v}" for k, v in report["resets"].items()) or "0"],
            ["segments with predictions", f"{len(used)} / {len(segments)}"],
            ["compute per prediction ms (median / p95 / max)",
             f"{lat['median_ms']} / {lat['p95_ms']} / {lat['max_ms']}" if lat["n"] else "-"],
            ["replay speed", f"{report['timing']['frames_per_s']} frames/s ({wall_s:.1f} s)"],
        ])

    # -- files
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        figures = {}
        for spec in manifest.heads:
            acc = report["tasks"].get(spec.task, {}).get("contexts", {}).get("all", {}).get("top1")
            title = (f"{spec.task}: predicted vs true label over bag time"
                     + (f" (top-1 {pct(acc)} %)" if acc is not None else "")
                     + "; orange: nearly symmetric classes")
            figures[f"timeline_{spec.task}"] = str(plot_timeline(
                spec, pred_rows, segments, out / f"timeline_{spec.task}.png", t0, title))
        if latency["n"]:
            figures["latency"] = str(plot_histogram(
                {"compute per prediction": [r.compute_ms for r in records]}, out / "latency.png",
                f"replay {bag_path.name}: backbone + heads per prediction ({report['settings']['runner']})"))
        report["figures"] = figures
        write_json(report, out / "report.json")
        if not quiet:
            console.print(f"wrote {out / 'report.json'} and {len(figures)} figures to {out}")
    return report


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``step-ros replay-eval``."""
    parser.add_argument("--bag", type=Path, required=True, help="rosbag2 folder (or a .mcap / .db3 file)")
    parser.add_argument("--manifest", type=Path, required=True, help="model manifest (YAML)")
    parser.add_argument("--out", type=Path, default=None, help="folder for report.json and figures")
    parser.add_argument("--image-topic", default=None, help="image topic (default: auto-detect)")
    parser.add_argument("--ground-truth-topic", default=None, help=f"default {GROUND_TRUTH_TOPIC}")
    parser.add_argument("--stride", type=int, default=1, help="predict every n-th sampled frame (node parameter)")
    parser.add_argument("--alpha", type=float, default=1.0, help="smoothing weight of the newest prediction (1 = none)")
    parser.add_argument("--threshold", type=float, default=0.5, help="confidence threshold")
    parser.add_argument("--stable-count", type=int, default=3)
    parser.add_argument("--max-gap", type=float, default=None, dest="max_gap_s",
                        help="window reset gap between sampled frames, s (default: the node's)")
    parser.add_argument("--min-frames", type=int, default=None,
                        help="predict from this many frames on (default: complete windows only)")
    parser.add_argument("--runner", choices=["fast", "reference"], default="fast",
                        help="heads: exact fast STEP engine (default) or the plain forward")
    parser.add_argument("--backend", default=None,
                        help="backbone inference backend (torch, onnxruntime, onnxruntime-int8, tensorrt)")
    parser.add_argument("--log-time", action="store_true", help="use the bag's receive time, not header.stamp")
    parser.add_argument("--save-probs", action="store_true", help="keep every class probability in report.json")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N: where heads and the torch "
                                                       "backbone run (default: cpu)")


def main(args: argparse.Namespace) -> int:
    report = replay_eval(
        args.bag, args.manifest, args.out, image_topic=args.image_topic, stride=args.stride, alpha=args.alpha,
        threshold=args.threshold, stable_count=args.stable_count, max_gap_s=args.max_gap_s,
        min_frames=args.min_frames, runner=args.runner, encode=args.backend,
        ground_truth_topic=args.ground_truth_topic, use_log_time=args.log_time, save_probs=args.save_probs,
        progress=not args.no_progress, device=args.device,
    )
    return 0 if report["num_predictions"] else 1
