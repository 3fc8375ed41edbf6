"""What every bag tool shares: the typestore, image conversions, stamps, errors, safe reading.

Bags are read and written with the pure-Python ``rosbags`` library (no ROS install needed).
Its typestore holds the standard ROS 2 message types (the newest distribution rosbags knows,
Kilted or later) plus the project's own ``step_ros/msg/HumanAction``, ``TaskPrediction`` and
``LabelScore``, registered from the same ``msg/*.msg`` files rosidl builds the node's messages
from -- one definition, so a bag written here deserializes in ROS and the other way round.

Images cross this module as ``numpy`` ``(H, W, 3)`` ``uint8`` **RGB** (docs/ARCHITECTURE.md);
reading them back is the node's own code, :mod:`step_ros.ros.conversions` (ROS-free).
Time is kept in integer nanoseconds where it is written (no float drift over long bags) and
handed to the model as float seconds, as the node does.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import struct
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "BagReader",
    "ROS1_SUFFIX",
    "BagError",
    "COMPRESSED_TYPE",
    "DEFAULT_IMAGE_TOPIC",
    "GROUND_TRUTH_TOPIC",
    "HUMAN_ACTION_TYPE",
    "IMAGE_TYPE",
    "IMAGE_TYPES",
    "LABEL_SCORE_TYPE",
    "SEGMENT_TOPIC",
    "STORAGES",
    "STRING_TYPE",
    "TASK_PREDICTION_TYPE",
    "find_msg_dir",
    "typestore",
    "msg_class",
    "ns_to_seconds",
    "seconds_to_ns",
    "ns_to_time",
    "time_to_ns",
    "time_to_seconds",
    "header",
    "rgb_to_image",
    "rgb_to_compressed",
    "open_bag",
    "iter_messages",
    "deserialize",
]

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_TYPE)
STRING_TYPE = "std_msgs/msg/String"
HUMAN_ACTION_TYPE = "step_ros/msg/HumanAction"
TASK_PREDICTION_TYPE = "step_ros/msg/TaskPrediction"
LABEL_SCORE_TYPE = "step_ros/msg/LabelScore"
_PROJECT_MSGS = ("LabelScore", "TaskPrediction", "HumanAction")  # dependency order

#: Default camera topic (the usual ``image_transport`` raw topic name).
DEFAULT_IMAGE_TOPIC = "/camera/image_raw"
#: Ground truth: one ``step_ros/msg/HumanAction`` per annotated segment (see docs/BAGS.md).
GROUND_TRUTH_TOPIC = "/ground_truth"
#: Where each ground-truth message came from: ``std_msgs/msg/String`` holding JSON.
SEGMENT_TOPIC = "/ground_truth/segment"
#: rosbag2 storage plugins the tools write (both are read).
STORAGES = ("mcap", "sqlite3")


class BagError(RuntimeError):
    """A bag is missing, corrupt, truncated or unreadable, or lacks a needed topic.

    The message always names the bag (and the topic where one is involved).
    """


# --------------------------------------------------------------------------- typestore


def find_msg_dir() -> Path:
    """The folder holding the project's ``HumanAction.msg`` & co.

    Looked up in order: ``$STEP_ROS_MSG_DIR``; the source tree's ``msg/`` (beside the
    ``step_ros`` package); ``share/step_ros/msg`` of every prefix on ``$AMENT_PREFIX_PATH``
    and of this Python's prefix (where ``colcon build`` / rosidl install them).
    """
    candidates: list[Path] = []
    if os.environ.get("STEP_ROS_MSG_DIR"):
        candidates.append(Path(os.environ["STEP_ROS_MSG_DIR"]))
    candidates.append(Path(__file__).resolve().parents[2] / "msg")
    prefixes = [p for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    prefixes += [sys.prefix]
    candidates += [Path(p) / "share" / "step_ros" / "msg" for p in prefixes]
    for c in candidates:
        if all((c / f"{name}.msg").is_file() for name in _PROJECT_MSGS):
            return c
    raise FileNotFoundError(
        "cannot find the step_ros message definitions (HumanAction.msg, TaskPrediction.msg, "
        f"LabelScore.msg); looked in: {', '.join(str(c) for c in candidates)}. "
        "Set STEP_ROS_MSG_DIR to the package's msg/ folder."
    )


def _newest_ros2_store() -> Any:
    from rosbags.typesys import Stores

    for name in ("ROS2_KILTED", "ROS2_LYRICAL", "ROS2_JAZZY", "ROS2_HUMBLE"):
        if hasattr(Stores, name):
            return getattr(Stores, name)
    return Stores.LATEST


@functools.lru_cache(maxsize=1)
def typestore() -> Any:
    """A ``rosbags`` Typestore: ROS 2 Kilted's standard types + ``step_ros/msg/*`` (cached)."""
    from rosbags.typesys import get_typestore, get_types_from_msg

    store = get_typestore(_newest_ros2_store())
    msg_dir = find_msg_dir()
    types: dict = {}
    for name in _PROJECT_MSGS:
        types.update(get_types_from_msg((msg_dir / f"{name}.msg").read_text(), f"step_ros/msg/{name}"))
    store.register(types)
    return store


def msg_class(msgtype: str) -> Any:
    """The rosbags dataclass of ``msgtype`` (e.g. ``"sensor_msgs/msg/Image"``)."""
    try:
        return typestore().types[msgtype]
    except KeyError:
        raise KeyError(f"message type {msgtype!r} is not in the typestore") from None


# --------------------------------------------------------------------------- time

_NS = 1_000_000_000


def seconds_to_ns(seconds: float) -> int:
    return int(round(float(seconds) * _NS))


def ns_to_seconds(ns: int) -> float:
    return int(ns) / _NS


def ns_to_time(ns: int) -> Any:
    """``builtin_interfaces/msg/Time`` for a non-negative nanosecond count."""
    ns = int(ns)
    if ns < 0:
        raise ValueError(f"ROS time cannot be negative, got {ns} ns")
    return msg_class("builtin_interfaces/msg/Time")(sec=ns // _NS, nanosec=ns % _NS)


def time_to_ns(t: Any) -> int:
    return int(t.sec) * _NS + int(t.nanosec)


def time_to_seconds(t: Any) -> float:
    """Float seconds of a Time, exactly as the node computes them (sec + nanosec * 1e-9)."""
    return time_to_ns(t) / _NS


def header(stamp_ns: int, frame_id: str = "camera") -> Any:
    return msg_class("std_msgs/msg/Header")(stamp=ns_to_time(stamp_ns), frame_id=frame_id)


# --------------------------------------------------------------------------- images


def _check_rgb(frame: np.ndarray) -> np.ndarray:
    arr = np.asarray(frame)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB frame, got {arr.shape} {arr.dtype}")
    return arr


def rgb_to_image(frame: np.ndarray, stamp_ns: int, frame_id: str = "camera") -> Any:
    """``sensor_msgs/msg/Image`` with encoding ``rgb8`` (lossless)."""
    arr = np.ascontiguousarray(_check_rgb(frame))
    h, w = arr.shape[:2]
    return msg_class(IMAGE_TYPE)(
        header=header(stamp_ns, frame_id), height=h, width=w, encoding="rgb8", is_bigendian=0,
        step=3 * w, data=arr.reshape(-1),
    )


def rgb_to_compressed(frame: np.ndarray, stamp_ns: int, frame_id: str = "camera", *, fmt: str = "jpeg",
                      quality: int = 90) -> Any:
    """``sensor_msgs/msg/CompressedImage`` (jpeg by default, or png), encoded with OpenCV.

    ``format`` is written the way ``image_transport``'s compressed plugin does
    (``"rgb8; jpeg compressed bgr8"``), which every decoder here and in ROS understands.
    """
    arr = _check_rgb(frame)
    bgr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    if fmt == "jpeg":
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    elif fmt == "png":
        ok, buf = cv2.imencode(".png", bgr)
    else:
        raise ValueError(f"compressed image format must be 'jpeg' or 'png', got {fmt!r}")
    if not ok:
        raise ValueError(f"OpenCV could not encode a {arr.shape} frame as {fmt}")
    return msg_class(COMPRESSED_TYPE)(
        header=header(stamp_ns, frame_id), format=f"rgb8; {fmt} compressed bgr8", data=buf.reshape(-1),
    )


# --------------------------------------------------------------------------- reading

# What rosbags and its storage back ends raise on a damaged file (besides its own errors).
_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError, AssertionError,
    struct.error, sqlite3.Error, UnicodeDecodeError, MemoryError, OverflowError,
)


def _rosbags_errors() -> tuple[type[BaseException], ...]:
    from rosbags.rosbag1 import ReaderError as Reader1Error
    from rosbags.rosbag2 import ReaderError

    errors: list[type[BaseException]] = [ReaderError, Reader1Error]
    try:
        from rosbags.interfaces import ConnectionError as RbConnectionError  # type: ignore[attr-defined]

        errors.append(RbConnectionError)
    except ImportError:  # pragma: no cover - older rosbags
        pass
    return tuple(errors) + _READ_ERRORS


ROS1_SUFFIX = ".bag"


def _closure(types: dict[str, Any], roots: Iterable[str]) -> dict[str, Any]:
    """``types`` restricted to ``roots`` and every message type their fields name, recursively."""
    keep: dict[str, Any] = {}
    todo = [r for r in roots if r in types]
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep[name] = types[name]
        stack: list[Any] = [types[name]]
        while stack:  # field definitions are nested tuples/lists; a type name is a str with a '/'
            item = stack.pop()
            if isinstance(item, str):
                if "/" in item and item in types and item not in keep:
                    todo.append(item)
            elif isinstance(item, (tuple, list)):
                stack.extend(item)
    return keep


class BagReader:
    """One bag open for reading, whoever wrote it: ROS 2 (a rosbag2 folder, or one ``.mcap`` /
    ``.db3`` file) or ROS 1 (a ``.bag`` file), through rosbags' own readers.

    Messages are deserialized with the types the bag itself carries (MCAP schemas, rosbag2's
    stored definitions, ROS 1 connection headers), so custom message types of other projects
    decode too; types the bag does not define come from the standard set (ROS 2 Kilted and the
    project's messages, or ROS 1 Noetic).
    """

    def __init__(self, path: Path, reader: Any, ros_version: int) -> None:
        self.path = path
        self.reader = reader
        self.ros_version = ros_version
        self.connections = list(reader.connections)
        self.store = self._build_typestore()
        self._cdr_store: Any = None

    def _build_typestore(self) -> Any:
        from rosbags.interfaces import MessageDefinitionFormat
        from rosbags.typesys import Stores, get_typestore, get_types_from_idl, get_types_from_msg

        types: dict = {}
        for conn in self.connections:
            fmt, data = conn.msgdef.format, conn.msgdef.data
            try:
                if fmt == MessageDefinitionFormat.MSG and data:
                    types.update(get_types_from_msg(data, conn.msgtype))
                elif fmt == MessageDefinitionFormat.IDL and data:
                    sep = "=" * 80 + "\n"
                    parts = data.split(sep)[1:] if data.startswith(f"{sep}IDL: ") else [data]
                    for part in parts:
                        types.update(get_types_from_idl(part.split("\n", 1)[1] if part.startswith("IDL: ") else part))
            except Exception as exc:  # noqa: BLE001 - a definition we cannot parse: the standard type is used
                log.warning("bag %s: cannot parse the stored definition of %s (%s); using the standard one",
                            self.path, conn.msgtype, exc)
        base = get_typestore(Stores.ROS1_NOETIC) if self.ros_version == 1 else typestore()
        for name, fields in base.fielddefs.items():
            types.setdefault(name, fields)
        store = get_typestore(Stores.EMPTY)
        # Only what the bag's topics reach: registering generates a class per type (~0.5 ms each),
        # and the standard set has ~170 of them -- 80-90 ms on every open for a bag of 3 topics.
        store.register(_closure(types, {conn.msgtype for conn in self.connections}))
        return store

    @property
    def topics(self) -> dict[str, Any]:
        return self.reader.topics

    @property
    def start_time(self) -> int:
        return self.reader.start_time

    @property
    def end_time(self) -> int:
        return self.reader.end_time

    @property
    def duration(self) -> int:
        """Nanoseconds from the first message to the last."""
        return self.reader.duration

    @property
    def message_count(self) -> int:
        return self.reader.message_count

    def messages(self, connections: Iterable[Any] | None = None) -> Iterator[tuple[Any, int, bytes]]:
        """Messages in time order: of every connection (``None``), or of those given (none: nothing)."""
        if connections is None:
            return self.reader.messages()
        conns = list(connections)
        return self.reader.messages(connections=conns) if conns else iter(())

    def deserialize(self, rawdata: bytes, msgtype: str) -> Any:
        """A message object of ``msgtype`` from the bag's bytes (CDR for ROS 2, ROS 1 serialization)."""
        if self.ros_version == 1:
            return self.store.deserialize_ros1(rawdata, msgtype)
        return self.store.deserialize_cdr(rawdata, msgtype)

    def decoded(self, connections: Iterable[Any]) -> Iterator[tuple[Any, int, Any]]:
        """``(connection, log time ns, message)`` in time order; a message that cannot be decoded
        is a :class:`BagError` naming the bag, the topic and the type (storage errors too)."""
        for conn, log_ns, raw in iter_messages(self, self.path, connections):
            try:
                msg = self.deserialize(raw, conn.msgtype)
            except Exception as exc:  # noqa: BLE001 - any decoding failure of any type
                raise BagError(f"bag {self.path}, topic {conn.topic}: cannot decode a {conn.msgtype} message "
                               f"({type(exc).__name__}: {exc})") from exc
            yield conn, log_ns, msg

    def to_cdr(self, rawdata: bytes, msgtype: str) -> bytes:
        """The message as ROS 2 CDR bytes (what ``rclpy`` publishes), converting ROS 1 messages.

        As ``rosbags``' own ROS 1 -> 2 converter does: the bag's types, with ROS 2's
        ``std_msgs/Header`` (no ``seq``), whose conversion drops the ROS 1 ``seq``.
        """
        if self.ros_version == 2:
            return bytes(rawdata)
        if self._cdr_store is None:
            from rosbags.typesys import Stores, get_typestore

            self._cdr_store = get_typestore(Stores.EMPTY)
            self._cdr_store.register({**self.store.fielddefs,
                                      **_closure(typestore().fielddefs, ["std_msgs/msg/Header"])})
        return bytes(self._cdr_store.ros1_to_cdr(rawdata, msgtype))


@contextmanager
def open_bag(path: str | os.PathLike[str]) -> Iterator[BagReader]:
    """Open a bag for reading: a rosbag2 folder, one ``.mcap`` / ``.db3`` file, or a ROS 1 ``.bag``.

    Every failure -- missing path, unreadable metadata, truncated or garbage storage file, an
    unindexed ROS 1 bag -- is raised as :class:`BagError` naming the bag. Errors raised later
    while iterating are wrapped by :func:`iter_messages`.
    """
    path = Path(path)
    if not path.exists():
        raise BagError(f"bag not found: {path}")
    ros1 = path.is_file() and path.suffix == ROS1_SUFFIX
    if path.is_dir() and not (path / "metadata.yaml").is_file():
        raise BagError(f"{path}: not a rosbag2 folder (no metadata.yaml); pass the bag folder, "
                       f"a .mcap / .db3 storage file or a ROS 1 .bag file")
    try:
        if ros1:
            from rosbags.rosbag1 import Reader as Reader1

            raw_reader: Any = Reader1(path)
        else:
            from rosbags.rosbag2 import Reader

            raw_reader = Reader(path)
        raw_reader.open()
    except _rosbags_errors() as exc:
        hint = ""
        if "magic" in str(exc).lower() and (path.suffix == ".mcap" or (path.is_dir() and any(path.glob("*.mcap")))):
            hint = "; an MCAP recording that was killed lacks its summary: `mcap recover` can repair it"
        elif ros1 and "index" in str(exc).lower():
            hint = "; `rosbag reindex` (ROS 1) rebuilds the index of a bag whose recording was killed"
        kind = "ROS 1 bag" if ros1 else "rosbag2"
        raise BagError(f"cannot read bag {path}: corrupt, truncated or not a {kind} ({type(exc).__name__}: "
                       f"{exc}){hint}") from exc
    try:
        try:
            reader = BagReader(path, raw_reader, 1 if ros1 else 2)
        except Exception as exc:  # noqa: BLE001 - conflicting type definitions and the like
            raise BagError(f"cannot read the message types of bag {path} ({type(exc).__name__}: {exc})") from exc
        yield reader
    finally:
        try:
            raw_reader.close()
        except Exception:  # noqa: BLE001 - closing a broken bag must not mask the real error
            pass


def iter_messages(reader: BagReader, path: str | os.PathLike[str], connections: Iterable[Any] | None = None
                  ) -> Iterator[tuple[Any, int, bytes]]:
    """``reader.messages(connections)`` (``None``: every connection; an empty list: nothing) with
    storage errors raised as :class:`BagError`."""
    count = 0
    try:
        for item in reader.messages(None if connections is None else list(connections)):
            count += 1
            yield item
    except _rosbags_errors() as exc:
        raise BagError(f"bag {path} is corrupt or truncated: reading failed after {count} messages "
                       f"({type(exc).__name__}: {exc})") from exc


def deserialize(rawdata: bytes, msgtype: str) -> Any:
    """CDR bytes to a message object of the standard typestore (errors are the caller's to name).

    For messages read from a bag use :meth:`BagReader.deserialize`, which knows the bag's
    own types and ROS 1 serialization."""
    return typestore().deserialize_cdr(rawdata, msgtype)


def topics_of(reader: Any) -> dict[str, tuple[str | None, int]]:
    """``{topic: (msgtype, message count)}`` of an open reader."""
    return {t: (info.msgtype, info.msgcount) for t, info in reader.topics.items()}


__all__ += ["topics_of"]
