"""Token cache: the frozen backbone runs once per frame of a dataset, heads train for many epochs.

One safetensors file per labelled segment holds every decoded frame's tokens ``(F, 1 + n, D)``.
With ``hflip`` a second file holds the tokens of the horizontally mirrored frames: the papers'
flip augmentation, paid for once at extraction instead of on every epoch.  Files are keyed by
what makes them valid (video path, size and mtime, segment, backbone fingerprint, image size),
written atomically, and skipped when present: an interrupted ``extract`` resumes where it
stopped.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..data.annotations import Dataset, Sample
from ..data.video import read_video
from ..model.backbone import Backbone


@dataclass(frozen=True)
class TokenCache:
    """A folder of per-segment token files for one backbone."""

    root: Path
    backbone_id: str

    @classmethod
    def for_backbone(cls, root: str | Path, backbone: Backbone) -> "TokenCache":
        ident = f"{backbone.arch.name}-{backbone.image_size}-{backbone.fingerprint}"
        return cls(Path(root) / ident, ident)

    def path(self, sample: Sample, hflip: bool = False) -> Path:
        st = sample.video.stat()
        key = f"{sample.video.resolve()}|{st.st_size}|{st.st_mtime_ns}|{sample.start_frame}|{sample.end_frame}"
        view = "-hflip" if hflip else ""
        return self.root / f"{sample.video.stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}{view}.safetensors"

    def load(self, sample: Sample, hflip: bool = False) -> torch.Tensor:
        path = self.path(sample, hflip)
        if not path.is_file():
            what = "mirrored tokens" if hflip else "tokens"
            flag = " --hflip" if hflip else ""
            raise FileNotFoundError(
                f"no cached {what} for {sample.video} ({sample.origin}); run `step-ros extract{flag}` first")
        return load_file(str(path))["tokens"]


def extract(
    dataset: Dataset, backbone: Backbone, cache_root: str | Path, batch_size: int = 32, progress: bool = True,
    hflip: bool = False,
) -> TokenCache:
    """Encode every segment of ``dataset`` once (resumable), with ``hflip`` also mirrored; returns the cache."""
    cache = TokenCache.for_backbone(cache_root, backbone)
    cache.root.mkdir(parents=True, exist_ok=True)
    views = (False, True) if hflip else (False,)
    todo = []  # (sample, [(view, path) still missing])
    for sample in dataset:
        missing = [(v, path) for v in views if not (path := cache.path(sample, v)).is_file()]
        if missing:
            todo.append((sample, missing))
    bar = tqdm(todo, desc=f"extract ({backbone.arch.name})", unit="video", disable=not progress)
    frames_done = 0
    for sample, missing in bar:
        frames = read_video(sample.video, sample.start_frame, sample.end_frame)
        for view, path in missing:
            pixels = np.ascontiguousarray(frames[:, :, ::-1]) if view else frames  # (F, H, W, 3): mirror W
            tokens = backbone.encode(pixels, batch_size=batch_size).contiguous()
            tmp = path.with_suffix(".tmp")
            save_file({"tokens": tokens}, str(tmp), metadata={"video": str(sample.video), "backbone": cache.backbone_id,
                                                              "hflip": str(view).lower()})
            os.replace(tmp, path)
            frames_done += len(frames)
        bar.set_postfix(frames=frames_done)
    return cache


def load_all(dataset: Dataset, cache: TokenCache, progress: bool = False, hflip: bool = False) -> list[torch.Tensor]:
    """Every segment's tokens in dataset order (``hflip``: the mirrored view's)."""
    return [cache.load(s, hflip) for s in tqdm(dataset, desc="load tokens", unit="video", disable=not progress)]


__all__ = ["TokenCache", "extract", "load_all"]
