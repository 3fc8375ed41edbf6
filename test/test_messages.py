"""The rosidl-generated messages of step_ros: definitions, defaults and a real DDS round trip.

Needs ROS 2 (rclpy) and the built messages: in the venv ``bash scripts/setup_ros.sh``,
on a robot ``colcon build --packages-select step_ros`` and a sourced workspace.
Skipped when rclpy is not installed at all, unless STEP_ROS_REQUIRE_ROS=1 (then it fails).

Every test run uses its own ROS domain (derived from the pid) and keeps discovery on
this host, so concurrent runs and other ROS traffic do not interfere.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

if os.environ.get("STEP_ROS_REQUIRE_ROS"):
    import rclpy  # noqa: F401  (fail loudly when ROS is required)
else:
    pytest.importorskip("rclpy", reason="ROS 2 (rclpy) not installed: run scripts/setup_ros.sh")

import rclpy  # noqa: E402
from rclpy.context import Context  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy, HistoryPolicy  # noqa: E402

try:
    from step_ros.msg import HumanAction, LabelScore, TaskPrediction  # noqa: E402
except ImportError as exc:  # rclpy is there, so the messages should be too
    raise ImportError(
        "step_ros.msg is not built: run `bash scripts/setup_ros.sh` with the venv active "
        "(or `colcon build --packages-select step_ros` and source the workspace on a robot)"
    ) from exc

from builtin_interfaces.msg import Time  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

# 0..101 are valid domain ids on every platform; 1..100 here, one per test process.
DOMAIN_ID = 1 + os.getpid() % 100
TIMEOUT_S = 10.0

# Keep DDS discovery on this machine (also for the child process, which inherits it).
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"  # Iron and later
if os.environ.get("ROS_DISTRO") == "humble":
    os.environ["ROS_LOCALHOST_ONLY"] = "1"

QOS = QoSProfile(
    depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST
)


def make_action(sequence: int = 7) -> HumanAction:
    """A HumanAction with two TaskPredictions (float values exact in float32)."""
    fine = TaskPrediction(
        task="fine_action",
        label="pick_up_leg",
        class_index=3,
        confidence=0.75,
        confidence_threshold=0.5,
        confident=True,
        stable=True,
        symmetric_counterpart="lay_down_leg",
        top_k=[
            LabelScore(label="pick_up_leg", class_index=3, score=0.75),
            LabelScore(label="lay_down_leg", class_index=4, score=0.125),
            LabelScore(label="spin_leg", class_index=9, score=0.0625),
        ],
    )
    obj = TaskPrediction(
        task="object_in_use",
        label="",
        class_index=TaskPrediction.NO_CLASS,
        confidence=0.375,
        confidence_threshold=0.5,
        confident=False,
        stable=False,
        symmetric_counterpart="",
        top_k=[
            LabelScore(label="leg", class_index=1, score=0.375),
            LabelScore(label="table_top", class_index=0, score=0.25),
        ],
    )
    return HumanAction(
        header=Header(stamp=Time(sec=1700000001, nanosec=500_000_000), frame_id="camera_optical"),
        window_start=Time(sec=1700000000, nanosec=250_000_000),
        frames_in_window=16,
        frames_expected=16,
        window_complete=True,
        sequence=sequence,
        tasks=[fine, obj],
    )


# --- definitions and defaults ------------------------------------------------------------


def test_fields_and_types():
    assert LabelScore.get_fields_and_field_types() == {
        "label": "string",
        "class_index": "int32",
        "score": "float",
    }
    assert TaskPrediction.get_fields_and_field_types() == {
        "task": "string",
        "label": "string",
        "class_index": "int32",
        "confidence": "float",
        "confidence_threshold": "float",
        "confident": "boolean",
        "stable": "boolean",
        "symmetric_counterpart": "string",
        "top_k": "sequence<step_ros/LabelScore>",
    }
    assert HumanAction.get_fields_and_field_types() == {
        "header": "std_msgs/Header",
        "window_start": "builtin_interfaces/Time",
        "frames_in_window": "uint32",
        "frames_expected": "uint32",
        "window_complete": "boolean",
        "sequence": "uint64",
        "tasks": "sequence<step_ros/TaskPrediction>",
    }


def test_defaults():
    ls = LabelScore()
    assert (ls.label, ls.class_index, ls.score) == ("", 0, 0.0)

    tp = TaskPrediction()
    assert TaskPrediction.NO_CLASS == -1
    # A fresh prediction reads as "not confident": no label, no class.
    assert tp.class_index == TaskPrediction.NO_CLASS
    assert (tp.task, tp.label, tp.symmetric_counterpart) == ("", "", "")
    assert (tp.confidence, tp.confidence_threshold) == (0.0, 0.0)
    assert (tp.confident, tp.stable) == (False, False)
    assert list(tp.top_k) == []

    ha = HumanAction()
    assert isinstance(ha.header, Header) and ha.header.frame_id == ""
    assert isinstance(ha.window_start, Time)
    assert (ha.window_start.sec, ha.window_start.nanosec) == (0, 0)
    assert (ha.frames_in_window, ha.frames_expected, ha.sequence) == (0, 0, 0)
    assert ha.window_complete is False
    assert list(ha.tasks) == []


def _checked(cls, **fields):
    """Construct with rosidl's field checks on (opt-in since Jazzy, always on in Humble)."""
    if "_check_fields" in cls.__slots__:
        return cls(check_fields=True, **fields)
    return cls(**fields)


def test_type_checks():
    with pytest.raises(AssertionError):
        _checked(LabelScore, score="high")
    with pytest.raises(AssertionError):
        _checked(TaskPrediction, class_index=2**31)  # int32
    with pytest.raises(AssertionError):
        _checked(HumanAction, frames_in_window=-1)  # uint32
    with pytest.raises(AssertionError):
        _checked(HumanAction, tasks=[LabelScore()])  # TaskPrediction[]
    _checked(HumanAction, tasks=[TaskPrediction(top_k=[LabelScore()])])  # well-typed: fine


def test_serialisation_round_trip():
    from rclpy.serialization import deserialize_message, serialize_message

    msg = make_action()
    data = serialize_message(msg)
    back = deserialize_message(data, HumanAction)
    assert back == msg
    assert back.tasks[0].top_k[1].label == "lay_down_leg"
    assert back.tasks[1].class_index == -1


# --- real DDS round trips ----------------------------------------------------------------


def _spin_until(executor: SingleThreadedExecutor, done, timeout: float, tick=None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tick is not None:
            tick()
        executor.spin_once(timeout_sec=0.05)
        if done():
            return True
    return done()


def test_dds_round_trip_in_process():
    ctx = Context()
    rclpy.init(context=ctx, domain_id=DOMAIN_ID)
    executor = SingleThreadedExecutor(context=ctx)
    try:
        node = rclpy.create_node("step_ros_msg_test", context=ctx)
        executor.add_node(node)
        topic = f"step_ros_test/in_process_{os.getpid()}"
        received: list[HumanAction] = []
        node.create_subscription(HumanAction, topic, received.append, QOS)
        pub = node.create_publisher(HumanAction, topic, QOS)
        sent = make_action(sequence=1)

        # Publish until the subscription has matched and a message came through
        # (messages published before discovery completes are not delivered).
        ok = _spin_until(executor, lambda: bool(received), TIMEOUT_S, tick=lambda: pub.publish(sent))
        assert ok, f"no HumanAction received within {TIMEOUT_S} s (domain {DOMAIN_ID})"
        got = received[0]
        assert isinstance(got, HumanAction)
        assert got == sent
        assert [t.task for t in got.tasks] == ["fine_action", "object_in_use"]
        assert got.tasks[0].confident and not got.tasks[1].confident
        executor.remove_node(node)
        node.destroy_node()
    finally:
        executor.shutdown()
        rclpy.shutdown(context=ctx)


# The child process subscribes to `<topic>/request` and publishes every HumanAction it
# receives, unchanged, on `<topic>/echo`; it exits after its deadline or when its stdin
# closes (so it never outlives the test).
_ECHO_CHILD = textwrap.dedent(
    """
    import sys, threading, time
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy, HistoryPolicy
    from step_ros.msg import HumanAction

    domain, topic, deadline = int(sys.argv[1]), sys.argv[2], time.monotonic() + float(sys.argv[3])
    stdin_closed = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stdin_closed.set()), daemon=True).start()
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
    ctx = Context()
    rclpy.init(context=ctx, domain_id=domain)
    node = rclpy.create_node("step_ros_msg_echo", context=ctx)
    pub = node.create_publisher(HumanAction, topic + "/echo", qos)
    node.create_subscription(HumanAction, topic + "/request", pub.publish, qos)
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    print("ready", flush=True)
    while time.monotonic() < deadline and not stdin_closed.is_set():
        ex.spin_once(timeout_sec=0.05)
    ex.shutdown()
    node.destroy_node()
    rclpy.shutdown(context=ctx)
    """
)


def test_dds_round_trip_two_processes():
    topic = f"step_ros_test/cross_process_{os.getpid()}"
    child = subprocess.Popen(
        [sys.executable, "-c", _ECHO_CHILD, str(DOMAIN_ID), topic, str(3 * TIMEOUT_S)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    err = ""
    ctx = Context()
    rclpy.init(context=ctx, domain_id=DOMAIN_ID)
    executor = SingleThreadedExecutor(context=ctx)
    try:
        node = rclpy.create_node("step_ros_msg_test_parent", context=ctx)
        executor.add_node(node)
        echoed: list[HumanAction] = []
        node.create_subscription(HumanAction, topic + "/echo", echoed.append, QOS)
        pub = node.create_publisher(HumanAction, topic + "/request", QOS)
        sent = make_action(sequence=42)

        ok = _spin_until(
            executor,
            lambda: bool(echoed) or child.poll() is not None,
            2 * TIMEOUT_S,  # includes the child's start-up (Python, rclpy, re-exec)
            tick=lambda: pub.publish(sent),
        )
        if not echoed:
            if child.poll() is None:
                child.kill()
            out, err = child.communicate(timeout=TIMEOUT_S)
            pytest.fail(
                f"no echo from the child process (ok={ok}, child rc={child.returncode}, "
                f"domain {DOMAIN_ID})\nstdout:\n{out}\nstderr:\n{err}"
            )
        assert echoed[0] == sent
        assert echoed[0].sequence == 42
        assert echoed[0].tasks[0].top_k[0].label == "pick_up_leg"
        executor.remove_node(node)
        node.destroy_node()
    finally:
        executor.shutdown()
        rclpy.shutdown(context=ctx)
        if child.returncode is None:
            try:
                _, err = child.communicate(input="", timeout=TIMEOUT_S)  # child exits on EOF
            except subprocess.TimeoutExpired:
                child.kill()
                _, err = child.communicate()
    assert child.returncode == 0, f"child process failed (rc={child.returncode}):\n{err}"
