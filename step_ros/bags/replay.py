"""``step-ros replay-eval``: run the node's pipeline over a bag, as fast as possible, and score it.

No ROS is involved: the bag (ROS 2 MCAP or sqlite3, or ROS 1, whoever wrote it) is read with
``rosbags``; images are checked and converted by the node's own code
(:mod:`step_ros.ros.conversions`), sampled by the node's
:class:`~step_ros.model.streaming.WindowSchedule` and smoothed by its
:class:`~step_ros.model.streaming.PredictionSmoother`.  Two pipelines compute the same
predictions:

- ``batched`` (default): a reader thread decodes ahead (only the sampled frames), the backbone
  runs on batches of sampled frames and the heads on batches of due windows
  (:class:`~step_ros.model.batched.BatchedEngine`);
- ``stream``: the live :class:`~step_ros.model.streaming.StreamingEngine`, one frame at a time,
  which also measures the compute latency per prediction a robot would see.

Ground truth comes from the project's ``/ground_truth`` topic, label topics or annotation files
(:mod:`step_ros.bags.truth`); the metrics are those a planner needs (:mod:`step_ros.bags.metrics`).
Any other ``step_ros/msg/HumanAction`` topic in the bag (a live ``/human_action`` recording of
the node) is scored against the same truth, in ``report["recorded"]``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..model.fast_kernels import BLOCK_DTYPES, KERNELS
from ..model.manifest import HeadSpec, Manifest, load_manifest
from ..model.streaming import SAMPLING_MODES, PredictionSmoother, ReferenceRunner, StreamingEngine, sampling_period
from ..ros import conversions
from .common import (
    GROUND_TRUTH_TOPIC,
    HUMAN_ACTION_TYPE,
    IMAGE_TYPE,
    IMAGE_TYPES,
    SEGMENT_TOPIC,
    BagError,
    BagReader,
    iter_messages,
    ns_to_seconds,
    open_bag,
    time_to_seconds,
)
from .metrics import Record, score
from .truth import (
    TIME_BASES,
    Truth,
    TruthError,
    TruthSources,
    from_annotation_file,
    from_label_topic,
    from_project_topic,
    parse_mapping,
)

log = logging.getLogger(__name__)

__all__ = ["replay_eval", "find_image_topic", "load_truth", "plot_timeline", "PIPELINES", "RUNNERS", "add_arguments",
           "main"]

PIPELINES = ("batched", "stream")
_PREFETCH = 64


# --------------------------------------------------------------------------- bag contents


def find_image_topic(topics: dict[str, tuple[str | None, int]], bag: str, requested: str | None) -> tuple[str, str]:
    """``(topic, msgtype)`` of the image topic: ``requested`` (checked), or the only one.

    With several Image / CompressedImage topics and none named, it is an error listing them:
    guessing which camera to evaluate would score the wrong one silently.
    """
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
    if len(images) > 1:
        raise BagError(f"bag {bag} has {len(images)} image topics ({', '.join(sorted(images))}); choose one with "
                       f"--image-topic")
    topic = next(iter(images))
    return topic, images[topic][0]


def _topic_table(reader: BagReader) -> dict[str, tuple[str | None, int]]:
    return {t: (info.msgtype, info.msgcount) for t, info in reader.topics.items()}


def _first_stamp(reader: BagReader, topic: str, use_log_time: bool) -> float | None:
    """Stamp of the topic's first message: the zero of relative annotation times."""
    conns = [c for c in reader.connections if c.topic == topic]
    for conn, log_ns, raw in iter_messages(reader, reader.path, conns):
        if use_log_time:
            return ns_to_seconds(log_ns)
        try:
            return time_to_seconds(reader.deserialize(raw, conn.msgtype).header.stamp)
        except Exception:  # noqa: BLE001 - an undecodable first image: the next one
            continue
    return None


def _action_record(msg: Any) -> Record:
    """A recorded HumanAction as a prediction: the label, or its best guess top_k[0] if not confident."""
    labels, conf, confident, stable, top = {}, {}, {}, {}, {}
    for tp in msg.tasks:
        best = tp.label or (tp.top_k[0].label if len(tp.top_k) else "")
        labels[tp.task] = best
        conf[tp.task] = float(tp.confidence)
        confident[tp.task] = bool(tp.confident)
        stable[tp.task] = bool(tp.stable)
        top[tp.task] = [(str(s.label), round(float(s.score), 6)) for s in tp.top_k]
    return Record(stamp=time_to_seconds(msg.header.stamp), window_start=time_to_seconds(msg.window_start),
                  complete=bool(msg.window_complete), labels=labels, confidence=conf, confident=confident,
                  stable=stable, top_k=top)


def _recorded_actions(reader: BagReader, exclude: set[str]) -> dict[str, list[Record]]:
    """Every HumanAction topic that is not ground truth: a node's recorded output."""
    conns = [c for c in reader.connections if c.msgtype == HUMAN_ACTION_TYPE and c.topic not in exclude]
    out: dict[str, list[Record]] = {}
    for conn, _, msg in reader.decoded(conns):
        out.setdefault(conn.topic, []).append(_action_record(msg))
    return out


def load_truth(reader: BagReader, manifest: Manifest, t0: float, sources: TruthSources | None = None) -> Truth:
    """The bag's ground truth from ``sources`` (default: its ``/ground_truth`` topic, if any).

    A task may have one source only; the truth is checked against the manifest and the bag
    before anything runs (:meth:`Truth.check`).  ``t0``: the first image's stamp, the zero of
    relative annotation times.
    """
    sources = sources or TruthSources()
    topics = _topic_table(reader)
    tasks = manifest.tasks
    found: list[tuple[str, list]] = []
    named = list(sources.topics)
    if not named and sources.annotations is None and GROUND_TRUTH_TOPIC in topics:
        named = [GROUND_TRUTH_TOPIC]
    for item in named:
        topic, _, task = str(item).partition("=")
        if topic not in topics:
            raise BagError(f"bag {reader.path} has no truth topic {topic!r}; its topics: {', '.join(sorted(topics))}")
        msgtype = topics[topic][0]
        if msgtype == HUMAN_ACTION_TYPE:
            found.append((f"topic {topic} (HumanAction segments)", from_project_topic(reader, topic, SEGMENT_TOPIC)))
            continue
        if not task:
            if len(tasks) != 1:
                raise TruthError(f"--truth-topic {topic}: name the task it labels, {topic}=TASK "
                                 f"(tasks: {', '.join(tasks)})")
            task = tasks[0]
        if task not in tasks:
            raise TruthError(f"--truth-topic {item}: {task!r} is not a task of the manifest ({', '.join(tasks)})")
        found.append((f"topic {topic} ({msgtype}, field {sources.label_field}) -> {task}",
                      from_label_topic(reader, topic, task, sources.label_field, sources.end_markers)))
    if sources.annotations is not None:
        found.append((f"file {sources.annotations} ({sources.annotation_time} time)", from_annotation_file(
            sources.annotations, tasks, t0, sources.annotation_time, parse_mapping(sources.task_map, "--task-map"))))
    owner: dict[str, str] = {}
    for name, ivs in found:
        for task in {iv.task for iv in ivs}:
            if owner.setdefault(task, name) != name:
                raise TruthError(f"task {task!r} has ground truth from two sources: {owner[task]} and {name}")
    relabel = parse_mapping(sources.label_map, "--label-map")
    ignore = set(sources.ignore_labels)
    intervals = []
    for _, ivs in found:
        for iv in ivs:
            iv.label = relabel.get(iv.label, iv.label)
            if iv.label not in ignore:
                intervals.append(iv)
    truth = Truth(intervals, [name for name, _ in found])
    truth.check(manifest, ns_to_seconds(reader.start_time), ns_to_seconds(reader.end_time))
    return truth


# --------------------------------------------------------------------------- frames


def _frames(bag_path: Path, topic: str, stop: threading.Event, use_log_time: bool,
            offer: Callable[[float], int]) -> Iterator[tuple[str, float | None, Any, int]]:
    """The node's intake, in bag order: ``("sampled", stamp, rgb, slots)``, ``("skipped", stamp,
    None, 0)`` (a valid frame the sampling passes over: never converted) or ``("invalid", stamp,
    reason, 0)``.

    As in the node's callback, the cheap header checks come first and only valid frames are
    offered to the sampler; a sampled frame whose pixels then fail to decode is counted invalid.
    """
    with open_bag(bag_path) as reader:
        conns = [c for c in reader.connections if c.topic == topic]
        for conn, log_ns, raw in iter_messages(reader, bag_path, conns):
            if stop.is_set():
                return
            try:
                msg = reader.deserialize(raw, conn.msgtype)
            except Exception as exc:  # noqa: BLE001 - corrupt payload
                yield "invalid", None, f"undeserializable {conn.msgtype} ({type(exc).__name__})", 0
                continue
            stamp = ns_to_seconds(log_ns) if use_log_time else time_to_seconds(msg.header.stamp)
            try:
                if conn.msgtype == IMAGE_TYPE:
                    conversions.validate_image(msg)
                else:
                    conversions.validate_compressed(msg)
                slots = offer(stamp)
                if not slots:
                    yield "skipped", stamp, None, 0
                    continue
                yield "sampled", stamp, conversions.msg_to_rgb(msg), slots
            except conversions.ImageError as exc:
                yield "invalid", stamp, f"{exc.reason}: {exc}", 0


def _prefetch(make: Callable[[threading.Event], Iterator[Any]], size: int = _PREFETCH) -> Iterator[Any]:
    """Run a generator in a thread (reading + decoding overlaps the model's compute)."""
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

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
            q.put(("end", None))
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


def _latency(ms: list[float]) -> dict:
    if not ms:
        return {"n": 0, "median_ms": None, "p95_ms": None, "max_ms": None, "mean_ms": None}
    a = np.asarray(ms)
    return {"n": int(a.size), "median_ms": round(float(np.median(a)), 3),
            "p95_ms": round(float(np.percentile(a, 95)), 3), "max_ms": round(float(a.max()), 3),
            "mean_ms": round(float(a.mean()), 3)}


def _camera_rate(stamps: list[float], max_gap_s: float) -> float | None:
    """Frames per second from the median step between consecutive valid frames (gaps excluded)."""
    d = np.diff(np.asarray(stamps, dtype=np.float64))
    d = d[(d > 0) & (d <= max_gap_s)]
    return float(1.0 / np.median(d)) if d.size else None


# --------------------------------------------------------------------------- figures


def plot_timeline(spec: HeadSpec, records: list[dict], truth: Truth, path: str | Path, t0: float, t_end: float,
                  title: str = "", row_s: float = 60.0, rows_per_page: int = 4) -> list[Path]:
    """True label (grey bars) against every prediction (green right, red wrong, blue unlabelled
    time; faded when the window spans two actions, which window accuracy does not score) of one
    task over bag time, ``row_s`` seconds per row, ``rows_per_page`` rows per PNG
    (``timeline_<task>.png``, then ``_2``, ``_3``... for long bags).  Nearly symmetric classes
    are shaded and named in orange."""
    from ..figures import plt, save_figure

    task = spec.task
    ivs = truth.by_task.get(task, [])
    labels = list(spec.labels) + sorted({iv.label for iv in ivs} - set(spec.labels))
    row = {lab: i for i, lab in enumerate(labels)}
    duration = max(t_end - t0, 1e-3)
    n_rows = max(1, math.ceil(duration / row_s))
    xs = np.array([r["stamp"] - t0 for r in records])
    ys = np.array([row.get(r["tasks"][task]["label"], -1) for r in records]) if records else np.zeros(0)
    true = [r["tasks"][task].get("true") for r in records]
    ok = np.array([t is not None and r["tasks"][task]["label"] == t for r, t in zip(records, true)], dtype=bool)
    bad = np.array([t is not None and r["tasks"][task]["label"] != t for r, t in zip(records, true)], dtype=bool)
    scored = np.array([bool(r["tasks"][task].get("scored")) for r in records], dtype=bool)
    base = Path(path)
    paths = []
    for page, first in enumerate(range(0, n_rows, rows_per_page)):
        rows = list(range(first, min(n_rows, first + rows_per_page)))
        fig, axes = plt.subplots(len(rows), 1, squeeze=False,
                                 figsize=(14, len(rows) * max(1.6, 0.2 * len(labels) + 0.9) + 0.6))
        for ax, r in zip(axes[:, 0], rows):
            lo, hi = r * row_s, (r + 1) * row_s
            for lab in spec.symmetric_labels:
                ax.axhspan(row[lab] - 0.5, row[lab] + 0.5, color="orange", alpha=0.12, lw=0)
            for iv in ivs:
                a, b = iv.start - t0, min(iv.end, t_end) - t0
                if b >= lo and a <= hi:
                    ax.plot([max(a, lo), min(b, hi)], [row[iv.label]] * 2, color="0.35", lw=6, alpha=0.45,
                            solid_capstyle="butt")
            sel = (xs >= lo) & (xs < hi)
            for mask, colour in ((ok, "tab:green"), (bad, "tab:red"), (~ok & ~bad, "tab:blue")):
                for in_one, alpha in ((scored, 1.0), (~scored, 0.3)):
                    m = sel & mask & in_one
                    if m.any():
                        ax.scatter(xs[m], ys[m], s=9, color=colour, alpha=alpha, zorder=3, lw=0)
            ax.set_xlim(lo, hi)
            ax.set_ylim(-0.7, len(labels) - 0.3)
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            for tick, lab in zip(ax.get_yticklabels(), labels):
                if lab in spec.symmetric_labels:
                    tick.set_color("darkorange")
            ax.tick_params(axis="x", labelsize=8)
            ax.grid(axis="x", alpha=0.25)
        axes[-1, 0].set_xlabel("bag time (s since the first image)")
        handles = [plt.Line2D([], [], color="0.35", lw=6, alpha=0.45, label="true label"),
                   plt.Line2D([], [], marker="o", ls="", color="tab:green", label="predicted, right"),
                   plt.Line2D([], [], marker="o", ls="", color="tab:red", label="predicted, wrong"),
                   plt.Line2D([], [], marker="o", ls="", color="tab:blue", label="predicted, unlabelled time"),
                   plt.Line2D([], [], marker="o", ls="", color="tab:red", alpha=0.3,
                              label="faded: window spans two actions (not scored)")]
        axes[0, 0].legend(handles=handles, fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=5,
                          frameon=False)
        pages = math.ceil(n_rows / rows_per_page)
        suffix = f" (page {page + 1} of {pages})" if pages > 1 else ""
        fig.suptitle((title or f"{task}: predicted vs true label") + suffix, fontsize=9)
        out = base if page == 0 else base.with_name(f"{base.stem}_{page + 1}{base.suffix}")
        paths.append(save_figure(fig, out))
    return paths


# --------------------------------------------------------------------------- main entry


#: Above this many tokens per window the batched plain forward (attention over all T x m tokens
#: of every window) costs more than the exact streaming engine's per-frame blocks.
INDEXED_MAX_TOKENS = 1024
RUNNERS = ("auto", "fast", "reference", "indexed")


def _choose_runner(runner: Any, pipeline: str, model: Any) -> Any:
    """``auto``: the stream pipeline runs the exact fast engine; the batched one runs every due
    window in batches (``StepHead.forward_indexed``) while a window holds at most
    :data:`INDEXED_MAX_TOKENS` tokens (the demo's 16 x 16), else the fast engine per frame."""
    if runner not in (None, "auto"):
        return runner
    if pipeline == "stream":
        return "fast" if runner == "auto" else "reference"
    tokens = model.manifest.frames * (model.backbone.num_patches + 1)
    return "indexed" if tokens <= INDEXED_MAX_TOKENS else "fast"


def _make_runner(runner: Any, model: Any, head_kernels: str = "auto", head_block_dtype: str = "float32") -> Any:
    if runner is None or runner == "reference":
        return ReferenceRunner(model)
    if runner == "fast":
        from ..model.fast_step import FastStepRunner

        return FastStepRunner(model, kernels=head_kernels, block_dtype=head_block_dtype)
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


def _write_predictions_csv(rows: list[dict], tasks: list[str], path: Path) -> None:
    header = ["stamp", "t", "window_start", "complete"]
    for task in tasks:
        header += [task, f"{task}_confidence", f"{task}_confident", f"{task}_stable", f"{task}_true",
                   f"{task}_scored"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            line = [f"{r['stamp']:.9f}", f"{r['t']:.6f}", f"{r['window_start']:.9f}", int(r["complete"])]
            for task in tasks:
                e = r["tasks"].get(task)
                line += ["", "", "", "", "", ""] if e is None else [
                    e["label"], f"{e['confidence']:.6f}", int(e["confident"]), int(e["stable"]), e["true"] or "",
                    int(e["scored"])]
            w.writerow(line)


def replay_eval(
    bag_path: str | os.PathLike[str],
    manifest_path: str | os.PathLike[str] | Manifest,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    image_topic: str | None = None,
    pipeline: str = "batched",
    batch_size: int = 32,
    sampling: str = "auto",
    stride: int = 1,
    alpha: float = 1.0,
    threshold: float = 0.5,
    stable_count: int = 3,
    max_gap_s: float | None = None,
    min_frames: int | None = None,
    top_k: int = 3,
    runner: Any = "auto",
    head_kernels: str = "auto",
    head_block_dtype: str = "float32",
    encode: Any = None,
    model: Any = None,
    truth: TruthSources | None = None,
    ground_truth_topic: str | None = None,
    use_log_time: bool = False,
    save_probs: bool = False,
    timeline_row_s: float = 60.0,
    progress: bool = True,
    quiet: bool = False,
    device: str | None = None,
) -> dict:
    """Replay ``bag_path`` through the node's pipeline for the model of ``manifest_path``; score it.

    ``pipeline``: ``batched`` (decode ahead, backbone and heads in batches of ``batch_size``) or
    ``stream`` (the live engine frame by frame; measures compute latency per prediction); both
    give the same predictions.  ``runner``: the heads, ``"auto"`` (see :func:`_choose_runner`),
    ``"fast"``, ``"reference"``, ``"indexed"`` (batched only) or a HeadRunner.  ``head_kernels``:
    who runs the fast engine's kernels or the indexed batches, ``auto``, ``torch`` or
    ``onnxruntime`` (same numbers to float32 rounding); ``head_block_dtype``: the fast engine's
    block storage, ``float32`` or ``bfloat16`` (the node's parameter).  ``image_topic``: needed when the bag has several image topics.
    ``stride``, ``max_gap_s``, ``min_frames``, ``top_k``, ``alpha``, ``threshold``,
    ``stable_count``: the node's parameters.  ``encode``: ``None`` (torch backbone), an inference
    backend name or a callable frame -> tokens.  ``model``: an already built MultiTaskModel.

    ``truth``: where the ground truth comes from (:class:`~step_ros.bags.truth.TruthSources`;
    default the bag's ``/ground_truth``); ``ground_truth_topic`` is the old name of one truth
    topic.  ``use_log_time``: stamp frames with
    the bag's receive time instead of ``header.stamp``.  ``save_probs``: keep every class
    probability.  ``device``: where heads and the torch backbone run.

    Undecodable images are skipped and counted; a bag without any decodable image on the topic,
    a missing topic or a corrupt bag raise :class:`BagError`, unusable truth
    :class:`~step_ros.bags.truth.TruthError`; both before anything is written.  With ``out_dir``
    writes ``report.json``, ``predictions.csv``, ``timeline_<task>.png`` and (stream) ``latency.png``.
    """
    from ..console import console, pct, print_table, write_json
    from ..figures import plot_histogram
    from ..model.multitask import MultiTaskModel

    bag_path = Path(bag_path)
    manifest = manifest_path if isinstance(manifest_path, Manifest) else load_manifest(manifest_path)
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {', '.join(PIPELINES)}, got {pipeline!r}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    sources = truth or TruthSources()
    if ground_truth_topic is not None:
        sources = replace(sources, topics=[*sources.topics, ground_truth_topic])

    # -- what is in the bag, and the truth (fails early, before loading a model)
    with open_bag(bag_path) as reader:
        topics = _topic_table(reader)
        topic, msgtype = find_image_topic(topics, str(bag_path), image_topic)
        first = _first_stamp(reader, topic, use_log_time)
        t0_truth = first if first is not None else ns_to_seconds(reader.start_time)
        if model is not None:
            manifest = getattr(model, "manifest", None) or manifest
        truth = load_truth(reader, manifest, t0_truth, sources)
        truth_topic_names = {str(t).partition("=")[0] for t in sources.topics}
        if not sources.topics and sources.annotations is None and GROUND_TRUTH_TOPIC in topics:
            truth_topic_names.add(GROUND_TRUTH_TOPIC)
        recorded = _recorded_actions(reader, truth_topic_names)
    if not truth:
        log.warning("bag %s: no ground truth (no %s topic, no --truth-topic, no --annotations): replaying "
                    "without accuracy", bag_path, GROUND_TRUTH_TOPIC)

    # -- the node's pipeline
    if model is None:
        model = MultiTaskModel.from_manifest(manifest)
    model.eval()
    if device is not None:
        from ..model.device import resolve_device

        device = resolve_device(device)
        model.to(device)
    engine_kwargs: dict[str, Any] = {} if max_gap_s is None else {"max_gap_s": max_gap_s}
    engine_kwargs["sample_period_s"] = sampling_period(manifest, sampling)
    encoder = _make_encode(encode, model, device)
    runner = _choose_runner(runner, pipeline, model)
    if pipeline == "batched":
        from ..model.batched import BatchedEngine

        runner_obj = None if runner == "indexed" else _make_runner(runner, model, head_kernels, head_block_dtype)
        engine: Any = BatchedEngine(model, stride=stride, min_frames=min_frames, top_k=top_k, encode=encoder,
                                    runner=runner_obj, batch_size=batch_size, head_kernels=head_kernels,
                                    **engine_kwargs)
    else:
        if runner == "indexed":
            raise ValueError("runner 'indexed' computes windows in batches: it needs pipeline='batched'")
        runner_obj = _make_runner(runner, model, head_kernels, head_block_dtype)
        engine = StreamingEngine(model, stride=stride, min_frames=min_frames, top_k=top_k, runner=runner_obj,
                                 encode=encoder, **engine_kwargs)
    runner_name = "indexed batches" if runner_obj is None else type(runner_obj).__name__
    smoother = PredictionSmoother(manifest, alpha=alpha, threshold=threshold, stable_count=stable_count, top_k=top_k)

    records: list[Record] = []
    invalid: Counter = Counter()
    sizes: Counter = Counter()
    valid_stamps: list[float] = []
    sampled_stamps: list[float] = []
    resets_seen = 0

    def take(resets: int, pred: Any) -> None:
        nonlocal resets_seen
        if resets != resets_seen:  # the node resets its smoother with the window
            smoother.reset()
            resets_seen = resets
        smoothed = smoother.update(pred)
        records.append(Record(
            stamp=pred.stamp, window_start=pred.window_start, complete=pred.window_complete,
            labels={t: s.result.label for t, s in smoothed.items()},
            confidence={t: float(s.result.confidence) for t, s in smoothed.items()},
            confident={t: s.confident for t, s in smoothed.items()},
            stable={t: s.stable for t, s in smoothed.items()},
            probs={t: np.asarray(s.result.probs, dtype=np.float64) for t, s in smoothed.items()},
            top_k={t: [(lab, round(float(p), 6)) for _, lab, p in s.result.top_k] for t, s in smoothed.items()},
            compute_ms=pred.compute_s * 1e3 if pipeline == "stream" else None,
        ))

    started = time.perf_counter()
    frames_iter = _prefetch(lambda stop: _frames(bag_path, topic, stop, use_log_time, engine.offer))
    with tqdm(total=topics[topic][1], desc=f"replay {bag_path.name}", unit="frame", disable=not progress) as bar:
        for kind, stamp, payload, slots in frames_iter:
            bar.update()
            if kind == "invalid":
                if not invalid:
                    log.warning("bag %s, topic %s: skipping an undecodable image: %s", bag_path, topic, payload)
                invalid[payload] += 1
                continue
            valid_stamps.append(stamp)
            if kind == "skipped":
                continue
            sampled_stamps.append(stamp)
            sizes[f"{payload.shape[1]}x{payload.shape[0]}"] += 1
            if pipeline == "batched":
                for resets, pred in engine.add(payload, stamp, slots):
                    take(resets, pred)
            else:
                pred = engine.process(payload, stamp, slots=slots)
                if pred is not None:
                    take(sum(engine.stats.resets.values()), pred)
        if pipeline == "batched":
            for resets, pred in engine.flush():
                take(resets, pred)
    wall_s = time.perf_counter() - started
    if not valid_stamps:
        why = "; ".join(f"{n} x {r}" for r, n in invalid.most_common(3)) or "no messages"
        raise BagError(f"bag {bag_path}, topic {topic}: no decodable image ({why})")

    # -- scoring
    t0 = valid_stamps[0]
    t_end = max(valid_stamps)
    first_task = truth.tasks[0] if truth else None
    pred_rows = []
    for r in records:
        row: dict[str, Any] = {"stamp": round(r.stamp, 9), "window_start": round(r.window_start, 9),
                               "t": round(r.stamp - t0, 6), "complete": r.complete,
                               "compute_ms": None if r.compute_ms is None else round(r.compute_ms, 3)}
        here = truth.at(first_task, r.stamp) if first_task else None
        if here is not None and "segment" in here.meta:
            row["segment"] = here.meta["segment"]
            if here.meta.get("fps") and here.meta.get("start_frame") is not None:
                row["video_frame"] = int(here.meta["start_frame"] + round((r.stamp - here.start) * here.meta["fps"]))
        row["tasks"] = {}
        for task in r.labels:
            now = truth.at(task, r.stamp)
            entry = {"label": r.labels[task], "confidence": round(r.confidence[task], 6),
                     "confident": r.confident[task], "stable": r.stable.get(task, False),
                     "true": None if now is None else now.label,
                     "scored": r.complete and truth.window(task, r.window_start, r.stamp) is not None,
                     "top_k": r.top_k.get(task, [])}
            if save_probs:
                entry["probs"] = [float(x) for x in r.probs[task]]
            row["tasks"][task] = entry
        pred_rows.append(row)
    matched = sum(any(e["scored"] for e in row["tasks"].values()) for row in pred_rows)

    stats = engine.stats
    rate = _camera_rate(valid_stamps, engine.max_gap_s)
    k, frames = engine.frame_interval, manifest.frames
    period = engine.sample_period_s if engine.sample_period_s is not None else (None if rate is None else k / rate)
    measured = _camera_rate(sampled_stamps, engine.max_gap_s)
    latency_model = {
        "frames": frames, "frame_interval": k, "sampling": engine.schedule.mode, "stride": stride,
        "stable_count": stable_count, "threshold": threshold, "alpha": alpha,
        "camera_rate_hz": None if rate is None else round(rate, 3),
        "sample_period_s": None if period is None else round(period, 4),
        "sampled_period_measured_s": None if measured is None else round(1.0 / measured, 4),
        "repeated_slots": int(stats.repeated),
        "window_span_s": None if period is None else round((frames - 1) * period, 4),
        "prediction_period_s": None if period is None else round(stride * period, 4),
        "earliest_after_reset_s": None if period is None else round(
            ((frames - 1) + (stable_count - 1) * stride) * period, 4),
    }
    intervals = {}
    for task, ivs in truth.by_task.items():
        scored_ids = {id(iv) for r in records if r.complete and task in r.labels
                      and (iv := truth.window(task, r.window_start, r.stamp)) is not None}
        intervals[task] = {"total": len(ivs), "with_scored_windows": len(scored_ids),
                           "without_scored_windows": [iv.source for iv in ivs if id(iv) not in scored_ids][:50]}
    report: dict[str, Any] = {
        "bag": str(bag_path),
        "manifest": str(manifest.path) if manifest.path else manifest.name,
        "image_topic": topic,
        "image_type": msgtype,
        "truth": {"sources": truth.sources, "tasks": {t: len(v) for t, v in truth.by_task.items()},
                  "contexts": truth.contexts},
        "pipeline": pipeline,
        "settings": {"frames": frames, "frame_interval": k, "sampling": engine.schedule.mode,
                     "sample_period_s": engine.sample_period_s, "stride": stride, "alpha": alpha, "threshold": threshold,
                     "stable_count": stable_count, "max_gap_s": engine.max_gap_s, "min_frames": engine.min_frames,
                     "runner": runner_name, "head_kernels": engine.head_kernels if pipeline == "batched"
                     else getattr(runner_obj, "kernels", "none"),
                     "head_block_dtype": getattr(runner_obj, "block_dtype", None),
                     "batch_size": batch_size if pipeline == "batched" else None,
                     "encode": "torch" if encode is None else (encode if isinstance(encode, str)
                                                                else getattr(encode, "name", "custom")),
                     "stamps": "log_time" if use_log_time else "header"},
        "latency_model": latency_model,
        "frames": {"messages": sum(invalid.values()) + len(valid_stamps), "valid": len(valid_stamps),
                   "decoded": stats.frames_sampled, "undecodable": sum(invalid.values()),
                   "undecodable_reasons": dict(invalid), "sampled": stats.frames_sampled,
                   "backbone_passes": stats.backbone_passes, "sizes": dict(sizes)},
        "resets": {k_: int(v) for k_, v in stats.resets.items()},
        "num_predictions": len(records),
        "num_matched": matched,
        "num_unmatched": len(records) - matched,
        "num_incomplete": sum(not r.complete for r in records),
        "intervals": intervals,
        "contexts": truth.contexts,
        "tasks": score(records, manifest, truth),
        "tasks_without_ground_truth": [t for t in manifest.tasks if t not in truth.by_task],
        "latency": _latency([r.compute_ms for r in records if r.compute_ms is not None]),
        "timing": {"wall_s": round(wall_s, 3), "frames_per_s": round(len(valid_stamps) / wall_s, 2) if wall_s > 0 else None,
                   "predictions_per_s": round(len(records) / wall_s, 2) if wall_s > 0 else None},
        "recorded": {},
        "predictions": pred_rows,
    }
    if pipeline == "batched":
        report["timing"].update({"backbone_s": round(engine.times.backbone_s, 3),
                                 "heads_s": round(engine.times.heads_s, 3)})
    for rtopic, rlist in recorded.items():
        report["recorded"][rtopic] = {
            "num_messages": len(rlist),
            "num_matched": sum(any(truth.window(t, r.window_start, r.stamp) is not None for t in r.labels)
                               for r in rlist),
            "num_incomplete": sum(not r.complete for r in rlist),
            "tasks": score(rlist, manifest, truth),
        }

    if not quiet:
        _print_report(report, bag_path, console, pct, print_table)

    # -- files
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        figures: dict[str, Any] = {}
        for spec in manifest.heads:
            acc = report["tasks"].get(spec.task, {}).get("contexts", {}).get("all", {}).get("top1")
            title = (f"{spec.task}: predicted vs true label over bag time"
                     + (f" (window top-1 {pct(acc)} %)" if acc is not None else "")
                     + "; orange: nearly symmetric classes")
            pages = plot_timeline(spec, pred_rows, truth, out / f"timeline_{spec.task}.png", t0, t_end, title,
                                  row_s=timeline_row_s)
            figures[f"timeline_{spec.task}"] = [str(p) for p in pages] if len(pages) > 1 else str(pages[0])
        if report["latency"]["n"]:
            figures["latency"] = str(plot_histogram(
                {"compute per prediction": [r.compute_ms for r in records if r.compute_ms is not None]},
                out / "latency.png", f"replay {bag_path.name}: backbone + heads per prediction ({runner_name})"))
        _write_predictions_csv(pred_rows, manifest.tasks, out / "predictions.csv")
        report["figures"] = figures
        write_json(report, out / "report.json")
        if not quiet:
            console.print(f"wrote {out / 'report.json'}, predictions.csv and the figures to {out}")
    return report


def _fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _print_report(report: dict, bag_path: Path, console: Any, pct: Callable, print_table: Callable) -> None:
    for task, tr in report["tasks"].items():
        rows = [[ctx, pct(s["top1"]), pct(s["symmetric"]), pct(s["non_symmetric"]), pct(s["within_pair"]),
                 pct(s["counterpart_share"]), pct(s["confident_coverage"]), pct(s["confident_accuracy"]), s["n"]]
                for ctx, s in tr["contexts"].items()]
        print_table(f"replay {bag_path.name} - {task}: top-1 % per window",
                    ["context", "all", "nearly symmetric", "non-symmetric", "within pair", "names the twin",
                     "confident %", "acc. if confident", "windows"], rows)
        rows = []
        for ctx, s in tr["contexts"].items():
            rec, sw, seg = s["recognition"], s["switches"], s["segments"]
            rows.append([ctx, pct(seg["last_window"]), pct(seg["majority"]), _fmt_s(rec["median_s"]),
                         _fmt_s(rec["p95_s"]), f"{pct(rec['never_fraction'])} ({rec['never_recognised']}/{rec['actions']})",
                         _fmt_s(sw["per_min"]), _fmt_s(sw["confident_stable_per_min"])])
        print_table(f"replay {bag_path.name} - {task}: for planners",
                    ["context", "segment: last %", "majority %", "recognition median s", "p95 s", "never %",
                     "false switches/min", "confident+stable /min"], rows)
    for rtopic, rr in report["recorded"].items():
        for task, tr in rr["tasks"].items():
            s = tr["contexts"].get("all")
            if s:
                console.print(f"recorded {rtopic} {task}: top-1 {pct(s['top1'])} % "
                              f"(nearly symmetric {pct(s['symmetric'])}, n={s['n']})")
    lat, lm, fr = report["latency"], report["latency_model"], report["frames"]
    rows = [
        ["image topic", f"{report['image_topic']} [{report['image_type'].split('/')[-1]}]"],
        ["ground truth", "; ".join(report["truth"]["sources"]) or "none"],
        ["frames valid / undecodable", f"{fr['valid']} / {fr['undecodable']}"],
        ["backbone passes", fr["backbone_passes"]],
        ["predictions (scored / not)", f"{report['num_predictions']} ({report['num_matched']} / {report['num_unmatched']})"],
        ["window resets", ", ".join(f"{k} {v}" for k, v in report["resets"].items()) or "0"],
        ["latency model", f"camera {_fmt_s(lm['camera_rate_hz'])} Hz, {lm['frames']} samples every "
                          + (f"{lm['sample_period_s']:.3f} s (by time)" if lm["sampling"] == "time" and lm["sample_period_s"]
                             else f"{lm['frame_interval']} frames")
                          + f": window {_fmt_s(lm['window_span_s'])} s, earliest stable after a reset "
                          f"{_fmt_s(lm['earliest_after_reset_s'])} s"
                          + (f"; {lm['repeated_slots']} slots filled by a repeated frame (slow camera)"
                             if lm["repeated_slots"] else "")],
    ]
    if lat["n"]:
        rows.append(["compute per prediction ms (median / p95 / max)", f"{lat['median_ms']} / {lat['p95_ms']} / {lat['max_ms']}"])
    rows.append([f"replay speed ({report['pipeline']})",
                 f"{report['timing']['frames_per_s']} frames/s ({report['timing']['wall_s']:.1f} s)"])
    print_table(f"replay {bag_path.name}: pipeline", ["item", "value"], rows)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``step-ros replay-eval``."""
    parser.add_argument("--bag", type=Path, required=True,
                        help="rosbag2 folder, a .mcap / .db3 file, or a ROS 1 .bag")
    parser.add_argument("--manifest", type=Path, required=True, help="model manifest (YAML)")
    parser.add_argument("--out", type=Path, default=None, help="folder for report.json, predictions.csv, figures")
    parser.add_argument("--image-topic", default=None, help="image topic (needed when the bag has several)")
    truth = parser.add_argument_group("ground truth (docs/BAGS.md; default: the bag's /ground_truth topic)")
    truth.add_argument("--truth-topic", action="append", default=None, metavar="TOPIC[=TASK]",
                       help="a label topic (String or any type with a string field) labelling TASK, or a "
                            "HumanAction topic (all tasks); repeat for several tasks")
    truth.add_argument("--ground-truth-topic", default=None, help=argparse.SUPPRESS)  # the old name
    truth.add_argument("--truth-field", default="data", help="string field of a label topic's messages (path: a.b)")
    truth.add_argument("--truth-end", action="append", default=None, metavar="LABEL",
                       help="label that ends the current action without starting one (default: the empty string)")
    truth.add_argument("--annotations", type=Path, default=None,
                       help="annotation file: .csv / .json intervals (start, end, task columns) or ELAN .eaf")
    truth.add_argument("--annotation-time", choices=TIME_BASES, default="relative",
                       help="CSV/JSON times: seconds from the first image (relative) or bag time (bag)")
    truth.add_argument("--task-map", action="append", default=None, metavar="NAME=TASK",
                       help="annotation column / ELAN tier NAME labels TASK")
    truth.add_argument("--label-map", action="append", default=None, metavar="THEIRS=OURS",
                       help="rename a truth label to the manifest's")
    truth.add_argument("--ignore-label", action="append", default=[], metavar="LABEL",
                       help="truth label to treat as unlabelled time (e.g. idle, background)")
    node = parser.add_argument_group("the node's parameters")
    node.add_argument("--sampling", choices=("auto", *SAMPLING_MODES), default="auto",
                      help="time: sample by stamps every sample_period_s of the manifest (auto, when it has one); "
                           "frames: every frame_interval-th frame")
    node.add_argument("--stride", type=int, default=1, help="predict every n-th sampled frame")
    node.add_argument("--alpha", type=float, default=1.0, help="smoothing weight of the newest prediction (1 = none)")
    node.add_argument("--threshold", type=float, default=0.5, help="confidence threshold")
    node.add_argument("--stable-count", type=int, default=3)
    node.add_argument("--max-gap", type=float, default=None, dest="max_gap_s",
                      help="window reset gap between sampled frames, s (default: the node's)")
    node.add_argument("--min-frames", type=int, default=None,
                      help="predict from this many frames on (default: complete windows only)")
    run = parser.add_argument_group("how it runs")
    run.add_argument("--pipeline", choices=PIPELINES, default="batched",
                     help="batched: decode ahead, backbone and heads in batches (fast); stream: the live engine "
                          "frame by frame, measuring compute latency")
    run.add_argument("--batch-size", type=int, default=32)
    run.add_argument("--runner", choices=RUNNERS, default="auto",
                     help="heads: fast (exact streaming STEP engine), reference (plain forward per window), "
                          "indexed (batched pipeline: windows in batches, each frame projected once); auto: "
                          "fast, or indexed for small windows in the batched pipeline")
    run.add_argument("--head-kernels", choices=KERNELS, default="auto",
                     help="who runs the heads' heavy kernels (the fast engine's blocks, or the indexed batches): "
                          "onnxruntime (MLAS, CPU), torch (any device), native (the fast engine's compiled block "
                          "creation, CPU); auto: the fastest of those here, timed (the indexed batches: ONNX Runtime "
                          "on a CPU when installed)")
    run.add_argument("--head-block-dtype", choices=BLOCK_DTYPES, default="float32",
                     help="the fast engine's block storage: float32 (exact) or bfloat16 (half the memory, faster "
                          "on a CPU; every attention weight within 0.4 %% of the exact one)")
    run.add_argument("--backend", default=None,
                     help="backbone inference backend (torch, onnxruntime, onnxruntime-int8, tensorrt)")
    run.add_argument("--log-time", action="store_true", help="use the bag's receive time, not header.stamp")
    run.add_argument("--save-probs", action="store_true", help="keep every class probability in report.json")
    run.add_argument("--timeline-row", type=float, default=60.0, dest="timeline_row_s",
                     help="seconds of bag time per timeline row")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N: where heads and the torch "
                                                    "backbone run (default: cpu)")


def main(args: argparse.Namespace) -> int:
    report = replay_eval(
        args.bag, args.manifest, args.out, image_topic=args.image_topic, pipeline=args.pipeline, sampling=args.sampling,
        batch_size=args.batch_size, stride=args.stride, alpha=args.alpha, threshold=args.threshold,
        stable_count=args.stable_count, max_gap_s=args.max_gap_s, min_frames=args.min_frames, runner=args.runner,
        head_kernels=args.head_kernels, head_block_dtype=args.head_block_dtype,
        encode=args.backend, ground_truth_topic=args.ground_truth_topic, use_log_time=args.log_time,
        truth=TruthSources(topics=args.truth_topic or [], label_field=args.truth_field,
                           end_markers=tuple(args.truth_end) if args.truth_end else ("",),
                           annotations=args.annotations, annotation_time=args.annotation_time,
                           task_map=args.task_map, label_map=args.label_map, ignore_labels=args.ignore_label),
        save_probs=args.save_probs, timeline_row_s=args.timeline_row_s, progress=not args.no_progress,
        device=args.device,
    )
    return 0 if report["num_predictions"] else 1
