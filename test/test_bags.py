"""rosbag2 tools: record an annotated video set, read it back, replay-eval it, play it over ROS 2.

The model is the tiny random-weights DINOv2-architecture backbone of conftest with untrained
(seeded) heads: accuracies are meaningless here; what is tested is that replay-eval runs the
node's pipeline exactly (its predictions equal the offline computation on the same frames),
the bag layout (stamps, gaps, ground truth) and the errors.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_OVERRIDES
from step_ros.bags.common import (
    COMPRESSED_TYPE,
    GROUND_TRUTH_TOPIC,
    HUMAN_ACTION_TYPE,
    IMAGE_TYPE,
    SEGMENT_TOPIC,
    BagError,
    deserialize,
    iter_messages,
    msg_class,
    open_bag,
    rgb_to_compressed,
    rgb_to_image,
    time_to_ns,
    typestore,
)
from step_ros.bags.record import record
from step_ros.bags.replay import replay_eval
from step_ros.ros.conversions import imgmsg_to_rgb
from step_ros.data.annotations import load_annotations
from step_ros.data.synthetic import ATOMIC_ACTIONS, FINE_ACTIONS, OBJECTS, SYMMETRIC_PAIRS, generate
from step_ros.data.video import read_video
from step_ros.model.manifest import parse_manifest
from step_ros.model.multitask import MultiTaskModel, save_head

FPS = 15.0
NUM_FRAMES = 12
GAP_S = 2.0
NS = 1_000_000_000


def _subset_csv(csv_path: Path, out: Path, rows: int) -> Path:
    lines = csv_path.read_text().splitlines()
    out.write_text("\n".join(lines[: rows + 1]) + "\n")
    # video paths are relative to the CSV's folder: keep the subset beside the original
    return out


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model gains nothing from threads; on a busy 2-core machine two OpenMP threads
    make each of its forwards ~20x slower (spin-waiting), so these tests use one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bag_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("bags")
    csv_path = generate(root / "synth", seed=2, videos_per_class={"train": 0, "val": 0, "test": 1},
                        unknown_per_class=0, size=64, num_frames=NUM_FRAMES, fps=FPS, progress=False)
    manifest = parse_manifest({
        "name": "tiny-bags",
        "backbone": {"arch": "dinov2_vitt14", "random_seed": 0, "image_size": 42, "overrides": TINY_OVERRIDES},
        "frames": 4,
        "frame_interval": 2,
        "heads": [
            {"task": "fine_action", "kind": "step", "labels": FINE_ACTIONS,
             "symmetric_pairs": [list(p) for p in SYMMETRIC_PAIRS]},
            {"task": "atomic_action", "kind": "attentive", "labels": ATOMIC_ACTIONS},
            {"task": "object_in_use", "kind": "linear", "labels": OBJECTS},
        ],
    }, root)
    torch.manual_seed(0)  # untrained, seeded heads (random weights on purpose)
    model = MultiTaskModel.from_manifest(manifest, load_checkpoints=False)
    for spec in manifest.heads:
        spec.checkpoint = root / "heads" / f"{spec.task}.safetensors"
        save_head(model.heads[spec.task], spec, spec.checkpoint, dim=model.backbone.dim, frames=manifest.frames,
                  num_tokens=model.backbone.num_patches)
    manifest_path = manifest.save(root / "manifest.yaml")
    bags = {st: record(csv_path, root / f"bag_{st}", storage=st, manifest=manifest_path, gap_s=GAP_S, progress=False)
            for st in ("mcap", "sqlite3")}
    small_csv = _subset_csv(csv_path, root / "synth" / "small.csv", rows=4)
    return {"root": root, "csv": csv_path, "small_csv": small_csv, "manifest": manifest_path, "bags": bags,
            "model": MultiTaskModel.from_manifest(manifest).eval()}


def _read_all(bag: Path) -> dict[str, list]:
    out: dict[str, list] = {}
    with open_bag(bag) as reader:
        for conn, log_ns, raw in iter_messages(reader, bag):
            out.setdefault(conn.topic, []).append((log_ns, deserialize(raw, conn.msgtype), conn.msgtype))
    return out


# --------------------------------------------------------------------------- record


@pytest.mark.parametrize("storage, suffix", [("mcap", ".mcap"), ("sqlite3", ".db3")])
def test_record_reads_back(bag_set, storage, suffix):
    bag = bag_set["bags"][storage]
    assert [p.suffix for p in bag.iterdir() if p.name != "metadata.yaml"] == [suffix]
    dataset = load_annotations(bag_set["csv"])
    msgs = _read_all(bag)
    assert set(msgs) == {"/camera/image_raw", GROUND_TRUTH_TOPIC, SEGMENT_TOPIC}
    images = msgs["/camera/image_raw"]
    assert len(images) == len(dataset) * NUM_FRAMES
    assert {ty for _, _, ty in images} == {IMAGE_TYPE}
    stamps = np.array([time_to_ns(m.header.stamp) for _, m, _ in images])
    assert (np.array([t for t, _, _ in images]) == stamps).all()  # log time = header stamp
    steps = np.diff(stamps)
    assert (steps > 0).all()
    within = steps.reshape(-1)[np.arange(len(steps)) % NUM_FRAMES != NUM_FRAMES - 1]
    assert np.abs(within - NS / FPS).max() <= 1  # integer-ns rounding only
    between = steps[NUM_FRAMES - 1 :: NUM_FRAMES]
    assert len(between) == len(dataset) - 1 and (between == GAP_S * NS).all()
    assert all(m.header.frame_id == "camera" and m.encoding == "rgb8" for _, m, _ in images)

    gts, segs = msgs[GROUND_TRUTH_TOPIC], msgs[SEGMENT_TOPIC]
    assert len(gts) == len(segs) == len(dataset)
    spec = {"fine_action": FINE_ACTIONS, "atomic_action": ATOMIC_ACTIONS, "object_in_use": OBJECTS}
    for i, ((gt_ns, gt, ty), (_, seg_msg, _), sample) in enumerate(zip(gts, segs, dataset)):
        assert ty == HUMAN_ACTION_TYPE and gt.sequence == i and gt.window_complete
        first, last = stamps[i * NUM_FRAMES], stamps[(i + 1) * NUM_FRAMES - 1]
        assert time_to_ns(gt.window_start) == first and time_to_ns(gt.header.stamp) == last == gt_ns
        assert {tp.task: tp.label for tp in gt.tasks} == sample.labels
        for tp in gt.tasks:
            assert tp.confident and tp.confidence == 1.0 and tp.class_index == spec[tp.task].index(tp.label)
            assert tp.top_k[0].label == tp.label
        fine = next(tp for tp in gt.tasks if tp.task == "fine_action")
        pair = dict(SYMMETRIC_PAIRS) | {b: a for a, b in SYMMETRIC_PAIRS}
        assert fine.symmetric_counterpart == pair.get(fine.label, "")
        seg = json.loads(seg_msg.data)
        assert seg["segment"] == i and Path(seg["video"]) == sample.video and seg["labels"] == sample.labels
        assert (seg["start_frame"], seg["end_frame"], seg["num_frames"], seg["fps"]) == (0, NUM_FRAMES, NUM_FRAMES, FPS)
        assert seg["window_start_ns"] == first and seg["stamp_ns"] == last and seg["context"] == "known"
    # rgb8 is lossless: the bag holds exactly the decoded video frames
    video = read_video(dataset[3].video)
    for j in range(NUM_FRAMES):
        np.testing.assert_array_equal(imgmsg_to_rgb(images[3 * NUM_FRAMES + j][1]), video[j])


def test_record_refuses_to_overwrite_and_checks_labels(bag_set, tmp_path):
    with pytest.raises(FileExistsError, match="exists"):
        record(bag_set["small_csv"], bag_set["bags"]["mcap"], progress=False)
    header, first = bag_set["small_csv"].read_text().splitlines()[:2]
    fields = first.split(",")
    fields[header.split(",").index("fine_action")] = "juggle"
    bad_rel = bag_set["small_csv"].parent / "bad_labels.csv"  # beside the videos (relative paths)
    bad_rel.write_text(header + "\n" + ",".join(fields) + "\n")
    with pytest.raises(ValueError, match="juggle"):
        record(bad_rel, tmp_path / "never", manifest=bag_set["manifest"], progress=False)
    assert not (tmp_path / "never").exists() and not list(tmp_path.glob(".never*"))


# --------------------------------------------------------------------------- replay-eval


def _offline_probs(model, video: Path, lasts: list[int]) -> list[dict[str, np.ndarray]]:
    """The heads on the clips of T frames at the frame interval ending at video frames ``lasts``
    (each frame encoded once by the backbone, as a clip would be; no streaming code involved)."""
    m = model.manifest
    idx = np.stack([last - np.arange(m.frames)[::-1] * m.frame_interval for last in lasts])
    assert (idx >= 0).all()
    with torch.inference_mode():
        tokens = model.backbone.encode(read_video(video))
        logits = model(tokens[torch.from_numpy(idx)])
    probs = {t: torch.softmax(v.float(), -1).numpy() for t, v in logits.items()}
    return [{t: p[i] for t, p in probs.items()} for i in range(len(lasts))]


def test_replay_eval_equals_offline_predictions(bag_set, tmp_path):
    model, manifest = bag_set["model"], bag_set["model"].manifest
    report = replay_eval(bag_set["bags"]["mcap"], bag_set["manifest"], tmp_path / "eval", save_probs=True,
                         progress=False, quiet=True)
    n_seg = len(load_annotations(bag_set["csv"]))
    span = (manifest.frames - 1) * manifest.frame_interval + 1
    per_segment = len(range(span - 1, NUM_FRAMES, manifest.frame_interval))  # frames 6, 8, 10
    assert report["num_predictions"] == n_seg * per_segment == report["num_matched"]
    assert report["resets"] == {"gap": n_seg - 1}
    assert report["frames"]["valid"] == n_seg * NUM_FRAMES and report["frames"]["undecodable"] == 0
    assert report["frames"]["backbone_passes"] == n_seg * NUM_FRAMES // manifest.frame_interval
    assert report["pipeline"] == "batched" and report["settings"]["runner"] == "indexed batches"
    assert all(v["with_scored_windows"] == v["total"] == n_seg for v in report["intervals"].values())
    fine = report["tasks"]["fine_action"]["contexts"]["all"]
    assert fine["n"] == report["num_predictions"] and 0 <= fine["top1"] <= 1 and fine["within_pair"] is not None
    assert fine["n_symmetric"] == 12 * per_segment
    assert report["latency"]["n"] == 0  # batched: no per-prediction latency (the stream pipeline measures it)
    for name in ("report.json", "predictions.csv", *(f"timeline_{t}.png" for t in manifest.tasks)):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    assert not (tmp_path / "eval" / "latency.png").exists()
    dataset = load_annotations(bag_set["csv"])
    by_segment: dict[int, list[tuple[dict, int]]] = {}
    for p in report["predictions"]:
        seg_start = 1_700_000_000.0 + p["segment"] * ((NUM_FRAMES - 1) / FPS + GAP_S)
        last = round((p["stamp"] - seg_start) * FPS)
        assert last == p["video_frame"] and last >= span - 1
        assert p["window_start"] == pytest.approx(seg_start + (last - span + 1) / FPS, abs=1e-6)
        by_segment.setdefault(p["segment"], []).append((p, last))
    assert len(by_segment) == n_seg and all(len(v) == per_segment for v in by_segment.values())
    for segment, preds in by_segment.items():
        sample = dataset[segment]
        offline = _offline_probs(model, sample.video, [last for _, last in preds])
        for (p, _), expected in zip(preds, offline):
            for spec in manifest.heads:
                got = p["tasks"][spec.task]
                np.testing.assert_allclose(got["probs"], expected[spec.task], rtol=1e-5, atol=1e-5)
                assert got["label"] == spec.labels[int(np.argmax(expected[spec.task]))]
                assert got["true"] == sample.labels[spec.task]

    # the sqlite3 bag through the live engine frame by frame (exact fast STEP heads) gives the same
    # predictions, and measures the compute latency of each
    fast = replay_eval(bag_set["bags"]["sqlite3"], bag_set["manifest"], tmp_path / "stream", pipeline="stream",
                       runner="fast", save_probs=True, progress=False, quiet=True)
    assert fast["settings"]["runner"] == "FastStepRunner"
    assert fast["latency"]["n"] == fast["num_predictions"] and fast["latency"]["p95_ms"] > 0
    assert (tmp_path / "stream" / "latency.png").stat().st_size > 0
    assert len(fast["predictions"]) == len(report["predictions"])
    for a, b in zip(report["predictions"], fast["predictions"]):
        assert a["stamp"] == b["stamp"]
        for task in manifest.tasks:
            np.testing.assert_allclose(a["tasks"][task]["probs"], b["tasks"][task]["probs"], rtol=1e-5, atol=1e-5)
            assert a["tasks"][task]["label"] == b["tasks"][task]["label"]


def test_compressed_bag_replays_through_the_cli_functions(bag_set, tmp_path):
    from step_ros.bags import record as record_mod
    from step_ros.bags import replay as replay_mod

    parser = argparse.ArgumentParser()
    record_mod.add_arguments(parser)
    args = parser.parse_args(["--data", str(bag_set["small_csv"]), "--out", str(tmp_path / "jpeg"), "--compressed",
                              "--no-progress", "--manifest", str(bag_set["manifest"])])
    assert record_mod.main(args) == 0
    msgs = _read_all(tmp_path / "jpeg")
    images = msgs["/camera/image_raw/compressed"]
    assert len(images) == 4 * NUM_FRAMES and {ty for _, _, ty in images} == {COMPRESSED_TYPE}
    assert "jpeg" in images[0][1].format

    parser = argparse.ArgumentParser()
    replay_mod.add_arguments(parser)
    args = parser.parse_args(["--bag", str(tmp_path / "jpeg"), "--manifest", str(bag_set["manifest"]),
                              "--out", str(tmp_path / "eval"), "--no-progress", "--alpha", "0.5"])
    assert replay_mod.main(args) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["image_type"] == COMPRESSED_TYPE and report["image_topic"] == "/camera/image_raw/compressed"
    assert report["frames"]["valid"] == 4 * NUM_FRAMES and report["frames"]["undecodable"] == 0
    assert report["num_predictions"] == report["num_matched"] == 4 * 3
    assert report["settings"]["alpha"] == 0.5


def _copy_with_extra(src: Path, dst: Path, extra) -> Path:
    """Copy a bag's messages to a new bag and add messages from ``extra(writer, store)``."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    store = typestore()
    with open_bag(src) as reader, Writer(dst, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        conns = {c.id: writer.add_connection(c.topic, c.msgtype, typestore=store) for c in reader.connections}
        for conn, t, raw in iter_messages(reader, src):
            writer.write(conns[conn.id], t, raw)
        extra(writer, store, reader)
    return dst


def test_recorded_human_action_topic_is_scored(bag_set, tmp_path):
    small = record(bag_set["small_csv"], tmp_path / "small", manifest=bag_set["manifest"], progress=False)

    def add_live(writer, store, reader):
        # a "live" recording that is always right on atomic_action and always wrong on object_in_use
        conn = writer.add_connection("/human_action", HUMAN_ACTION_TYPE, typestore=store)
        gts = [deserialize(raw, c.msgtype) for c, _, raw in iter_messages(reader, small)
               if c.topic == GROUND_TRUTH_TOPIC]
        for gt in gts:
            for tp in gt.tasks:
                if tp.task == "object_in_use":
                    tp.label = next(o for o in OBJECTS if o != tp.label)
            gt.frames_in_window = gt.frames_expected = 4
            writer.write(conn, time_to_ns(gt.header.stamp), store.serialize_cdr(gt, HUMAN_ACTION_TYPE))

    bag = _copy_with_extra(small, tmp_path / "live", add_live)
    report = replay_eval(bag, bag_set["manifest"], progress=False, quiet=True, model=bag_set["model"])
    live = report["recorded"]["/human_action"]
    assert live["num_messages"] == live["num_matched"] == 4
    assert live["tasks"]["atomic_action"]["contexts"]["all"]["top1"] == 1.0
    assert live["tasks"]["object_in_use"]["contexts"]["all"]["top1"] == 0.0


def test_undecodable_images_are_skipped_and_counted(bag_set, tmp_path):
    from rosbags.rosbag2 import StoragePlugin, Writer

    store = typestore()
    frames = read_video(load_annotations(bag_set["csv"])[0].video)
    image_cls = msg_class(IMAGE_TYPE)

    def write(path: Path, bad_every: int | None, good: bool = True) -> Path:
        with Writer(path, version=9, storage_plugin=StoragePlugin.SQLITE3) as writer:
            conn = writer.add_connection("/cam", IMAGE_TYPE, typestore=store)
            for i, frame in enumerate(frames):
                t = 1_000 * NS + int(i * NS / FPS)
                if bad_every and i % bad_every == 1 or not good:
                    msg = image_cls(header=rgb_to_image(frame, t).header, height=4, width=4, encoding="16UC1",
                                    is_bigendian=0, step=8, data=np.zeros(32, np.uint8))
                else:
                    msg = rgb_to_image(frame, t)
                writer.write(conn, t, store.serialize_cdr(msg, IMAGE_TYPE))
        return path

    report = replay_eval(write(tmp_path / "mixed", 5), bag_set["manifest"], progress=False, quiet=True,
                         model=bag_set["model"], min_frames=1)
    assert report["frames"]["undecodable"] == 3 and report["frames"]["valid"] == NUM_FRAMES - 3
    assert all("16UC1" in reason for reason in report["frames"]["undecodable_reasons"])
    assert report["truth"]["sources"] == [] and report["num_predictions"] > 0
    with pytest.raises(BagError, match=r"/cam.*no decodable image.*16UC1"):
        replay_eval(write(tmp_path / "allbad", None, good=False), bag_set["manifest"], progress=False, quiet=True,
                    model=bag_set["model"])


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_corrupt_bag_is_a_clear_error(bag_set, tmp_path, storage, damage):
    bag = tmp_path / f"broken_{storage}"
    shutil.copytree(bag_set["bags"][storage], bag)
    data_file = next(p for p in bag.iterdir() if p.name != "metadata.yaml")
    data = data_file.read_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes()
    else:
        data = b""
    data_file.write_bytes(data)
    with pytest.raises(BagError, match=re.escape(str(bag))):
        replay_eval(bag, bag_set["manifest"], progress=False, quiet=True, model=bag_set["model"])


def test_missing_bag_topic_and_unreadable_folder_errors(bag_set, tmp_path):
    with pytest.raises(BagError, match="not found"):
        replay_eval(tmp_path / "nope", bag_set["manifest"], progress=False, quiet=True, model=bag_set["model"])
    (tmp_path / "plain").mkdir()
    with pytest.raises(BagError, match="metadata.yaml"):
        replay_eval(tmp_path / "plain", bag_set["manifest"], progress=False, quiet=True, model=bag_set["model"])
    bag = bag_set["bags"]["mcap"]
    with pytest.raises(BagError, match=r"no topic '/front_camera'.*/camera/image_raw"):
        replay_eval(bag, bag_set["manifest"], image_topic="/front_camera", progress=False, quiet=True,
                    model=bag_set["model"])
    with pytest.raises(BagError, match="not an image"):
        replay_eval(bag, bag_set["manifest"], image_topic=GROUND_TRUTH_TOPIC, progress=False, quiet=True,
                    model=bag_set["model"])
    with pytest.raises(BagError, match="/labels"):
        replay_eval(bag, bag_set["manifest"], ground_truth_topic="/labels", progress=False, quiet=True,
                    model=bag_set["model"])
    # a single storage file opens too (no metadata.yaml needed)
    with open_bag(next(bag.glob("*.mcap"))) as reader:
        assert "/camera/image_raw" in reader.topics


# --------------------------------------------------------------------------- conversions


def test_recorded_images_read_back_through_the_node_conversions():
    """What ``record`` writes (rgb8 Image, png / jpeg CompressedImage), through CDR, is read back by
    the node's own conversions (which replay-eval uses too) to the same pixels."""
    from step_ros.ros.conversions import ImageError, compressed_imgmsg_to_rgb, imgmsg_to_rgb

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    t = 5 * NS + 7
    msg = rgb_to_image(rgb, t)
    back = imgmsg_to_rgb(deserialize(typestore().serialize_cdr(msg, IMAGE_TYPE), IMAGE_TYPE))
    np.testing.assert_array_equal(back, rgb)
    assert back.flags.writeable and time_to_ns(msg.header.stamp) == t
    png = deserialize(typestore().serialize_cdr(rgb_to_compressed(rgb, t, fmt="png"), COMPRESSED_TYPE),
                      COMPRESSED_TYPE)
    np.testing.assert_array_equal(compressed_imgmsg_to_rgb(png), rgb)  # png is lossless
    smooth = np.repeat(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], 48, axis=0).repeat(3, axis=2)
    jpeg = rgb_to_compressed(np.ascontiguousarray(smooth), t, quality=95)
    assert "jpeg" in jpeg.format and np.abs(compressed_imgmsg_to_rgb(jpeg).astype(int) - smooth).max() <= 8
    broken = msg_class(COMPRESSED_TYPE)(header=msg.header, format="jpeg", data=np.frombuffer(b"not a jpeg", np.uint8))
    with pytest.raises(ImageError, match="cannot decode"):
        compressed_imgmsg_to_rgb(broken)
    with pytest.raises(ValueError, match="png"):
        rgb_to_compressed(rgb, t, fmt="webp")


# --------------------------------------------------------------------------- play (needs ROS 2)


def test_play_publishes_frames_in_order_at_rate(bag_set, tmp_path, monkeypatch):
    pytest.importorskip("rclpy", reason="ROS 2 (rclpy) not installed: run scripts/setup_ros.sh")
    pytest.importorskip("sensor_msgs.msg", reason="sensor_msgs not installed")
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")  # keep DDS discovery on this host
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import Image

    from step_ros.bags.play import play

    bag = record(bag_set["small_csv"], tmp_path / "small", progress=False, gap_s=1.5)  # 4 segments, ~7.4 s
    rate = 4.0
    domain = 1 + (os.getpid() + 50) % 100
    ctx = Context()
    rclpy.init(context=ctx, domain_id=domain)
    node = rclpy.create_node("bag_test_listener", context=ctx)
    got = []
    node.create_subscription(Image, "/camera/image_raw",
                             lambda m: got.append((time.monotonic(), m.header.stamp.sec * NS + m.header.stamp.nanosec,
                                                   m.width, bytes(m.data[:12]))), 100)
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    result = {}
    stop = threading.Event()

    def run():
        result["count"] = play(bag, rate=rate, wait_for_subscribers=1, wait_timeout_s=20, domain_id=domain,
                               stop_event=stop)

    thread = threading.Thread(target=run)
    try:
        thread.start()
        deadline = time.monotonic() + 60
        while thread.is_alive() and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.02)
        end = time.monotonic() + 2
        while len(got) < result.get("count", 0) and time.monotonic() < end:
            executor.spin_once(timeout_sec=0.02)
    finally:
        stop.set()
        thread.join(10)
        node.destroy_node()
        ctx.try_shutdown()
    sent = [m for _, m, _ in _read_all(bag)["/camera/image_raw"]]
    assert result["count"] == len(sent) == 4 * NUM_FRAMES
    assert len(got) == len(sent)
    assert [s for _, s, _, _ in got] == [time_to_ns(m.header.stamp) for m in sent]  # all, in order
    assert got[0][3] == bytes(np.asarray(sent[0].data[:12]))
    # from the second segment on: the first samples after matching can arrive late in a burst
    # (reliable QoS repairs them), which shortened the measured wall time below the rate's
    start = got[len(got) // 4]
    bag_span = (got[-1][1] - start[1]) / NS
    wall = got[-1][0] - start[0]
    assert bag_span / rate * 0.8 < wall < bag_span / rate * 1.5 + 0.3, (wall, bag_span)


def test_play_without_ros_is_a_clear_error(bag_set, monkeypatch):
    import sys

    from step_ros.bags.play import RosUnavailable, play

    monkeypatch.setitem(sys.modules, "rclpy", None)  # as if ROS 2 were not installed
    with pytest.raises(RosUnavailable, match="setup_ros.sh"):
        play(bag_set["bags"]["mcap"])
    with pytest.raises(BagError, match="no topic '/nope'"):
        play(bag_set["bags"]["mcap"], topics=["/nope"])


def test_ground_truth_deserializes_in_ros(bag_set):
    """The bag's HumanAction bytes are the rosidl-generated message's (same .msg files)."""
    pytest.importorskip("rclpy", reason="ROS 2 (rclpy) not installed: run scripts/setup_ros.sh")
    msg_mod = pytest.importorskip("step_ros.msg", reason="step_ros messages not built: run scripts/setup_ros.sh")
    from rclpy.serialization import deserialize_message

    with open_bag(bag_set["bags"]["sqlite3"]) as reader:
        conns = [c for c in reader.connections if c.topic == GROUND_TRUTH_TOPIC]
        raw_msgs = [(deserialize(raw, HUMAN_ACTION_TYPE), bytes(raw)) for _, _, raw in iter_messages(reader, "", conns)]
    for ours, raw in raw_msgs[:3]:
        ros = deserialize_message(raw, msg_mod.HumanAction)
        assert (ros.header.stamp.sec, ros.header.stamp.nanosec) == (ours.header.stamp.sec, ours.header.stamp.nanosec)
        assert ros.sequence == ours.sequence and ros.window_complete
        assert [(t.task, t.label, t.class_index, t.symmetric_counterpart, t.confident, [s.label for s in t.top_k])
                for t in ros.tasks] == [(t.task, t.label, t.class_index, t.symmetric_counterpart, t.confident,
                                         [s.label for s in t.top_k]) for t in ours.tasks]


def test_replay_bench_rows_give_identical_predictions(bag_set, tmp_path, monkeypatch):
    """``step-ros bench --suite replay``: every row replays the same bag to the same predictions
    (the ONNX Runtime row through the dynamic-batch graph), or the command fails."""
    pytest.importorskip("onnxruntime", reason="the ONNX Runtime row needs onnxruntime")
    from step_ros.bags import bench_replay

    monkeypatch.setenv("STEP_ROS_CACHE_DIR", str(tmp_path / "cache"))
    args = argparse.Namespace(bag=str(bag_set["bags"]["sqlite3"]), manifest=str(bag_set["manifest"]), repeat=1,
                              busy=0, bag_per_class=1, out=str(tmp_path / "out"))
    assert bench_replay.main(args) == 0
    result = json.loads((tmp_path / "out" / "bench_replay.json").read_text())
    assert [r["pipeline"] for r in result["rows"]] == ["stream", "batched-torch", "batched", "batched-ort"]
    assert [r["backbone"] for r in result["rows"]] == ["torch", "torch", "torch", "onnxruntime"]
    assert [r["head_kernels"] for r in result["rows"][1:]] == ["torch", "onnxruntime", "onnxruntime"]
    assert result["identical_predictions"] is True and result["max_prob_diff"] <= bench_replay.ATOL
    assert len({(r["frames"], r["predictions"]) for r in result["rows"]}) == 1 and result["rows"][0]["predictions"] > 0
    assert all(len(r["times_s"]) == 1 for r in result["rows"])  # the warm-up round is not timed
    assert list((tmp_path / "cache").glob("*/backbone.batched.onnx"))
