"""Token cache: the frozen backbone runs once per frame of a dataset, heads train for many epochs.

One safetensors file per labelled segment holds every decoded frame's tokens ``(F, 1 + n, D)``.
Files are keyed by what makes them valid (video path, size and mtime, segment, backbone
fingerprint, image size), written atomically, and skipped when present: an interrupted
``extract`` resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

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

    def path(self, sample: Sample) -> Path:
        st = sample.video.stat()
        key = f"{sample.video.resolve()}|{st.st_size}|{st.st_mtime_ns}|{sample.start_frame}|{sample.end_frame}"
        return self.root / f"{sample.video.stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.safetensors"

    def has(self, sample: Sample) -> bool:
        return self.path(sample).is_file()

    def load(self, sample: Sample) -> torch.Tensor:
        path = self.path(sample)
        if not path.is_file():
            raise FileNotFoundError(f"no cached tokens for {sample.video} ({sample.origin}); run `step-ros extract` first")
        return load_file(str(path))["tokens"]


def extract(
    dataset: Dataset, backbone: Backbone, cache_root: str | Path, batch_size: int = 32, progress: bool = True
) -> TokenCache:
    """Encode every segment of ``dataset`` once (resumable); returns the cache."""
    cache = TokenCache.for_backbone(cache_root, backbone)
    cache.root.mkdir(parents=True, exist_ok=True)
    todo = {cache.path(s): s for s in dataset if not cache.has(s)}
    bar = tqdm(todo.items(), desc=f"extract ({backbone.arch.name})", unit="video", disable=not progress)
    frames_done = 0
    for path, sample in bar:
        frames = read_video(sample.video, sample.start_frame, sample.end_frame)
        tokens = backbone.encode(frames, batch_size=batch_size).contiguous()
        tmp = path.with_suffix(".tmp")
        save_file({"tokens": tokens}, str(tmp), metadata={"video": str(sample.video), "backbone": cache.backbone_id})
        os.replace(tmp, path)
        frames_done += len(frames)
        bar.set_postfix(frames=frames_done)
    return cache


def load_all(dataset: Dataset, cache: TokenCache, progress: bool = False) -> list[torch.Tensor]:
    return [cache.load(s) for s in tqdm(dataset, desc="load tokens", unit="video", disable=not progress)]


__all__ = ["TokenCache", "extract", "load_all"]
