"""``step-ros record``: an annotated video set -> a rosbag2 with camera frames and ground truth.

Every annotated segment (``load_annotations``: CSV or folder per class) is decoded and its
frames are written, in order, on one image topic, stamped at the video's frame rate; segments
follow each other with a ``gap_s`` second pause (longer than the node's reset gap, so no
window ever mixes two clips). After the last frame of each segment the bag gets

* on ``/ground_truth`` a ``step_ros/msg/HumanAction`` -- the message type the node publishes --
  holding the true labels (confidence 1, ``window_start`` = first frame stamp, ``header.stamp``
  = last frame stamp, ``sequence`` = segment index), and
* on ``/ground_truth/segment`` a ``std_msgs/msg/String`` with JSON saying where that segment
  came from (video, frame range, split, context, labels, stamps, fps).

See docs/BAGS.md for why. Pure ``rosbags``: no ROS install needed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..data.annotations import AnnotationError, Dataset, Sample, check_labels, load_annotations
from ..data.video import iter_frames, video_info
from ..model.manifest import Manifest, load_manifest
from .common import (
    COMPRESSED_TYPE,
    DEFAULT_IMAGE_TOPIC,
    GROUND_TRUTH_TOPIC,
    HUMAN_ACTION_TYPE,
    IMAGE_TYPE,
    SEGMENT_TOPIC,
    STORAGES,
    STRING_TYPE,
    header,
    msg_class,
    ns_to_seconds,
    ns_to_time,
    rgb_to_compressed,
    rgb_to_image,
    seconds_to_ns,
    typestore,
)

log = logging.getLogger(__name__)

__all__ = ["record", "DEFAULT_START_TIME", "DEFAULT_GAP_S", "SegmentInfo", "ground_truth_message",
           "add_arguments", "main"]

#: Header stamp of the first frame (seconds since the epoch): fixed, so the same input gives
#: the same bag. 2023-11-14T22:13:20Z; any value works, the node only looks at differences.
DEFAULT_START_TIME = 1_700_000_000.0
#: Pause between segments; must exceed the node's window reset gap (StreamingEngine.max_gap_s).
DEFAULT_GAP_S = 2.0


def node_reset_gap_s() -> float:
    """The window reset gap the node uses by default (StreamingEngine's ``max_gap_s``)."""
    import inspect

    from ..model.streaming import StreamingEngine

    return float(inspect.signature(StreamingEngine).parameters["max_gap_s"].default)


@dataclass
class SegmentInfo:
    """What ``/ground_truth/segment`` says about one segment (also the JSON written)."""

    segment: int
    video: str
    start_frame: int
    end_frame: int  # exclusive, the frames actually decoded
    num_frames: int
    fps: float
    split: str | None
    context: str | None
    labels: dict[str, str]
    window_start: float  # first frame stamp, s
    stamp: float  # last frame stamp, s
    window_start_ns: int
    stamp_ns: int

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=False)


def ground_truth_message(info: SegmentInfo, tasks: list[str], manifest: Manifest | None, frame_id: str) -> Any:
    """The ``HumanAction`` of one segment: its true labels, as the node would publish them."""
    ha_cls = msg_class(HUMAN_ACTION_TYPE)
    tp_cls = msg_class("step_ros/msg/TaskPrediction")
    ls_cls = msg_class("step_ros/msg/LabelScore")
    no_class = int(tp_cls.NO_CLASS)
    preds = []
    for task in tasks:
        label = info.labels[task]
        index, counterpart = no_class, ""
        if manifest is not None and task in manifest.tasks:
            spec = manifest.head(task)
            index = spec.index(label)
            counterpart = spec.counterpart(label) or ""
        preds.append(tp_cls(
            task=task, label=label, class_index=index, confidence=1.0, confidence_threshold=1.0,
            confident=True, stable=True, symmetric_counterpart=counterpart,
            top_k=[ls_cls(label=label, class_index=index, score=1.0)],
        ))
    return ha_cls(
        header=header(info.stamp_ns, frame_id), window_start=ns_to_time(info.window_start_ns),
        frames_in_window=info.num_frames, frames_expected=info.num_frames, window_complete=True,
        sequence=info.segment, tasks=preds,
    )


def _segment_frames(sample: Sample):
    """Frames ``[start, end)`` of a sample, decoded one at a time."""
    for index, frame, _ in iter_frames(sample.video):
        if sample.end_frame is not None and index >= sample.end_frame:
            break
        if index >= sample.start_frame:
            yield index, frame


def _resolve_manifest(manifest: str | os.PathLike[str] | Manifest | None) -> Manifest | None:
    if manifest is None or isinstance(manifest, Manifest):
        return manifest
    return load_manifest(manifest)


def _storage_plugin(storage: str):
    from rosbags.rosbag2 import StoragePlugin

    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    return StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3


def _prepare_target(bag_path: Path, overwrite: bool) -> None:
    if bag_path.exists() or bag_path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{bag_path} exists already: record to another --out, or replace it with "
                                  f"--overwrite")
        if bag_path.is_dir() and (bag_path / "metadata.yaml").is_file():
            shutil.rmtree(bag_path)
        else:  # never delete something that does not look like a bag
            raise FileExistsError(f"{bag_path} exists and is not a rosbag2 folder; not overwriting it")


def record(
    annotations_path: str | os.PathLike[str],
    bag_path: str | os.PathLike[str],
    *,
    storage: str = "mcap",
    image_topic: str = DEFAULT_IMAGE_TOPIC,
    compressed: bool = False,
    fps: float | None = None,
    gap_s: float = DEFAULT_GAP_S,
    split: str | None = None,
    manifest: str | os.PathLike[str] | Manifest | None = None,
    progress: bool = True,
    context: str | None = None,
    task: str = "fine_action",
    frame_id: str = "camera",
    start_time: float = DEFAULT_START_TIME,
    jpeg_quality: int = 90,
    ground_truth_topic: str = GROUND_TRUTH_TOPIC,
    segment_topic: str = SEGMENT_TOPIC,
    overwrite: bool = False,
) -> Path:
    """Write the annotated segments of ``annotations_path`` to a new rosbag2 at ``bag_path``.

    ``storage``: ``"mcap"`` (ROS 2 default since Iron) or ``"sqlite3"``. ``compressed``:
    ``sensor_msgs/msg/CompressedImage`` jpeg (lossy, ``jpeg_quality``) instead of a lossless
    ``rgb8`` ``Image``; with the default topic the name becomes ``<topic>/compressed`` as
    ``image_transport`` does. ``fps``: stamp frames at this rate instead of each video's own.
    ``gap_s``: time between the last frame of one segment and the first of the next.
    ``split`` / ``context``: only those samples. ``manifest``: fills ``class_index`` and
    ``symmetric_counterpart`` of the ground truth and checks that every label is the
    manifest's. ``task``: the task name of a folder-per-class dataset.

    The bag is written under a temporary name and renamed when complete, so an interrupted
    run never leaves a half-written bag behind. Returns ``bag_path``.
    """
    from rosbags.rosbag2 import Writer, WriterError

    bag_path = Path(bag_path)
    plugin = _storage_plugin(storage)
    if gap_s < 0:
        raise ValueError(f"gap_s must be >= 0, got {gap_s}")
    if gap_s <= node_reset_gap_s():
        log.warning("gap_s=%.3g s is not above the node's default reset gap (%.3g s): windows will mix "
                    "the end of one segment with the start of the next", gap_s, node_reset_gap_s())
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if not 0 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [0, 100], got {jpeg_quality}")
    if compressed and image_topic == DEFAULT_IMAGE_TOPIC:
        image_topic = f"{DEFAULT_IMAGE_TOPIC}/compressed"
    if len({image_topic, ground_truth_topic, segment_topic}) != 3:
        raise ValueError("image, ground-truth and segment topics must be three different names")

    dataset: Dataset = load_annotations(annotations_path, task=task)
    if split is not None or context is not None:
        dataset = dataset.filter(split=split, context=context)
        if not len(dataset):
            raise AnnotationError(f"{annotations_path}: no samples with split={split!r} context={context!r}")
    man = _resolve_manifest(manifest)
    if man is not None:
        for t in dataset.tasks:
            if t in man.tasks:
                check_labels(dataset, t, man.head(t).labels)
        if not set(dataset.tasks) & set(man.tasks):
            log.warning("no annotation task (%s) is a task of the manifest (%s)", dataset.tasks, man.tasks)

    store = typestore()
    _prepare_target(bag_path, overwrite)
    bag_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = bag_path.parent / f".{bag_path.name}.partial"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir()
    tmp_bag = tmp_dir / bag_path.name
    msgtype = COMPRESSED_TYPE if compressed else IMAGE_TYPE
    str_cls = msg_class(STRING_TYPE)
    fps_cache: dict[Path, float] = {}
    started = time.perf_counter()
    total_frames = 0
    next_ns = seconds_to_ns(start_time)
    try:
        writer = Writer(tmp_bag, version=9, storage_plugin=plugin)
        writer.set_custom_data("step_ros.record", json.dumps({
            "annotations": str(Path(annotations_path).resolve()), "image_topic": image_topic,
            "compressed": compressed, "gap_s": gap_s, "fps": fps, "split": split, "context": context,
            "ground_truth_topic": ground_truth_topic, "segment_topic": segment_topic,
            "manifest": None if man is None or man.path is None else str(Path(man.path).resolve()),
        }))
        with writer:
            img_conn = writer.add_connection(image_topic, msgtype, typestore=store)
            gt_conn = writer.add_connection(ground_truth_topic, HUMAN_ACTION_TYPE, typestore=store)
            seg_conn = writer.add_connection(segment_topic, STRING_TYPE, typestore=store)
            bar = tqdm(total=len(dataset), desc=f"recording {bag_path.name}", unit="segment", disable=not progress)
            with bar:
                for seg_index, sample in enumerate(dataset):
                    if fps is not None:
                        seg_fps = float(fps)
                    else:
                        if sample.video not in fps_cache:
                            fps_cache[sample.video] = video_info(sample.video).fps
                        seg_fps = fps_cache[sample.video]
                        if not seg_fps > 0:
                            raise ValueError(f"{sample.video}: the video does not say its frame rate; pass fps")
                    first_ns = last_ns = next_ns
                    first_index = last_index = None
                    count = 0
                    for index, frame in _segment_frames(sample):
                        stamp_ns = first_ns + int(round(count * 1e9 / seg_fps))
                        if compressed:
                            msg = rgb_to_compressed(frame, stamp_ns, frame_id, quality=jpeg_quality)
                        else:
                            msg = rgb_to_image(frame, stamp_ns, frame_id)
                        writer.write(img_conn, stamp_ns, store.serialize_cdr(msg, msgtype))
                        first_index = index if first_index is None else first_index
                        last_index, last_ns = index, stamp_ns
                        count += 1
                    if count == 0:
                        raise AnnotationError(f"{sample.origin or sample.video}: segment [{sample.start_frame}, "
                                              f"{sample.end_frame}) has no frames in {sample.video}")
                    total_frames += count
                    info = SegmentInfo(
                        segment=seg_index, video=str(sample.video), start_frame=int(first_index),
                        end_frame=int(last_index) + 1, num_frames=count, fps=seg_fps, split=sample.split,
                        context=sample.context, labels=dict(sample.labels),
                        window_start=ns_to_seconds(first_ns), stamp=ns_to_seconds(last_ns),
                        window_start_ns=first_ns, stamp_ns=last_ns,
                    )
                    gt = ground_truth_message(info, dataset.tasks, man, frame_id)
                    writer.write(gt_conn, last_ns, store.serialize_cdr(gt, HUMAN_ACTION_TYPE))
                    writer.write(seg_conn, last_ns, store.serialize_cdr(str_cls(data=info.to_json()), STRING_TYPE))
                    next_ns = last_ns + seconds_to_ns(gap_s)
                    bar.update()
        os.replace(tmp_bag, bag_path)
    except WriterError as exc:
        raise RuntimeError(f"cannot write bag {bag_path}: {exc}") from exc
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    elapsed = time.perf_counter() - started
    log.info("wrote %s: %d segments, %d frames on %s (%s), %.1f s", bag_path, len(dataset), total_frames,
             image_topic, storage, elapsed)
    return bag_path


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``step-ros record``."""
    parser.add_argument("--data", type=Path, required=True,
                        help="annotation CSV or folder-per-class root (docs/DATA_FORMAT.md)")
    parser.add_argument("--out", type=Path, required=True, help="bag to create (a folder)")
    parser.add_argument("--storage", choices=list(STORAGES), default="mcap", help="rosbag2 storage (default mcap)")
    parser.add_argument("--image-topic", default=DEFAULT_IMAGE_TOPIC,
                        help="image topic (default %(default)s; with --compressed <topic>/compressed)")
    parser.add_argument("--compressed", action="store_true",
                        help="write sensor_msgs/CompressedImage jpeg (lossy) instead of rgb8 Image")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--fps", type=float, default=None, help="stamp frames at this rate (default: the video's)")
    parser.add_argument("--gap", type=float, default=DEFAULT_GAP_S, dest="gap_s",
                        help="seconds between segments (default %(default)s; keep it above the node's "
                             "window reset gap)")
    parser.add_argument("--split", default=None, help="only samples of this split (e.g. test)")
    parser.add_argument("--context", default=None, help="only samples of this context")
    parser.add_argument("--manifest", type=Path, default=None,
                        help="model manifest: fills class indices and checks the labels")
    parser.add_argument("--task", default="fine_action", help="task name for a folder-per-class dataset")
    parser.add_argument("--start-time", type=float, default=DEFAULT_START_TIME,
                        help="header stamp of the first frame, s since the epoch")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bag at --out")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    path = record(
        args.data, args.out, storage=args.storage, image_topic=args.image_topic, compressed=args.compressed,
        fps=args.fps, gap_s=args.gap_s, split=args.split, manifest=args.manifest, progress=not args.no_progress,
        context=args.context, task=args.task, start_time=args.start_time, jpeg_quality=args.jpeg_quality,
        overwrite=args.overwrite,
    )
    print(f"wrote {path}")
    return 0
