"""What the node thinks, drawn on the newest frame: the ``~/debug_image`` picture.

ROS-free (NumPy and OpenCV), so it renders and tests without rclpy; the node publishes the
result as ``sensor_msgs/Image`` (rgb8) only while someone subscribes.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

CONFIDENT_STABLE = (60, 220, 90)  # RGB
CONFIDENT = (250, 210, 60)
UNSURE = (190, 190, 190)


@dataclass(frozen=True)
class TaskLine:
    """One task's line: label, confidence, and the confident / stable flags of HumanAction."""

    task: str
    label: str
    confidence: float
    confident: bool
    stable: bool

    def text(self) -> str:
        flags = ("confident" if self.confident else "unsure") + (", stable" if self.stable else "")
        return f"{self.task}: {self.label} {100 * self.confidence:.0f}% ({flags})"

    def color(self) -> tuple[int, int, int]:
        return CONFIDENT_STABLE if self.confident and self.stable else CONFIDENT if self.confident else UNSURE


def render_debug_image(
    frame: np.ndarray,
    lines: list[TaskLine],
    width: int,
    attention: np.ndarray | None = None,
    crop: tuple[float, float, float, float] | None = None,
    header: str = "",
) -> np.ndarray:
    """The frame scaled to ``width`` (aspect kept), the attention map as a heat overlay on the
    region the backbone sees (``crop``: top, left, height, width in frame pixels), and one text
    line per task.  Returns (H, width, 3) uint8 RGB."""
    h, w = frame.shape[:2]
    scale = width / w
    out = cv2.resize(frame, (width, max(1, round(h * scale))), interpolation=cv2.INTER_AREA if scale < 1
                     else cv2.INTER_LINEAR)
    if attention is not None:
        top, left, ch, cw = crop if crop is not None else (0.0, 0.0, float(h), float(w))
        y0, x0 = round(top * scale), round(left * scale)
        y1, x1 = min(out.shape[0], y0 + round(ch * scale)), min(width, x0 + round(cw * scale))
        if y1 > y0 and x1 > x0:
            a = np.asarray(attention, dtype=np.float32)
            a = a / max(float(a.max()), 1e-12)
            heat = cv2.resize(a, (x1 - x0, y1 - y0), interpolation=cv2.INTER_NEAREST)
            color = np.ascontiguousarray(cv2.applyColorMap(np.uint8(255 * heat), cv2.COLORMAP_JET)[:, :, ::-1])
            alpha = 0.25 + 0.45 * heat  # hotter patches show more colour
            out[y0:y1, x0:x1] = cv2.blendLinear(out[y0:y1, x0:x1], color, 1 - alpha, alpha)  # one pass, in C
            cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), (255, 255, 255), 1)
    texts = ([(header, (255, 255, 255))] if header else []) + [(t.text(), t.color()) for t in lines]
    font_scale = max(0.35, width / 1100)
    thickness = 1 if width < 900 else 2
    line_h = int(26 * font_scale / 0.6) + 4
    band = out[: min(out.shape[0], line_h * len(texts) + 8)]
    band[:] = (band * 0.35).astype(np.uint8)  # a dark band keeps the text legible on any frame
    for i, (text, color) in enumerate(texts):
        cv2.putText(out, text, (8, line_h * (i + 1)), cv2.FONT_HERSHEY_SIMPLEX, font_scale, color, thickness,
                    cv2.LINE_AA)
    return out


__all__ = ["TaskLine", "render_debug_image"]
