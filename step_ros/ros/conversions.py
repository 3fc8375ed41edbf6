"""ROS image messages -> ``(H, W, 3)`` uint8 **RGB** frames, validated before anything is converted.

The node's contract with the camera. Semantics follow ``cv_bridge``:
``imgmsg_to_rgb(msg)`` is ``CvBridge().imgmsg_to_cv2(msg, desired_encoding='rgb8')`` and
``compressed_imgmsg_to_rgb(msg)`` is ``CvBridge().compressed_imgmsg_to_cv2(msg, 'rgb8')``.

==================== ======================== ==========================================
encoding             bytes per pixel          conversion
==================== ======================== ==========================================
``rgb8``             3                        copy
``bgr8``             3                        channel swap
``rgba8``/``bgra8``  4                        alpha dropped (and swap for ``bgra8``)
``mono8``            1                        grey replicated to R, G, B
``yuv422`` (UYVY)    2 (4 bytes per 2 pixels) OpenCV ``COLOR_YUV2RGB_UYVY``; alias ``uyvy``
``yuv422_yuy2``      2 (4 bytes per 2 pixels) OpenCV ``COLOR_YUV2RGB_YUY2``; alias ``yuyv``
CompressedImage      --                       ``cv2.imdecode`` (jpeg, png), BGR -> RGB
==================== ======================== ==========================================

Which implementation: the ROS 2 ``cv_bridge`` (C++, from apt) when it is importable and passes
a self-check, else this module's numpy/OpenCV code, which does the same conversions (the
OpenCV codes above are the ones ``cv_bridge`` uses). The C++ ``cv_bridge`` is not installable
from the Python package index, and the old pure-Python ``cv-bridge`` on PyPI is a ROS 1 port
that ignores row padding (``step``) and has no YUV support, so it is not used.
``STEP_ROS_CV_BRIDGE=0`` forces the numpy/OpenCV path.

Validation always comes first and is cheap (header fields and ``len(data)`` only, no pixel
access), so the node can run it in the subscription callback. Every rejected message raises
:class:`ImageError` whose ``reason`` is a short machine-readable key, for counting.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

__all__ = [
    "ImageError",
    "ImageLayout",
    "REASONS",
    "SUPPORTED_ENCODINGS",
    "compressed_imgmsg_to_rgb",
    "converter_name",
    "imgmsg_to_rgb",
    "msg_to_rgb",
    "validate_compressed",
    "validate_image",
]

# Reasons (ImageError.reason): the keys counted in the node's diagnostics.
EMPTY = "empty"  # zero width or height, or no compressed bytes
SIZE_MISMATCH = "size_mismatch"  # len(data) != height * step
STEP_TOO_SMALL = "step_too_small"  # step < width * bytes per pixel
UNSUPPORTED_ENCODING = "unsupported_encoding"  # encoding / compressed format not handled
BAD_DIMENSIONS = "bad_dimensions"  # e.g. odd width for a YUV 4:2:2 image
CORRUPT_COMPRESSED = "corrupt_compressed"  # the decoder cannot read the bytes
CONVERSION_FAILED = "conversion_failed"  # a valid-looking message the converter still refused

REASONS = (EMPTY, SIZE_MISMATCH, STEP_TOO_SMALL, UNSUPPORTED_ENCODING, BAD_DIMENSIONS, CORRUPT_COMPRESSED,
           CONVERSION_FAILED)


class ImageError(ValueError):
    """One image message that cannot become an RGB frame. ``reason``: a key of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


#: encoding -> (bytes per pixel, OpenCV code to RGB or None for the numpy path)
_ENCODINGS: dict[str, tuple[int, int | None]] = {
    "rgb8": (3, None),
    "bgr8": (3, None),
    "rgba8": (4, None),
    "bgra8": (4, None),
    "mono8": (1, None),
    "yuv422": (2, cv2.COLOR_YUV2RGB_UYVY),  # sensor_msgs image_encodings YUV422 = UYVY
    "uyvy": (2, cv2.COLOR_YUV2RGB_UYVY),
    "yuv422_yuy2": (2, cv2.COLOR_YUV2RGB_YUY2),  # YUV422_YUY2 = YUYV
    "yuyv": (2, cv2.COLOR_YUV2RGB_YUY2),
}
SUPPORTED_ENCODINGS = tuple(_ENCODINGS)
_YUV = {"yuv422", "uyvy", "yuv422_yuy2", "yuyv"}


@dataclass(frozen=True)
class ImageLayout:
    """What validation found out about a raw image (used by the conversion)."""

    encoding: str
    height: int
    width: int
    step: int
    bytes_per_pixel: int


# --------------------------------------------------------------------------- validation


def validate_image(msg: Any) -> ImageLayout:
    """Check a ``sensor_msgs/Image`` without touching its pixels; raise :class:`ImageError`.

    Order of checks: encoding supported, non-zero size, ``step >= width * bytes_per_pixel``,
    ``len(data) == height * step`` (exactly, as the message definition says), even width for
    4:2:2 YUV.
    """
    encoding = str(msg.encoding).strip().lower()
    layout = _ENCODINGS.get(encoding)
    if layout is None:
        raise ImageError(UNSUPPORTED_ENCODING,
                         f"unsupported image encoding {msg.encoding!r} (supported: {', '.join(SUPPORTED_ENCODINGS)})")
    bpp = layout[0]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ImageError(EMPTY, f"empty image: {width}x{height} pixels")
    if step < width * bpp:
        raise ImageError(STEP_TOO_SMALL,
                         f"step {step} is smaller than width * bytes per pixel = {width} * {bpp} ({encoding})")
    size = len(msg.data)
    if size != height * step:
        raise ImageError(SIZE_MISMATCH,
                         f"data has {size} bytes, height * step = {height} * {step} = {height * step} "
                         f"({width}x{height} {encoding})")
    if encoding in _YUV and width % 2:
        raise ImageError(BAD_DIMENSIONS, f"{encoding} (4:2:2) needs an even width, got {width}")
    return ImageLayout(encoding, height, width, step, bpp)


def _compressed_kind(fmt: str) -> str:
    """'jpeg' / 'png' / '' (unknown, let the decoder sniff) from a CompressedImage.format."""
    f = fmt.strip().lower()
    if "compresseddepth" in f.replace(" ", ""):
        raise ImageError(UNSUPPORTED_ENCODING, f"unsupported compressed format {fmt!r}: compressedDepth (depth images)")
    if "jpeg" in f or "jpg" in f:
        return "jpeg"
    if "png" in f:
        return "png"
    if f:
        raise ImageError(UNSUPPORTED_ENCODING, f"unsupported compressed format {fmt!r} (supported: jpeg, png)")
    return ""


def validate_compressed(msg: Any) -> str:
    """Cheap checks of a ``sensor_msgs/CompressedImage`` (format, non-empty); returns the kind."""
    kind = _compressed_kind(str(msg.format))
    if len(msg.data) == 0:
        raise ImageError(EMPTY, "compressed image with no data")
    return kind


# --------------------------------------------------------------------------- conversion (numpy / OpenCV)


def _as_uint8(data: Any) -> np.ndarray:
    """The message's byte buffer as a flat uint8 array, without a copy where possible."""
    try:
        return np.frombuffer(memoryview(data), dtype=np.uint8)  # array.array / bytes (rclpy)
    except TypeError:
        return np.asarray(data, dtype=np.uint8).reshape(-1)  # lists, numpy (rosbags)


def _numpy_to_rgb(msg: Any, layout: ImageLayout) -> np.ndarray:
    h, w, step, bpp = layout.height, layout.width, layout.step, layout.bytes_per_pixel
    rows = _as_uint8(msg.data).reshape(h, step)[:, : w * bpp].reshape(h, w, bpp)  # drops row padding
    enc = layout.encoding
    if enc == "rgb8":
        return np.array(rows, copy=True, order="C")  # writable, independent of the message buffer
    if enc == "bgr8":
        return np.ascontiguousarray(rows[:, :, ::-1])
    if enc == "rgba8":
        return np.ascontiguousarray(rows[:, :, :3])
    if enc == "bgra8":
        return np.ascontiguousarray(rows[:, :, 2::-1])
    if enc == "mono8":
        return np.ascontiguousarray(np.repeat(rows, 3, axis=2))
    code = _ENCODINGS[enc][1]
    return cv2.cvtColor(np.ascontiguousarray(rows), code)  # YUV 4:2:2, (h, w, 2) -> (h, w, 3)


def _numpy_compressed_to_rgb(msg: Any) -> np.ndarray:
    data = _as_uint8(msg.data)
    try:
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise ImageError(CORRUPT_COMPRESSED, f"OpenCV cannot decode the compressed image ({data.size} bytes): "
                                             f"{str(exc).strip().splitlines()[-1]}") from None
    if bgr is None or bgr.size == 0:
        raise ImageError(CORRUPT_COMPRESSED,
                         f"OpenCV cannot decode the {msg.format or 'compressed'!s} data ({data.size} bytes): corrupt "
                         f"or truncated")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# --------------------------------------------------------------------------- cv_bridge (when installed)

_bridge_lock = threading.Lock()
_bridge: Any = None
_bridge_checked = False


def _probe_bridge(bridge: Any) -> bool:
    """True if ``bridge`` converts a padded bgr8 image to rgb8 correctly (the ROS 2 cv_bridge does)."""
    from sensor_msgs.msg import Image

    rgb = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)
    padded = np.zeros((2, 16), np.uint8)
    padded[:, :12] = rgb[:, :, ::-1].reshape(2, 12)
    msg = Image(height=2, width=4, encoding="bgr8", is_bigendian=0, step=16, data=padded.tobytes())
    out = np.asarray(bridge.imgmsg_to_cv2(msg, desired_encoding="rgb8"))
    return out.shape == rgb.shape and bool((out == rgb).all())


def _get_bridge() -> Any:
    global _bridge, _bridge_checked
    if _bridge_checked:
        return _bridge
    with _bridge_lock:
        if not _bridge_checked:
            bridge = None
            if os.environ.get("STEP_ROS_CV_BRIDGE", "1") != "0":
                try:
                    from cv_bridge import CvBridge

                    candidate = CvBridge()
                    if _probe_bridge(candidate):
                        bridge = candidate
                except Exception:  # noqa: BLE001 - absent, ROS 1 port, or broken: use numpy/OpenCV
                    bridge = None
            _bridge = bridge
            _bridge_checked = True
    return _bridge


def converter_name() -> str:
    """``"cv_bridge"`` or ``"numpy/opencv"``: what converts images in this process."""
    return "cv_bridge" if _get_bridge() is not None else "numpy/opencv"


# --------------------------------------------------------------------------- public API


def imgmsg_to_rgb(msg: Any, layout: ImageLayout | None = None) -> np.ndarray:
    """``sensor_msgs/Image`` -> ``(H, W, 3)`` uint8 RGB (validated first unless ``layout`` is given)."""
    layout = layout or validate_image(msg)
    bridge = _get_bridge()
    if bridge is not None:
        try:
            out = np.asarray(bridge.imgmsg_to_cv2(msg, desired_encoding="rgb8"))
            if out.shape == (layout.height, layout.width, 3) and out.dtype == np.uint8:
                return np.ascontiguousarray(out)
        except Exception:  # noqa: BLE001 - fall through to our own conversion
            pass
    try:
        return _numpy_to_rgb(msg, layout)
    except (ValueError, cv2.error) as exc:
        raise ImageError(CONVERSION_FAILED, f"cannot convert {layout.width}x{layout.height} {layout.encoding} "
                                            f"image: {exc}") from None


def compressed_imgmsg_to_rgb(msg: Any) -> np.ndarray:
    """``sensor_msgs/CompressedImage`` (jpeg / png) -> ``(H, W, 3)`` uint8 RGB."""
    validate_compressed(msg)
    bridge = _get_bridge()
    if bridge is not None:
        try:
            out = np.asarray(bridge.compressed_imgmsg_to_cv2(msg, desired_encoding="rgb8"))
            if out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.uint8 and out.size:
                return np.ascontiguousarray(out)
        except Exception:  # noqa: BLE001 - corrupt data: our decoder gives the reason
            pass
    return _numpy_compressed_to_rgb(msg)


def msg_to_rgb(msg: Any) -> np.ndarray:
    """Either message type, told apart by its fields (``format`` = CompressedImage)."""
    if hasattr(msg, "format") and not hasattr(msg, "encoding"):
        return compressed_imgmsg_to_rgb(msg)
    return imgmsg_to_rgb(msg)
