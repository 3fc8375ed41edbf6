"""The workflows behind ``step-ros extract | train | evaluate | compare``.

Each job takes paths (manifest, annotations, output folder), does one thing end to end, writes
its results to disk (JSON + PNG) and prints a summary.  The CLI only parses arguments.  Every
job runs the same under ``torchrun``: ranks share the work, rank 0 writes and prints.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..console import console, pct, print_table, write_json
from ..data.annotations import Dataset, carve_validation, load_annotations
from ..model.backbone import Backbone
from ..model.manifest import Manifest, load_manifest
from ..model.multitask import MultiTaskModel, backbone_from_manifest
from .cache import DEFAULT_TOKEN_DTYPE, TokenCache, extract
from .evaluate import ORDERS, evaluate_predictions, predict, predictions_table
from .loader import Split, StreamedTokens, TokenSource, TokensInRam, row_step
from .report import plot_comparison, plot_confusion, plot_per_class, print_evaluation
from .runtime import Runtime
from .train import STATE_FILE, TrainConfig, TrainResult, label_indices, save_trained, train_heads

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path("runs/cache")
LOADS = ("stream", "ram")


@dataclass(frozen=True)
class TokenOptions:
    """How tokens are cached (dtype, frame stride) and read (streamed from disk, or all in RAM)."""

    frame_stride: int = 1
    dtype: str = DEFAULT_TOKEN_DTYPE
    load: str = "stream"

    def cache(self, cache_root: Path, backbone: Backbone) -> TokenCache:
        return TokenCache.for_backbone(cache_root, backbone, frame_stride=self.frame_stride, dtype=self.dtype)

    def source(self, dataset: Dataset, cache: TokenCache, hflip: bool = False, progress: bool = False) -> TokenSource:
        if self.load == "stream":
            return StreamedTokens(cache, dataset)
        if self.load == "ram":
            return TokensInRam.load(cache, dataset, hflip=hflip, progress=progress)
        raise ValueError(f"--load-tokens must be one of {', '.join(LOADS)}, got {self.load!r}")


def _cpu() -> Runtime:
    return Runtime(torch.device("cpu"))


def select(dataset: Dataset, split: str | None, context: str | None = None) -> Dataset:
    """Samples of a split (all when the data has no splits) and optionally one context."""
    if split and dataset.splits:
        if split not in dataset.splits:
            raise ValueError(f"split {split!r} not in {dataset.source} (splits: {dataset.splits})")
        dataset = dataset.filter(split=split)
    if context:
        dataset = dataset.filter(context=context)
    if not len(dataset):
        raise ValueError(f"no samples for split={split!r} context={context!r}")
    return dataset


def train_and_validation(dataset: Dataset, split: str, val_split: str | None, val_fraction: float, task: str,
                         seed: int) -> tuple[Dataset, Dataset | None]:
    """The training samples and the validation samples, if any.

    ``val_fraction`` > 0 carves whole videos from the training split (per class of ``task``);
    otherwise the annotations' ``val_split`` rows are used when they exist.
    """
    train = select(dataset, split)
    if val_fraction:
        return carve_validation(train, val_fraction, task, seed)
    if val_split and val_split in dataset.splits and val_split != split:
        return train, dataset.filter(split=val_split)
    return train, None


def extract_job(manifest_path: Path, data: Path, cache_root: Path = DEFAULT_CACHE, split: str | None = None,
                hflip: bool = False, *, runtime: Runtime | None = None,
                tokens: TokenOptions = TokenOptions()) -> TokenCache:
    runtime = runtime or _cpu()
    manifest = load_manifest(manifest_path)
    row_step(manifest.frame_interval, tokens.frame_stride)  # a stride clips cannot use: fail before the work
    dataset = select(load_annotations(data), split)
    backbone = backbone_from_manifest(manifest).to(runtime.device)
    start = time.perf_counter()
    cache = extract(dataset, backbone, tokens.cache(cache_root, backbone), runtime=runtime, hflip=hflip)
    views = " (and mirrored)" if hflip else ""
    console.print(f"cached {tokens.dtype} tokens{views} of {len(dataset)} segments in {cache.root} "
                  f"({time.perf_counter() - start:.0f} s)")
    return cache


def head_path(out: Path, task: str) -> Path:
    return out / "heads" / f"{task}.safetensors"


def _train(
    manifest: Manifest, data: Path, out: Path, config: TrainConfig, *, cache_root: Path, split: str,
    backbone: Backbone | None, runtime: Runtime, tokens: TokenOptions, val_split: str | None, val_fraction: float,
    resume: bool,
) -> tuple[Manifest, TrainResult, Backbone]:
    state_path = out / STATE_FILE
    if state_path.is_file() and not resume:
        raise FileExistsError(f"{state_path} holds an unfinished training run: continue it with --resume, "
                              "or delete the file to start over")
    row_step(manifest.frame_interval, tokens.frame_stride)
    task = manifest.heads[0].task
    train_ds, val_ds = train_and_validation(load_annotations(data), split, val_split, val_fraction, task, config.seed)
    labels = label_indices(train_ds, manifest)
    val_labels = label_indices(val_ds, manifest) if val_ds is not None else None
    backbone = backbone or backbone_from_manifest(manifest)
    backbone.to(runtime.device)
    cache = tokens.cache(cache_root, backbone)
    extract(train_ds, backbone, cache, runtime=runtime, hflip=config.hflip)
    if val_ds is not None:
        extract(val_ds, backbone, cache, runtime=runtime)
    train = Split(tokens.source(train_ds, cache, config.hflip, progress=runtime.is_main), labels)
    val = Split(tokens.source(val_ds, cache), val_labels) if val_ds is not None else None
    if runtime.is_main:
        where = f"{len(val_ds)} validation" if val_ds is not None else "no validation"
        how = "streamed from" if tokens.load == "stream" else "loaded into RAM from"
        console.print(f"training {len(manifest.heads)} head(s) on {len(train_ds)} samples, {where} "
                      f"({runtime.describe()}; tokens {how} {cache.root})")
    manifest = copy.deepcopy(manifest)
    if manifest.sample_period_s is None:  # clips by time, and what the node needs to sample any camera
        manifest.sample_period_s = training_sample_period(train_ds, manifest.frame_interval)
    result = train_heads(manifest, backbone.dim, backbone.num_patches, train, config, runtime=runtime, val=val,
                         state_path=state_path, resume=resume, progress=runtime.is_main)
    manifest.backbone.fingerprint = backbone.fingerprint  # heads only fit these exact weights
    extra = {"runtime": {"device": str(runtime.device), "precision": runtime.precision,
                         "world_size": runtime.world_size, "workers": runtime.workers},
             "tokens": asdict(tokens), "num_train": len(train_ds), "num_val": len(val_ds) if val_ds else 0}
    if runtime.is_main:
        trained = save_trained(manifest, result, out, dim=backbone.dim, num_tokens=backbone.num_patches,
                               config=config, backbone_source=backbone.source, extra_log=extra)
        state_path.unlink(missing_ok=True)  # a finished run leaves no resume state behind
        kinds = ", ".join(h.kind for h in trained.heads)
        console.print(f"trained {len(result.heads)} head(s) ({kinds}); kept the {result.selection} "
                      f"(epoch {result.selected_epoch}) -> {out / 'manifest.yaml'}")
    else:  # the same manifest, without writing: rank 0 owns the files
        trained = copy.deepcopy(manifest)
        for spec in trained.heads:
            spec.checkpoint = head_path(out, spec.task)
    runtime.barrier()
    return trained, result, backbone


def training_sample_period(dataset: Dataset, frame_interval: int, limit: int = 200) -> float | None:
    """``frame_interval`` / the training videos' frame rate (PyAV's; the median over up to ``limit``
    videos, a warning when they differ): the time between two samples the heads learned."""
    import numpy as np

    from ..data.video import video_info

    given = {str(s.video): s.fps for s in dataset if s.fps}  # the annotation CSV's fps column wins
    videos = sorted({str(s.video) for s in dataset})
    if len(videos) > limit:
        videos = [videos[i] for i in np.linspace(0, len(videos) - 1, limit).round().astype(int)]
    rates = []
    for v in videos:
        try:
            fps = given.get(v) or video_info(v).fps
        except Exception:  # noqa: BLE001 - an unreadable header: training already decoded it or failed
            continue
        if fps and fps > 0:
            rates.append(fps)
    if not rates:
        return None
    lo, mid, hi = float(min(rates)), float(np.median(rates)), float(max(rates))
    if hi > lo * 1.01:
        log.warning("training videos have different frame rates (%.3g to %.3g fps); sample_period_s is set from "
                    "the median, %.3g fps, but training samples every %d-th frame of each video", lo, hi, mid,
                    frame_interval)
    return frame_interval / mid


def train_job(
    manifest_path: Path,
    data: Path,
    out: Path,
    config: TrainConfig,
    *,
    kind: str | None = None,
    cache_root: Path = DEFAULT_CACHE,
    split: str = "train",
    backbone: Backbone | None = None,
    runtime: Runtime | None = None,
    tokens: TokenOptions = TokenOptions(),
    val_split: str | None = "val",
    val_fraction: float = 0.0,
    resume: bool = False,
) -> Manifest:
    """Train every head of ``manifest_path`` (optionally all as ``kind``) on ``split``."""
    manifest = load_manifest(manifest_path)
    if kind:
        manifest = with_kind(manifest, kind)
    trained, _, _ = _train(manifest, data, out, config, cache_root=cache_root, split=split, backbone=backbone,
                           runtime=runtime or _cpu(), tokens=tokens, val_split=val_split,
                           val_fraction=val_fraction, resume=resume)
    return trained


def with_kind(manifest: Manifest, kind: str) -> Manifest:
    """The same tasks and labels with another head kind (for baseline comparisons)."""
    m = copy.deepcopy(manifest)
    for spec in m.heads:
        if spec.kind != kind:
            spec.kind, spec.options, spec.checkpoint = kind, {}, None
    return m


def evaluate_job(
    manifest_path: Path,
    data: Path,
    out: Path | None,
    *,
    split: str = "test",
    num_clips: int = 3,
    cache_root: Path = DEFAULT_CACHE,
    model: MultiTaskModel | None = None,
    quiet: bool = False,
    runtime: Runtime | None = None,
    tokens: TokenOptions = TokenOptions(),
    sampling: str = "auto",
) -> dict | None:
    """Evaluate a trained manifest; writes report.json, predictions.json and PNG figures.

    ``sampling``: clips by time (``auto`` / ``time``: every ``sample_period_s``, each video at
    its own rate) or ``frames`` (every ``frame_interval``-th frame, whatever the rate).

    Returns the report on rank 0 (``None`` on the other ranks of a torchrun job).
    """
    runtime = runtime or _cpu()
    model = model or MultiTaskModel.from_manifest(load_manifest(manifest_path))
    manifest = model.manifest
    if sampling not in ("auto", "time", "frames"):
        raise ValueError(f"sampling must be auto, time or frames, got {sampling!r}")
    if sampling == "frames" and manifest.sample_period_s is not None:
        manifest = copy.deepcopy(manifest)
        manifest.sample_period_s = None
    row_step(manifest.frame_interval, tokens.frame_stride)
    dataset = select(load_annotations(data), split)
    label_indices(dataset, manifest)  # unknown labels -> clear error before any work
    model.backbone.to(runtime.device)
    cache = extract(dataset, model.backbone, tokens.cache(cache_root, model.backbone), runtime=runtime,
                    progress=not quiet)
    probs = predict(dict(model.heads.items()), manifest, tokens.source(dataset, cache), runtime=runtime,
                    num_clips=num_clips, orders=ORDERS, progress=not quiet)
    if probs is None:  # not rank 0
        return None
    report = evaluate_predictions(manifest, dataset, probs)
    report.update(model=manifest.name, manifest=str(manifest_path), data=str(data), split=split,
                  num_clips=num_clips, sampling="frames" if manifest.sample_period_s is None else "time",
                  sample_period_s=manifest.sample_period_s, backbone=model.backbone.source,
                  head_kinds={s.task: s.kind for s in manifest.heads}, tokens=asdict(tokens))
    if out is not None:
        out = Path(out)
        write_json(report, out / "report.json")
        write_json(predictions_table(manifest, dataset, probs), out / "predictions.json")
        for spec in manifest.heads:
            r = report["tasks"][spec.task]
            plot_confusion(r["confusion"], spec.labels, out / f"confusion_{spec.task}.png",
                           f"{manifest.name}: {spec.task} ({spec.kind})")
            plot_per_class(r["per_class"], out / f"per_class_{spec.task}.png", f"{spec.task} ({spec.kind})")
    if not quiet:
        print_evaluation(report, title=f"{manifest.name}: ")
        if out is not None:
            console.print(f"report: {out / 'report.json'}  figures: {out}/*.png")
    return report


def headline(report: dict, task: str) -> dict:
    """The numbers the papers' comparison is about, for one task."""
    o = report["tasks"][task]["orders"]
    known = "known" if "known" in o["normal"] else "all"
    row = {
        "top1": o["normal"]["all"]["top1"],
        "symmetric": o["normal"]["all"]["symmetric"],
        "non_symmetric": o["normal"]["all"]["non_symmetric"],
        "within_pair": o["normal"]["all"]["within_pair"],
        "reversed": o["reversed"]["all"]["top1"],
        "shuffled": o["shuffled"]["all"]["top1"],
        f"{known}": o["normal"][known]["top1"],
    }
    if "unknown" in o["normal"]:
        row["unknown"] = o["normal"]["unknown"]["top1"]
    return row


def compare_job(
    manifest_path: Path,
    data: Path,
    out: Path,
    kinds: list[str],
    config: TrainConfig,
    *,
    cache_root: Path = DEFAULT_CACHE,
    num_clips: int = 3,
    runtime: Runtime | None = None,
    tokens: TokenOptions = TokenOptions(),
    val_fraction: float = 0.0,
) -> dict | None:
    """Train and evaluate the same tasks with each head kind: the papers' comparison in one run."""
    runtime = runtime or _cpu()
    template = load_manifest(manifest_path)
    backbone = backbone_from_manifest(template)
    results: dict = {"kinds": {}, "config": asdict(config)}
    for kind in kinds:
        console.rule(kind)
        run = out / kind
        manifest = with_kind(template, kind)
        if runtime.is_main:
            manifest.save(run / "template.yaml")
        trained, result, backbone = _train(
            manifest, data, run, config, cache_root=cache_root, split="train", backbone=backbone, runtime=runtime,
            tokens=tokens, val_split="val", val_fraction=val_fraction, resume=False)
        model = MultiTaskModel(trained, backbone, result.heads)
        report = evaluate_job(run / "manifest.yaml", data, run / "eval", num_clips=num_clips, cache_root=cache_root,
                              model=model, quiet=True, runtime=runtime, tokens=tokens)
        if report is not None:
            results["kinds"][kind] = {t: headline(report, t) for t in report["tasks"]}
    if not runtime.is_main:
        return None
    for task in template.tasks:
        rows = [{"kind": k, **results["kinds"][k][task]} for k in kinds]
        cols = [c for c in rows[0] if c != "kind"]
        print_table(f"{task}: head kinds compared (top-1 %)", ["kind", *cols],
                    [[r["kind"], *[pct(r[c]) for c in cols]] for r in rows])
        plot_comparison(rows, out / f"compare_{task}.png", f"{task}: head kinds compared")
    write_json(results, out / "compare.json")
    console.print(f"comparison: {out / 'compare.json'}")
    return results


__all__ = ["DEFAULT_CACHE", "LOADS", "TokenOptions", "compare_job", "evaluate_job", "extract_job", "headline",
           "select", "train_and_validation", "train_job", "with_kind"]
