"""Token cache: the frozen backbone runs once per frame of a dataset, heads train for many epochs.

Layout (format 2)::

    <cache>/<arch>-<image size>-<backbone fingerprint>[-stride<k>]/
        cache.json                           format, token dtype, frame stride
        <video stem>-<key>.safetensors       tokens (rows, 1 + n, D) of one labelled segment
        <video stem>-<key>-hflip.safetensors the same for the horizontally mirrored frames

* **float16 tokens** (``--token-dtype``): half of float32 on disk and in every batch.  DINOv2's
  tokens leave a LayerNorm, far inside float16's range, and float16 keeps 3 more mantissa bits
  than bfloat16 (rounding error 5e-4 against 4e-3); a value that would overflow is an error at
  extraction, never a silent inf.
* **Memory-mapped reads**: training opens a file with safetensors' ``safe_open`` and copies only
  the rows of one clip, so memory is O(batch), whatever the dataset's size.
* **Frame stride k** (``--frame-stride``): only frames 0, k, 2k, ... of a segment are cached
  (and encoded: k times less extraction).  Clips then start on that grid, so k must divide the
  manifest's frame interval.
* **Keyed and resumable** as before: a file's name hashes video path, size, mtime and segment;
  the folder names the backbone weights.  Files are written atomically and skipped when present,
  so an interrupted ``extract`` resumes where it stopped.  A folder from the float32 format 1 is
  refused with the way out: ``step-ros migrate-cache`` or re-extraction.

``extract`` decodes each video once for all of its segments, in DataLoader workers that decode
and preprocess ahead of the backbone, and splits videos across ``torchrun`` ranks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import socket
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from ..data.annotations import Dataset, Sample
from ..data.video import VideoError, iter_frames, video_info
from ..model.backbone import Backbone, preprocess_frames
from .runtime import Runtime

CACHE_FORMAT = 2
MARKER = "cache.json"
TOKEN_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                                        "float32": torch.float32}
DEFAULT_TOKEN_DTYPE = "float16"


class CacheError(RuntimeError):
    """A token cache that cannot be used as it is: old format, other dtype, missing or corrupt file."""


@dataclass(frozen=True)
class TokenCache:
    """A folder of per-segment token files for one backbone and one frame stride."""

    root: Path
    backbone_id: str
    dtype: str = DEFAULT_TOKEN_DTYPE
    frame_stride: int = 1

    @classmethod
    def for_backbone(cls, cache_root: str | Path, backbone: Backbone, *, frame_stride: int = 1,
                     dtype: str = DEFAULT_TOKEN_DTYPE) -> "TokenCache":
        if dtype not in TOKEN_DTYPES:
            raise ValueError(f"--token-dtype must be one of {', '.join(TOKEN_DTYPES)}, got {dtype!r}")
        if not isinstance(frame_stride, int) or frame_stride < 1:
            raise ValueError(f"--frame-stride must be a positive integer, got {frame_stride!r}")
        ident = f"{backbone.arch.name}-{backbone.image_size}-{backbone.fingerprint}"
        folder = ident + (f"-stride{frame_stride}" if frame_stride > 1 else "")
        return cls(Path(cache_root) / folder, ident, dtype, frame_stride)

    # -------------------------------------------------------------- format and marker

    def check(self, create: bool = False, must_exist: bool = True) -> None:
        """Refuse a folder of another format or token dtype; with ``create`` start a new one.

        Why a marker file: format-1 files (float32) have the same names, so without it an old
        cache would be read as if it were new, or silently mixed with new files.
        """
        marker = self.root / MARKER
        if marker.is_file():
            try:
                info = json.loads(marker.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise CacheError(f"token cache {self.root}: unreadable {MARKER} ({exc})") from exc
            if info.get("format") != CACHE_FORMAT:
                raise CacheError(f"token cache {self.root} has format {info.get('format')}, this step_ros reads "
                                 f"format {CACHE_FORMAT}; delete the folder and extract again")
            if info.get("dtype") != self.dtype:
                raise CacheError(f"token cache {self.root} holds {info.get('dtype')} tokens, {self.dtype} were asked "
                                 f"for; use --token-dtype {info.get('dtype')} or another --cache folder")
            return
        if self.root.is_dir() and any(self.root.glob("*.safetensors")):
            raise CacheError(
                f"token cache {self.root} is in the old float32 format (format 1, before streamed training); "
                f"convert it in place with `step-ros migrate-cache --cache {self.root.parent}` (halves its size), "
                f"or delete {self.root} and run `step-ros extract` again")
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(marker, json.dumps({"format": CACHE_FORMAT, "dtype": self.dtype,
                                                   "frame_stride": self.frame_stride,
                                                   "backbone": self.backbone_id}, indent=1))
        elif must_exist and not self.root.is_dir():
            raise CacheError(f"no token cache at {self.root}; run `step-ros extract` first")

    # -------------------------------------------------------------- files

    def path(self, sample: Sample, hflip: bool = False) -> Path:
        st = sample.video.stat()
        key = f"{sample.video.resolve()}|{st.st_size}|{st.st_mtime_ns}|{sample.start_frame}|{sample.end_frame}"
        view = "-hflip" if hflip else ""
        return self.root / f"{sample.video.stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}{view}.safetensors"

    def require(self, sample: Sample, hflip: bool = False) -> Path:
        """The path of a cached file, or an error that says which command makes it."""
        path = self.path(sample, hflip)
        if not path.is_file():
            what = "mirrored tokens" if hflip else "tokens"
            flag = " --hflip" if hflip else ""
            stride = f" --frame-stride {self.frame_stride}" if self.frame_stride > 1 else ""
            raise CacheError(f"no cached {what} for {sample.video} ({sample.origin}) in {self.root}; "
                             f"run `step-ros extract{flag}{stride}` first")
        return path

    def clip(self, sample: Sample, pick: Callable[[int], np.ndarray], hflip: bool = False) -> torch.Tensor:
        """The rows ``pick(number of cached rows)`` of a segment (any order, repeats allowed).

        One open per clip: the header gives the row count, the slice is a view of the
        memory-mapped file, and indexing it copies just these rows; the mapping goes with the view.
        """
        path = self.require(sample, hflip)
        try:
            with safe_open(str(path), "pt") as f:
                whole = f.get_slice("tokens")
                rows = np.asarray(pick(whole.get_shape()[0]), dtype=np.int64)
                lo, hi = int(rows.min()), int(rows.max()) + 1
                return whole[lo:hi][torch.from_numpy(rows - lo)]
        except (SafetensorError, OSError, KeyError) as exc:
            raise CacheError(f"corrupt token file {path} ({exc}); delete it and run `step-ros extract` again") from exc

    def fps(self, sample: Sample) -> float | None:
        """The frame rate of a segment's video: the annotation CSV's ``fps`` when it gives one,
        else recorded in its token file at extraction, else the video's header (PyAV); None when
        nothing says."""
        if sample.fps:
            return float(sample.fps)
        path = self.path(sample)
        try:
            with safe_open(str(path), "pt") as f:
                value = (f.metadata() or {}).get("fps")
            if value:
                return float(value)
        except (SafetensorError, OSError, ValueError):
            pass
        try:
            return float(video_info(sample.video).fps) or None
        except (VideoError, OSError, ValueError):
            return None

    def load(self, sample: Sample, hflip: bool = False) -> torch.Tensor:
        """Every cached row of a segment, in the stored dtype (the in-RAM path and tests)."""
        path = self.require(sample, hflip)
        try:
            return load_file(str(path))["tokens"]
        except (SafetensorError, OSError, KeyError) as exc:
            raise CacheError(f"corrupt token file {path} ({exc}); delete it and run `step-ros extract` again") from exc


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _to_storage(tokens: torch.Tensor, cache: TokenCache, sample: Sample) -> torch.Tensor:
    """Cast to the cache dtype, refusing non-finite tokens and values beyond the dtype's range."""
    if not torch.isfinite(tokens).all():
        raise CacheError(f"the backbone produced non-finite tokens for {sample.video} ({sample.origin}); "
                         "check the weights and the --precision of extraction")
    stored = tokens.to(TOKEN_DTYPES[cache.dtype]).contiguous()
    if not torch.isfinite(stored).all():
        biggest = float(tokens.abs().max())
        raise CacheError(f"tokens of {sample.video} reach |x| = {biggest:.3g}, beyond {cache.dtype}'s range; "
                         "extract with --token-dtype bfloat16 (or float32) into another --cache folder")
    return stored


@functools.lru_cache(maxsize=1024)
def _header_fps(video: str) -> str:
    """A video's frame rate from its header, read once per video (its segments and views share it)."""
    try:
        return str(float(video_info(video).fps))
    except (VideoError, OSError, ValueError):
        return ""


def _save_tokens(path: Path, stored: torch.Tensor, cache: TokenCache, sample: Sample, hflip: bool,
                 num_frames: int) -> None:
    """Write atomically: a file is whole or absent, whoever reads the folder meanwhile."""
    # Unique temporary name: ranks and machines may share the folder (multi-node extraction).
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    # the frame rate: what sampling by time needs (row r is frame r * stride, at r * stride / fps s)
    fps = str(float(sample.fps)) if sample.fps else _header_fps(str(sample.video))
    save_file({"tokens": stored}, str(tmp), metadata={
        "format": str(CACHE_FORMAT), "video": str(sample.video), "segment": f"{sample.start_frame}:{sample.end_frame}",
        "backbone": cache.backbone_id, "hflip": str(hflip).lower(), "frame_stride": str(cache.frame_stride),
        "num_frames": str(num_frames), "dtype": cache.dtype, "fps": fps})
    os.replace(tmp, path)


# ------------------------------------------------------------------ extraction


@dataclass(frozen=True)
class _Job:
    """One segment of a video and the views of it still to encode."""

    index: int  # position in the dataset
    sample: Sample
    views: tuple[tuple[bool, Path], ...]  # (hflip, destination)


_DECODE_FAILED = -1


class _DecodedChunks(IterableDataset):
    """Decode each video once for all its segments, keep every k-th frame, preprocess ahead.

    Yields ``(job index, plain pixels, mirrored pixels or None, segment frames so far, last)``
    in chunks of ``batch_size`` frames, so a long segment never sits in memory as raw frames.
    DataLoader workers split the videos between them.
    """

    def __init__(self, groups: list[list[_Job]], image_size: int, stride: int, batch_size: int) -> None:
        self.groups, self.image_size, self.stride, self.batch_size = groups, image_size, stride, batch_size

    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        return preprocess_frames(torch.from_numpy(frames), self.image_size)  # CPU, in the worker

    def __iter__(self) -> Iterator[tuple]:
        worker = get_worker_info()
        mine = self.groups if worker is None else self.groups[worker.id :: worker.num_workers]
        for group in mine:
            try:
                yield from self._video(group)
            except VideoError as exc:  # handed to the main process as a record: one clean message
                yield _DECODE_FAILED, str(exc)
                return

    def _chunk(self, job: _Job, frames: list[np.ndarray], seen: int, last: bool) -> tuple:
        if not frames:
            return job.index, None, None, seen, last
        raw = np.stack(frames)
        mirrored = any(h for h, _ in job.views)
        plain = self.preprocess(raw) if any(not h for h, _ in job.views) else None
        flipped = self.preprocess(np.ascontiguousarray(raw[:, :, ::-1])) if mirrored else None
        return job.index, plain, flipped, seen, last

    def _video(self, jobs: list[_Job]) -> Iterator[tuple]:
        video = jobs[0].sample.video
        end_of = {j.index: (math.inf if j.sample.end_frame is None else j.sample.end_frame) for j in jobs}
        last_needed = max(end_of.values())
        buffers: dict[int, list[np.ndarray]] = defaultdict(list)
        seen: dict[int, int] = defaultdict(int)  # segment frames decoded so far
        open_jobs = {j.index: j for j in jobs}
        total = 0
        for index, frame, _ in iter_frames(video):
            total = index + 1
            if index >= last_needed:
                break
            for j in list(open_jobs.values()):
                start = j.sample.start_frame
                if index < start:
                    continue
                offset = index - start
                seen[j.index] = offset + 1
                if offset % self.stride == 0:
                    buffers[j.index].append(frame)
                done = index + 1 >= end_of[j.index]
                if done or len(buffers[j.index]) == self.batch_size:
                    yield self._chunk(j, buffers.pop(j.index, []), seen[j.index], done)
                if done:
                    del open_jobs[j.index]
        for j in open_jobs.values():  # segments running to (or past) the end of the video
            if seen[j.index] == 0:
                raise VideoError(f"segment {j.sample.start_frame}:{j.sample.end_frame} of {video} ({j.sample.origin}) "
                                 f"starts after the last frame (the video has {total} frames)")
            yield self._chunk(j, buffers.pop(j.index, []), seen[j.index], True)


def extract(
    dataset: Dataset, backbone: Backbone, cache: TokenCache, *, runtime: Runtime | None = None,
    hflip: bool = False, batch_size: int = 32, progress: bool = True,
) -> TokenCache:
    """Encode every segment of ``dataset`` once (resumable), with ``hflip`` also mirrored.

    Under torchrun every rank takes a share of the videos; a video is decoded by one rank only.
    Returns when every rank is done, so the caller may read any file.
    """
    runtime = runtime or Runtime(torch.device("cpu"))
    cache.check(create=runtime.is_main, must_exist=False)  # every rank refuses an old cache with the same message
    runtime.barrier()
    cache.check()
    views = (False, True) if hflip else (False,)
    # Videos are split between ranks from the dataset alone (not from which files exist yet),
    # so every rank agrees on the split while others are already writing.
    by_video: dict[Path, list[tuple[int, Sample]]] = {}
    for i, sample in enumerate(dataset):
        by_video.setdefault(sample.video.resolve(), []).append((i, sample))
    videos = list(by_video.values())
    mine: list[list[_Job]] = []
    for v in runtime.shard(len(videos)):
        group = [_Job(i, s, missing) for i, s in videos[v]
                 if (missing := tuple((h, p) for h in views if not (p := cache.path(s, h)).is_file()))]
        if group:
            mine.append(group)
    jobs = {j.index: j for group in mine for j in group}
    workers = min(runtime.workers, len(mine))
    loader = DataLoader(_DecodedChunks(mine, backbone.image_size, cache.frame_stride, batch_size), batch_size=None,
                        num_workers=workers, prefetch_factor=4 if workers else None, pin_memory=runtime.pin_memory)
    rank = f", rank {runtime.rank}/{runtime.world_size}" if runtime.distributed else ""
    parts: dict[int, dict[bool, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    encoded = 0
    with torch.inference_mode(), tqdm(total=len(jobs), desc=f"extract ({backbone.arch.name}{rank})", unit="segment",
                                      disable=not (progress and runtime.is_main)) as bar:
        for record in loader:
            if record[0] == _DECODE_FAILED:
                raise VideoError(record[1])
            index, plain, flipped, seen, last = record
            job = jobs[index]
            for view, pixels in ((False, plain), (True, flipped)):
                if pixels is not None:  # stored dtype at once: a long segment waits at half the size
                    parts[index][view].append(_to_storage(_encode(backbone, pixels, runtime), cache, job.sample))
                    encoded += len(pixels)
            if last:
                for view, path in job.views:
                    _save_tokens(path, torch.cat(parts[index][view]), cache, job.sample, view, seen)
                del parts[index]
                bar.update(1)
                bar.set_postfix(frames=encoded, refresh=False)
    runtime.barrier()  # every rank's files exist before anyone reads them
    return cache


def _encode(backbone: Backbone, pixels: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    with runtime.autocast():
        tokens = backbone(pixels.to(runtime.device, non_blocking=True))
    return tokens.float().cpu()


# ------------------------------------------------------------------ migration


def migrate(cache_root: str | Path, dtype: str = DEFAULT_TOKEN_DTYPE, progress: bool = True) -> list[Path]:
    """Convert every format-1 (float32) folder under ``cache_root`` to format 2 in place.

    Resumable: files already converted are skipped; the marker is written last, so a folder
    counts as migrated only when all of its files are.
    """
    root = Path(cache_root)
    if not root.is_dir():
        raise CacheError(f"--cache {root} is not a folder")
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"--token-dtype must be one of {', '.join(TOKEN_DTYPES)}, got {dtype!r}")
    folders = [d for d in sorted(root.iterdir()) if d.is_dir() and not (d / MARKER).exists()
               and any(d.glob("*.safetensors"))]
    done = []
    for folder in folders:
        ident = folder.name
        files = sorted(folder.glob("*.safetensors"))
        for path in tqdm(files, desc=f"migrate {ident}", unit="file", disable=not progress):
            try:
                with safe_open(str(path), "pt") as f:
                    meta = dict(f.metadata() or {})
                    tokens = f.get_tensor("tokens")
            except (SafetensorError, OSError) as exc:
                raise CacheError(f"corrupt token file {path} ({exc}); delete it and extract again") from exc
            if meta.get("format") == str(CACHE_FORMAT):
                continue  # converted by an interrupted earlier run
            stored = tokens.to(TOKEN_DTYPES[dtype]).contiguous()
            if not torch.isfinite(stored).all():
                raise CacheError(f"{path}: tokens reach |x| = {float(tokens.abs().max()):.3g}, beyond {dtype}'s range; "
                                 "migrate with --token-dtype bfloat16")
            meta.update(format=str(CACHE_FORMAT), frame_stride="1", num_frames=str(len(tokens)), dtype=dtype,
                        backbone=meta.get("backbone", ident))
            tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
            save_file({"tokens": stored}, str(tmp), metadata=meta)
            os.replace(tmp, path)
        _atomic_write_text(folder / MARKER, json.dumps({"format": CACHE_FORMAT, "dtype": dtype, "frame_stride": 1,
                                                        "backbone": ident, "migrated_from": 1}, indent=1))
        done.append(folder)
    return done


__all__ = ["CACHE_FORMAT", "CacheError", "DEFAULT_TOKEN_DTYPE", "TOKEN_DTYPES", "TokenCache", "extract",
           "migrate"]
