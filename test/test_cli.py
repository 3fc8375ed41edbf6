"""The command line as a user meets it: one clear line per mistake, text printed as written,
and ``step-ros doctor``.  Every command runs as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def step_ros(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "step_ros", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "200"}, **kw)


def one_error_line(result: subprocess.CompletedProcess, command: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"step-ros {command}")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_tensorrt_without_a_gpu_is_one_line(tmp_path):
    pytest.importorskip("rosbags")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the tensorrt backend may work here")
    bag = tmp_path / "bag"
    csv = ROOT / "models" / "demo" / "manifest.yaml"  # any existing file: the backend fails before the bag
    from step_ros.data.synthetic import generate

    data = generate(tmp_path / "data", seed=3, videos_per_class={"train": 0, "val": 0, "test": 1},
                    unknown_per_class=0, size=32, num_frames=20, progress=False)
    assert step_ros("record", "--data", str(data), "--out", str(bag)).returncode == 0
    line = one_error_line(step_ros("replay-eval", "--bag", str(bag), "--manifest", str(csv), "--backend",
                                   "tensorrt"), "replay-eval")
    assert "tensorrt" in line and "step_ros[tensorrt]" in line  # the install hint, brackets and all
    # Recording into the same folder twice is one line too.
    line = one_error_line(step_ros("record", "--data", str(data), "--out", str(bag)), "record")
    assert "exists already" in line and "--overwrite" in line


def test_program_text_in_brackets_prints_as_written(capsys):
    from step_ros.console import console, print_table, step

    console.print("[human_action] published; pip install 'step_ros[tensorrt]'")
    step("1/4", "[synthetic-demo] starts")
    print_table("[synthetic-demo] fine_action", ["[col]"], [["[cell] wide enough for the title to fit on one line"]])
    out = capsys.readouterr().out
    for text in ("[human_action] published", "'step_ros[tensorrt]'", "[synthetic-demo] starts",
                 "[synthetic-demo] fine_action", "[col]", "[cell]"):
        assert text in out, text


def test_doctor_reports_every_check_and_fails_on_a_broken_model(tmp_path):
    if not os.environ.get("STEP_ROS_REQUIRE_ROS"):
        pytest.importorskip("rclpy", reason="ROS 2 (rclpy) not installed: doctor would rightly fail its ROS check")
    result = step_ros("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    for check in ("python and libraries", "ROS 2", "step_ros messages", "torch and GPU", "ONNX Runtime", "TensorRT",
                  "model (manifest, weights, heads)", "engine cache", "compiled kernels"):
        assert check in result.stdout, check
    assert "0 failed" in result.stdout
    broken = tmp_path / "manifest.yaml"
    demo = (ROOT / "models" / "demo" / "manifest.yaml").read_text().replace("heads/", str(ROOT / "models/demo/heads") + "/")
    broken.write_text(demo.replace("random_seed: 0", "random_seed: 1"))  # other weights than the heads know
    result = step_ros("doctor", "--manifest", str(broken))
    assert result.returncode == 1
    assert "FAIL" in result.stdout and "fingerprint" in result.stdout
    assert "1 failed: model (manifest, weights, heads)" in result.stdout


def test_live_demo_calibration_slows_the_bag_only_when_the_node_is_too_slow():
    from step_ros.ros.demo import calibrate

    # 15 fps, interval 2: a sampled frame every 133 ms at 1x, 67 ms at 2x.
    quick = calibrate([9.0, 10.0, 11.0], fps=15.0, interval=2, rate=2.0, dropped=0, sampled=48)
    assert quick["ok"] and quick["next_rate"] is None and "keeps up" in quick["note"]
    slow = calibrate([20.0] * 8 + [100.0, 100.0], fps=15.0, interval=2, rate=2.0, dropped=0, sampled=48)
    assert not slow["ok"] and slow["next_rate"] == 0.67  # the slow frames (p90: 100 ms) fit in half of 133 ms x 2/0.67
    assert "needed up to 100 ms (p90)" in slow["note"] and "trying 0.67x" in slow["note"]
    # Fast enough on average, but frames were dropped (a busy CPU delivers them in bursts): half the rate.
    bursty = calibrate([10.0] * 10, fps=15.0, interval=2, rate=2.0, dropped=9, sampled=48)
    assert not bursty["ok"] and bursty["next_rate"] == 1.0 and "dropped 9 of 48" in bursty["note"]
    assert calibrate([10.0] * 10, fps=15.0, interval=2, rate=2.0, dropped=0, sampled=100)["ok"]
    nothing = calibrate([], fps=15.0, interval=2, rate=2.0, dropped=48, sampled=48)
    assert not nothing["ok"] and nothing["next_rate"] == 1.0
    # One very slow play (p90 1 s): at most 4x slower per step, never below MIN_RATE.
    assert calibrate([1000.0] * 10, fps=15.0, interval=2, rate=2.0, dropped=20, sampled=48)["next_rate"] == 0.5
    assert calibrate([1000.0] * 10, fps=15.0, interval=2, rate=0.3, dropped=20, sampled=48)["next_rate"] == 0.25
    floor = calibrate([1000.0] * 10, fps=15.0, interval=2, rate=0.25, dropped=20, sampled=48)
    assert not floor["ok"] and floor["next_rate"] is None and "not trying slower than 0.25x" in floor["note"]


def test_live_demo_verdict_says_when_the_machine_could_not_keep_up():
    from step_ros.ros.demo import Segment, node_load

    segments = [Segment(i, i * 10, i * 10 + 9, {}) for i in range(10)]
    records = [{"segment": i} for i in range(10)]
    ok = node_load({"frames sampled": 5, "dropped_busy": 0}, {"frames sampled": 205, "dropped_busy": 1}, records,
                   segments, 20.0)
    assert ok["kept_up"] and ok["verdict"].startswith("the machine kept up: 10 of 10 segments covered, 1 of 200")
    starved = node_load({}, {"frames sampled": 200, "dropped_busy": 70, "window resets": 12}, records[:4], segments,
                        20.0)
    assert not starved["kept_up"] and "could NOT keep up" in starved["verdict"]
    assert "4 of 10 segments covered, 70 of 200 sampled frames dropped" in starved["verdict"]


def test_every_help_text_formats():
    """argparse expands % in help strings: one stray "95 %" breaks `step-ros --help` for every command."""
    import argparse

    from step_ros.cli import build_parser

    parser = build_parser()
    assert "diff-eval" in parser.format_help()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        assert p.format_help(), name
