"""The soak report's arithmetic: periods without data, and the debug image's cost split at the
moment of subscription (the soak itself runs the node over DDS; see ``step-ros soak``)."""
from __future__ import annotations

import math
import threading
from types import SimpleNamespace

import cv2
import numpy as np

from step_ros.ros.soak import _debug_report, _median


def test_median_skips_periods_without_data() -> None:
    assert _median([math.nan, 3.0, 1.0, math.nan, 2.0]) == 2.0
    assert math.isnan(_median([math.nan]))
    assert math.isnan(_median([]))


def _diag(t: float, compute: str, debug_images: int, debug_ms: str = "-", rate: str = "10.0") -> tuple:
    return (t, {"input rate (Hz)": rate, "compute median (ms)": compute, "debug images": str(debug_images),
                "debug image ms": debug_ms}, 0, "ok")


def test_debug_report_splits_at_subscription_and_writes_the_newest_image(tmp_path) -> None:
    image = np.zeros((6, 8, 3), np.uint8)
    image[:, :4] = (255, 0, 0)  # rgb8: red on the left
    msg = SimpleNamespace(height=6, width=8, data=image.tobytes())
    listener = SimpleNamespace(debug_since=10.0, lock=threading.Lock(), debug_images=[msg])
    diags = [_diag(1.0, "-", 0, rate="0.0"),  # before frames flow: ignored
             _diag(5.0, "40.0", 0), _diag(9.0, "42.0", 0),
             _diag(11.0, "90.0", 1, "30.0"),  # inside the settling time: ignored
             _diag(14.0, "60.0", 4, "20.0"), _diag(18.0, "64.0", 8, "22.0")]
    report = _debug_report(listener, diags, fps=10.0, png=tmp_path / "debug.png")
    assert report["compute_ms_without_subscriber"] == 41.0
    assert report["compute_ms_with_subscriber"] == 62.0
    assert report["debug_image_ms"] == 21.0
    assert (report["debug_images_built_before_subscribing"], report["debug_images_built"]) == (0, 8)
    written = cv2.imread(report["png"])  # BGR on disk
    assert written.shape == (6, 8, 3)
    assert tuple(written[0, 0]) == (0, 0, 255) and tuple(written[0, 7]) == (0, 0, 0)


def test_a_short_soak_runs_the_node_over_dds_and_writes_its_report(tmp_path) -> None:
    """`step-ros soak` end to end (real node subprocess, real DDS): a few seconds of the demo
    model.  The report and its figure are written, and the node kept up."""
    from step_ros.ros.soak import run_soak

    report = run_soak(None, frames=60, fps=15.0, out=tmp_path, size=64)
    assert (tmp_path / "soak.json").is_file() and (tmp_path / "soak.png").stat().st_size > 0
    assert report["node_exit_code"] == 0 and report["frames_sent"] == 60
    assert report["predictions_received"] > 0 and report["figure"].endswith("soak.png")
