"""``step-ros demo`` (live): a fresh synthetic test set -> a rosbag2 -> played to the running node.

1. generate a small synthetic test set never seen in training (``step_ros.demo.fresh_test_set``);
2. record it into a bag (``step_ros.bags.record.record``): camera frames on
   ``/camera/image_raw`` plus one ground-truth ``HumanAction`` per video segment on
   ``/ground_truth``;
3. start the ``human_action`` node (``scripts/step_ros_node``) on the demo model;
4. calibrate: play the bag's first seconds at the asked ``--rate`` and read the node's
   latencies and ``/diagnostics``; while it drops sampled frames or is too slow, try a slower
   rate (at most ``CALIBRATION_STEPS`` plays; :func:`calibrate`);
5. play the bag (``step_ros.bags.play.play``) while printing one line per ``/human_action``
   message;
6. score every prediction against the ground-truth segment that contains its window
   (``window_start .. header.stamp``), print accuracy per task, the latency, and what the node
   reported in ``/diagnostics`` (drops, window resets, published rate, segments covered), with
   a plain verdict on whether the machine kept up; stop the node.

Why calibrate the playback and not the node: a demo exists to show predictions, and slowing a
recorded camera changes nothing the node sees (stamps are the bag's).  A robot cannot slow its
camera: there the node's own load shedding (``max_deferrals``, ``max_backlog``) applies, and
``/diagnostics`` counts it.

Latency here is measured in this process, from the arrival of a camera frame (this process
also subscribes the image topic) to the arrival of the HumanAction stamped with it: the bag's
stamps are not wall-clock times, so stamp -> receipt would be meaningless.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .soak import latency_stats, node_command, sampled_period_s, stop_process

IMAGE_TOPIC = "/camera/image_raw"
ACTION_TOPIC = "/human_action"


@dataclass
class Segment:
    index: int
    start_ns: int
    end_ns: int
    labels: dict[str, str]


def ground_truth(bag: Path) -> list[Segment]:
    """The bag's ``/ground_truth`` HumanAction messages as segments (read with rosbags, no ROS)."""
    from step_ros.bags.common import (
        GROUND_TRUTH_TOPIC,
        BagError,
        open_bag,
        time_to_ns,
    )

    segments = []
    with open_bag(bag) as reader:
        conns = [c for c in reader.connections if c.topic == GROUND_TRUTH_TOPIC]
        if not conns:
            raise BagError(f"bag {bag} has no {GROUND_TRUTH_TOPIC} topic")
        for _conn, _t, msg in reader.decoded(conns):
            segments.append(Segment(int(msg.sequence), time_to_ns(msg.window_start), time_to_ns(msg.header.stamp),
                                    {tp.task: tp.label for tp in msg.tasks}))
    return sorted(segments, key=lambda s: s.start_ns)


def segment_of(segments: list[Segment], start_ns: int, end_ns: int) -> Segment | None:
    """The segment containing the whole window ``[start_ns, end_ns]``, if any."""
    for s in segments:
        if s.start_ns <= start_ns and end_ns <= s.end_ns:
            return s
    return None


def _ns(t: Any) -> int:
    return int(t.sec) * 1_000_000_000 + int(t.nanosec)


class _LiveListener:
    """Subscribes the camera topic (arrival times) and /human_action (prints one line each)."""

    def __init__(self, segments: list[Segment]) -> None:
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image

        from step_ros.msg import HumanAction

        self.segments = segments
        self.t0_ns = segments[0].start_ns if segments else None
        self.lock = threading.Lock()
        self.image_arrival: dict[int, float] = {}
        self.records: list[dict] = []
        self.echo = True  # one printed line per prediction (off while calibrating)
        self.context = Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("step_ros_live_demo", context=self.context)
        qos = QoSProfile(depth=50, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(Image, IMAGE_TOPIC, self._on_image, qos)
        self.node.create_subscription(HumanAction, ACTION_TOPIC, self._on_action, qos)
        from diagnostic_msgs.msg import DiagnosticArray

        self.diagnostics: dict[str, str] = {}  # the node's newest /diagnostics key-values
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, qos)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        try:
            while self.context.ok():
                self.executor.spin_once(timeout_sec=0.05)
        except Exception:  # noqa: BLE001 - shut down under us
            pass

    def node_ready(self) -> bool:
        return (self.node.count_subscribers(IMAGE_TOPIC) >= 2  # the node and this listener
                and self.node.count_publishers(ACTION_TOPIC) >= 1)

    def _on_diagnostics(self, msg: Any) -> None:
        for status in msg.status:
            if status.name == "step_ros: human_action":
                with self.lock:
                    self.diagnostics = {kv.key: kv.value for kv in status.values}

    def counters(self) -> dict[str, int]:
        """The node's cumulative counters from its newest diagnostics."""
        with self.lock:
            d = dict(self.diagnostics)
        keys = ("frames received", "frames sampled", "frames processed", "dropped_busy", "predictions deferred",
                "window resets", "published")
        return {k: int(d[k]) for k in keys if k in d}

    def _on_image(self, msg: Any) -> None:
        with self.lock:
            self.image_arrival[_ns(msg.header.stamp)] = time.monotonic()

    def _on_action(self, msg: Any) -> None:
        arrived = time.monotonic()
        stamp, start = _ns(msg.header.stamp), _ns(msg.window_start)
        with self.lock:
            seen = self.image_arrival.pop(stamp, None)
            for old in [s for s in self.image_arrival if s < stamp - 60_000_000_000]:
                del self.image_arrival[old]  # keep the dict small
        seg = segment_of(self.segments, start, stamp)
        rec = {"sequence": int(msg.sequence), "stamp_ns": stamp, "window_start_ns": start,
               "complete": bool(msg.window_complete), "segment": seg.index if seg else None,
               "latency_ms": (arrived - seen) * 1e3 if seen is not None else None, "tasks": {}}
        parts = []
        for tp in msg.tasks:
            guess = tp.top_k[0].label if tp.top_k else tp.label
            truth = seg.labels.get(tp.task) if seg else None
            rec["tasks"][tp.task] = {"label": tp.label, "guess": guess, "confidence": float(tp.confidence),
                                     "confident": bool(tp.confident), "stable": bool(tp.stable), "truth": truth}
            mark = "" if truth is None else (" ok" if guess == truth else f" x({truth})")
            flags = ("c" if tp.confident else "-") + ("s" if tp.stable else "-")
            parts.append(f"{tp.task}: {guess or '?'} {tp.confidence:.2f} [{flags}]{mark}")
        with self.lock:
            self.records.append(rec)
        t = (stamp - self.t0_ns) / 1e9 if self.t0_ns is not None else stamp / 1e9
        seg_text = f"seg {seg.index:3d}" if seg else "seg   -"
        if self.echo:
            print(f"{t:7.2f}s {seg_text} #{msg.sequence:<5d} " + " | ".join(parts), flush=True)

    def latencies(self) -> list[float]:
        with self.lock:
            return [r["latency_ms"] for r in self.records if r["latency_ms"] is not None]

    def clear(self) -> None:
        with self.lock:
            self.records.clear()

    def close(self) -> None:
        import rclpy

        try:
            self.node.destroy_node()
        finally:
            rclpy.try_shutdown(context=self.context)
            self.thread.join(2)


def score(records: list[dict], segments: list[Segment]) -> dict[str, dict]:
    """Accuracy per task: every window (best guess = top_k[0]); confident windows only; the last
    window of each segment (one decision per video)."""
    out: dict[str, dict] = {}
    tasks = sorted({t for r in records for t in r["tasks"] if r["tasks"][t]["truth"] is not None})
    for task in tasks:
        rows = [r["tasks"][task] for r in records if r["segment"] is not None and task in r["tasks"]
                and r["tasks"][task]["truth"] is not None]
        confident = [x for x in rows if x["confident"]]
        last: dict[int, dict] = {}
        for r in records:
            if r["segment"] is not None and task in r["tasks"]:
                last[r["segment"]] = r["tasks"][task]
        out[task] = {
            "windows": len(rows),
            "accuracy": float(np.mean([x["guess"] == x["truth"] for x in rows])) if rows else math.nan,
            "confident_windows": len(confident),
            "confident_accuracy": (float(np.mean([x["label"] == x["truth"] for x in confident]))
                                   if confident else math.nan),
            "segments": len(last),
            "segments_with_truth": sum(1 for s in segments if task in s.labels),
            "last_window_accuracy": (float(np.mean([x["guess"] == x["truth"] for x in last.values()]))
                                     if last else math.nan),
        }
    return out


def camera_rate(bag: Path) -> tuple[float, int]:
    """(frames per second, frame count) of the bag's camera topic."""
    from step_ros.bags.common import open_bag

    with open_bag(bag) as reader:
        count = reader.topics[IMAGE_TOPIC].msgcount
        duration_s = max(reader.duration, 1) / 1e9
    return (count - 1) / duration_s if count > 1 else 1.0, count


def manifest_frames(manifest: Path) -> int:
    from step_ros.model.manifest import load_manifest

    return load_manifest(manifest).frames


#: The node may use at most this share of the time between two sampled frames (the rest is the
#: machine's other work, and jitter).
CALIBRATION_HEADROOM = 0.5
#: ... measured at this percentile of its latencies during calibration (the slow frames drop).
CALIBRATION_PERCENTILE = 90
#: At most this many calibration plays (each of 3 windows' worth of frames).
CALIBRATION_STEPS = 4
#: A rate that passed after a slower-down is played at this share of it (measured: a training run
#: beside the demo dropped 0 of 48 sampled frames in calibration at 1x, then 57 of 640 in the run).
CALIBRATION_MARGIN = 0.75
#: Never slower than this (the demo bag then plays for about 10 minutes); below it the verdict
#: says the machine could not keep up.
MIN_RATE = 0.25


def calibrate(latencies_ms: list[float], fps: float, interval: float, rate: float, dropped: int = 0,
              sampled: int = 0) -> dict[str, Any]:
    """One calibration step: does the node keep up with the bag played at ``rate``, on this
    machine now?  If not, the rate to try next.

    What matters is the slow frames, not the typical one: a sampled frame dropped while the
    node is busy leaves the window short (16 samples are needed; a demo segment has 20), and a
    busy CPU delivers frames in bursts that overflow the node's short queue even when its
    median compute would fit.  So the rate passes when the node dropped nothing (at most 1 % of
    the sampled frames) and its 90th-percentile frame-to-prediction latency fits in half the time
    between two sampled frames (``interval / (fps * rate)``).  Otherwise the next rate is the one
    at which that latency would fit, and at most half of this one when frames were dropped.
    """
    period_ms = interval * 1000.0 / (fps * rate)
    if not latencies_ms:
        return {"rate": rate, "ok": sampled == 0, "next_rate": max(MIN_RATE, round(rate / 2, 2)) if sampled else None,
                "note": f"at {rate:g}x: no prediction" + (f" ({dropped} of {sampled} sampled frames dropped)"
                                                         if sampled else "")}
    need_ms = float(np.percentile(latencies_ms, CALIBRATION_PERCENTILE))
    fits = need_ms <= CALIBRATION_HEADROOM * period_ms
    drops_ok = dropped <= 0.01 * max(sampled, 1)
    out = {"rate": rate, "node_ms_per_sampled_frame": need_ms, "percentile": CALIBRATION_PERCENTILE,
           "dropped": dropped, "sampled": sampled, "ok": fits and drops_ok, "next_rate": None}
    what = (f"at {rate:g}x (a sampled frame every {period_ms:.0f} ms) the node needed up to {need_ms:.0f} ms "
            f"(p{CALIBRATION_PERCENTILE}) and dropped {dropped} of {sampled} sampled frames")
    if out["ok"]:
        out["note"] = what + ": it keeps up"
        return out
    if rate <= MIN_RATE:
        out["note"] = what + f": not trying slower than {MIN_RATE:g}x"
        return out
    fastest = rate * CALIBRATION_HEADROOM * period_ms / need_ms  # where the p90 latency would fit
    nxt = fastest if drops_ok else min(fastest, rate / 2)
    nxt = max(nxt, rate / 4)  # one noisy play must not make the demo last an hour
    out["next_rate"] = max(MIN_RATE, round(min(nxt, rate * 0.9), 2))
    out["note"] = what + f": trying {out['next_rate']:g}x"
    return out


def node_load(before: dict[str, int], after: dict[str, int], records: list[dict], segments: list[Segment],
              seconds: float) -> dict[str, Any]:
    """What the node's /diagnostics counted during the run, and a plain verdict."""
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    covered = len({r["segment"] for r in records if r["segment"] is not None})
    sampled = delta.get("frames sampled", 0)
    dropped = delta.get("dropped_busy", 0)
    out = {"segments_covered": covered, "segments": len(segments), "frames_sampled": sampled,
           "dropped_busy": dropped, "predictions_deferred": delta.get("predictions deferred", 0),
           "window_resets": delta.get("window resets", 0), "published": delta.get("published", len(records)),
           "published_rate_hz": delta.get("published", len(records)) / max(seconds, 1e-9)}
    out["kept_up"] = bool(segments) and covered >= 0.9 * len(segments) and dropped <= 0.01 * max(sampled, 1)
    summary = (f"{covered} of {len(segments)} segments covered, {dropped} of {sampled} sampled frames dropped "
               f"(busy), {out['predictions_deferred']} predictions postponed, {out['window_resets']} window resets, "
               f"{out['published_rate_hz']:.1f} predictions/s")
    out["verdict"] = ("the machine kept up: " if out["kept_up"] else
                      "the machine could NOT keep up (too slow or too busy): ") + summary
    return out


def run_live_demo(args: argparse.Namespace) -> int:
    """The main job; ``args``: ``out`` (Path), ``per_class`` (int, default 1), ``rate`` (float);
    optional ``manifest`` (Path, default the demo model), ``context`` ('known' / 'unknown': only those
    videos; default both) and ``node_param`` (list of NAME:=VALUE node parameters)."""
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    from step_ros.bags.play import play
    from step_ros.bags.record import record
    from step_ros.demo import DEMO_MANIFEST, fresh_test_set
    from step_ros.console import console, error, pct, print_table, step, write_json

    out: Path = Path(args.out)
    per_class = int(getattr(args, "per_class", 1) or 1)
    rate = float(getattr(args, "rate", 1.0) or 1.0)
    manifest = Path(getattr(args, "manifest", None) or DEMO_MANIFEST)
    if not manifest.is_file():
        error(f"model manifest {manifest} not found: train the demo model with `step-ros reproduce-demo`, "
              "or pass another manifest")
        return 1
    out.mkdir(parents=True, exist_ok=True)

    step("1/5", f"fresh synthetic test set ({per_class} video(s) per class and context)")
    csv = fresh_test_set(out / "data", per_class)
    step("2/5", "recording the bag")
    bag = record(csv, out / "bag", manifest=manifest, overwrite=True, image_topic=IMAGE_TOPIC,
                 context=getattr(args, "context", None))
    segments = ground_truth(bag)
    span = (segments[-1].end_ns - segments[0].start_ns) / 1e9 if segments else 0.0
    fps, frames_in_bag = camera_rate(bag)
    console.print(f"      {bag}: {len(segments)} segments, {span:.0f} s of camera time at {fps:.1f} fps")

    step("3/5", f"starting the node on {manifest}")
    params = list(getattr(args, "node_param", None) or [])
    interval = sampled_period_s(manifest, params, fps) * fps  # camera frames per sampled frame
    cmd = node_command(manifest, params, [f"image:={IMAGE_TOPIC}", f"human_action:={ACTION_TOPIC}"])
    log_path = out / "node.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    listener: _LiveListener | None = None
    published = 0
    code = 0
    interrupted = False
    calibration: dict[str, Any] = {"asked_rate": rate}
    before: dict[str, int] = {}
    after: dict[str, int] = {}
    try:
        listener = _LiveListener(segments)
        deadline = time.monotonic() + 180.0
        while not listener.node_ready():
            if proc.poll() is not None:
                error(f"the node exited with {proc.returncode} while starting:\n"
                      f"{log_path.read_text(errors='replace')[-3000:]}")
                return 1
            if time.monotonic() > deadline:
                error(f"the node did not come up within 180 s; see {log_path}")
                return 1
            time.sleep(0.1)
        if getattr(args, "calibrate", True):
            warm = min(frames_in_bag, int(round(3 * manifest_frames(manifest) * interval)))
            step("4/5", f"calibrating: the bag's first {warm} frames, at {rate:g}x and slower until the node keeps up "
                        "on this machine, now")
            steps = []
            listener.echo = False  # calibration predictions are measured, not shown or scored
            # A first, unmeasured play: the node's first windows allocate, fill and build its caches
            # (measured here: p90 above 1 s on the first play, 160 ms once warm).
            play(bag, rate=rate, wait_for_subscribers=2, wait_timeout_s=10.0, max_messages=warm)
            time.sleep(1.5)  # the last predictions and a fresh /diagnostics
            end = listener.counters()
            for _ in range(CALIBRATION_STEPS):
                start = end  # one play's counters after are the next one's before
                listener.clear()
                play(bag, rate=rate, wait_for_subscribers=2, wait_timeout_s=10.0, max_messages=warm)
                time.sleep(1.5)  # the last predictions and a fresh /diagnostics
                end = listener.counters()
                result = calibrate(listener.latencies(), fps, interval, rate,
                                   dropped=end.get("dropped_busy", 0) - start.get("dropped_busy", 0),
                                   sampled=end.get("frames sampled", 0) - start.get("frames sampled", 0))
                steps.append(result)
                console.print(f"      {result['note']}")
                if result["ok"] or result["next_rate"] is None:
                    break
                rate = result["next_rate"]
            calibration["steps"] = steps
            if steps and steps[-1]["ok"] and rate < calibration["asked_rate"]:
                # The load came and went during a short play: keep a margin below the rate that passed.
                rate = max(MIN_RATE, round(rate * CALIBRATION_MARGIN, 2))
                console.print(f"      playing at {rate:g}x ({CALIBRATION_MARGIN:g} of the rate that passed: "
                              "the load varies)")
            calibration["rate"] = rate
            listener.clear()
            listener.echo = True
        time.sleep(1.5)  # a fresh /diagnostics: the counters before the run
        before = listener.counters()
        step("5/5", f"playing the bag at {rate:g}x ({span / rate:.0f} s). Columns: camera time, segment, sequence; "
                    "per task: best label, confidence, flags (c = confident, s = stable), ok or x(truth)")
        published = play(bag, rate=rate, wait_for_subscribers=2, wait_timeout_s=10.0)
        time.sleep(1.5)  # the last predictions and a last /diagnostics
        after = listener.counters()
    except KeyboardInterrupt:
        interrupted = True
        code = 130
    finally:
        exit_code = stop_process(proc)
        log.close()
        if listener is not None:
            listener.close()

    records = list(listener.records) if listener is not None else []
    accuracy = score(records, segments)
    lat = latency_stats([r["latency_ms"] for r in records if r["latency_ms"] is not None])
    def p(x: float) -> str:
        return pct(None if x is None or not math.isfinite(x) else x)

    print_table(f"live demo: {len(records)} predictions on {len(segments)} segments ({manifest.parent.name})",
                ["task", "windows", "acc %", "confident", "conf. acc %", "last/segment acc %"],
                [[t, a["windows"], p(a["accuracy"]), a["confident_windows"], p(a["confident_accuracy"]),
                  p(a["last_window_accuracy"])] for t, a in accuracy.items()])
    unscored = sum(1 for r in records if r["segment"] is None)
    console.print(f"latency frame arrival -> HumanAction arrival: median {lat['median_ms']:.1f} ms, "
                  f"p95 {lat['p95_ms']:.1f} ms ({lat['n']} predictions); {published} frames played; "
                  f"{unscored} predictions outside a segment; node exit code {exit_code}")
    load = node_load(before, after, records, segments, span / rate)
    console.print(load["verdict"], style="bold" if load["kept_up"] else "bold red")
    report = {"manifest": str(manifest), "bag": str(bag), "rate": rate, "per_class": per_class,
              "segments": len(segments), "frames_played": published, "predictions": len(records),
              "unscored": unscored, "accuracy": accuracy, "latency": lat, "node_exit_code": exit_code,
              "interrupted": interrupted, "node_log": str(log_path), "calibration": calibration, "load": load}
    write_json(report, out / "live_demo.json")
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    console.print(f"wrote {out / 'live_demo.json'} and {out / 'predictions.jsonl'}")
    if code:
        return code
    return 0 if exit_code == 0 and records else 1


__all__ = ["Segment", "calibrate", "camera_rate", "ground_truth", "node_load", "run_live_demo", "score", "segment_of"]
