"""The ~/debug_image picture, without ROS: scale, the attention overlay on the backbone's crop
only, and the blend weights (the node test checks the same picture arrives over DDS)."""
from __future__ import annotations

import cv2
import numpy as np

from step_ros.ros.debug_image import CONFIDENT_STABLE, TaskLine, render_debug_image


def test_overlay_covers_the_crop_only_and_hot_patches_show_more_colour() -> None:
    frame = np.full((200, 400, 3), 100, np.uint8)
    attention = np.array([[0.0, 1.0], [0.0, 0.0]], np.float32)  # the top-right patch is hot
    out = render_debug_image(frame, [TaskLine("fine_action", "pick_up", 0.9, True, True)], 200, attention,
                             crop=(0.0, 100.0, 200.0, 200.0))
    assert out.shape == (100, 200, 3) and out.dtype == np.uint8  # aspect kept
    assert (out[60:, :48] == 100).all() and (out[60:, 152:] == 100).all()  # outside the crop: the frame
    jet = cv2.applyColorMap(np.uint8([[0, 255]]), cv2.COLORMAP_JET)[0, :, ::-1].astype(float)  # RGB
    cold, hot = out[80, 60].astype(float), out[40, 130].astype(float)
    assert np.abs(cold - (0.75 * 100 + 0.25 * jet[0])).max() <= 1
    assert np.abs(hot - (0.30 * 100 + 0.70 * jet[1])).max() <= 1


def test_text_band_darkens_and_colours_by_flags() -> None:
    frame = np.full((100, 100, 3), 200, np.uint8)
    line = TaskLine("fine_action", "pick_up", 0.9, True, True)
    assert line.color() == CONFIDENT_STABLE and "confident, stable" in line.text()
    assert TaskLine("t", "x", 0.2, False, False).text() == "t: x 20% (unsure)"
    out = render_debug_image(frame, [line], 400)
    band = out[:20]
    assert band.max() > 200 * 0.35 + 1  # the text is drawn over the darkened band
    assert (out[-10:] == 200).all()  # below the band the frame is untouched
