"""Train the heads of a manifest on cached tokens (paper recipe, SPEC section 2).

Backbone frozen (its tokens come from the cache); all heads of the manifest train together on
the same clips, one cross-entropy per task.  AdamW, lr 1e-3 with cosine annealing, batch 32,
60 epochs by default; temporal jitter (a random clip start per video and epoch), never a
temporal flip.  With ``hflip`` (the papers' horizontal flip; only for labels that a mirror image
does not change) each clip is drawn from the mirrored frames' tokens half of the time.  Output: ``<out>/heads/<task>.safetensors`` (config in the metadata), a manifest
pointing at them, and ``train_log.json`` + ``train_curve.png``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data.annotations import Dataset, check_labels
from ..data.clips import random_clip_indices
from ..model.manifest import Manifest
from ..model.multitask import build_head, save_head


@dataclass
class TrainConfig:
    epochs: int = 60
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.02
    optimizer: str = "adamw"  # adamw | sgd (the papers use SGD on NTU)
    seed: int = 0
    hflip: bool = False  # horizontal-flip augmentation from cached mirrored tokens


def label_indices(dataset: Dataset, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Class index per sample and task; labels not in the manifest are an error naming them."""
    out = {}
    for spec in manifest.heads:
        if spec.task not in dataset.tasks:
            raise ValueError(
                f"task {spec.task!r} of the manifest has no column in {dataset.source} (columns: {dataset.tasks})"
            )
        check_labels(dataset, spec.task, spec.labels)
        out[spec.task] = torch.tensor([spec.labels.index(s.labels[spec.task]) for s in dataset])
    return out


def sample_windows(
    tokens: list[torch.Tensor], indices: np.ndarray, frames: int, interval: int, rng: np.random.Generator,
    mirrored: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """A batch of training windows (B, T, 1 + n, D), each at a random clip start.

    With ``mirrored`` (the same videos' hflip tokens) each window comes from either view with
    probability 1/2; without it the random stream is the same as before hflip existed.
    """
    windows = []
    for i in indices:
        source = mirrored[i] if mirrored is not None and rng.random() < 0.5 else tokens[i]
        windows.append(source[torch.from_numpy(random_clip_indices(len(source), frames, interval, rng))])
    return torch.stack(windows)


def train_heads(
    manifest: Manifest,
    dim: int,
    num_tokens: int,
    tokens: list[torch.Tensor],
    labels: dict[str, torch.Tensor],
    config: TrainConfig,
    progress: bool = True,
    mirrored: list[torch.Tensor] | None = None,
) -> tuple[dict[str, torch.nn.Module], list[dict]]:
    """Train one head per manifest entry; returns the heads and a per-epoch log.

    ``mirrored``: hflip tokens of the same videos, required when ``config.hflip``.
    """
    if config.hflip and (mirrored is None or len(mirrored) != len(tokens)):
        raise ValueError("config.hflip needs the mirrored tokens of every training video (extract with hflip)")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    heads = {s.task: build_head(s, dim, manifest.frames, num_tokens) for s in manifest.heads}
    params = [p for h in heads.values() for p in h.parameters()]
    if config.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    elif config.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {config.optimizer!r}")
    n = len(tokens)
    steps_per_epoch = math.ceil(n / config.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs * steps_per_epoch)
    log: list[dict] = []
    bar = tqdm(range(config.epochs), desc="train", unit="epoch", disable=not progress)
    for epoch in bar:
        for h in heads.values():
            h.train()
        order = rng.permutation(n)
        totals = {t: [0.0, 0] for t in heads}
        start = time.perf_counter()
        for b in range(steps_per_epoch):
            idx = order[b * config.batch_size : (b + 1) * config.batch_size]
            window = sample_windows(tokens, idx, manifest.frames, manifest.frame_interval, rng,
                                    mirrored if config.hflip else None)
            loss = 0.0
            for task, head in heads.items():
                logits = head(window)
                target = labels[task][idx]
                loss = loss + F.cross_entropy(logits, target)
                totals[task][0] += (logits.argmax(-1) == target).sum().item()
                totals[task][1] += len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        entry = {
            "epoch": epoch + 1,
            "loss": loss.item(),
            "lr": sched.get_last_lr()[0],
            "seconds": time.perf_counter() - start,
            **{f"train_acc/{t}": c / max(1, k) for t, (c, k) in totals.items()},
        }
        log.append(entry)
        bar.set_postfix(loss=f"{entry['loss']:.3f}", **{t[:12]: f"{entry[f'train_acc/{t}']:.2f}" for t in heads})
    for h in heads.values():
        h.eval()
    return heads, log


def save_trained(
    manifest: Manifest, heads: dict[str, torch.nn.Module], out_dir: str | Path, *, dim: int, num_tokens: int,
    log: list[dict], config: TrainConfig, backbone_source: str,
) -> Manifest:
    """Write head checkpoints, the trained manifest, the log and the training curve."""
    out = Path(out_dir)
    trained = copy.deepcopy(manifest)
    for spec in trained.heads:
        spec.checkpoint = save_head(
            heads[spec.task], spec, out / "heads" / f"{spec.task}.safetensors", dim=dim,
            frames=trained.frames, num_tokens=num_tokens, backbone=backbone_source,
            extra={"epochs": config.epochs, "lr": config.lr},
        )
    trained.save(out / "manifest.yaml")
    (out / "train_log.json").write_text(json.dumps({"config": asdict(config), "epochs": log}, indent=1))
    from .report import plot_training

    plot_training(log, out / "train_curve.png")
    return trained


__all__ = ["TrainConfig", "label_indices", "sample_windows", "save_trained", "train_heads"]
