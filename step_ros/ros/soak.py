"""``step-ros soak``: run the node for thousands of frames and look for drift.

Starts the node (``scripts/step_ros_node``) as a subprocess, publishes ``--frames`` synthetic
video frames (``rgb8`` Images stamped with the current ROS time) at ``--fps`` over DDS, and
listens to ``/human_action`` and ``/diagnostics``. Reports, as a table, JSON and a PNG:

* latency image stamp -> receipt of its HumanAction (median, p95) over the first and the last
  10 % of the run (a growing queue or a leak shows up as a difference);
* the node's resident memory (``VmRSS`` of ``/proc/<pid>/status``) sampled over the run: at the
  first frame, at the end, the maximum and the slope per 1000 frames (least squares);
* frames lost: published by us but not received by the node, ``dropped_busy`` (sampled while
  the inference thread was busy) and gaps in ``sequence``;
* the node's inference and published rates (from its diagnostics) against the expected
  the rate the node samples at (``1 / sample_period_s``, or ``fps / frame_interval``);
* with ``--debug-image``: ``~/debug_image`` is subscribed for the second half of the run, its
  newest picture saved as ``debug_image.png``, and the node's compute per sampled frame compared
  without and with a subscriber (the debug image is built only while someone watches).

Discovery is kept on this machine (``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST`` unless set).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def node_command(manifest: Path | None, params: list[str], remaps: list[str]) -> list[str]:
    """``python <step_ros_node> --ros-args ...`` (the source checkout's script, or the installed one)."""
    script = ROOT / "scripts" / "step_ros_node"
    cmd = [sys.executable, str(script)] if script.is_file() else [sys.executable, "-m", "step_ros.ros.node"]
    cmd.append("--ros-args")
    if manifest is not None:
        cmd += ["-p", f"manifest:={manifest}"]
    for p in params:
        cmd += ["-p", p]
    for r in remaps:
        cmd += ["-r", r]
    return cmd


def rss_mib(pid: int) -> float | None:
    """Resident memory of ``pid`` in MiB (``VmRSS``), or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGINT, then SIGKILL after ``timeout``; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return int(proc.returncode)


def latency_stats(values_ms: list[float]) -> dict[str, float]:
    if not values_ms:
        return {"n": 0, "median_ms": math.nan, "p95_ms": math.nan}
    return {"n": len(values_ms), "median_ms": float(np.median(values_ms)),
            "p95_ms": float(np.percentile(values_ms, 95))}


def slope_per_1000(x: list[float], y: list[float]) -> float:
    if len(x) < 2 or max(x) == min(x):
        return math.nan
    return float(np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)[0] * 1000.0)


def synthetic_frames(n_clips: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """A loop of synthetic clips (different actions), rendered once and cycled."""
    from step_ros.data.synthetic import FINE_ACTIONS, render_clip

    rng = np.random.default_rng(seed)
    frames: list[np.ndarray] = []
    for i in range(n_clips):
        action = FINE_ACTIONS[int(rng.integers(len(FINE_ACTIONS)))]
        frames.extend(render_clip(action, seed=seed * 1000 + i, size=size, num_frames=40))
    return frames


class _Listener:
    def __init__(self, node: Any, topic: str) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

        from step_ros.msg import HumanAction

        self.node = node
        self.lock = threading.Lock()
        self.actions: list[tuple[int, int, float]] = []  # (sequence, stamp ns, latency ms)
        self.diags: list[tuple[float, dict[str, str], int, str]] = []  # (monotonic, values, level, message)
        qos = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE)
        node.create_subscription(HumanAction, topic, self._on_action, qos)
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, qos)
        self.debug_images: list[Any] = []
        self.debug_since: float | None = None  # monotonic time of the debug-image subscription

    def subscribe_debug(self, topic: str) -> None:
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image

        qos = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(Image, topic, self._on_debug, qos)
        self.debug_since = time.monotonic()

    def _on_debug(self, msg: Any) -> None:
        with self.lock:
            self.debug_images.append(msg)
            del self.debug_images[:-1]  # the newest only; the count is in the node's diagnostics

    def _on_action(self, msg: Any) -> None:
        now = self.node.get_clock().now().nanoseconds
        stamp = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
        with self.lock:
            self.actions.append((int(msg.sequence), stamp, (now - stamp) / 1e6))

    def _on_diag(self, msg: Any) -> None:
        for status in msg.status:
            if status.name == "step_ros: human_action":
                values = {kv.key: kv.value for kv in status.values}
                level = status.level[0] if isinstance(status.level, bytes) else int(status.level)
                with self.lock:
                    self.diags.append((time.monotonic(), values, level, status.message))


def sampled_period_s(manifest: Path, params: list[str], fps: float) -> float:
    """Seconds of camera time between two frames the node will sample: by time (the manifest's
    ``sample_period_s``, never faster than the camera) unless a ``frame_interval:=k`` or
    ``sampling:=frames`` node parameter asks for frame-count sampling (``k / fps``)."""
    from step_ros.model.manifest import load_manifest

    man = load_manifest(manifest)
    values = {name.strip(): value.strip() for name, _, value in (p.partition(":=") for p in params)}
    interval = int(values.get("frame_interval") or 0)
    if values.get("sampling", "auto") != "frames" and not interval and man.sample_period_s:
        return max(float(man.sample_period_s), 1.0 / fps)
    return (interval or man.frame_interval) / fps


def run_soak(manifest: Path | None, frames: int, fps: float, out: Path, size: int = 128,
             node_params: list[str] | None = None, startup_timeout_s: float = 180.0,
             rss_period_s: float = 1.0, debug_image: bool = False) -> dict:
    """Run the soak; returns the report (also written to ``out/soak.json`` with ``out/soak.png``)."""
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from step_ros.console import console, print_table, step, write_json

    out.mkdir(parents=True, exist_ok=True)
    if manifest is None:
        from step_ros.ros.node import default_manifest

        manifest = Path(default_manifest())
    sample_s = sampled_period_s(manifest, list(node_params or []), fps)
    interval = sample_s * fps  # camera frames per sampled frame (fractional when sampling by time)
    image_topic, out_topic = "/soak/image", "/soak/human_action"
    cmd = node_command(manifest, list(node_params or []), [f"image:={image_topic}", f"human_action:={out_topic}"])
    log_path = out / "node.log"
    step("soak:", f"{frames} frames at {fps:g} fps ({size}x{size} rgb8), model {manifest} "
                  f"(a sampled frame every {sample_s:.3f} s: {1.0 / sample_s:.2f} inferences/s expected); node log {log_path}")

    source = synthetic_frames(n_clips=8, size=size)
    context = Context()
    rclpy.init(args=["step_ros_soak"], context=context)  # not sys.argv: `name:=value` there is the node's
    node = rclpy.create_node("step_ros_soak", context=context)
    listener = _Listener(node, out_topic)
    pub = node.create_publisher(Image, image_topic, QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST,
                                                               reliability=ReliabilityPolicy.RELIABLE))
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    spin = threading.Thread(target=lambda: _spin(executor, context), daemon=True)
    spin.start()

    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    rss: list[tuple[float, int, float]] = []  # (seconds since first frame, frames sent, MiB)
    sent_stamps: list[int] = []
    exit_code = None
    try:
        started = time.monotonic()
        while pub.get_subscription_count() < 1:
            if proc.poll() is not None:
                raise RuntimeError(f"the node exited with {proc.returncode} while starting; see {log_path}")
            if time.monotonic() - started > startup_timeout_s:
                raise RuntimeError(f"the node did not subscribe within {startup_timeout_s:.0f} s; see {log_path}")
            time.sleep(0.1)
        console.print(f"node ready after {time.monotonic() - started:.1f} s (pid {proc.pid}); publishing ...")
        period = 1.0 / fps
        t0 = time.monotonic()
        next_rss = t0
        for i in range(frames):
            due = t0 + i * period
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            frame = source[i % len(source)]
            h, w = frame.shape[:2]
            msg = Image(height=h, width=w, encoding="rgb8", is_bigendian=0, step=3 * w, data=frame.tobytes())
            msg.header.frame_id = "soak_camera"
            msg.header.stamp = node.get_clock().now().to_msg()
            pub.publish(msg)
            sent_stamps.append(int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec))
            now = time.monotonic()
            if now >= next_rss:
                value = rss_mib(proc.pid)
                if value is not None:
                    rss.append((now - t0, i + 1, value))
                next_rss = now + rss_period_s
            if proc.poll() is not None:
                raise RuntimeError(f"the node exited with {proc.returncode} during the soak; see {log_path}")
            if debug_image and i == frames // 2:
                listener.subscribe_debug("/human_action/debug_image")
            if i and i % max(1, frames // 10) == 0:
                with listener.lock:
                    n = len(listener.actions)
                console.print(f"  {i}/{frames} frames sent, {n} predictions received, "
                              f"RSS {rss[-1][2] if rss else float('nan'):.0f} MiB")
        duration = time.monotonic() - t0
        value = rss_mib(proc.pid)
        if value is not None:
            rss.append((time.monotonic() - t0, frames, value))
        time.sleep(max(2.0, 3 * period * interval))  # the last predictions and one more diagnostics period
    finally:
        if proc.poll() is None:
            exit_code = stop_process(proc)
        else:
            exit_code = proc.returncode
        node.destroy_node()
        rclpy.try_shutdown(context=context)
        spin.join(2)

    with listener.lock:
        actions = list(listener.actions)
        diags = list(listener.diags)
    report = _report(actions, diags, rss, sent_stamps, frames, fps, interval, duration, manifest, exit_code)
    report["node_log"] = str(log_path)
    if debug_image:
        report["debug_image"] = _debug_report(listener, diags, fps, out / "debug_image.png")
    _print(report, print_table)
    write_json(report, out / "soak.json")
    from step_ros.model.manifest import load_manifest

    title = f"soak: {load_manifest(manifest).name}, {frames} frames at {fps:g} fps"
    if node_params:
        title += f" ({' '.join(node_params)})"
    png = _plot(actions, rss, sent_stamps, out / "soak.png", title)
    report["figure"] = str(png)
    write_json(report, out / "soak.json")
    console.print(f"wrote {out / 'soak.json'} and {png}")
    return report


def _median(values) -> float:
    """Median of the finite values (a diagnostics period with nothing to report says "-" or nan)."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def _flowing(diags: list, fps: float) -> list[tuple[float, dict]]:
    """(time, values) of the diagnostics periods in which frames were arriving (at over half ``fps``)."""
    return [(t, v) for t, v, _, _ in diags if float(v.get("input rate (Hz)", "nan")) > 0.5 * fps]


def _debug_report(listener: _Listener, diags: list, fps: float, png: Path) -> dict:
    """The node's compute per sampled frame without and with a debug-image subscriber, and the
    newest debug image as a PNG."""
    since = listener.debug_since or math.inf
    settle = 2.0  # the subscription reaches the node
    flowing = _flowing(diags, fps)

    def median(rows: list, key: str) -> float:
        return _median(float(v[key]) for _, v in rows if v.get(key, "-") != "-")

    without = [(t, v) for t, v in flowing if t < since]
    with_sub = [(t, v) for t, v in flowing if t > since + settle]
    out = {"compute_ms_without_subscriber": median(without, "compute median (ms)"),
           "compute_ms_with_subscriber": median(with_sub, "compute median (ms)"),
           "debug_image_ms": median(with_sub, "debug image ms"),
           "debug_images_built": int(float(diags[-1][1].get("debug images", 0))) if diags else 0,
           "debug_images_built_before_subscribing": int(float(without[-1][1].get("debug images", 0)))
           if without else 0}
    with listener.lock:
        newest = listener.debug_images[-1] if listener.debug_images else None
    if newest is not None:
        import cv2

        image = np.frombuffer(bytes(newest.data), np.uint8).reshape(newest.height, newest.width, 3)
        cv2.imwrite(str(png), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        out["png"] = str(png)
    return out


def _spin(executor: Any, context: Any) -> None:
    try:
        while context.ok():
            executor.spin_once(timeout_sec=0.05)
    except Exception:  # noqa: BLE001 - the context was shut down
        pass


def _report(actions, diags, rss, sent_stamps, frames, fps, interval, duration, manifest, exit_code) -> dict:
    first_ns = sent_stamps[0] if sent_stamps else 0
    span = (sent_stamps[-1] - first_ns) if sent_stamps else 1
    index_of = {s: i for i, s in enumerate(sent_stamps)}
    tenth = max(1, frames // 10)
    first = [lat for _, stamp, lat in actions if index_of.get(stamp, -1) < tenth and stamp in index_of]
    last = [lat for _, stamp, lat in actions if index_of.get(stamp, -1) >= frames - tenth]
    seqs = sorted(s for s, _, _ in actions)
    seq_gaps = sum(b - a - 1 for a, b in zip(seqs, seqs[1:]) if b > a + 1)
    final = diags[-1][1] if diags else {}

    def num(key: str) -> float:
        try:
            return float(final.get(key, "nan"))
        except ValueError:
            return math.nan

    # steady-state rates from the diagnostics periods while frames were flowing
    flowing = [(float(v.get("inference rate (Hz)", "nan")), float(v.get("published rate (Hz)", "nan")),
                float(v.get("input rate (Hz)", "nan")), float(v.get("compute median (ms)", "nan")))
               for _, v in _flowing(diags, fps)]
    warm = [(f, m) for _, f, m in rss if f >= tenth]  # after the first 10 % (allocator / cache warm-up)
    levels = {}
    for _, _, level, message in diags:
        levels[str(level)] = levels.get(str(level), 0) + 1
    rss_values = [m for _, _, m in rss]
    return {
        "manifest": str(manifest),
        "frames_sent": frames,
        "fps": fps,
        "duration_s": duration,
        "frames_per_sample": round(interval, 4),
        "expected_inference_hz": fps / interval,
        "predictions_received": len(actions),
        "latency_first_10pct": latency_stats(first),
        "latency_last_10pct": latency_stats(last),
        "latency_all": latency_stats([lat for _, _, lat in actions]),
        "rss_mib": {
            "start": rss_values[0] if rss_values else math.nan,
            "end": rss_values[-1] if rss_values else math.nan,
            "max": max(rss_values) if rss_values else math.nan,
            "after_warmup": warm[0][1] if warm else math.nan,
            "slope_per_1000_frames": slope_per_1000([f for f, _ in warm], [m for _, m in warm]),
            "slope_window": "frames after the first 10 %",
            "samples": len(rss_values),
        },
        "node_frames_received": num("frames received"),
        "frames_lost_in_transport": frames - num("frames received"),
        "dropped_busy": num("dropped_busy"),
        "predictions_deferred": num("predictions deferred"),
        "backlog_max": max((float(v.get("backlog", "nan")) for _, v, _, _ in diags), default=math.nan),
        "invalid": num("invalid"),
        "window_resets": num("window resets"),
        "sequence_gaps": seq_gaps,
        "inference_hz_median": _median(r[0] for r in flowing),
        "published_hz_median": _median(r[1] for r in flowing),
        "published_hz_overall": len(actions) / duration if duration else math.nan,
        "node_compute_ms_median": _median(r[3] for r in flowing),  # periods before the first compute have none
        "diagnostic_levels": levels,
        "node_exit_code": exit_code,
        "span_s": span / 1e9,
    }


def _print(r: dict, print_table) -> None:
    f, la, rs = r["latency_first_10pct"], r["latency_last_10pct"], r["rss_mib"]
    rows = [
        ["frames sent / received by node", f"{r['frames_sent']} / {r['node_frames_received']:.0f}"],
        ["predictions received", r["predictions_received"]],
        ["latency first 10 % median / p95 (ms)", f"{f['median_ms']:.1f} / {f['p95_ms']:.1f}"],
        ["latency last 10 % median / p95 (ms)", f"{la['median_ms']:.1f} / {la['p95_ms']:.1f}"],
        ["RSS start / after 10 % / end / max (MiB)",
         f"{rs['start']:.1f} / {rs['after_warmup']:.1f} / {rs['end']:.1f} / {rs['max']:.1f}"],
        ["RSS slope after 10 % (MiB per 1000 frames)", f"{rs['slope_per_1000_frames']:+.2f}"],
        ["dropped_busy / lost in transport / sequence gaps",
         f"{r['dropped_busy']:.0f} / {r['frames_lost_in_transport']:.0f} / {r['sequence_gaps']}"],
        ["predictions deferred (node behind) / max backlog seen", f"{r['predictions_deferred']:.0f} / "
                                                                  f"{r['backlog_max']:.0f}"],
        ["inference rate (Hz, median; expected)", f"{r['inference_hz_median']:.2f} ({r['expected_inference_hz']:.2f})"],
        ["published rate (Hz, median / overall)", f"{r['published_hz_median']:.2f} / {r['published_hz_overall']:.2f}"],
        ["node compute median (ms, convert + backbone + heads)", f"{r['node_compute_ms_median']:.1f}"],
        ["node exit code", r["node_exit_code"]],
    ]
    if "debug_image" in r:
        d = r["debug_image"]
        rows += [["compute median without / with a debug-image subscriber (ms)",
                  f"{d['compute_ms_without_subscriber']:.1f} / {d['compute_ms_with_subscriber']:.1f}"],
                 ["debug image: median ms to build; built before / in all",
                  f"{d['debug_image_ms']:.1f}; {d['debug_images_built_before_subscribing']} / "
                  f"{d['debug_images_built']}"]]
    print_table(f"soak: {r['frames_sent']} frames at {r['fps']:g} fps, {r['duration_s']:.0f} s", ["", "value"], rows)


def _plot(actions, rss, sent_stamps, path: Path, title: str) -> Path:
    from step_ros.figures import plt, save_figure

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    first = sent_stamps[0] if sent_stamps else 0
    t = [(stamp - first) / 1e9 for _, stamp, _ in actions]
    lat = [v for _, _, v in actions]
    ax1.plot(t, lat, ".", ms=2, alpha=0.5, label="per prediction")
    if len(lat) >= 20:
        w = max(5, len(lat) // 50)
        smooth = np.convolve(lat, np.ones(w) / w, mode="valid")
        ax1.plot(t[w - 1:], smooth, "-", lw=1.5, label=f"moving mean ({w})")
    ax1.set_ylabel("stamp -> receipt (ms)")
    ax1.set_title(title, fontsize=10)
    ax1.legend(fontsize=8)
    ax2.plot([s for s, _, _ in rss], [m for _, _, m in rss], "-", color="tab:red")
    ax2.set_ylabel("node RSS (MiB)")
    ax2.set_xlabel("time since the first frame (s)")
    return save_figure(fig, path)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``step-ros soak``."""
    parser.add_argument("--manifest", type=Path, default=None, help="model manifest (default: the demo model)")
    parser.add_argument("--frames", type=int, default=3000, help="frames to publish (default %(default)s)")
    parser.add_argument("--fps", type=float, default=10.0, help="camera rate (default %(default)s)")
    parser.add_argument("--size", type=int, default=128, help="frame width and height in pixels")
    parser.add_argument("--out", type=Path, default=Path("runs/soak"), help="report folder")
    parser.add_argument("--param", action="append", default=[], metavar="NAME:=VALUE",
                        help="extra node parameter (repeatable), e.g. --param backend:=onnxruntime")
    parser.add_argument("--debug-image", action="store_true",
                        help="subscribe ~/debug_image for the second half; save it as PNG and compare the cost")


def main(args: argparse.Namespace) -> int:
    if args.frames < 10 or args.fps <= 0:
        raise SystemExit("--frames must be >= 10 and --fps positive")
    report = run_soak(args.manifest, args.frames, args.fps, args.out, size=args.size, node_params=args.param,
                      debug_image=args.debug_image)
    ok = report["node_exit_code"] == 0 and report["predictions_received"] > 0
    return 0 if ok else 1


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="step_ros.ros.soak", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
