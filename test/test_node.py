"""The ``human_action`` node end to end over real DDS, plus the image conversions.

The node runs as its own process (``python scripts/step_ros_node --ros-args ...``) on a tiny
model, in a ROS domain of its own (``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``); this process
publishes images and listens to ``human_action`` and ``/diagnostics``. Two node processes are
started together (their start-up dominates the run time): a raw-image node shared by the
prediction, bad-input and SIGINT tests, and a compressed-image node (started with the
package's ``config/hri_params.yaml``) for the corrupt-jpeg and SIGTERM tests.

Predictions are compared with an offline computation of the same frames (backbone.encode +
the heads), with ``smoothing_alpha=1`` and ``confidence_threshold=0`` so the published label
is the raw argmax. The raw node publishes incomplete windows too, so the test can wait for
the answer to every sampled frame before sending the next: no frame is ever dropped.

Needs rclpy and the built messages (``scripts/setup_ros.sh``); the conversion tests do not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, tiny_manifest_dict

DOMAIN_ID = 101 + os.getpid() % 100  # test_messages.py uses 1 + pid % 100
NODE_SCRIPT = ROOT / "scripts" / "step_ros_node"
PARAMS_FILE = ROOT / "config" / "hri_params.yaml"
STARTUP_TIMEOUT_S = 120.0  # model loading on a busy 2-core CI machine
WAIT_S = 15.0
T, K, IMAGE_SIZE = 4, 2, 42  # tiny manifest: frames, frame interval, backbone input
RAW_TOPIC, RAW_OUT = "/test/image", "/test/human_action"
COMP_TOPIC, COMP_OUT = "/testc/image/compressed", "/testc/human_action"
TIME_TOPIC, TIME_OUT = "/testt/image", "/testt/human_action"
RAW_FQN, COMP_FQN, TIME_FQN = "/human_action", "/human_action_compressed", "/human_action_timed"
PERIOD_S = 0.1  # the timed node's manifest: sample_period_s
FRAME_ID = "test_cam"
BASE_NS = 1_700_000_000 * 10**9


# =========================================================================== (c) conversions


def _image(arr: np.ndarray, encoding: str, pad: int = 0) -> SimpleNamespace:
    """A sensor_msgs/Image look-alike (the conversions only read these fields)."""
    h = arr.shape[0]
    rows = arr.reshape(h, -1)
    if pad:
        rows = np.concatenate([rows, np.zeros((h, pad), np.uint8)], axis=1)
    return SimpleNamespace(height=h, width=arr.shape[1], encoding=encoding, is_bigendian=0,
                           step=rows.shape[1], data=rows.tobytes(),
                           header=SimpleNamespace(frame_id="x", stamp=SimpleNamespace(sec=0, nanosec=0)))


@pytest.fixture(scope="module")
def rgb():
    return np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)


def test_rgb_bgr_rgba_bgra_and_padding(rgb):
    from step_ros.ros.conversions import imgmsg_to_rgb

    np.testing.assert_array_equal(imgmsg_to_rgb(_image(rgb, "rgb8")), rgb)
    np.testing.assert_array_equal(imgmsg_to_rgb(_image(rgb[:, :, ::-1].copy(), "bgr8", pad=6)), rgb)
    alpha = np.full((6, 10, 1), 77, np.uint8)
    np.testing.assert_array_equal(imgmsg_to_rgb(_image(np.concatenate([rgb, alpha], 2), "rgba8")), rgb)
    np.testing.assert_array_equal(imgmsg_to_rgb(_image(np.concatenate([rgb[:, :, ::-1], alpha], 2), "bgra8", 4)), rgb)
    out = imgmsg_to_rgb(_image(rgb, "rgb8", pad=2))
    assert out.flags.writeable and out.flags.c_contiguous and out.dtype == np.uint8


def test_mono8_is_replicated_grey(rgb):
    from step_ros.ros.conversions import imgmsg_to_rgb

    grey = rgb[:, :, 1].copy()
    out = imgmsg_to_rgb(_image(grey[:, :, None], "mono8", pad=3))
    assert out.shape == (6, 10, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], grey)


@pytest.mark.parametrize("encoding,order", [("yuv422", "uyvy"), ("uyvy", "uyvy"),
                                            ("yuv422_yuy2", "yuyv"), ("yuyv", "yuyv")])
def test_yuv422_matches_the_bt601_formula(encoding, order):
    """Pack known Y/U/V planes as UYVY or YUYV; compare with OpenCV's BT.601 integer formula."""
    from step_ros.ros.conversions import imgmsg_to_rgb

    rng = np.random.default_rng(1)
    h, w = 4, 8
    y = rng.integers(16, 236, (h, w)).astype(np.uint8)
    u = rng.integers(16, 241, (h, w // 2)).astype(np.uint8)
    v = rng.integers(16, 241, (h, w // 2)).astype(np.uint8)
    packed = np.empty((h, w // 2, 4), np.uint8)
    if order == "uyvy":
        packed[..., 0], packed[..., 1], packed[..., 2], packed[..., 3] = u, y[:, 0::2], v, y[:, 1::2]
    else:
        packed[..., 0], packed[..., 1], packed[..., 2], packed[..., 3] = y[:, 0::2], u, y[:, 1::2], v
    out = imgmsg_to_rgb(_image(packed.reshape(h, w, 2), encoding, pad=4))
    # BT.601 "video range" -> RGB, as OpenCV and cv_bridge do it
    uu, vv = np.repeat(u, 2, axis=1).astype(float) - 128, np.repeat(v, 2, axis=1).astype(float) - 128
    yy = (y.astype(float) - 16) * 1.164
    ref = np.stack([yy + 1.596 * vv, yy - 0.391 * uu - 0.813 * vv, yy + 2.018 * uu], axis=-1)
    ref = np.clip(np.round(ref), 0, 255)
    assert out.shape == (h, w, 3)
    assert np.abs(out.astype(float) - ref).max() <= 2
    # grey: U = V = 128 gives R = G = B
    packed[..., 0 if order == "uyvy" else 1] = 128
    packed[..., 2 if order == "uyvy" else 3] = 128
    grey = imgmsg_to_rgb(_image(packed.reshape(h, w, 2), encoding))
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_compressed_jpeg_png_and_corrupt(rgb):
    from step_ros.ros.conversions import ImageError, compressed_imgmsg_to_rgb

    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    msg = SimpleNamespace(format="rgb8; png compressed bgr8", data=png.tobytes())
    np.testing.assert_array_equal(compressed_imgmsg_to_rgb(msg), rgb)
    smooth = np.repeat(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], 16, 0).repeat(3, 2)
    ok, jpg = cv2.imencode(".jpg", smooth, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert np.abs(compressed_imgmsg_to_rgb(SimpleNamespace(format="jpeg", data=jpg.tobytes())).astype(int)
                  - smooth).max() <= 8
    for data, fmt, reason in [(b"not a jpeg at all", "jpeg", "corrupt_compressed"),
                              (jpg.tobytes()[:40], "jpeg", "corrupt_compressed"),
                              (b"", "jpeg", "empty"),
                              (png.tobytes(), "16UC1; compressedDepth png", "unsupported_encoding"),
                              (png.tobytes(), "webp", "unsupported_encoding")]:
        with pytest.raises(ImageError) as err:
            compressed_imgmsg_to_rgb(SimpleNamespace(format=fmt, data=data))
        assert err.value.reason == reason, (fmt, data[:10], err.value)


def test_validation_reasons(rgb):
    from step_ros.ros.conversions import ImageError, imgmsg_to_rgb, validate_image

    good = _image(rgb, "rgb8")
    cases = {
        "size_mismatch": dict(data=good.data[:-1]),
        "step_too_small": dict(step=29, data=bytes(6 * 29)),
        "empty": dict(height=0, data=b""),
        "unsupported_encoding": dict(encoding="32FC1"),
        "bad_dimensions": dict(encoding="yuv422", width=9, step=18, data=bytes(6 * 18)),
    }
    for reason, fields in cases.items():
        msg = SimpleNamespace(**{**vars(good), **fields})
        with pytest.raises(ImageError) as err:
            validate_image(msg)
        assert err.value.reason == reason and isinstance(err.value, ValueError)
        with pytest.raises(ImageError):
            imgmsg_to_rgb(msg)
    too_long = SimpleNamespace(**{**vars(good), "data": good.data + b"\0"})
    with pytest.raises(ImageError, match="height \\* step"):
        validate_image(too_long)


def test_frame_queue_is_bounded_fifo_dropping_the_oldest():
    _require_ros()
    from step_ros.ros.node import FrameQueue

    q = FrameQueue(2)
    assert [q.put(i) for i in range(4)] == [False, False, True, True]  # 0 and 1 dropped
    assert len(q) == 2 and q.take(0.01) == 2 and q.take(0.01) == 3
    started = time.monotonic()
    assert q.take(0.05) is None and time.monotonic() - started >= 0.04  # empty: waits, then None
    threading.Timer(0.05, q.put, args=("late",)).start()
    assert q.take(5.0) == "late"  # a waiting consumer wakes up on put
    q.close()
    assert q.take(5.0) is None


# =========================================================================== DDS fixtures


def _require_ros():
    if os.environ.get("STEP_ROS_REQUIRE_ROS"):
        import rclpy  # noqa: F401  (CI: a missing rclpy is a failure)
        from step_ros.msg import HumanAction  # noqa: F401
    else:
        pytest.importorskip("rclpy", reason="ROS 2 (rclpy) not installed: run scripts/setup_ros.sh")
        pytest.importorskip("step_ros.msg", reason="step_ros messages not built: run scripts/setup_ros.sh")
        pytest.importorskip("diagnostic_msgs.msg", reason="diagnostic_msgs not installed")


def write_tiny_model(folder: Path) -> Path:
    """Tiny manifest + untrained (seeded) head checkpoints; returns the manifest path."""
    from step_ros.model.manifest import parse_manifest
    from step_ros.model.multitask import build_head, save_head

    folder.mkdir(parents=True, exist_ok=True)
    data = tiny_manifest_dict(frames=T, interval=K, image_size=IMAGE_SIZE)
    manifest = parse_manifest(data, folder)
    torch.manual_seed(0)
    dim, tokens = 64, (IMAGE_SIZE // 14) ** 2
    for spec, raw in zip(manifest.heads, data["heads"]):
        head = build_head(spec, dim, T, tokens)
        with torch.no_grad():  # spread the logits so argmaxes are far from ties
            for p in head.parameters():
                p.mul_(3.0)
        save_head(head, spec, folder / f"{spec.task}.safetensors", dim=dim, frames=T, num_tokens=tokens)
        raw["checkpoint"] = f"{spec.task}.safetensors"
    path = folder / "manifest.yaml"
    path.write_text(json.dumps(data, indent=1))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def tiny_manifest(tmp_path_factory):
    _require_ros()
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def offline(tiny_manifest):
    """Offline reference: probabilities per task for windows of given sampled frames."""
    from step_ros.model.manifest import load_manifest
    from step_ros.model.multitask import MultiTaskModel

    model = MultiTaskModel.from_manifest(load_manifest(tiny_manifest)).eval()

    @torch.inference_mode()
    def predict(frames: list[np.ndarray], pad: bool) -> list[dict[str, np.ndarray]]:
        tokens = torch.cat([model.backbone.encode(f[None]) for f in frames])
        out = []
        for j in range(len(frames)):
            if j + 1 < T and not pad:
                out.append({})
                continue
            idx = list(range(max(0, j - T + 1), j + 1))
            idx = [idx[0]] * (T - len(idx)) + idx  # front padding with the oldest frame, as the engine
            logits = model(tokens[idx][None])
            out.append({task: torch.softmax(v[0].float(), -1).numpy() for task, v in logits.items()})
        return out

    predict.model = model
    return predict


class Listener:
    """The test's own rclpy node in its own context, spun in a thread."""

    def __init__(self) -> None:
        os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CompressedImage, Image

        from step_ros.msg import HumanAction

        self.context = Context()
        rclpy.init(context=self.context, domain_id=DOMAIN_ID)
        self.node = rclpy.create_node("step_ros_node_test", context=self.context)
        reliable = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE)
        self.cond = threading.Condition()
        self.actions: dict[str, list] = {RAW_OUT: [], COMP_OUT: [], TIME_OUT: []}
        self.diags: dict[str, list] = {RAW_FQN: [], COMP_FQN: [], TIME_FQN: []}
        self.subs = {topic: self.node.create_subscription(
            HumanAction, topic, lambda m, t=topic: self._add(self.actions[t], m), reliable) for topic in self.actions}
        self.diag_sub = self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, reliable)
        self.raw_pub = self.node.create_publisher(Image, RAW_TOPIC, reliable)
        self.comp_pub = self.node.create_publisher(CompressedImage, COMP_TOPIC, reliable)
        self.time_pub = self.node.create_publisher(Image, TIME_TOPIC, reliable)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        try:
            while self.context.ok():
                self.executor.spin_once(timeout_sec=0.05)
        except Exception:  # noqa: BLE001 - context shut down under us at teardown
            pass

    def _add(self, bucket: list, msg) -> None:
        with self.cond:
            bucket.append((time.monotonic(), msg))
            self.cond.notify_all()

    def _on_diag(self, msg) -> None:
        for status in msg.status:
            if status.hardware_id in self.diags and status.name == "step_ros: human_action":
                self._add(self.diags[status.hardware_id], status)

    def wait(self, predicate, timeout: float = WAIT_S, what: str = "condition"):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
                self.cond.wait(min(left, 0.1))

    def diag(self, fqn: str, where=lambda d: True, timeout: float = WAIT_S) -> dict:
        """Key-values (+ level, message) of the newest diagnostics of ``fqn`` satisfying ``where``."""
        def newest():
            for _, status in reversed(self.diags[fqn]):
                d = {kv.key: kv.value for kv in status.values}
                d["_level"], d["_message"] = status.level, status.message
                if where(d):
                    return d
            return None
        return self.wait(newest, timeout, f"diagnostics of {fqn}")

    def close(self) -> None:
        import rclpy

        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self.thread.join(2)


class NodeProcess:
    def __init__(self, name: str, args: list[str], log: Path) -> None:
        env = dict(os.environ, ROS_DOMAIN_ID=str(DOMAIN_ID), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
                   PYTHONUNBUFFERED="1", RCUTILS_COLORIZED_OUTPUT="0")
        self.name, self.log = name, log
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, str(NODE_SCRIPT), "--ros-args", *args], cwd=str(ROOT), env=env,
                                     stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)
        self._log_file.close()


@pytest.fixture(scope="module")
def processes(tiny_manifest, tmp_path_factory):
    """Start both node processes at once: their start-up (imports, model) overlaps."""
    logs = tmp_path_factory.mktemp("node_logs")
    common = ["-p", f"manifest:={tiny_manifest}", "-p", "confidence_threshold:=0", "-p", "smoothing_alpha:=1.0",
              "-p", "qos_reliability:=reliable", "-p", "qos_depth:=50", "-p", "diagnostics_period_s:=0.3",
              "-p", "num_threads:=1"]
    raw = NodeProcess("raw", [*common, "-p", "publish_incomplete:=true", "-r", f"image:={RAW_TOPIC}",
                              "-r", f"human_action:={RAW_OUT}"], logs / "raw.log")
    comp = NodeProcess("compressed", ["--params-file", str(PARAMS_FILE), *common, "-p", "input:=compressed",
                                      "-r", "__node:=human_action_compressed",
                                      "-r", f"image/compressed:={COMP_TOPIC}", "-r", f"human_action:={COMP_OUT}"],
                       logs / "compressed.log")
    # the same model with sample_period_s in its manifest: the node samples by header stamps
    timed_manifest = tiny_manifest.with_name("tiny_timed.yaml")
    data = yaml.safe_load(tiny_manifest.read_text())
    data["sample_period_s"] = PERIOD_S
    timed_manifest.write_text(yaml.safe_dump(data, sort_keys=False))
    timed = NodeProcess("timed", [*common, "-p", f"manifest:={timed_manifest}", "-p", "publish_incomplete:=true",
                                  "-r", "__node:=human_action_timed", "-r", f"image:={TIME_TOPIC}",
                                  "-r", f"human_action:={TIME_OUT}"], logs / "timed.log")
    procs = {"raw": raw, "compressed": comp, "timed": timed}
    yield procs
    for p in procs.values():  # always: whatever the tests did
        p.kill()


@pytest.fixture(scope="module")
def listener(tiny_manifest):
    lis = Listener()
    yield lis
    lis.close()


def _ready(listener: Listener, proc: NodeProcess, publisher, out_topic: str) -> NodeProcess:
    """Wait until the node's input and output are both matched with this process (no message lost)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while publisher.get_subscription_count() < 1 or listener.subs[out_topic].get_publisher_count() < 1:
        if not proc.alive():
            pytest.fail(f"{proc.name} node exited with {proc.proc.returncode} while starting:\n{proc.output()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{proc.name} node not subscribed after {STARTUP_TIMEOUT_S:.0f} s:\n{proc.output()}")
        time.sleep(0.1)
    return proc


class Stream:
    """Sends frames to one node and tracks what the node must have done with them."""

    def __init__(self, listener: Listener, out_topic: str, publisher, compressed: bool) -> None:
        self.listener, self.out_topic, self.pub, self.compressed = listener, out_topic, publisher, compressed
        self.offered = 0  # valid frames the node has seen (its sampling phase)
        self.sent = 0  # every message sent
        self.last_ns = BASE_NS
        self.last_shape: tuple[int, int] | None = None

    def message(self, frame: np.ndarray, stamp_ns: int):
        from sensor_msgs.msg import CompressedImage, Image

        if self.compressed:
            ok, png = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))  # lossless
            msg = CompressedImage(format="rgb8; png compressed bgr8", data=png.tobytes())
        else:
            h, w = frame.shape[:2]
            msg = Image(height=h, width=w, encoding="rgb8", is_bigendian=0, step=3 * w, data=frame.tobytes())
        msg.header.frame_id = FRAME_ID
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 10**9)
        return msg

    def send_raw(self, msg, valid: bool) -> None:
        self.pub.publish(msg)
        self.sent += 1
        self.offered += int(valid)

    def received(self) -> list:
        return [m for _, m in self.listener.actions[self.out_topic]]

    def send_clip(self, frames: np.ndarray, start_ns: int, lockstep: bool, dt_ns: int = 50_000_000):
        """Publish ``frames``; returns [(stamp_ns, frame)] of the sampled ones, oldest first.

        ``lockstep``: wait for the node's answer to each sampled frame (publish_incomplete node);
        otherwise pause after each sampled frame so the inference thread is idle again."""
        sampled = []
        for i, frame in enumerate(frames):
            stamp = start_ns + i * dt_ns
            is_sampled = self.offered % K == 0
            before = len(self.received())
            self.send_raw(self.message(frame, stamp), valid=True)
            self.last_ns, self.last_shape = stamp, frame.shape[:2]
            if is_sampled:
                sampled.append((stamp, frame))
                if lockstep:
                    self.listener.wait(lambda: any(_ns(m.header.stamp) == stamp for m in self.received()[before:]),
                                       what=f"the prediction for frame {i} (stamp {stamp})")
                else:
                    time.sleep(0.15)
        return sampled


def _ns(t) -> int:
    return int(t.sec) * 10**9 + int(t.nanosec)


@pytest.fixture(scope="module")
def raw_node(processes, listener):
    return _ready(listener, processes["raw"], listener.raw_pub, RAW_OUT)


@pytest.fixture(scope="module")
def raw_stream(raw_node, listener):
    return Stream(listener, RAW_OUT, listener.raw_pub, compressed=False)


@pytest.fixture(scope="module")
def timed_node(processes, listener):
    return _ready(listener, processes["timed"], listener.time_pub, TIME_OUT)


@pytest.fixture(scope="module")
def compressed_node(processes, listener):
    return _ready(listener, processes["compressed"], listener.comp_pub, COMP_OUT)


def _clip(action: str, seed: int, n: int, size: int = 64) -> np.ndarray:
    from step_ros.data.synthetic import render_clip

    return render_clip(action, seed=seed, size=size, num_frames=n)


def check_predictions(messages: list, sampled: list, offline, pad: bool, first_sequence: int | None = None) -> None:
    """Published messages for one clip (fresh window) against the offline computation."""
    model = offline.model
    probs = offline([f for _, f in sampled], pad)
    by_stamp = {_ns(m.header.stamp): m for m in messages}
    history: dict[str, list[int]] = {}
    expected_count = 0
    sequences = []
    for j, (stamp, _) in enumerate(sampled):
        if not probs[j]:
            assert stamp not in by_stamp, "published a prediction for an incomplete window"
            continue
        expected_count += 1
        assert stamp in by_stamp, f"no prediction for sampled frame {j} (stamp {stamp})"
        m = by_stamp[stamp]
        sequences.append(m.sequence)
        n = min(j + 1, T)
        assert m.header.frame_id == FRAME_ID
        assert _ns(m.window_start) == sampled[j - n + 1][0], "window_start is not the oldest frame's stamp"
        assert (m.frames_in_window, m.frames_expected, m.window_complete) == (n, T, n == T)
        assert [t.task for t in m.tasks] == model.manifest.tasks
        for spec, tp in zip(model.manifest.heads, m.tasks):
            p = probs[j][spec.task]
            top = int(np.argmax(p))
            hist = history.setdefault(spec.task, [])
            hist.append(top)
            scores = {s.label: s.score for s in tp.top_k}
            assert len(tp.top_k) == len(spec.labels) == 3
            assert [s.score for s in tp.top_k] == sorted(scores.values(), reverse=True)
            assert all(spec.labels[s.class_index] == s.label for s in tp.top_k)
            np.testing.assert_allclose([scores[label] for label in spec.labels], p, atol=2e-4,
                                       err_msg=f"{spec.task} probabilities of frame {j}")
            assert np.sort(p)[-1] - np.sort(p)[-2] > 1e-3, "offline near-tie: pick another clip"
            assert (tp.label, tp.class_index) == (spec.labels[top], top), f"{spec.task} frame {j}"
            assert tp.confident and tp.confidence_threshold == 0.0
            assert tp.confidence == pytest.approx(float(p[top]), abs=2e-4)
            assert tp.symmetric_counterpart == (spec.counterpart(spec.labels[top]) or "")
            assert tp.stable == (len(hist) >= 3 and len(set(hist[-3:])) == 1), f"stable flag of frame {j}"
    assert len([m for m in messages if _ns(m.header.stamp) in {s for s, _ in sampled}]) == expected_count
    assert sequences == list(range(sequences[0], sequences[0] + len(sequences))), "sequence must step by 1"
    if first_sequence is not None:
        assert sequences[0] == first_sequence


# =========================================================================== (a) predictions


def test_publishes_offline_predictions(raw_node, raw_stream, listener, offline):
    frames = _clip("pick_up", seed=1, n=24)
    sampled = raw_stream.send_clip(frames, BASE_NS, lockstep=True)
    assert len(sampled) == 12
    messages = raw_stream.received()
    assert len(messages) == 12, "one message per sampled frame (publish_incomplete)"
    assert [_ns(m.header.stamp) for m in messages] == [s for s, _ in sampled]
    check_predictions(messages, sampled, offline, pad=True, first_sequence=1)
    d = listener.diag(RAW_FQN, lambda d: int(d["frames received"]) == raw_stream.sent
                      and int(d["frames processed"]) == 12)
    assert d["dropped_busy"] == "0" and d["invalid"] == "0" and d["window resets"] == "0"
    assert d["frames sampled"] == "12" and d["backbone passes"] == "12" and d["published"] == "12"
    assert d["head runner"] in ("fast", "reference") and d["backend"].startswith("torch")
    if d["head runner"] == "fast":  # the exact engine's counters: nothing handed back, nothing extreme
        assert d["head kernels"] in ("torch", "onnxruntime")
        assert d["fast engine fallbacks (non-finite)"] == "0" and d["fast engine exact rows"] == "0"
    assert "tiny" in d["model"] and d["frame interval"] == str(K)
    # the tiny manifest has no sample_period_s (an old one): frame-count sampling, the camera's rate
    # and the sample period are still measured from the stamps (20 Hz camera, every 2nd frame)
    assert d["sampling"] == f"frames: every {K}" and d["repeated samples (camera slower than the model)"] == "0"
    assert float(d["camera rate from stamps (Hz)"]) == pytest.approx(20.0, rel=0.01)
    assert float(d["sample period measured (s)"]) == pytest.approx(K / 20.0, rel=0.01)
    for key in ("input rate (Hz)", "inference rate (Hz)", "published rate (Hz)", "latency median (ms)",
                "latency p95 (ms)", "compute median (ms)"):
        assert key in d


def test_a_time_sampled_node_takes_the_frame_nearest_each_sample_time(timed_node, listener, offline):
    """Manifest sample_period_s 0.1 s, camera at 40 Hz: every 4th frame, by header stamps, and the
    predictions are the offline ones for those frames; /diagnostics reports the camera's rate."""
    stream = Stream(listener, TIME_OUT, listener.time_pub, compressed=False)
    frames = _clip("put_down", seed=3, n=24)
    dt_ns = 25_000_000
    sampled = []
    for i, frame in enumerate(frames):
        stamp = BASE_NS + i * dt_ns
        before = len(stream.received())
        stream.send_raw(stream.message(frame, stamp), valid=True)
        if i % 4 == 0:  # the sample times t0, t0 + 0.1 s, ...: the frame nearest each
            sampled.append((stamp, frame))
            listener.wait(lambda: any(_ns(m.header.stamp) == stamp for m in stream.received()[before:]),
                          what=f"the prediction for frame {i}")
    messages = stream.received()
    assert [_ns(m.header.stamp) for m in messages] == [s for s, _ in sampled]
    check_predictions(messages, sampled, offline, pad=True, first_sequence=1)
    d = listener.diag(TIME_FQN, lambda d: int(d["frames received"]) == len(frames)
                      and int(d["frames processed"]) == len(sampled))
    assert d["sampling"] == f"time: every {PERIOD_S:.4f} s" and d["dropped_busy"] == "0"
    assert float(d["camera rate from stamps (Hz)"]) == pytest.approx(40.0, rel=0.01)
    assert float(d["sample period measured (s)"]) == pytest.approx(PERIOD_S, rel=0.01)
    assert d["repeated samples (camera slower than the model)"] == "0"


def test_debug_image_only_while_subscribed_and_exactly_what_it_shows(raw_node, raw_stream, listener, offline):
    """~/debug_image: not built without a subscriber; with one, it is the newest frame with the
    published labels and the STEP head's CLS attention, pixel for pixel what the renderer draws."""
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from step_ros.model.backbone import crop_box
    from step_ros.ros.debug_image import TaskLine, render_debug_image

    d = listener.diag(RAW_FQN, lambda d: "debug images" in d)
    assert d["debug images"] == "0", "nobody subscribed: nothing may be built"
    images: list = []
    qos = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE)
    sub = listener.node.create_subscription(Image, RAW_FQN + "/debug_image", lambda m: listener._add(images, m), qos)
    deadline = time.monotonic() + WAIT_S
    while sub.get_publisher_count() < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    start = raw_stream.last_ns + 5_000_000_000  # a gap: the window starts afresh with this clip
    sampled = raw_stream.send_clip(_clip("open", seed=5, n=12), start, lockstep=True, dt_ns=300_000_000)
    listener.wait(lambda: images, what="a debug image")
    _, image = images[-1]
    assert (image.encoding, image.width, image.step) == ("rgb8", 640, 640 * 3) and image.height == 640  # 64 x 64 in
    stamp = _ns(image.header.stamp)
    index = [s for s, _ in sampled].index(stamp)
    action = next(m for m in raw_stream.received() if _ns(m.header.stamp) == stamp)
    # The same picture from the published message and an offline window of the same frames.
    model = offline.model
    frames = [f for _, f in sampled[: index + 1]]
    idx = list(range(max(0, index - T + 1), index + 1))
    idx = [idx[0]] * (T - len(idx)) + idx
    tokens = torch.cat([model.backbone.encode(f[None]) for f in frames])
    head = model.heads["task_step"]
    attention = head.cls_attention(tokens[idx][None])[0, -1].numpy()
    side = int(round(len(attention) ** 0.5))
    lines = [TaskLine(t.task, t.top_k[0].label, t.confidence, t.confident, t.stable) for t in action.tasks]
    expected = render_debug_image(frames[-1], lines, 640, attention.reshape(side, side),
                                  crop_box(64, 64, IMAGE_SIZE), f"#{action.sequence}  {action.frames_in_window}/"
                                  f"{action.frames_expected} frames")
    got = np.frombuffer(bytes(image.data), np.uint8).reshape(640, 640, 3)
    assert np.abs(got.astype(int) - expected.astype(int)).mean() < 0.5  # float rounding of the heat map
    plain = cv2.resize(frames[-1], (640, 640), interpolation=cv2.INTER_LINEAR)
    assert np.abs(got.astype(int) - plain.astype(int)).mean() > 5  # labels and the heat map are drawn
    built = int(listener.diag(RAW_FQN, lambda d: int(d["debug images"]) >= len(images))["debug images"])
    assert 1 <= built <= len(sampled)
    listener.node.destroy_subscription(sub)
    time.sleep(1.0)  # the unsubscription reaches the node
    now = listener.diag(RAW_FQN)
    before, processed = int(now["debug images"]), int(now["frames processed"])
    raw_stream.send_clip(_clip("close", seed=6, n=6), raw_stream.last_ns + 5_000_000_000, lockstep=True)
    after = listener.diag(RAW_FQN, lambda d: int(d["frames processed"]) >= processed + 3)
    assert int(after["debug images"]) == before, "no subscriber: no debug image built"


# =========================================================================== (b) bad input


def _bad_messages(case: str, stream: Stream) -> list:
    from sensor_msgs.msg import Image

    frame = _clip("shake", seed=3, n=2)[0]
    good = stream.message(frame, stream.last_ns + 50_000_000)
    if case == "size_mismatch":
        short = stream.message(frame, stream.last_ns + 50_000_000)
        short.data = bytes(good.data)[:-7]
        long = stream.message(frame, stream.last_ns + 100_000_000)
        long.data = bytes(good.data) + b"\0" * 3
        return [short, long]
    if case == "unsupported_encoding":
        f32 = Image(height=8, width=8, encoding="32FC1", step=32, data=bytes(8 * 32))
        bayer = Image(height=8, width=8, encoding="bayer_rggb8", step=8, data=bytes(64))
        for m in (f32, bayer):
            m.header = good.header
        return [f32, bayer]
    if case == "empty":
        empty = Image(height=0, width=0, encoding="rgb8", step=0, data=b"")
        empty.header = good.header
        return [empty]
    raise ValueError(case)


BAD_CASES = ["size_mismatch", "unsupported_encoding", "empty", "backwards", "resize"]
_ACTIONS = ("approach", "rise", "open", "fall", "shake")


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_counted_and_the_node_recovers(case, raw_node, raw_stream, listener, offline):
    stream = raw_stream
    before = listener.diag(RAW_FQN, lambda d: int(d["frames received"]) == stream.sent)
    n_before = len(stream.received())
    invalid_sent = 0
    size = 64
    if case in ("size_mismatch", "unsupported_encoding", "empty"):
        for msg in _bad_messages(case, stream):
            stream.send_raw(msg, valid=False)
            invalid_sent += 1
        start = stream.last_ns + 10 * 10**9  # a gap: the clip starts a fresh window
    elif case == "resize":
        size = 48  # same stream, new resolution
        start = stream.last_ns + 50_000_000
    else:  # backwards: a bag looping
        start = stream.last_ns - 100 * 10**9
    frames = _clip(_ACTIONS[BAD_CASES.index(case)], seed=7, n=16, size=size)
    if case == "resize":
        frames = np.ascontiguousarray(frames[:, 4:44])  # 48 wide, 40 high: not square either
        assert stream.last_shape != frames.shape[1:3]
    elif stream.last_shape is not None and stream.last_shape != frames.shape[1:3]:
        # same resolution as before, so that only the time check can reset the window
        h, w = stream.last_shape
        frames = np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in frames])
    sampled = stream.send_clip(frames, start, lockstep=True)
    assert raw_node.alive(), raw_node.output()
    new = stream.received()[n_before:]
    check_predictions(new, sampled, offline, pad=True)
    after = listener.diag(RAW_FQN, lambda d: int(d["frames received"]) == stream.sent
                          and int(d["published"]) == len(stream.received()))

    def count(d, key):
        return int(d.get(key, "0"))

    if invalid_sent:
        assert count(after, f"invalid/{case}") - count(before, f"invalid/{case}") == invalid_sent
        assert count(after, "invalid") - count(before, "invalid") == invalid_sent
        assert count(after, "resets/gap") - count(before, "resets/gap") == 1
        log = raw_node.output()
        assert log.count(f"dropping image [{case}]") == 1, "each reason is logged once, then throttled"
    else:
        assert count(after, f"resets/{case}") - count(before, f"resets/{case}") == 1
        assert count(after, "invalid") == count(before, "invalid")
    assert after["dropped_busy"] == "0"
    assert "Traceback" not in raw_node.output()


# =========================================================================== compressed input


def test_corrupt_compressed_is_counted_and_png_frames_predict(compressed_node, listener, offline):
    from sensor_msgs.msg import CompressedImage

    stream = Stream(listener, COMP_OUT, listener.comp_pub, compressed=True)
    d = listener.diag(COMP_FQN)
    assert d["input"] == "compressed", "-p after --params-file must win"
    assert d["input topic"] == COMP_TOPIC
    for i in range(2):  # both pass the cheap checks; the sampled one fails to decode
        bad = CompressedImage(format="jpeg", data=b"\xff\xd8\xff garbage, not a jpeg" * 3)
        bad.header.frame_id = FRAME_ID
        bad.header.stamp.sec = 1_700_000_000 + i
        stream.send_raw(bad, valid=True)
    depth = CompressedImage(format="16UC1; compressedDepth png", data=b"\x00" * 16)
    stream.send_raw(depth, valid=False)
    # let the inference thread decode (and reject) the sampled corrupt frame before the clip
    # follows, so a busy machine cannot turn it into a keep-newest drop instead
    listener.diag(COMP_FQN, lambda d: d.get("invalid/corrupt_compressed") == "1"
                  and d.get("invalid/unsupported_encoding") == "1")
    frames = _clip("rise", seed=5, n=16)
    sampled = stream.send_clip(frames, BASE_NS + 10 * 10**9, lockstep=False)
    listener.wait(lambda: any(_ns(m.header.stamp) == sampled[-1][0] for m in stream.received()),
                  what="the last prediction of the compressed clip")
    check_predictions(stream.received(), sampled, offline, pad=False, first_sequence=1)
    after = listener.diag(COMP_FQN, lambda d: int(d["frames received"]) == stream.sent
                          and int(d["published"]) == len(stream.received()))
    assert after["invalid/corrupt_compressed"] == "1"
    assert after["invalid/unsupported_encoding"] == "1"
    assert after["dropped_busy"] == "0", "inference was slower than the test's pacing"
    assert compressed_node.alive()
    log = compressed_node.output()
    assert "dropping image [corrupt_compressed]" in log and "Traceback" not in log


# =========================================================================== (d) signals


def _stop(proc: NodeProcess, sig: int) -> None:
    assert proc.alive(), proc.output()
    started = time.monotonic()
    proc.proc.send_signal(sig)
    try:
        code = proc.proc.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"node still running 10 s after {signal.Signals(sig).name}:\n{proc.output()}")
    elapsed = time.monotonic() - started
    out = proc.output()
    assert code == 0, f"exit code {code} after {signal.Signals(sig).name}:\n{out}"
    assert "Traceback" not in out and "Exception" not in out, out
    assert elapsed < 5.0, f"took {elapsed:.1f} s to stop"


def test_sigterm_exits_cleanly(compressed_node):
    _stop(compressed_node, signal.SIGTERM)


def test_sigint_exits_cleanly(raw_node):
    _stop(raw_node, signal.SIGINT)
