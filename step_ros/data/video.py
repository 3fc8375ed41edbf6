"""Video decoding and encoding on PyAV (FFmpeg), frames as ``uint8`` RGB ``(H, W, 3)``.

Why PyAV and not OpenCV: PyAV is a real FFmpeg binding with exact frame access,
timestamps and encoder options (deterministic single-threaded x264), and it reports
errors instead of silently returning empty frames. Every FFmpeg / OS failure is
re-raised as :class:`VideoError` naming the file, so callers handle one exception type.

Frame indices count decoded frames from 0 in presentation order; ``end`` is exclusive.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

__all__ = [
    "VideoError",
    "VideoInfo",
    "read_video",
    "iter_frames",
    "video_info",
    "write_video",
    "VIDEO_EXTENSIONS",
]

#: File name suffixes treated as videos by the folder-per-class loader.
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mkv", ".mov", ".webm")

# Exceptions that mean "this file cannot be decoded" (PyAV's InvalidDataError is also a
# ValueError; EOFError / OSError come from the I/O layer).
_DECODE_ERRORS: tuple[type[BaseException], ...] = (av.FFmpegError, OSError, EOFError, ValueError)


class VideoError(RuntimeError):
    """A video is missing, unreadable, corrupt, empty, or a frame range is out of bounds."""


@dataclass(frozen=True)
class VideoInfo:
    """Basic facts about a video stream."""

    num_frames: int
    fps: float
    width: int
    height: int


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise VideoError(f"video not found: {path}")
    if not path.is_file():
        raise VideoError(f"not a video file (is a directory or special file): {path}")


def _open(path: Path) -> Any:
    """Open a container that has a video stream; raise VideoError otherwise."""
    _check_exists(path)
    try:
        container = av.open(str(path), mode="r")
    except _DECODE_ERRORS as exc:
        raise VideoError(f"cannot open video {path}: {exc}") from exc
    if not container.streams.video:
        container.close()
        raise VideoError(f"no video stream in {path}")
    return container


def _stream_fps(stream: Any) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def iter_frames(path: str | os.PathLike[str]) -> Iterator[tuple[int, np.ndarray, float]]:
    """Yield ``(index, frame, pts_seconds)`` one frame at a time (constant memory).

    ``pts_seconds`` is the presentation time from the container; where a frame has no
    timestamp it falls back to ``index / fps``. Raises :class:`VideoError` if the file
    cannot be decoded or holds no frame.
    """
    path = Path(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = _stream_fps(stream)
        index = 0
        try:
            for frame in container.decode(stream):
                if frame.pts is not None and frame.time_base is not None:
                    t = float(frame.pts * frame.time_base)
                else:
                    t = index / fps if fps > 0 else float(index)
                rgb = frame.to_ndarray(format="rgb24")
                yield index, rgb, t
                index += 1
        except _DECODE_ERRORS as exc:
            raise VideoError(f"error decoding {path} at frame {index}: {exc}") from exc
        if index == 0:
            raise VideoError(f"video has no decodable frames: {path}")
    finally:
        container.close()


def read_video(
    path: str | os.PathLike[str], start: int | None = None, end: int | None = None
) -> np.ndarray:
    """Decode frames ``[start, end)`` into one ``(F, H, W, 3)`` uint8 RGB array.

    Decoding is sequential from the first frame (exact indices even for streams whose
    timestamps are irregular). ``end`` past the last frame is truncated like a slice;
    a range that selects no frame raises :class:`VideoError`.
    """
    path = Path(path)
    s = 0 if start is None else int(start)
    if s < 0 or (end is not None and int(end) < 0):
        raise ValueError(f"negative frame index in [{start}, {end}) for {path}")
    if end is not None and int(end) <= s:
        raise ValueError(f"empty frame range [{start}, {end}) for {path}")
    frames: list[np.ndarray] = []
    total = 0
    for index, frame, _ in iter_frames(path):
        total = index + 1
        if end is not None and index >= int(end):
            break
        if index >= s:
            frames.append(frame)
    if not frames:
        raise VideoError(f"frame range [{s}, {end}) is outside {path} which has {total} frames")
    return np.stack(frames)


def video_info(path: str | os.PathLike[str]) -> VideoInfo:
    """Frame count, fps and size; counts frames by decoding when the container does not say."""
    path = Path(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        fps = _stream_fps(stream)
        width = int(stream.codec_context.width)
        height = int(stream.codec_context.height)
        num_frames = int(stream.frames or 0)
    finally:
        container.close()
    if num_frames <= 0 or width <= 0 or height <= 0:
        num_frames = 0
        for _, frame, _ in iter_frames(path):
            num_frames += 1
            height, width = frame.shape[:2]
    if num_frames <= 0:
        raise VideoError(f"video has no decodable frames: {path}")
    return VideoInfo(num_frames=num_frames, fps=fps, width=width, height=height)


def _pick_codec() -> str:
    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except (av.FFmpegError, ValueError):
            continue
    raise VideoError("PyAV's FFmpeg has neither libx264 nor mpeg4 encoders")


def _same_bytes(a: Path, b: Path) -> bool:
    if not b.is_file() or a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def write_video(
    path: str | os.PathLike[str],
    frames: np.ndarray | Iterable[np.ndarray],
    fps: float,
    crf: int = 12,
    preset: str = "fast",
) -> Path:
    """Encode RGB uint8 frames to a video file (mp4 with H.264 yuv420p when available).

    libx264 at a low CRF (near lossless for synthetic content), else mpeg4 at a high
    bitrate. Single-threaded and bit-exact flags so the same frames give the same bytes.
    Width and height must be even (yuv420p chroma subsampling). The file is written under
    a temporary name and renamed, so a crash never leaves a truncated video behind; when the
    file already holds exactly these bytes it is left untouched.
    """
    path = Path(path)
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    rate = Fraction(fps).limit_denominator(1001)
    codec = _pick_codec()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    count = 0
    try:
        try:
            container = av.open(str(tmp), mode="w", options={"fflags": "+bitexact"})
        except ValueError as exc:  # e.g. an unknown file extension
            raise VideoError(f"cannot write video {path}: {exc}") from exc
        with container:
            stream = None
            for frame in frames:
                arr = np.asarray(frame)
                if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
                    raise ValueError(
                        f"frame {count} for {path}: expected (H, W, 3) uint8 RGB, "
                        f"got {arr.shape} {arr.dtype}"
                    )
                h, w = arr.shape[:2]
                if stream is None:
                    if h % 2 or w % 2:
                        raise ValueError(f"frame size {w}x{h} for {path} must be even (yuv420p)")
                    try:
                        stream = container.add_stream(codec, rate=rate)
                    except ValueError as exc:  # container cannot hold this codec
                        raise VideoError(
                            f"cannot write {codec} video to {path}: {exc} (use .mp4, .mkv, .mov or .avi)"
                        ) from exc
                    stream.width, stream.height = w, h
                    stream.pix_fmt = "yuv420p"
                    stream.codec_context.thread_count = 1
                    stream.codec_context.flags |= av.codec.context.Flags.bitexact
                    if codec == "libx264":
                        stream.options = {"crf": str(crf), "preset": preset, "threads": "1"}
                    else:
                        stream.bit_rate = max(4_000_000, int(w * h * float(rate) * 4))
                        stream.options = {"threads": "1"}
                elif (h, w) != (stream.height, stream.width):
                    raise ValueError(
                        f"frame {count} for {path} is {w}x{h}, earlier frames were "
                        f"{stream.width}x{stream.height}"
                    )
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
                vf.pts = count
                for packet in stream.encode(vf):
                    container.mux(packet)
                count += 1
            if stream is None:
                raise ValueError(f"no frames to write to {path}")
            for packet in stream.encode(None):
                container.mux(packet)
        if not _same_bytes(tmp, path):
            os.replace(tmp, path)  # else the file stays, mtime and all: token caches keyed on it stay valid
    except (av.FFmpegError, OSError) as exc:
        raise VideoError(f"cannot write video {path}: {exc}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
