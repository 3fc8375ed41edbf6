"""``human_action``: camera images in, ``step_ros/msg/HumanAction`` out (one per sampled frame).

A thin rclpy adapter over :class:`step_ros.model.streaming.StreamingEngine` (no model logic
here). One node, one job:

* subscription ``image`` (``sensor_msgs/Image``; or ``image/compressed``,
  ``sensor_msgs/CompressedImage``, with ``input:=compressed``), sensor-data QoS by default
  (best effort, keep last ``qos_depth``): remap it to the camera;
* publisher ``human_action`` (``step_ros/msg/HumanAction``), reliable, keep last 10;
* publisher ``/diagnostics`` (``diagnostic_msgs/DiagnosticArray``), every ``diagnostics_period_s``;
* publisher ``~/debug_image`` (``sensor_msgs/Image``, rgb8): the newest frame with each task's
  label, confidence and flags and the STEP attention map, at most ``debug_image_rate`` per second
  and only while someone subscribes (rqt_image_view, Foxglove).

Threading and drop policy. The subscription callback does only cheap work: it validates the
header fields (encoding, size, step, data length: no pixel access), asks the engine whether the
frame is a sampled one (``offer()``: every k-th valid frame) and puts sampled messages into a
short queue (``max_backlog`` frames). When it is full the oldest waiting message is dropped and
counted as ``dropped_busy``. The inference loop (on the main thread, which loaded the model;
the executor spins in a helper thread, see :meth:`HumanActionNode.run_inference`) takes
messages in order, converts the image to RGB, runs ``engine.process`` (continuity checks and
window resets, one backbone pass, the heads), smooths, and publishes. Inference never blocks
the callback and the backlog can never grow beyond ``max_backlog``.

Load shedding, in order. Every sampled frame costs a backbone pass and the per-frame head
work (it must, to be in the window); a prediction costs extra. So when another sampled frame is
already waiting, a due prediction is postponed to the next frame (at most ``max_deferrals``
times in a row; counted as ``predictions deferred``): the node publishes a little less often
before it drops any frame. Frames are dropped only when even that cannot keep up.

A bad message is counted by reason, logged once per reason (then at most every 10 s with a
count) and dropped; the node never dies on one. SIGINT and SIGTERM stop the node cleanly
(exit code 0).
"""

from __future__ import annotations

import logging
import math
import signal
import statistics
import sys
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any, Callable

import rclpy
import rclpy.executors
from builtin_interfaces.msg import Time as TimeMsg
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.exceptions import ParameterException
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image

from step_ros.msg import HumanAction, LabelScore, TaskPrediction

from . import conversions
from .conversions import ImageError

NODE_NAME = "human_action"
DIAGNOSTIC_NAME = "step_ros: human_action"
LOG_REPEAT_S = 10.0  # a repeated bad-input reason is logged at most this often
_NS = 1_000_000_000


# --------------------------------------------------------------------------- helpers


def default_manifest() -> str:
    """The demo model: ``share/step_ros/models/demo/manifest.yaml`` of an installed package, else
    the source checkout's ``models/demo/manifest.yaml`` (the venv build installs no models)."""
    from step_ros.resources import demo_manifest

    return str(demo_manifest())


def stamp_seconds(stamp: Any) -> float:
    """Float seconds of a ``builtin_interfaces/Time`` as the rest of step_ros computes them."""
    return (int(stamp.sec) * _NS + int(stamp.nanosec)) / _NS


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(math.ceil(q / 100.0 * len(s))) - 1))
    return s[k]


def _fmt(x: float, digits: int = 1) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


class FrameQueue:
    """Bounded FIFO between the callback (producer) and the inference thread: drop-oldest when
    full, so the backlog (and the latency it adds) never exceeds ``maxlen`` frames."""

    def __init__(self, maxlen: int) -> None:
        self._cond = threading.Condition()
        self._items: deque = deque()
        self.maxlen = max(1, maxlen)
        self._closed = False

    def put(self, item: Any) -> bool:
        """Append ``item``; True if the oldest waiting item was dropped to make room."""
        with self._cond:
            dropped = len(self._items) >= self.maxlen
            if dropped:
                self._items.popleft()
            self._items.append(item)
            self._cond.notify()
            return dropped

    def take(self, timeout: float) -> Any:
        """The oldest item, or None after ``timeout`` / when closed."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class _RosLogHandler(logging.Handler):
    """Python ``logging`` (the core's warnings, e.g. random backbone weights) -> the ROS logger."""

    def __init__(self, logger: Any) -> None:
        super().__init__(logging.INFO)
        self.ros_logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = f"[{record.name}] {record.getMessage()}"
            if record.levelno >= logging.ERROR:
                self.ros_logger.error(text)
            elif record.levelno >= logging.WARNING:
                self.ros_logger.warning(text)
            else:
                self.ros_logger.info(text)
        except Exception:  # noqa: BLE001 - logging must never raise
            pass


class ConfigError(ValueError):
    """A node parameter has an invalid value (message names the parameter)."""


# --------------------------------------------------------------------------- the node

# name: (default, description, extra descriptor fields)
_PARAMETERS: list[tuple[str, Any, str, dict[str, Any]]] = [
    ("manifest", "", "model manifest YAML (backbone, frames, frame interval, heads); '' = the demo model "
                     "(share/step_ros/models/demo/manifest.yaml, else the source checkout's)", {}),
    ("weights", "", "backbone weights path overriding the manifest's backbone.weights ('' = the manifest's)", {}),
    ("backend", "torch", "backbone inference backend: torch | onnxruntime | onnxruntime-int8 | tensorrt", {}),
    ("device", "auto", "device of the heads and of the torch/TensorRT backbone: auto (cuda if available) | cpu | "
                       "cuda | cuda:N; tokens stay on it until the final probabilities", {}),
    ("engine_cache_dir", "", "where exported ONNX graphs and TensorRT engines are cached ('' = "
                             "$STEP_ROS_CACHE_DIR or ~/.cache/step_ros); engines are keyed by ONNX hash, "
                             "TensorRT version, GPU and precision", {}),
    ("force_engine_update", False, "re-export the ONNX graph and rebuild the TensorRT engine at start-up even "
                                   "if a cached one matches", {}),
    ("head_runner", "fast", "how heads run on the window: fast (exact incremental STEP engine) | reference "
                            "(plain forward)", {}),
    ("head_kernels", "auto", "who runs the fast engine's block kernels: onnxruntime (MLAS, CPU) | torch (any "
                             "device) | native (step_ros's compiled, fused block creation; CPU with AVX-512) | auto "
                             "(on the CPU with >= 128 tokens per frame: those that run here timed at the first frame, "
                             "the fastest kept; else torch); same numbers", {}),
    ("head_block_dtype", "float32", "how the fast engine stores its attention blocks: float32 (exact to float32 "
                                    "rounding) | bfloat16 (half the memory, 1.3-1.65x faster heads on a CPU; every "
                                    "attention weight within 0.4 % of the exact one; kernels torch, native or auto)", {}),
    ("sampling", "auto", "how camera frames are sampled into the window: time (by header stamps, every "
                         "sample_period_s of the manifest, the frame nearest each sample time) | frames (every "
                         "frame_interval-th frame) | auto (time when the manifest has sample_period_s and "
                         "frame_interval is 0, else frames)", {}),
    ("frame_interval", 0, "frame-count sampling: sample every k-th valid camera frame into the window; 0 = the "
                          "manifest's frame_interval; > 0 selects frame-count sampling under sampling:=auto",
     {"integer_range": (0, 1000)}),
    ("prediction_stride", 1, "predict (and publish) every n-th sampled frame", {"integer_range": (1, 1000)}),
    ("max_backlog", 2, "sampled frames that may wait for the inference thread; when full the oldest is dropped "
                       "(counted as dropped_busy)", {"integer_range": (1, 100)}),
    ("max_deferrals", 1, "when another sampled frame is already waiting, postpone a due prediction to the next "
                         "sampled frame, at most this many times in a row (publish a little less often rather than "
                         "drop frames from the window); 0 = never", {"integer_range": (0, 1000)}),
    ("confidence_threshold", 0.5, "TaskPrediction.confident = smoothed confidence >= this; below it label is '' "
                                  "and class_index NO_CLASS", {"float_range": (0.0, 1.0)}),
    ("smoothing_alpha", 0.5, "EMA weight of the newest prediction's probabilities (1 = no smoothing)",
     {"float_range": (0.0, 1.0)}),
    ("stable_count", 3, "TaskPrediction.stable = same top label over this many published windows",
     {"integer_range": (1, 1000)}),
    ("top_k", 3, "number of LabelScores in TaskPrediction.top_k (capped at the number of classes)",
     {"integer_range": (0, 1000)}),
    ("max_gap_s", 1.0, "reset the window when sampled frames are further apart than this (seconds)",
     {"float_range": (0.0, 3600.0)}),
    ("publish_incomplete", False, "also publish while the window fills up (window_complete false, front padded "
                                  "with the oldest frame)", {}),
    ("input", "raw", "raw: subscribe 'image' (sensor_msgs/Image); compressed: subscribe 'image/compressed' "
                     "(sensor_msgs/CompressedImage)", {}),
    ("qos_depth", 5, "input subscription queue depth (KEEP_LAST)", {"integer_range": (1, 1000)}),
    ("qos_reliability", "best_effort", "input subscription reliability: best_effort (sensor data QoS) | reliable",
     {}),
    ("num_threads", 0, "torch CPU threads for inference (process-wide); 0 = torch's default",
     {"integer_range": (0, 256)}),
    ("diagnostics_period_s", 1.0, "period of the /diagnostics status (rates and latencies are over one period)",
     {"float_range": (0.05, 3600.0)}),
    ("debug_image_width", 640, "width of ~/debug_image (the newest frame with labels, confidences and flags); "
                               "built only while someone subscribes", {"integer_range": (64, 4096)}),
    ("debug_image_rate", 5.0, "at most this many ~/debug_image per second", {"float_range": (0.1, 1000.0)}),
    ("debug_attention", True, "overlay ~/debug_image with the first STEP head's global-CLS attention over the "
                              "newest frame's patches", {}),
]


class HumanActionNode(Node):
    """See the module docstring. Build with ``HumanActionNode()`` after ``rclpy.init``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self._python_log_handler = _RosLogHandler(self.get_logger())
        for name in ("step_ros", "__main__"):
            logging.getLogger(name).addHandler(self._python_log_handler)
            logging.getLogger(name).setLevel(logging.INFO)
        self.p = self._declare_parameters()
        self._lock = threading.Lock()  # counters shared by the callback, worker and timer
        self._stop = threading.Event()
        self._queue = FrameQueue(self.p["max_backlog"])
        self._deferred_in_row = 0  # inference thread only
        self._inference_error: str | None = None  # why run_inference() ended early, if it did
        self._inference_done = threading.Event()

        # cumulative counters (under _lock)
        self.received = 0
        self.sampled = 0
        self.dropped_busy = 0
        self.invalid: Counter = Counter()
        self.processed = 0
        self.published = 0
        self.processing_errors = 0
        self._last_sampled_t: float | None = None
        self._sampled_period: float | None = None
        self._engine_snapshot: dict[str, Any] = {"backbone_passes": 0, "resets": {}, "deferred": 0}
        # per diagnostics period (under _lock)
        self._latency_ms: list[float] = []
        self._compute_ms: list[float] = []
        self._last_counts = {"received": 0, "processed": 0, "published": 0, "dropped_busy": 0, "invalid": 0,
                             "errors": 0}
        self._last_diag = time.monotonic()
        self.debug_images = 0  # inference thread writes, diagnostics read (under _lock)
        self._debug_ms: list[float] = []
        self._last_debug = -math.inf
        # bad-input logging state
        self._log_state: dict[str, list[float]] = {}  # reason -> [last log time, suppressed count]

        self._build_model()
        self._stamps: dict[float, TimeMsg] = {}
        self._stamp_order: deque = deque()
        self._sequence = 0

        reliability = ReliabilityPolicy.BEST_EFFORT if self.p["qos_reliability"] == "best_effort" \
            else ReliabilityPolicy.RELIABLE
        in_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=self.p["qos_depth"], reliability=reliability,
                            durability=DurabilityPolicy.VOLATILE)
        out_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.VOLATILE)
        self.pub = self.create_publisher(HumanAction, "human_action", out_qos)
        # Reliable, keep last 1: rqt_image_view and Foxglove subscribe reliably; only the newest matters.
        debug_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                               durability=DurabilityPolicy.VOLATILE)
        self.debug_pub = self.create_publisher(Image, "~/debug_image", debug_qos)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.diag_timer = self.create_timer(self.p["diagnostics_period_s"], self._publish_diagnostics)

        if self.p["input"] == "compressed":
            self.input_topic = "image/compressed"
            self.sub = self.create_subscription(CompressedImage, self.input_topic, self._on_compressed, in_qos)
        else:
            self.input_topic = "image"
            self.sub = self.create_subscription(Image, self.input_topic, self._on_image, in_qos)
        self.get_logger().info(
            f"ready: {self.sub.topic_name} ({self.p['input']}, {self.p['qos_reliability']}, depth "
            f"{self.p['qos_depth']}) -> {self.pub.topic_name}; model '{self.manifest.name}' "
            f"[{', '.join(self.manifest.tasks)}], T={self.manifest.frames}, frame interval "
            f"{self.engine.frame_interval}; backend {self.backend_name}, heads {self.runner_name}, "
            f"images via {conversions.converter_name()}")

    # ------------------------------------------------------------------ setup

    def _declare_parameters(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        overrides = getattr(self, "_parameter_overrides", None)
        for name, default, text, extra in _PARAMETERS:
            desc = ParameterDescriptor(description=text, read_only=True)
            if "integer_range" in extra:
                lo, hi = extra["integer_range"]
                desc.integer_range = [IntegerRange(from_value=lo, to_value=hi, step=1)]
            if "float_range" in extra:
                lo, hi = extra["float_range"]
                desc.floating_point_range = [FloatingPointRange(from_value=lo, to_value=hi, step=0.0)]
            if isinstance(default, float) and isinstance(overrides, dict):
                # `-p confidence_threshold:=0` arrives as an INTEGER: accept it for a double parameter
                given = overrides.get(name)
                if given is not None and given.type_ == Parameter.Type.INTEGER:
                    overrides[name] = Parameter(name, Parameter.Type.DOUBLE, float(given.value))
            values[name] = self.declare_parameter(name, default, desc).value
        from step_ros.model.fast_kernels import BLOCK_DTYPES, KERNELS

        choices = {"backend": None, "head_runner": ("fast", "reference"),
                   "head_kernels": KERNELS, "head_block_dtype": BLOCK_DTYPES, "input": ("raw", "compressed"),
                   "qos_reliability": ("best_effort", "reliable")}
        for name, allowed in choices.items():
            values[name] = str(values[name]).strip().lower()
            if allowed and values[name] not in allowed:
                raise ConfigError(f"parameter {name}: {values[name]!r} is not one of {', '.join(allowed)}")
        if values["head_block_dtype"] != "float32" and values["head_kernels"] == "onnxruntime":
            raise ConfigError(f"parameter head_block_dtype: {values['head_block_dtype']} blocks need head_kernels "
                              f"torch, native or auto (ONNX Runtime's kernels store float32 blocks)")
        if not 0.0 < values["smoothing_alpha"] <= 1.0:
            raise ConfigError(f"parameter smoothing_alpha must be in (0, 1], got {values['smoothing_alpha']}")
        if not values["manifest"]:
            values["manifest"] = default_manifest()
        return values

    def _build_model(self) -> None:
        import torch

        from step_ros.model.manifest import load_manifest
        from step_ros.model.multitask import MultiTaskModel
        from step_ros.model.streaming import (
            SAMPLING_MODES,
            PredictionSmoother,
            ReferenceRunner,
            StreamingEngine,
            sampling_period,
        )

        p = self.p
        if p["num_threads"] > 0:
            torch.set_num_threads(p["num_threads"])
        manifest = load_manifest(p["manifest"])
        if p["weights"]:
            manifest.backbone.weights = Path(p["weights"]).expanduser()
            manifest.backbone.random_seed = None
        self.get_logger().info(f"loading model {manifest.path} ...")
        started = time.perf_counter()
        model = MultiTaskModel.from_manifest(manifest).eval()
        self.manifest = manifest
        self.model = model
        self.heads_device = self._heads_device()
        model.heads.to(self.heads_device)

        encode, self.backend_name, self.backend_info = self._make_encoder(model)
        if p["backend"] != "torch":
            # The graph backends have their own copy of the weights: drop PyTorch's (on a Jetson,
            # CPU and GPU share one memory, and a ViT-B would otherwise be held twice).
            model.backbone.release_weights()
        runner: Any = None
        self.runner_name = "reference"
        if p["head_runner"] == "fast":
            try:
                from step_ros.model.fast_step import FastStepRunner

                runner = FastStepRunner(model, kernels=p["head_kernels"], block_dtype=p["head_block_dtype"])
                self.runner_name = "fast"
            except Exception as exc:  # noqa: BLE001 - the reference runner gives the same numbers
                self.get_logger().warning(f"head_runner 'fast' unavailable ({type(exc).__name__}: {exc}); "
                                          f"using the reference runner")
        runner = runner or ReferenceRunner(model)
        sampling = p["sampling"]
        if sampling not in ("auto", *SAMPLING_MODES):
            raise ValueError(f"parameter sampling must be auto, time or frames, got {sampling!r}")
        if sampling == "auto" and p["frame_interval"]:
            sampling = "frames"  # an explicit frame_interval asks for frame-count sampling
        self.engine = StreamingEngine(
            model, frame_interval=p["frame_interval"] or None, stride=p["prediction_stride"],
            max_gap_s=p["max_gap_s"], min_frames=1 if p["publish_incomplete"] else None, top_k=p["top_k"],
            runner=runner, encode=encode, sample_period_s=sampling_period(manifest, sampling),
        )
        self.smoother = PredictionSmoother(manifest, alpha=p["smoothing_alpha"], threshold=p["confidence_threshold"],
                                           stable_count=p["stable_count"], top_k=p["top_k"])
        warm_s = self.engine.warm_up()
        kernels = (f", head kernels {runner.kernels}, {runner.block_dtype} blocks"
                   if hasattr(runner, "kernel_timings") else "")
        self.get_logger().info(f"model loaded in {time.perf_counter() - started:.1f} s (warm-up with a blank frame "
                               f"{warm_s:.1f} s{kernels}); backbone: {model.backbone.source}")

    def _fast_engine_counters(self) -> list[tuple[str, str]]:
        """The exact engine's own counters: predictions it handed to the reference forward
        (non-finite values) and block rows it keeps in the log domain (sharp attention)."""
        runner = self.engine.runner
        if not hasattr(runner, "exact_rows"):
            return []
        return [("head kernels", runner.kernels), ("head blocks", runner.block_dtype),
                ("fast engine fallbacks (non-finite)", str(runner.fallbacks)),
                ("fast engine exact rows", str(runner.exact_rows))]

    def _heads_device(self) -> Any:
        from step_ros.model.device import DeviceError, resolve_device

        try:
            return resolve_device(self.p["device"] or "auto")
        except DeviceError as exc:
            raise ConfigError(f"parameter device: {exc}") from None

    def _make_encoder(self, model: Any) -> tuple[Callable[[Any], Any] | None, str, str]:
        p = self.p
        device = None if p["device"] in ("", "auto") else p["device"]
        try:
            from step_ros.deploy.backends import create_encoder
        except Exception as exc:  # noqa: BLE001 - being finished elsewhere: the plain backbone still works
            if p["backend"] != "torch":
                raise ConfigError(f"backend {p['backend']!r} needs step_ros.deploy.backends, which cannot be "
                                  f"imported ({exc})") from None
            self.get_logger().warning(f"step_ros.deploy.backends unavailable ({exc}); encoding with the "
                                      f"backbone's own forward on the CPU")
            return None, "torch", "backbone.encode (cpu)"
        encoder = create_encoder(p["backend"], model.backbone, p["engine_cache_dir"] or None, device=device,
                                 threads=p["num_threads"] or None, force_engine_update=p["force_engine_update"],
                                 fingerprint=model.backbone.fingerprint)
        try:
            info = ", ".join(f"{k}={v}" for k, v in encoder.describe().items()
                             if k in ("device", "providers", "precision", "threads"))
        except Exception:  # noqa: BLE001
            info = ""
        return encoder, p["backend"], info

    # ------------------------------------------------------------------ callbacks (executor thread)

    def _on_image(self, msg: Image) -> None:
        with self._lock:
            self.received += 1
        try:
            conversions.validate_image(msg)
        except ImageError as exc:
            self._bad_input(exc.reason, str(exc), msg)
            return
        self._offer(msg)

    def _on_compressed(self, msg: CompressedImage) -> None:
        with self._lock:
            self.received += 1
        try:
            conversions.validate_compressed(msg)
        except ImageError as exc:
            self._bad_input(exc.reason, str(exc), msg)
            return
        self._offer(msg)

    def _offer(self, msg: Any) -> None:
        slots = self.engine.offer(stamp_seconds(msg.header.stamp))
        if not slots:
            return
        dropped = self._queue.put((msg, slots))
        with self._lock:
            self.sampled += 1
            if dropped:
                self.dropped_busy += 1

    def _bad_input(self, reason: str, text: str, msg: Any, count: bool = True) -> None:
        """Count and log (once per reason, then throttled) one rejected message."""
        now = time.monotonic()
        with self._lock:
            if count:
                self.invalid[reason] += 1
            state = self._log_state.get(reason)
            if state is None:
                self._log_state[reason] = [now, 0]
                line = f"dropping image [{reason}]: {text} (frame_id '{msg.header.frame_id}', stamp " \
                       f"{stamp_seconds(msg.header.stamp):.3f}); further '{reason}' drops are counted in " \
                       f"/diagnostics and logged at most every {LOG_REPEAT_S:.0f} s"
            elif now - state[0] >= LOG_REPEAT_S:
                line = f"dropping image [{reason}]: {text} ({state[1] + 1} such images since the last message)"
                self._log_state[reason] = [now, 0]
            else:
                state[1] += 1
                line = None
        if line:
            self.get_logger().warning(line)

    # ------------------------------------------------------------------ inference thread

    def run_inference(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        """The inference loop, on the calling thread, until :meth:`stop` or ``should_stop()``.

        Call it from the thread that built the node (``main`` does: the executor spins in a
        helper thread instead). Why: PyTorch's OpenMP workers belong to the first thread that
        ran parallel work -- the one that loaded the model; another thread gets a second worker
        team competing for the same cores, and ran the backbone and heads ~2.5x slower here.
        """
        try:
            while not self._stop.is_set() and not should_stop():
                item = self._queue.take(timeout=0.25)
                if item is None:
                    continue
                msg, slots = item
                try:
                    self._handle(msg, slots)
                except ImageError as exc:
                    self._bad_input(exc.reason, str(exc), msg)
                except Exception as exc:  # noqa: BLE001 - one failing frame must not stop the node
                    with self._lock:
                        self.processing_errors += 1
                    self._bad_input("processing_error", f"{type(exc).__name__}: {exc}", msg, count=False)
        except BaseException as exc:  # noqa: BLE001 - reported as ERROR in /diagnostics
            self._inference_error = f"{type(exc).__name__}: {exc}"
            self.get_logger().error(f"inference loop stopped: {self._inference_error}")
        finally:
            self._inference_done.set()

    def _handle(self, msg: Any, slots: int = 1) -> None:
        started = time.perf_counter()
        frame = conversions.msg_to_rgb(msg)
        stamp = msg.header.stamp
        t = stamp_seconds(stamp)
        self._remember_stamp(t, stamp)
        with self._lock:
            if self._last_sampled_t is not None and 0 < t - self._last_sampled_t <= self.p["max_gap_s"]:
                dt = t - self._last_sampled_t  # moving average of the time between two sampled frames
                self._sampled_period = dt if self._sampled_period is None else 0.9 * self._sampled_period + 0.1 * dt
            self._last_sampled_t = t
        engine = self.engine
        resets_before = sum(engine.stats.resets.values())
        behind = len(self._queue) > 0 and self._deferred_in_row < self.p["max_deferrals"]
        deferred_before = engine.stats.deferred
        prediction = engine.process(frame, t, predict=not behind, slots=slots)
        if engine.stats.deferred != deferred_before:
            self._deferred_in_row += 1
        elif prediction is not None:
            self._deferred_in_row = 0
        if sum(engine.stats.resets.values()) != resets_before:
            self.smoother.reset()
        snapshot = {"backbone_passes": engine.stats.backbone_passes, "resets": dict(engine.stats.resets),
                    "deferred": engine.stats.deferred}
        if prediction is None:
            with self._lock:
                self.processed += 1
                self._engine_snapshot = snapshot
            return
        smoothed = self.smoother.update(prediction)
        out = self._message(prediction, smoothed, msg.header.frame_id, stamp)
        self.pub.publish(out)
        if self.debug_pub.get_subscription_count() > 0:  # nobody watching: not even built
            self._publish_debug(frame, out)
        compute_ms = (time.perf_counter() - started) * 1e3  # the debug image's share included
        latency_ms = (self.get_clock().now().nanoseconds - (int(stamp.sec) * _NS + int(stamp.nanosec))) / 1e6
        with self._lock:
            self.processed += 1
            self.published += 1
            self._engine_snapshot = snapshot
            self._latency_ms.append(latency_ms)
            self._compute_ms.append(compute_ms)

    def _publish_debug(self, frame: Any, action: HumanAction) -> None:
        """~/debug_image: the newest frame, each task's label, confidence and flags, and the
        global-CLS attention of the first STEP head over the newest frame's patches."""
        now = time.monotonic()
        if now - self._last_debug < 1.0 / self.p["debug_image_rate"]:
            return
        self._last_debug = now
        started = time.perf_counter()
        from step_ros.model.backbone import crop_box
        from step_ros.ros.debug_image import TaskLine, render_debug_image

        lines = [TaskLine(t.task, t.top_k[0].label if t.top_k else (t.label or "-"), t.confidence, t.confident,
                          t.stable) for t in action.tasks]
        attention = crop = None
        head = self._attention_head()
        if head is not None:
            window = self.engine.window.window(pad_to_full=True)
            newest = head.cls_attention(window[None])[0, -1].float().cpu().numpy()
            side = math.isqrt(len(newest))
            attention = newest.reshape(side, side)
            crop = crop_box(frame.shape[0], frame.shape[1], self.model.backbone.image_size)
        header = f"#{action.sequence}  {action.frames_in_window}/{action.frames_expected} frames"
        image = render_debug_image(frame, lines, self.p["debug_image_width"], attention, crop, header)
        msg = Image()
        msg.header = action.header
        msg.height, msg.width = int(image.shape[0]), int(image.shape[1])
        msg.encoding, msg.is_bigendian, msg.step = "rgb8", 0, int(image.shape[1]) * 3
        msg.data = image.tobytes()
        self.debug_pub.publish(msg)
        with self._lock:
            self.debug_images += 1
            self._debug_ms.append((time.perf_counter() - started) * 1e3)

    def _attention_head(self) -> Any:
        if not self.p["debug_attention"]:
            return None
        for head in self.model.heads.values():
            if getattr(head, "global_cls", None) is not None and hasattr(head, "cls_attention"):
                return head
        return None

    def _remember_stamp(self, t: float, stamp: TimeMsg) -> None:
        """Exact ``Time`` of recent sampled frames, so window_start is the oldest frame's own stamp."""
        self._stamps[t] = stamp
        self._stamp_order.append(t)
        while len(self._stamp_order) > 2 * self.manifest.frames + 2:
            old = self._stamp_order.popleft()
            if old not in self._stamp_order:
                self._stamps.pop(old, None)

    def _time_of(self, t: float) -> TimeMsg:
        known = self._stamps.get(t)
        if known is not None:
            return known
        ns = max(0, int(round(t * _NS)))
        return TimeMsg(sec=ns // _NS, nanosec=ns % _NS)

    def _message(self, prediction: Any, smoothed: dict[str, Any], frame_id: str, stamp: TimeMsg) -> HumanAction:
        self._sequence += 1
        msg = HumanAction()
        msg.header.stamp = stamp
        msg.header.frame_id = frame_id
        msg.window_start = self._time_of(prediction.window_start)
        msg.frames_in_window = int(prediction.frames_in_window)
        msg.frames_expected = int(prediction.frames_expected)
        msg.window_complete = bool(prediction.window_complete)
        msg.sequence = self._sequence
        threshold = float(self.p["confidence_threshold"])
        k = int(self.p["top_k"])
        tasks = []
        for spec in self.manifest.heads:
            s = smoothed.get(spec.task)
            if s is None:
                continue
            r = s.result
            tp = TaskPrediction()
            tp.task = spec.task
            tp.confidence = float(r.confidence)
            tp.confidence_threshold = threshold
            tp.confident = bool(s.confident)
            tp.label = r.label if s.confident else ""
            tp.class_index = int(r.index) if s.confident else TaskPrediction.NO_CLASS
            tp.stable = bool(s.stable)
            tp.symmetric_counterpart = spec.counterpart(r.label) or ""
            tp.top_k = [LabelScore(label=label, class_index=int(i), score=float(score))
                        for i, label, score in r.top_k[:k]]
            tasks.append(tp)
        msg.tasks = tasks
        return msg

    # ------------------------------------------------------------------ diagnostics (executor thread)

    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        with self._lock:
            dt = max(1e-6, now - self._last_diag)
            self._last_diag = now
            invalid_total = sum(self.invalid.values())
            counts = {"received": self.received, "processed": self.processed, "published": self.published,
                      "dropped_busy": self.dropped_busy, "invalid": invalid_total, "errors": self.processing_errors}
            delta = {k: counts[k] - self._last_counts[k] for k in counts}
            self._last_counts = counts
            latency, self._latency_ms = self._latency_ms, []
            compute, self._compute_ms = self._compute_ms, []
            debug_ms, self._debug_ms = self._debug_ms, []
            debug_images = self.debug_images
            invalid = dict(self.invalid)
            snapshot = dict(self._engine_snapshot)
            sampled = self.sampled
        lat_med = statistics.median(latency) if latency else math.nan
        lat_p95 = _percentile(latency, 95)
        comp_med = statistics.median(compute) if compute else math.nan
        comp_p95 = _percentile(compute, 95)

        level, message = DiagnosticStatus.OK, "running"
        problems = []
        if self._inference_error or (self._inference_done.is_set() and not self._stop.is_set()):
            level, message = DiagnosticStatus.ERROR, f"inference loop stopped: {self._inference_error}"
        elif delta["errors"] and not delta["published"]:
            level, message = DiagnosticStatus.ERROR, f"inference failing: {delta['errors']} errors, nothing published"
        else:
            if delta["received"] == 0:
                problems.append(f"no images on {self.sub.topic_name}")
            elif delta["invalid"] == delta["received"]:
                problems.append(f"every image invalid ({', '.join(sorted(invalid))})")
            elif delta["invalid"]:
                problems.append(f"{delta['invalid']} invalid images")
            if delta["dropped_busy"]:
                problems.append(f"inference too slow: {delta['dropped_busy']} sampled frames dropped")
            if delta["errors"]:
                problems.append(f"{delta['errors']} processing errors")
            if problems:
                level, message = DiagnosticStatus.WARN, "; ".join(problems)
            else:
                message = f"running: {delta['received'] / dt:.1f} Hz in, {delta['published'] / dt:.1f} Hz published"

        values = [
            ("input topic", self.sub.topic_name),
            ("input", self.p["input"]),
            ("input rate (Hz)", _fmt(delta["received"] / dt, 2)),
            ("inference rate (Hz)", _fmt(delta["processed"] / dt, 2)),
            ("published rate (Hz)", _fmt(delta["published"] / dt, 2)),
            ("latency median (ms)", _fmt(lat_med)),
            ("latency p95 (ms)", _fmt(lat_p95)),
            ("compute median (ms)", _fmt(comp_med)),
            ("compute p95 (ms)", _fmt(comp_p95)),
            ("frames received", str(counts["received"])),
            ("frames sampled", str(sampled)),
            ("frames processed", str(counts["processed"])),
            ("dropped_busy", str(counts["dropped_busy"])),
            ("predictions deferred", str(snapshot["deferred"])),
            ("backlog", str(len(self._queue))),
            ("invalid", str(invalid_total)),
            *[(f"invalid/{reason}", str(n)) for reason, n in sorted(invalid.items())],
            ("processing errors", str(counts["errors"])),
            *[(f"resets/{reason}", str(n)) for reason, n in sorted(snapshot["resets"].items())],
            ("window resets", str(sum(snapshot["resets"].values()))),
            ("backbone passes", str(snapshot["backbone_passes"])),
            ("published", str(counts["published"])),
            ("sequence", str(self._sequence)),
            ("model", f"{self.manifest.name} ({self.manifest.path})"),
            ("backbone", str(self.model.backbone.source)),
            ("backend", f"{self.backend_name}{' (' + self.backend_info + ')' if self.backend_info else ''}"),
            ("head runner", self.runner_name),
            *self._fast_engine_counters(),
            ("heads device", str(self.heads_device)),
            ("sampling", (f"time: every {self.engine.sample_period_s:.4f} s" if self.engine.sample_period_s
                          else f"frames: every {self.engine.frame_interval}")),
            ("camera rate from stamps (Hz)", _fmt(1.0 / self.engine.schedule.camera_period_s, 2)
             if self.engine.schedule.camera_period_s else "-"),
            ("sample period measured (s)", f"{self._sampled_period:.4f}" if self._sampled_period else "-"),
            ("repeated samples (camera slower than the model)", str(self.engine.stats.repeated)),
            ("frame interval", str(self.engine.frame_interval)),
            ("frames per window", str(self.manifest.frames)),
            ("image conversion", conversions.converter_name()),
            ("debug images", str(debug_images)),
            ("debug image ms", f"{_percentile(debug_ms, 50):.1f}" if debug_ms else "-"),
        ]
        status = DiagnosticStatus(level=level, name=DIAGNOSTIC_NAME, message=message,
                                  hardware_id=self.get_fully_qualified_name(),
                                  values=[KeyValue(key=k, value=v) for k, v in values])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self.diag_pub.publish(array)

    # ------------------------------------------------------------------ shutdown

    def stop(self) -> None:
        """Ask the inference loop to end (after the frame in progress)."""
        self._stop.set()
        self._queue.close()

    def destroy_node(self) -> None:
        self.stop()
        for name in ("step_ros", "__main__"):
            logging.getLogger(name).removeHandler(self._python_log_handler)
        super().destroy_node()


# --------------------------------------------------------------------------- entry point


class _ShutdownRequested(BaseException):
    """Raised by the signal handler while the node is still starting (model loading)."""


def _startup_error(exc: BaseException) -> str:
    """One line for configuration errors (bad parameter, manifest, weights); a traceback otherwise."""
    if isinstance(exc, (ValueError, ImportError, OSError, ParameterException)):
        return f"cannot start: {exc}"
    import traceback

    return f"cannot start: {type(exc).__name__}: {exc}\n{''.join(traceback.format_exception(exc))}"


def main(args: list[str] | None = None) -> int:
    """``ros2 run step_ros step_ros_node`` / ``scripts/step_ros_node``; returns the exit code.

    SIGINT and SIGTERM: while starting, abandon the start; while running, leave the spin loop.
    Either way the inference loop is stopped, the node destroyed, rclpy shut down, exit code 0
    (1 if the model failed to load or the inference loop died).
    """
    from rclpy.signals import SignalHandlerOptions

    from step_ros.model.device import flush_denormals

    flush_denormals()  # before any PyTorch op starts its worker threads, so that they inherit it
    state = {"stop": False, "raise": True}

    def on_signal(signum: int, _frame: Any) -> None:
        state["stop"] = True
        if state["raise"]:
            state["raise"] = False
            raise _ShutdownRequested(signal.Signals(signum).name)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    node: HumanActionNode | None = None
    code = 0
    try:
        rclpy.init(args=sys.argv if args is None else args, signal_handler_options=SignalHandlerOptions.NO)
        node = HumanActionNode()
        executor = rclpy.executors.SingleThreadedExecutor()
        executor.add_node(node)
        state["raise"] = False  # from here on a signal only ends the loops below

        def spin() -> None:  # callbacks only validate and enqueue: cheap, off the inference thread
            try:
                while not state["stop"] and rclpy.ok():
                    executor.spin_once(timeout_sec=0.1)
            except Exception as exc:  # noqa: BLE001 - e.g. the context shut down under us
                node.get_logger().error(f"executor stopped: {type(exc).__name__}: {exc}")
            finally:
                state["stop"] = True

        spinner = threading.Thread(target=spin, name="step_ros_executor", daemon=True)
        spinner.start()
        node.run_inference(should_stop=lambda: state["stop"])  # the thread that loaded the model
        state["stop"] = True
        spinner.join(5.0)
        if node._inference_error:
            code = 1
        node.get_logger().info("shutting down")
    except _ShutdownRequested:
        pass
    except Exception as exc:  # noqa: BLE001 - a configuration error is a message, not a traceback
        (node.get_logger() if node is not None else rclpy.logging.get_logger(NODE_NAME)).fatal(_startup_error(exc))
        code = 1
    finally:
        state["raise"] = False
        state["stop"] = True
        try:
            if node is not None:
                node.destroy_node()
            rclpy.try_shutdown()
        except Exception:  # noqa: BLE001 - best effort while exiting
            pass
        for s, h in previous.items():
            signal.signal(s, h)
    return code


if __name__ == "__main__":
    sys.exit(main())
