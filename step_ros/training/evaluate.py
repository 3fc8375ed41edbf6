"""Evaluate trained heads on cached tokens: the papers' metrics, per task.

* top-1 overall, on the nearly symmetric classes and on the rest;
* the same with the frames of every clip reversed and shuffled at test time (order test);
* per context (known / unknown) when the data has contexts;
* per class: accuracy, most common confusion and its rate (paper Table 4 / Table III);
* within-pair accuracy: for clips of a symmetric pair, how often the pair's right member
  scores higher than its twin (50 % = blind to order);
* multi-view: ``num_clips`` temporal clips per video, softmax averaged ("16 x 3 x 1 views").
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from ..data.annotations import Dataset
from ..model.manifest import HeadSpec, Manifest
from .loader import TokenSource, ViewDataset, make_loader
from .runtime import Runtime

ORDERS = ("normal", "reversed", "shuffled")


def order_permutation(order: str, frames: int, rng: np.random.Generator) -> np.ndarray:
    if order == "normal":
        return np.arange(frames)
    if order == "reversed":
        return np.arange(frames)[::-1].copy()
    if order == "shuffled":
        while True:  # a real shuffle, never the identity
            perm = rng.permutation(frames)
            if frames < 2 or (perm != np.arange(frames)).any():
                return perm
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


@torch.inference_mode()
def predict(
    heads: dict[str, torch.nn.Module],
    manifest: Manifest,
    source: TokenSource,
    *,
    runtime: Runtime | None = None,
    num_clips: int = 3,
    orders: tuple[str, ...] = ORDERS,
    seed: int = 0,
    batch_videos: int = 8,
    progress: bool = False,
) -> dict[str, dict[str, np.ndarray]] | None:
    """Class probabilities averaged over views: ``{order: {task: (N, C)}}``.

    Under torchrun each rank scores its share of the videos and rank 0 gathers them in
    dataset order (other ranks get ``None``).  A shuffled order is drawn per video from
    ``(seed, video index)``, so it does not depend on how videos were split.
    """
    runtime = runtime or Runtime(torch.device("cpu"))
    for head in heads.values():
        head.to(runtime.device).eval()
    views = ViewDataset(source, manifest.frames, manifest.frame_interval, num_clips,
                        sample_period_s=manifest.sample_period_s, clip_sampling=manifest.clip_sampling)
    mine = list(runtime.shard(len(source)))
    loader = make_loader(views, runtime, indices=mine, batch_size=batch_videos)
    out: dict[str, dict[str, list[np.ndarray]]] = {o: {t: [] for t in heads} for o in orders}
    seen: list[np.ndarray] = []
    with tqdm(loader, desc="evaluate", unit="batch", disable=not (progress and runtime.is_main)) as batches:
        for index, batch in batches:
            batch = batch.to(runtime.device, non_blocking=True).float()  # (B, clips, T, 1 + n, D)
            seen.append(index.numpy())
            for o in orders:
                perms = [order_permutation(o, manifest.frames, np.random.default_rng([seed, int(i)])) for i in index]
                windows = torch.stack([v[:, torch.from_numpy(p).to(batch.device)] for v, p in zip(batch, perms)])
                windows = windows.flatten(0, 1)  # (B * clips, T, 1 + n, D)
                with runtime.autocast():
                    logits = {task: head(windows) for task, head in heads.items()}
                for task, lt in logits.items():
                    probs = torch.softmax(lt.float(), -1).reshape(len(index), num_clips, -1).mean(1)
                    out[o][task].append(probs.cpu().numpy())
    local = ({o: {t: np.concatenate(v) if v else None for t, v in d.items()} for o, d in out.items()},
             np.concatenate(seen) if seen else np.zeros(0, np.int64))
    parts = runtime.gather_objects(local)
    if parts is None:
        return None
    order_of = np.concatenate([idx for _, idx in parts])
    position = np.argsort(order_of, kind="stable")
    merged = {}
    for o in orders:
        merged[o] = {}
        for t in heads:
            arrays = [probs[o][t] for probs, idx in parts if len(idx)]
            merged[o][t] = np.concatenate(arrays)[position]
    return merged


@dataclass
class Scores:
    top1: float | None
    symmetric: float | None
    non_symmetric: float | None
    within_pair: float | None
    n: int

    def as_dict(self) -> dict:
        return {k: (None if v is None else round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def _mean(mask: np.ndarray, correct: np.ndarray) -> float | None:
    return float(correct[mask].mean()) if mask.any() else None


def score(spec: HeadSpec, probs: np.ndarray, truth: np.ndarray) -> Scores:
    pred = probs.argmax(1)
    correct = pred == truth
    sym_idx = np.array([i for i, lab in enumerate(spec.labels) if lab in spec.symmetric_labels], dtype=int)
    is_sym = np.isin(truth, sym_idx)
    within = []
    for a, b in spec.symmetric_pairs:
        ia, ib = spec.labels.index(a), spec.labels.index(b)
        for own, twin in ((ia, ib), (ib, ia)):
            rows = truth == own
            within.extend((probs[rows, own] > probs[rows, twin]).tolist())
    return Scores(
        top1=_mean(np.ones_like(correct), correct),
        symmetric=_mean(is_sym, correct),
        non_symmetric=_mean(~is_sym, correct),
        within_pair=float(np.mean(within)) if within else None,
        n=int(len(truth)),
    )


def per_class(spec: HeadSpec, probs: dict[str, np.ndarray], truth: np.ndarray) -> list[dict]:
    pred = probs["normal"].argmax(1)
    rows = []
    for i, label in enumerate(spec.labels):
        mask = truth == i
        if not mask.any():
            continue
        wrong = Counter(pred[mask][pred[mask] != i].tolist())
        confused, count = wrong.most_common(1)[0] if wrong else (None, 0)
        row = {
            "label": label,
            "support": int(mask.sum()),
            "symmetric": label in spec.symmetric_labels,
            "accuracy": round(float((pred[mask] == i).mean()), 4),
            "confused_with": None if confused is None else spec.labels[confused],
            "confusion_rate": round(count / mask.sum(), 4),
        }
        for order in ("reversed", "shuffled"):
            if order in probs:
                row[f"accuracy_{order}"] = round(float((probs[order].argmax(1)[mask] == i).mean()), 4)
        rows.append(row)
    return rows


def confusion_matrix(num_classes: int, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (truth, pred), 1)
    return m


def evaluate_predictions(
    manifest: Manifest, dataset: Dataset, probs: dict[str, dict[str, np.ndarray]]
) -> dict:
    """Metrics for every task, order and context (see module docstring)."""
    contexts = ["all"] + [c for c in dataset.contexts]
    ctx = np.array([s.context for s in dataset])
    report: dict = {"num_samples": len(dataset), "contexts": contexts, "tasks": {}}
    for spec in manifest.heads:
        truth = np.array([spec.labels.index(s.labels[spec.task]) for s in dataset])
        task_probs = {o: probs[o][spec.task] for o in probs}
        orders = {}
        for order, p in task_probs.items():
            orders[order] = {
                c: score(spec, p[mask], truth[mask]).as_dict()
                for c in contexts
                if (mask := (np.ones(len(truth), bool) if c == "all" else ctx == c)).any()
            }
        report["tasks"][spec.task] = {
            "labels": spec.labels,
            "symmetric_pairs": [list(p) for p in spec.symmetric_pairs],
            "orders": orders,
            "per_class": per_class(spec, task_probs, truth),
            "confusion": confusion_matrix(len(spec.labels), truth, task_probs["normal"].argmax(1)).tolist(),
        }
    return report


def predictions_table(manifest: Manifest, dataset: Dataset, probs: dict[str, dict[str, np.ndarray]]) -> list[dict]:
    """Per-sample predicted labels (normal order), for comparing pipelines clip by clip."""
    rows = []
    for i, s in enumerate(dataset):
        row = {"video": str(s.video), "start_frame": s.start_frame, "context": s.context}
        for spec in manifest.heads:
            p = probs["normal"][spec.task][i]
            row[spec.task] = {"true": s.labels.get(spec.task), "pred": spec.labels[int(p.argmax())],
                              "confidence": round(float(p.max()), 4)}
        rows.append(row)
    return rows


__all__ = [
    "ORDERS",
    "Scores",
    "confusion_matrix",
    "evaluate_predictions",
    "order_permutation",
    "per_class",
    "predict",
    "predictions_table",
    "score",
]
