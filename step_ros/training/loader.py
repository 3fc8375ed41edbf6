"""The input pipeline of training and evaluation: windows of cached tokens, O(batch) memory.

* :class:`TokenSource` gives the rows of one clip: :class:`StreamedTokens` reads them from the
  memory-mapped cache files (the default; memory does not grow with the dataset) and
  :class:`TokensInRam` from tensors loaded once (the old path, fast for small sets).
* :class:`WindowDataset` draws one training window per (epoch, sample): a random clip start
  and, with hflip, a random view.  The randomness is keyed by ``(seed, epoch, sample)``, not
  by a stream, so the same windows come out whatever the number of DataLoader workers or
  torchrun ranks, and a resumed run continues exactly where the interrupted one stopped.
* :class:`GlobalBatchSampler` cuts each epoch's permutation into global batches and gives
  every rank its share of each: N ranks see the same global batches as one process does.
* :class:`ViewDataset` gives the evaluation views of a video (the 16 x 3 test protocol).
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from ..data.annotations import Dataset
from ..data.clips import clip_indices, clip_starts, random_clip_indices, uniform_indices, uniform_view_indices
from .cache import TokenCache
from .runtime import Runtime

RowPicker = Callable[[int], np.ndarray]  # number of cached rows -> the rows of a clip


class TokenSource:
    """The cached tokens of a dataset's samples, one clip at a time."""

    frame_stride: int = 1

    def __len__(self) -> int:
        raise NotImplementedError

    def fps(self, index: int) -> float | None:
        """The frame rate of sample ``index``'s video (None: unknown), for sampling by time."""
        return None

    def clip(self, index: int, pick: RowPicker, hflip: bool = False) -> torch.Tensor:
        """Rows ``pick(rows)`` of sample ``index`` -> (len, 1 + n, D) in the stored dtype."""
        raise NotImplementedError

    def require_mirrored(self) -> None:
        """Fail before training, not at the first flipped window, when mirrored tokens are missing."""
        raise NotImplementedError


class StreamedTokens(TokenSource):
    """Reads each clip's rows from the cache files when asked: memory is O(batch)."""

    def __init__(self, cache: TokenCache, dataset: Dataset) -> None:
        self.cache, self.samples = cache, list(dataset)
        self.frame_stride = cache.frame_stride

    def __len__(self) -> int:
        return len(self.samples)

    def clip(self, index: int, pick: RowPicker, hflip: bool = False) -> torch.Tensor:
        return self.cache.clip(self.samples[index], pick, hflip)

    def fps(self, index: int) -> float | None:
        return self.cache.fps(self.samples[index])

    def require_mirrored(self) -> None:
        for sample in self.samples:
            self.cache.require(sample, hflip=True)  # names the first missing file and the command to run


class TokensInRam(TokenSource):
    """Every sample's tokens loaded once (the pre-streaming path): memory grows with the dataset."""

    def __init__(self, plain: list[torch.Tensor], mirrored: list[torch.Tensor] | None = None,
                 frame_stride: int = 1, rates: list[float | None] | None = None) -> None:
        if mirrored is not None and len(mirrored) != len(plain):
            raise ValueError(f"{len(mirrored)} mirrored token tensors for {len(plain)} samples")
        self.plain, self.mirrored, self.frame_stride = plain, mirrored, frame_stride
        self.rates = rates

    @classmethod
    def load(cls, cache: TokenCache, dataset: Dataset, hflip: bool = False, progress: bool = False) -> "TokensInRam":
        plain = [cache.load(s) for s in tqdm(dataset, desc="load tokens", unit="video", disable=not progress)]
        mirrored = [cache.load(s, True) for s in dataset] if hflip else None
        return cls(plain, mirrored, cache.frame_stride, [cache.fps(s) for s in dataset])

    def fps(self, index: int) -> float | None:
        return None if self.rates is None else self.rates[index]

    def __len__(self) -> int:
        return len(self.plain)

    def require_mirrored(self) -> None:
        if self.mirrored is None:
            raise ValueError("hflip needs the mirrored tokens of every training video (extract with --hflip)")

    def clip(self, index: int, pick: RowPicker, hflip: bool = False) -> torch.Tensor:
        if hflip and self.mirrored is None:
            raise ValueError("mirrored tokens were not loaded (load with hflip=True)")
        tokens = (self.mirrored if hflip else self.plain)[index]
        return tokens[torch.from_numpy(pick(len(tokens)))]


def row_step(frame_interval: int, frame_stride: int) -> int:
    """The manifest's frame interval in cached rows; clips must land on the cached frames."""
    if frame_interval % frame_stride:
        raise ValueError(f"the token cache keeps every {frame_stride}-th frame, which cannot give the manifest's "
                         f"frame_interval {frame_interval}; extract with a --frame-stride that divides it")
    return frame_interval // frame_stride


def row_steps(source: TokenSource, frame_interval: int, sample_period_s: float | None) -> list[float]:
    """Per sample, the cached rows between two samples of a clip.

    By time (``sample_period_s``): ``period * fps / frame_stride``, from each video's own rate, so
    videos of any rate show the heads the motion of the same time span (each sample the nearest
    cached frame).  By frame count (an old manifest, or a video whose rate is unknown):
    ``frame_interval / frame_stride`` (:func:`row_step`).
    """
    if sample_period_s is None:
        return [float(row_step(frame_interval, source.frame_stride))] * len(source)
    steps = []
    for i in range(len(source)):
        fps = source.fps(i)
        if fps is None or not fps > 0:
            steps.append(float(row_step(frame_interval, source.frame_stride)))
        else:
            steps.append(sample_period_s * fps / source.frame_stride)
    return steps


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one training window: independent of workers, ranks and resumption."""
    return np.random.default_rng([seed, epoch, index])


class WindowDataset(torch.utils.data.Dataset):
    """Training windows: key ``(epoch, index, weight)`` -> (index, weight, window (T, 1 + n, D)).

    ``weight`` 0 marks a padding item that keeps every torchrun rank's batch non-empty.
    """

    def __init__(self, source: TokenSource, frames: int, frame_interval: int, seed: int, hflip: bool = False,
                 sample_period_s: float | None = None, clip_sampling: str = "interval") -> None:
        self.source, self.frames, self.seed, self.hflip = source, frames, seed, hflip
        self.uniform = clip_sampling == "uniform"
        self.steps = [] if self.uniform else row_steps(source, frame_interval, sample_period_s)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int, float]) -> tuple[int, float, torch.Tensor]:
        epoch, index, weight = key
        rng = sample_rng(self.seed, epoch, index)
        flip = self.hflip and bool(rng.random() < 0.5)
        if self.uniform:  # one random frame from each of T equal segments of the video
            window = self.source.clip(index, lambda rows: uniform_indices(rows, self.frames, rng), flip)
        else:
            step = self.steps[index]
            window = self.source.clip(index, lambda rows: random_clip_indices(rows, self.frames, step, rng), flip)
        return index, weight, window


class ViewDataset(torch.utils.data.Dataset):
    """Evaluation: item ``i`` -> (i, views (num_clips, T, 1 + n, D)), evenly spaced clip starts."""

    def __init__(self, source: TokenSource, frames: int, frame_interval: int, num_clips: int,
                 sample_period_s: float | None = None, clip_sampling: str = "interval") -> None:
        self.source, self.frames, self.num_clips = source, frames, num_clips
        self.uniform = clip_sampling == "uniform"
        self.steps = [] if self.uniform else row_steps(source, frame_interval, sample_period_s)

    def __len__(self) -> int:
        return len(self.source)

    def _rows(self, rows: int, step: float) -> np.ndarray:
        starts = clip_starts(rows, self.frames, step, self.num_clips)
        return np.concatenate([clip_indices(rows, self.frames, step, int(s)) for s in starts])

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        if self.uniform:
            views = self.source.clip(index, lambda rows: uniform_view_indices(rows, self.frames, self.num_clips))
        else:
            step = self.steps[index]
            views = self.source.clip(index, lambda rows: self._rows(rows, step))
        return index, views.reshape(self.num_clips, self.frames, *views.shape[1:])


class GlobalBatchSampler(Sampler[list[tuple[int, int, float]]]):
    """One epoch of global batches of ``batch_size``, this rank's share of each.

    The permutation depends only on (seed, epoch).  Rank r takes items r, r + W, ... of every
    global batch; a rank left without an item gets a zero-weight copy of the batch's first one,
    so that every rank runs every step (DistributedDataParallel needs that) and the sums over
    ranks equal one process's batch.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if num_samples < 1:
            raise ValueError("no training samples")
        self.n, self.batch_size, self.seed, self.rank, self.world = num_samples, batch_size, seed, rank, world_size
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int, float]]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        for step in range(self.start_step, self.steps_per_epoch):
            batch = order[step * self.batch_size : (step + 1) * self.batch_size]
            mine = batch[self.rank :: self.world]
            if len(mine):
                yield [(self.epoch, int(i), 1.0) for i in mine]
            else:
                yield [(self.epoch, int(batch[0]), 0.0)]


def collate(batch: list[tuple]) -> tuple:
    """Stack a batch of ``(index, [weight,] tensor)`` items into CPU tensors.

    Explicitly on the CPU, not PyTorch's default collate: that one creates the index and
    weight tensors on the *default* device, which a caller may have set to a GPU (or meta).
    """
    columns = list(zip(*batch))
    out = [torch.tensor(columns[0], dtype=torch.long, device="cpu")]
    if len(columns) == 3:
        out.append(torch.tensor(columns[1], dtype=torch.float32, device="cpu"))
    out.append(torch.stack(columns[-1]))
    return tuple(out)


def _ignore_sigint(_: int) -> None:
    """Workers leave Ctrl-C to the main process, which saves a checkpoint and stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset: torch.utils.data.Dataset, runtime: Runtime, *, batch_sampler: Sampler | None = None,
                indices: list[int] | None = None, batch_size: int = 1) -> DataLoader:
    """A DataLoader with ``runtime.workers`` prefetching workers and pinned memory on GPUs."""
    workers = runtime.workers
    # Workers come from a fork server, not a fork of this process: by the time a loader starts
    # (the validation loader after the first epoch) the process has threads (gloo, the other
    # loader's queue feeders, tqdm's monitor), and a fork copies whatever lock one of them holds.
    # Seen once in CI: a torchrun rank's forked validation worker hung in a futex for an hour.
    kwargs = dict(num_workers=workers, pin_memory=runtime.pin_memory, prefetch_factor=2 if workers else None,
                  worker_init_fn=_ignore_sigint if workers else None, persistent_workers=bool(workers),
                  multiprocessing_context="forkserver" if workers else None, collate_fn=collate)
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
    subset = dataset if indices is None else torch.utils.data.Subset(dataset, indices)
    return DataLoader(subset, batch_size=batch_size, shuffle=False, **kwargs)


@dataclass(frozen=True)
class Split:
    """Tokens and class indices of one split (train or validation)."""

    source: TokenSource
    labels: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.source)


__all__ = [
    "GlobalBatchSampler",
    "Split",
    "StreamedTokens",
    "TokenSource",
    "TokensInRam",
    "ViewDataset",
    "WindowDataset",
    "collate",
    "make_loader",
    "row_step",
    "sample_rng",
]
