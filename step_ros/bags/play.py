"""``step-ros play``: publish a bag's camera topic(s) on ROS 2 in real time, without ``ros2 bag``.

``ros2 bag`` (``rosbag2_py``) is not on any index these machines reach, so this player reads the
bag with ``rosbags`` and publishes with ``rclpy``. The bag stores messages as CDR, the
serialization ROS itself uses, so each message is turned into a real ROS message with
``rclpy.serialization.deserialize_message`` -- exact, whatever the type -- and published at
the bag's receive times (scaled by ``rate``), with its original ``header.stamp``.

rclpy is imported inside :func:`play` only: everything else in ``step_ros.bags`` works without
ROS. Ctrl-C stops cleanly and returns the number of messages published.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from .common import IMAGE_TYPES, BagError, iter_messages, open_bag

log = logging.getLogger(__name__)

__all__ = ["play", "RosUnavailable", "add_arguments", "main"]


class RosUnavailable(RuntimeError):
    """ROS 2 (rclpy) or a message package needed to publish is not installed."""


def _import_rclpy() -> Any:
    try:
        import rclpy  # noqa: F401
        import rclpy.serialization  # noqa: F401
        from rclpy import qos  # noqa: F401
    except ImportError as exc:
        raise RosUnavailable(
            f"publishing a bag needs ROS 2 (rclpy), which cannot be imported ({exc}). In the project's "
            "venv run `bash scripts/setup_ros.sh`; on a robot source your ROS 2 installation "
            "(`source /opt/ros/<distro>/setup.bash`). replay-eval needs no ROS."
        ) from exc
    return rclpy


def _ros_class(msgtype: str, topic: str) -> Any:
    """The rclpy message class of ``pkg/msg/Name``."""
    try:
        pkg, kind, name = msgtype.split("/")
        return getattr(importlib.import_module(f"{pkg}.{kind}"), name)
    except (ValueError, ImportError, AttributeError) as exc:
        raise RosUnavailable(f"cannot publish {topic}: message type {msgtype} is not available in this ROS 2 "
                             f"environment ({exc})") from exc


def _select(connections: list[Any], topics: list[str] | None, bag: Path) -> list[Any]:
    by_topic: dict[str, list[Any]] = {}
    for c in connections:
        by_topic.setdefault(c.topic, []).append(c)
    listing = ", ".join(f"{t} [{cs[0].msgtype}]" for t, cs in sorted(by_topic.items())) or "none"
    if topics is None:
        chosen = [c for c in connections if c.msgtype in IMAGE_TYPES]
        if not chosen:
            raise BagError(f"bag {bag} has no image topic ({' or '.join(IMAGE_TYPES)}); its topics: {listing}; "
                           f"name the topics to play")
        return chosen
    missing = [t for t in topics if t not in by_topic]
    if missing:
        raise BagError(f"bag {bag} has no topic {', '.join(map(repr, missing))}; its topics: {listing}")
    return [c for t in topics for c in by_topic[t]]


def play(
    bag_path: str | os.PathLike[str],
    *,
    rate: float = 1.0,
    topics: list[str] | None = None,
    loop: bool = False,
    node_name: str = "step_ros_player",
    qos_depth: int = 10,
    clock: bool = False,
    wait_for_subscribers: int = 0,
    wait_timeout_s: float = 10.0,
    domain_id: int | None = None,
    stop_event: threading.Event | None = None,
    max_messages: int | None = None,
) -> int:
    """Publish ``bag_path``'s image topics (or ``topics``) in real time; return the count published.

    ``rate``: playback speed factor (2 = twice as fast). Messages keep their ``header.stamp``;
    the timing follows the bag's receive times. ``loop``: start over at the end (the stamps
    then jump back, which the node answers with a window reset) until Ctrl-C / ``stop_event``.
    ``qos_depth``: KEEP_LAST depth of the RELIABLE publishers (they also reach best-effort
    subscribers). ``clock``: also publish the bag time on ``/clock`` (run the node with
    ``use_sim_time:=true``). ``wait_for_subscribers``: before the first message, wait up to
    ``wait_timeout_s`` until every topic has this many subscribers. ``domain_id``: ROS domain
    (default ``$ROS_DOMAIN_ID``). ``stop_event``: set it to stop from another thread.
    ``max_messages``: stop after publishing this many (a warm-up or calibration run).

    Runs its own rclpy context (works beside other nodes in the process) and installs no signal
    handler: Ctrl-C (KeyboardInterrupt) stops playback and shuts the context down.
    """
    if not rate > 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if qos_depth < 1:
        raise ValueError(f"qos_depth must be >= 1, got {qos_depth}")
    bag_path = Path(bag_path)
    with open_bag(bag_path) as reader:  # checks the bag and the topics before starting ROS
        conns = _select(list(reader.connections), topics, bag_path)
        selected = {c.topic: c.msgtype for c in conns}
    rclpy = _import_rclpy()
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    from rclpy.serialization import deserialize_message

    classes = {t: _ros_class(ty, t) for t, ty in selected.items()}
    clock_cls = _ros_class("rosgraph_msgs/msg/Clock", "/clock") if clock else None
    stop = stop_event or threading.Event()

    context = rclpy.context.Context()
    init_kwargs: dict[str, Any] = {"context": context}
    if domain_id is not None:
        init_kwargs["domain_id"] = int(domain_id)
    try:
        from rclpy.signals import SignalHandlerOptions

        init_kwargs["signal_handler_options"] = SignalHandlerOptions.NO
    except ImportError:  # pragma: no cover - older rclpy
        pass
    rclpy.init(**init_kwargs)
    published = 0
    node = None
    try:
        node = rclpy.create_node(node_name, context=context)
        qos = QoSProfile(depth=qos_depth, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
        pubs = {t: node.create_publisher(classes[t], t, qos) for t in selected}
        clock_pub = node.create_publisher(clock_cls, "/clock", QoSProfile(depth=1)) if clock_cls else None
        if wait_for_subscribers > 0:
            deadline = time.monotonic() + wait_timeout_s
            while not stop.is_set() and any(p.get_subscription_count() < wait_for_subscribers for p in pubs.values()):
                if time.monotonic() > deadline:
                    log.warning("play: not every topic has %d subscriber(s) after %.1f s; starting anyway",
                                wait_for_subscribers, wait_timeout_s)
                    break
                stop.wait(0.02)
        log.info("playing %s: %s at %.3gx%s", bag_path, ", ".join(sorted(selected)), rate, " (loop)" if loop else "")
        while not stop.is_set():
            first_ns: int | None = None
            wall0 = time.monotonic()
            with open_bag(bag_path) as reader:
                wanted = [c for c in reader.connections if c.topic in selected]
                for conn, log_ns, raw in iter_messages(reader, bag_path, wanted):
                    if first_ns is None:
                        first_ns = log_ns
                    due = wall0 + (log_ns - first_ns) / 1e9 / rate
                    delay = due - time.monotonic()
                    if delay > 0 and stop.wait(delay):
                        break
                    if stop.is_set():
                        break
                    try:
                        msg = deserialize_message(reader.to_cdr(raw, conn.msgtype), classes[conn.topic])
                    except Exception as exc:  # noqa: BLE001 - one corrupt message is skipped, not fatal
                        log.warning("play: skipping an undecodable %s message on %s (%s)", conn.msgtype,
                                    conn.topic, exc)
                        continue
                    if clock_pub is not None:
                        clock_pub.publish(clock_cls(clock=_ros_time(log_ns)))
                    pubs[conn.topic].publish(msg)
                    published += 1
                    if max_messages is not None and published >= max_messages:
                        break
            if not loop or first_ns is None or (max_messages is not None and published >= max_messages):
                break
    except KeyboardInterrupt:
        log.info("play: interrupted after %d messages", published)
    finally:
        if node is not None:
            node.destroy_node()
        context.try_shutdown()
    return published


def _ros_time(ns: int) -> Any:
    from builtin_interfaces.msg import Time

    return Time(sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``step-ros play``."""
    parser.add_argument("--bag", type=Path, required=True, help="rosbag2 folder (or a .mcap / .db3 file)")
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed factor")
    parser.add_argument("--topics", nargs="+", default=None, help="topics to publish (default: the image topics)")
    parser.add_argument("--loop", action="store_true", help="start over at the end, until Ctrl-C")
    parser.add_argument("--clock", action="store_true", help="also publish the bag time on /clock (use_sim_time)")
    parser.add_argument("--qos-depth", type=int, default=10)
    parser.add_argument("--wait-for-subscribers", type=int, default=0, metavar="N",
                        help="wait (up to --wait-timeout s) until each topic has N subscribers")
    parser.add_argument("--wait-timeout", type=float, default=10.0)
    parser.add_argument("--node-name", default="step_ros_player")


def main(args: argparse.Namespace) -> int:
    count = play(args.bag, rate=args.rate, topics=args.topics, loop=args.loop, node_name=args.node_name,
                 qos_depth=args.qos_depth, clock=args.clock, wait_for_subscribers=args.wait_for_subscribers,
                 wait_timeout_s=args.wait_timeout)
    print(f"published {count} messages from {args.bag}")
    return 0 if count else 1
