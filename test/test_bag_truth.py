"""Real robot bags: bags written by other tools (rosbags' writers, the mcap writer, ROS 1), ground
truth from label topics and annotation files, planner metrics, batched replay, bad inputs.

Every foreign bag carries the frames of one bag recorded by ``step-ros record`` (same pixels, same
stamps) and the same truth in its own form; its scores must equal the project format's.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_OVERRIDES
from step_ros.bags.common import (
    GROUND_TRUTH_TOPIC,
    IMAGE_TYPE,
    STRING_TYPE,
    BagError,
    iter_messages,
    open_bag,
    time_to_ns,
    typestore,
)
from step_ros.bags.record import record
from step_ros.bags.replay import replay_eval
from step_ros.bags.truth import Interval, Truth, TruthError, TruthSources
from step_ros.data.synthetic import ATOMIC_ACTIONS, FINE_ACTIONS, OBJECTS, SYMMETRIC_PAIRS, generate
from step_ros.model.manifest import parse_manifest
from step_ros.model.multitask import MultiTaskModel, save_head

FPS = 15.0
NUM_FRAMES = 14
NS = 1_000_000_000
HALF_FRAME_NS = int(NS / FPS / 2)
LABEL_TOPIC = "/ground_truth/action"
OBJECT_TOPIC = "/labels/object"
#: A type no standard typestore has: the bag's own definition must be used to read it.
CUSTOM_TYPE = "hri_msgs/msg/ObjectLabel"
CUSTOM_MSG = "std_msgs/Header header\nstring name\nfloat32 certainty\n"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """A project bag (frames + /ground_truth), its frames and segments, and a tiny model."""
    root = tmp_path_factory.mktemp("truth")
    csv_path = generate(root / "synth", seed=5, videos_per_class={"train": 0, "val": 0, "test": 1},
                        unknown_per_class=0, size=48, num_frames=NUM_FRAMES, fps=FPS, progress=False)
    lines = csv_path.read_text().splitlines()
    small = root / "synth" / "six.csv"
    small.write_text("\n".join(lines[:7]) + "\n")
    manifest = parse_manifest({
        "name": "tiny-truth",
        "backbone": {"arch": "dinov2_vitt14", "random_seed": 0, "image_size": 42, "overrides": TINY_OVERRIDES},
        "frames": 4, "frame_interval": 2,
        "heads": [
            {"task": "fine_action", "kind": "step", "labels": FINE_ACTIONS,
             "symmetric_pairs": [list(p) for p in SYMMETRIC_PAIRS]},
            {"task": "atomic_action", "kind": "step", "labels": ATOMIC_ACTIONS},
            {"task": "object_in_use", "kind": "linear", "labels": OBJECTS},
        ],
    }, root)
    torch.manual_seed(1)
    model = MultiTaskModel.from_manifest(manifest, load_checkpoints=False)
    for spec in manifest.heads:
        spec.checkpoint = root / "heads" / f"{spec.task}.safetensors"
        save_head(model.heads[spec.task], spec, spec.checkpoint, dim=model.backbone.dim, frames=manifest.frames,
                  num_tokens=model.backbone.num_patches)
    manifest_path = manifest.save(root / "manifest.yaml")
    bag = record(small, root / "ref", manifest=manifest_path, gap_s=1.5, progress=False)
    frames, segments = [], []
    with open_bag(bag) as reader:
        for conn, log_ns, raw in iter_messages(reader, bag):
            msg = reader.deserialize(raw, conn.msgtype)
            if conn.msgtype == IMAGE_TYPE:
                rgb = np.asarray(msg.data, np.uint8).reshape(msg.height, msg.width, 3)
                frames.append((time_to_ns(msg.header.stamp), log_ns, rgb))
            elif conn.topic == GROUND_TRUTH_TOPIC:
                segments.append((time_to_ns(msg.window_start), time_to_ns(msg.header.stamp),
                                 {tp.task: tp.label for tp in msg.tasks}))
    model = MultiTaskModel.from_manifest(manifest).eval()
    base = replay_eval(bag, manifest_path, None, model=model, quiet=True, progress=False, save_probs=True)
    return {"root": root, "bag": bag, "manifest": manifest_path, "model": model, "frames": frames,
            "segments": segments, "base": base}


def _events(segments, task):
    """Label events of one task: the label at a segment's first frame, an end marker half a frame
    after its last one (so the same frames are labelled as by the /ground_truth segments)."""
    out = []
    for start, end, labels in segments:
        out += [(start, labels[task]), (end + HALF_FRAME_NS, "")]
    return out


def _bgr_image(store, rgb, stamp_ns, ros1=False):
    """What a ROS camera driver writes: bgr8."""
    cls = store.types[IMAGE_TYPE]
    hdr_cls = store.types["std_msgs/msg/Header"]
    stamp = store.types["builtin_interfaces/msg/Time"](sec=stamp_ns // NS, nanosec=stamp_ns % NS)
    hdr = hdr_cls(seq=0, stamp=stamp, frame_id="cam") if ros1 else hdr_cls(stamp=stamp, frame_id="cam")
    h, w = rgb.shape[:2]
    return cls(header=hdr, height=h, width=w, encoding="bgr8", is_bigendian=0, step=3 * w,
               data=np.ascontiguousarray(rgb[:, :, ::-1]).reshape(-1))


def _custom_store(base):
    from rosbags.typesys import get_types_from_msg

    store = base
    store.register(get_types_from_msg(CUSTOM_MSG, CUSTOM_TYPE))
    return store


def _object_label(store, name, stamp_ns, ros1=False):
    hdr_cls = store.types["std_msgs/msg/Header"]
    stamp = store.types["builtin_interfaces/msg/Time"](sec=stamp_ns // NS, nanosec=stamp_ns % NS)
    hdr = hdr_cls(seq=0, stamp=stamp, frame_id="") if ros1 else hdr_cls(stamp=stamp, frame_id="")
    return store.types[CUSTOM_TYPE](header=hdr, name=name, certainty=1.0)


def write_rosbag2(ref, path, storage):
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = _custom_store(get_typestore(Stores.ROS2_HUMBLE))
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(path, version=9, storage_plugin=plugin) as w:
        cam = w.add_connection("/camera/color/image_raw", IMAGE_TYPE, typestore=store)
        lab = w.add_connection(LABEL_TOPIC, STRING_TYPE, typestore=store)
        obj = w.add_connection(OBJECT_TOPIC, CUSTOM_TYPE, typestore=store)
        msgs = [(log, cam, store.serialize_cdr(_bgr_image(store, rgb, stamp), IMAGE_TYPE))
                for stamp, log, rgb in ref["frames"]]
        msgs += [(t, lab, store.serialize_cdr(store.types[STRING_TYPE](data=v), STRING_TYPE))
                 for t, v in _events(ref["segments"], "fine_action")]
        # stamped labels, logged late (the header stamp is what counts)
        msgs += [(t + NS // 10, obj, store.serialize_cdr(_object_label(store, v, t), CUSTOM_TYPE))
                 for t, v in _events(ref["segments"], "object_in_use")]
        for t, conn, data in sorted(msgs, key=lambda m: m[0]):
            w.write(conn, t, data)
    return path


def write_ros1(ref, path):
    from rosbags.rosbag1 import Writer
    from rosbags.typesys import Stores, get_typestore

    store = _custom_store(get_typestore(Stores.ROS1_NOETIC))
    with Writer(path) as w:
        cam = w.add_connection("/camera/color/image_raw", IMAGE_TYPE, typestore=store)
        lab = w.add_connection(LABEL_TOPIC, STRING_TYPE, typestore=store)
        obj = w.add_connection(OBJECT_TOPIC, CUSTOM_TYPE, typestore=store)
        msgs = [(log, cam, store.serialize_ros1(_bgr_image(store, rgb, stamp, ros1=True), IMAGE_TYPE))
                for stamp, log, rgb in ref["frames"]]
        msgs += [(t, lab, store.serialize_ros1(store.types[STRING_TYPE](data=v), STRING_TYPE))
                 for t, v in _events(ref["segments"], "fine_action")]
        msgs += [(t + NS // 10, obj, store.serialize_ros1(_object_label(store, v, t, ros1=True), CUSTOM_TYPE))
                 for t, v in _events(ref["segments"], "object_in_use")]
        for t, conn, data in sorted(msgs, key=lambda m: m[0]):
            w.write(conn, t, data)
    return path


def write_mcap_ros2(ref, path):
    """A bare .mcap written by the mcap project's own ROS 2 writer (no rosbag2 metadata.yaml)."""
    from mcap_ros2.writer import Writer
    from rosbags.typesys import Stores, get_typestore

    store = _custom_store(get_typestore(Stores.ROS2_HUMBLE))
    with open(path, "wb") as f:
        w = Writer(f)
        img_schema = w.register_msgdef(IMAGE_TYPE, store.generate_msgdef(IMAGE_TYPE, ros_version=2)[0])
        str_schema = w.register_msgdef(STRING_TYPE, store.generate_msgdef(STRING_TYPE, ros_version=2)[0])
        obj_schema = w.register_msgdef(CUSTOM_TYPE, store.generate_msgdef(CUSTOM_TYPE, ros_version=2)[0])

        def stamp(ns):
            return {"sec": ns // NS, "nanosec": ns % NS}

        msgs = []
        for t, log, rgb in ref["frames"]:
            h, w_ = rgb.shape[:2]
            msgs.append((log, "/camera/color/image_raw", img_schema, {
                "header": {"stamp": stamp(t), "frame_id": "cam"}, "height": h, "width": w_, "encoding": "bgr8",
                "is_bigendian": 0, "step": 3 * w_, "data": np.ascontiguousarray(rgb[:, :, ::-1]).tobytes()}))
        msgs += [(t, LABEL_TOPIC, str_schema, {"data": v}) for t, v in _events(ref["segments"], "fine_action")]
        msgs += [(t + NS // 10, OBJECT_TOPIC, obj_schema, {"header": {"stamp": stamp(t), "frame_id": ""}, "name": v,
                                                          "certainty": 1.0})
                 for t, v in _events(ref["segments"], "object_in_use")]
        for t, topic, schema, msg in sorted(msgs, key=lambda m: m[0]):
            w.write_message(topic, schema, msg, log_time=t, publish_time=t)
        w.finish()
    return path


WRITERS = {
    "rosbags-mcap": lambda ref, tmp: write_rosbag2(ref, tmp / "bag", "mcap"),
    "rosbags-sqlite3": lambda ref, tmp: write_rosbag2(ref, tmp / "bag", "sqlite3"),
    "mcap-ros2-writer": lambda ref, tmp: write_mcap_ros2(ref, tmp / "robot.mcap"),
    "ros1": lambda ref, tmp: write_ros1(ref, tmp / "robot.bag"),
}


def _same_scores(got: dict, want: dict, tasks) -> None:
    for task in tasks:
        g, w = got["tasks"][task]["contexts"]["all"], want["tasks"][task]["contexts"]["all"]
        assert g == w, task
        assert got["tasks"][task]["per_class"] == want["tasks"][task]["per_class"]


@pytest.mark.parametrize("writer", list(WRITERS))
def test_foreign_bag_with_label_topics_scores_as_the_project_format(ref, tmp_path, writer):
    bag = WRITERS[writer](ref, tmp_path)
    report = replay_eval(bag, ref["manifest"], tmp_path / "eval", model=ref["model"], quiet=True, progress=False,
                         save_probs=True, truth=TruthSources(topics=[f"{LABEL_TOPIC}=fine_action"]))
    base = ref["base"]
    # the same frames in a foreign bag (bgr8, another topic name) give the same predictions
    assert report["image_topic"] == "/camera/color/image_raw"
    assert [p["stamp"] for p in report["predictions"]] == [p["stamp"] for p in base["predictions"]]
    for a, b in zip(report["predictions"], base["predictions"]):
        np.testing.assert_allclose(a["tasks"]["fine_action"]["probs"], b["tasks"]["fine_action"]["probs"], atol=1e-6)
    _same_scores(report, base, ["fine_action"])
    assert report["tasks"]["fine_action"]["contexts"]["all"]["n"] == base["num_predictions"]
    assert report["tasks_without_ground_truth"] == ["atomic_action", "object_in_use"]
    # a stamped custom type (defined only in the bag), read by field path, stamped by its header
    obj = replay_eval(bag, ref["manifest"], None, model=ref["model"], quiet=True, progress=False, save_probs=True,
                      truth=TruthSources(topics=[f"{OBJECT_TOPIC}=object_in_use"], label_field="name"))
    _same_scores(obj, base, ["object_in_use"])
    assert (tmp_path / "eval" / "predictions.csv").read_text().splitlines()[0].startswith("stamp,t,window_start")


def _relative_rows(ref, t0_ns):
    rows = []
    for start, end, labels in ref["segments"]:
        rows.append(((start - t0_ns) / NS, (end + HALF_FRAME_NS - t0_ns) / NS, labels))
    return rows


def test_annotation_csv_and_json_score_as_the_project_format(ref, tmp_path):
    t0 = ref["frames"][0][0]
    rows = _relative_rows(ref, t0)
    csv_path = tmp_path / "ann.csv"
    csv_path.write_text("start,end,fine_action,atomic_action,object_in_use,notes\n" + "".join(
        f"{s!r},{e!r},{lab['fine_action']},{lab['atomic_action']},{lab['object_in_use']},seen\n" for s, e, lab in rows))
    report = replay_eval(ref["bag"], ref["manifest"], None, model=ref["model"], quiet=True, progress=False,
                         save_probs=True, truth=TruthSources(annotations=csv_path))
    _same_scores(report, ref["base"], ["fine_action", "atomic_action", "object_in_use"])
    # JSON, in bag time
    items = [{"start": (s * NS + t0) / NS, "end": (e * NS + t0) / NS, "labels": lab} for s, e, lab in rows]
    js = tmp_path / "ann.json"
    js.write_text(json.dumps({"intervals": items}))
    report = replay_eval(ref["bag"], ref["manifest"], None, model=ref["model"], quiet=True, progress=False,
                         save_probs=True, truth=TruthSources(annotations=js, annotation_time="bag"))
    _same_scores(report, ref["base"], ["fine_action", "atomic_action", "object_in_use"])


def test_elan_export_is_read_tier_per_task(ref, tmp_path):
    t0 = ref["frames"][0][0]
    slots, anns = [], []
    for i, (start, end, lab) in enumerate(ref["segments"]):
        # ELAN stores whole milliseconds: round outwards so the same frames are covered
        a = math.floor((start - t0) / 1e6)
        b = math.ceil((end + HALF_FRAME_NS - t0) / 1e6)
        slots += [f'<TIME_SLOT TIME_SLOT_ID="ts{2 * i}" TIME_VALUE="{a}"/>',
                  f'<TIME_SLOT TIME_SLOT_ID="ts{2 * i + 1}" TIME_VALUE="{b}"/>']
        anns.append((i, lab))
    tier = "".join(f'<ANNOTATION><ALIGNABLE_ANNOTATION ANNOTATION_ID="a{i}" TIME_SLOT_REF1="ts{2 * i}" '
                   f'TIME_SLOT_REF2="ts{2 * i + 1}"><ANNOTATION_VALUE>{lab["fine_action"]}</ANNOTATION_VALUE>'
                   f'</ALIGNABLE_ANNOTATION></ANNOTATION>' for i, lab in anns)
    ref_tier = "".join(f'<ANNOTATION><REF_ANNOTATION ANNOTATION_ID="r{i}" ANNOTATION_REF="a{i}"><ANNOTATION_VALUE>'
                       f'{lab["object_in_use"]}</ANNOTATION_VALUE></REF_ANNOTATION></ANNOTATION>' for i, lab in anns)
    eaf = tmp_path / "session.eaf"
    eaf.write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n<ANNOTATION_DOCUMENT AUTHOR="" DATE="2026-12-01T00:00:00+00:00" '
        'FORMAT="3.0" VERSION="3.0"><HEADER MEDIA_FILE="" TIME_UNITS="milliseconds"><MEDIA_DESCRIPTOR '
        'MEDIA_URL="file:///robot.mp4" MIME_TYPE="video/mp4"/></HEADER>'
        f'<TIME_ORDER>{"".join(slots)}</TIME_ORDER>'
        f'<TIER LINGUISTIC_TYPE_REF="default" TIER_ID="Action">{tier}</TIER>'
        f'<TIER LINGUISTIC_TYPE_REF="sub" PARENT_REF="Action" TIER_ID="object_in_use">{ref_tier}</TIER>'
        '<TIER LINGUISTIC_TYPE_REF="default" TIER_ID="comments"></TIER>'
        '<LINGUISTIC_TYPE LINGUISTIC_TYPE_ID="default" TIME_ALIGNABLE="true"/>'
        '<LINGUISTIC_TYPE CONSTRAINTS="Symbolic_Association" LINGUISTIC_TYPE_ID="sub" TIME_ALIGNABLE="false"/>'
        '</ANNOTATION_DOCUMENT>')
    report = replay_eval(ref["bag"], ref["manifest"], None, model=ref["model"], quiet=True, progress=False,
                         save_probs=True,
                         truth=TruthSources(annotations=eaf, task_map=["Action=fine_action"]))
    base = ref["base"]
    for task in ("fine_action", "object_in_use"):
        g, w = report["tasks"][task]["contexts"]["all"], base["tasks"][task]["contexts"]["all"]
        for key in ("n", "top1", "symmetric", "within_pair", "segments", "switches"):
            assert g[key] == w[key], (task, key)
        # the intervals start up to 1 ms earlier (whole milliseconds)
        if w["recognition"]["median_s"] is not None:
            assert g["recognition"]["median_s"] == pytest.approx(w["recognition"]["median_s"], abs=2e-3)


def test_batched_pipeline_equals_the_live_engine(ref):
    """Same windows, same order, same predictions: batched (indexed heads, and the fast runner)
    against the live StreamingEngine frame by frame, also with a stride and incomplete windows."""
    for kwargs in ({}, {"stride": 2, "min_frames": 2}):
        live = replay_eval(ref["bag"], ref["manifest"], None, model=ref["model"], pipeline="stream", runner="reference",
                           quiet=True, progress=False, save_probs=True, **kwargs)
        for runner, batch in (("indexed", 3), ("fast", 5), ("auto", 64)):
            got = replay_eval(ref["bag"], ref["manifest"], None, model=ref["model"], pipeline="batched", runner=runner,
                              batch_size=batch, quiet=True, progress=False, save_probs=True, **kwargs)
            assert len(got["predictions"]) == len(live["predictions"]) > 0
            for a, b in zip(got["predictions"], live["predictions"]):
                assert (a["stamp"], a["window_start"], a["complete"]) == (b["stamp"], b["window_start"], b["complete"])
                for task, e in a["tasks"].items():
                    np.testing.assert_allclose(e["probs"], b["tasks"][task]["probs"], rtol=1e-5, atol=1e-6)
                    assert (e["label"], e["stable"], e["confident"]) == (
                        b["tasks"][task]["label"], b["tasks"][task]["stable"], b["tasks"][task]["confident"])
            assert got["resets"] == live["resets"] and got["frames"] == live["frames"]


def test_planner_metrics_by_hand():
    """Time to recognition, false switches, segment accuracy and the twin's share on a made-up
    stream of predictions whose answers are counted by hand."""
    from step_ros.bags.metrics import Record, score

    manifest = parse_manifest({
        "name": "m", "backbone": {"arch": "dinov2_vitt14", "random_seed": 0, "image_size": 42,
                                  "overrides": TINY_OVERRIDES},
        "frames": 4, "frame_interval": 1,
        "heads": [{"task": "a", "kind": "linear", "labels": ["open", "close", "wave"],
                   "symmetric_pairs": [["open", "close"]]}]}, Path("."))
    truth = Truth([Interval("a", "open", 10.0, 20.0), Interval("a", "wave", 20.0, 30.0),
                   Interval("a", "close", 30.0, 31.0)])
    # one prediction per second; windows 2 s long; confident from 14 s, stable from 15 s
    seq = {11: "close", 12: "open", 13: "close", 14: "open", 15: "open", 16: "open", 17: "open", 18: "open",
           19: "open", 22: "wave", 23: "wave", 24: "open", 25: "wave", 26: "wave", 27: "wave", 28: "wave", 29: "wave"}
    recs = []
    for t, lab in seq.items():
        recs.append(Record(stamp=float(t), window_start=t - 2.0, complete=True, labels={"a": lab},
                           confidence={"a": 0.9}, confident={"a": t >= 14}, stable={"a": t >= 15 and t != 24}))
    s = score(recs, manifest, truth)["a"]["contexts"]["all"]
    # open: first confident+stable+right at 15 s -> 5 s; wave: at 22 s -> 2 s; close: no prediction
    assert s["recognition"]["actions"] == 3 and s["recognition"]["recognised"] == 2
    assert s["recognition"]["median_s"] == 3.5 and s["recognition"]["max_s"] == 5.0
    assert s["recognition"]["never_recognised"] == 1 and s["recognition"]["never_fraction"] == pytest.approx(1 / 3, abs=1e-4)
    assert s["recognition"]["without_predictions"] == 1
    # scored windows: open 12..19 (window start >= 10), wave 22..29
    assert s["n"] == 16
    # false switches (to a wrong label): open 12->13 (to close), wave 23->24 (to open); the way back
    # to the right label is recognition, not a false switch; observed 7 s + 7 s
    assert s["switches"]["switches"] == 2 and s["switches"]["per_min"] == pytest.approx(60 * 2 / 14, abs=1e-3)
    assert s["switches"]["confident_stable_switches"] == 0
    # twin's share: windows of 'open' (a symmetric class) naming 'close': 1 of 8
    assert s["counterpart_share"] == pytest.approx(1 / 8, abs=1e-4)
    assert s["segments"] == {"n": 2, "last_window": 1.0, "majority": 1.0}


# --------------------------------------------------------------------------- bad inputs


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "step_ros", "replay-eval", *args, "--no-progress"],
                          capture_output=True, text=True, timeout=300)


def test_bad_inputs_fail_in_one_line_and_write_nothing(ref, tmp_path):
    t0 = ref["frames"][0][0]
    rows = _relative_rows(ref, t0)
    header = "start,end,fine_action\n"
    cases = {
        "overlap": (header + f"0,2,{rows[0][2]['fine_action']}\n1.5,3,approach\n", "overlaps"),
        "unknown": (header + "0,1,juggle\n", "'juggle' of task 'fine_action' is not in the manifest"),
        "outside": (header + "500,501,approach\n", "falls outside the bag"),
        "no-task": ("start,end,mood\n0,1,happy\n", "no column or tier names a task"),
        "not-a-number": (header + "zero,1,approach\n", "start 'zero' is not a number"),
    }
    for name, (text, expected) in cases.items():
        ann = tmp_path / f"{name}.csv"
        ann.write_text(text)
        out = tmp_path / f"out-{name}"
        done = _cli("--bag", str(ref["bag"]), "--manifest", str(ref["manifest"]), "--annotations", str(ann),
                    "--out", str(out))
        lines = [ln for ln in done.stderr.splitlines() if "error:" in ln]
        assert done.returncode == 2 and len(lines) == 1 and expected in lines[0], (name, done.stderr)
        assert "Traceback" not in done.stderr and not out.exists()
    # a truth topic that is not there, an image topic that is not there
    for extra, expected in ((["--truth-topic", "/nope=fine_action"], "no truth topic '/nope'"),
                            (["--image-topic", "/front"], "has no topic '/front'")):
        done = _cli("--bag", str(ref["bag"]), "--manifest", str(ref["manifest"]), *extra, "--out", str(tmp_path / "x"))
        assert done.returncode == 2 and expected in done.stderr and "Traceback" not in done.stderr
        assert not (tmp_path / "x").exists()
    # a label topic with several tasks in the manifest needs TASK
    with pytest.raises(TruthError, match="name the task it labels"):
        replay_eval(write_ros1(ref, tmp_path / "a.bag"), ref["manifest"], None, model=ref["model"], quiet=True,
                    progress=False, truth=TruthSources(topics=[LABEL_TOPIC]))


def test_ros1_messages_become_ros2_cdr_for_play(ref, tmp_path):
    """``play`` publishes ROS 1 bags in ROS 2: each message converted to CDR, bit-exact pixels."""
    bag = write_ros1(ref, tmp_path / "robot.bag")
    store = typestore()
    with open_bag(bag) as reader:
        assert reader.ros_version == 1
        conn = next(c for c in reader.connections if c.msgtype == IMAGE_TYPE)
        _, log_ns, raw = next(iter_messages(reader, bag, [conn]))
        msg = store.deserialize_cdr(reader.to_cdr(raw, IMAGE_TYPE), IMAGE_TYPE)
    stamp, _, rgb = ref["frames"][0]
    assert time_to_ns(msg.header.stamp) == stamp and msg.encoding == "bgr8"
    np.testing.assert_array_equal(np.asarray(msg.data).reshape(rgb.shape), rgb[:, :, ::-1])


def test_truncated_and_ambiguous_bags(ref, tmp_path):
    bag = write_ros1(ref, tmp_path / "robot.bag")
    data = bag.read_bytes()
    cut = tmp_path / "cut.bag"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BagError, match="cut.bag"):
        replay_eval(cut, ref["manifest"], tmp_path / "o", model=ref["model"], quiet=True, progress=False)
    assert not (tmp_path / "o").exists()
    cut_mcap = tmp_path / "cut.mcap"
    mcap = write_mcap_ros2(ref, tmp_path / "whole.mcap")
    cut_mcap.write_bytes(mcap.read_bytes()[: mcap.stat().st_size * 2 // 3])
    with pytest.raises(BagError, match="cut.mcap"):
        replay_eval(cut_mcap, ref["manifest"], None, model=ref["model"], quiet=True, progress=False)
    # two cameras: the user must say which
    from rosbags.rosbag2 import StoragePlugin, Writer

    store = typestore()
    two = tmp_path / "two"
    with Writer(two, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        a = w.add_connection("/left/image_raw", IMAGE_TYPE, typestore=store)
        b = w.add_connection("/right/image_raw", IMAGE_TYPE, typestore=store)
        for stamp, log, rgb in ref["frames"][:20]:
            for conn in (a, b):
                w.write(conn, log, store.serialize_cdr(_bgr_image(store, rgb, stamp), IMAGE_TYPE))
    with pytest.raises(BagError, match="2 image topics.*--image-topic"):
        replay_eval(two, ref["manifest"], None, model=ref["model"], quiet=True, progress=False)
    report = replay_eval(two, ref["manifest"], None, model=ref["model"], quiet=True, progress=False,
                         image_topic="/right/image_raw", min_frames=1)
    assert report["image_topic"] == "/right/image_raw" and report["frames"]["valid"] == 20


def test_bag_reader_answers_what_the_tools_ask(ref, tmp_path):
    """Every tool reads bags through ``open_bag``: the properties they use exist for ROS 2 and
    ROS 1 bags (the live demo asks the camera rate from ``duration``)."""
    from step_ros.ros.demo import camera_rate

    ros1 = write_ros1(ref, tmp_path / "robot.bag")
    for bag in (ref["bag"], ros1):
        with open_bag(bag) as reader:
            assert reader.duration == reader.end_time - reader.start_time > 0
            assert reader.message_count == sum(info.msgcount for info in reader.topics.values())
    fps, count = camera_rate(ref["bag"])
    span_s = (ref["frames"][-1][1] - ref["frames"][0][1]) / NS  # 6 clips at 15 fps, 1.5 s gaps between them
    assert count == len(ref["frames"]) and fps == pytest.approx((count - 1) / span_s, rel=0.02)
