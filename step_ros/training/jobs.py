"""The workflows behind ``step-ros extract | train | evaluate | compare``.

Each job takes paths (manifest, annotations, output folder), does one thing end to end, writes
its results to disk (JSON + PNG) and prints a summary.  The CLI only parses arguments.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..data.annotations import Dataset, load_annotations
from ..model.backbone import Backbone
from ..model.manifest import Manifest, load_manifest
from ..model.multitask import MultiTaskModel, backbone_from_manifest
from .cache import TokenCache, extract, load_all
from .evaluate import ORDERS, evaluate_predictions, predict, predictions_table
from .report import (
    console,
    pct,
    plot_comparison,
    plot_confusion,
    plot_per_class,
    print_evaluation,
    print_table,
    write_json,
)
from .train import TrainConfig, label_indices, save_trained, train_heads

DEFAULT_CACHE = Path("runs/cache")


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


def cached_tokens(
    dataset: Dataset, backbone: Backbone, cache_root: Path, progress: bool = True
) -> list[torch.Tensor]:
    return cached_views(dataset, backbone, cache_root, hflip=False, progress=progress)[0]


def cached_views(
    dataset: Dataset, backbone: Backbone, cache_root: Path, hflip: bool, progress: bool = True
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Tokens of every segment and, with ``hflip``, of its mirrored frames (extracting what is missing)."""
    cache = extract(dataset, backbone, cache_root, progress=progress, hflip=hflip)
    return load_all(dataset, cache), (load_all(dataset, cache, hflip=True) if hflip else None)


def extract_job(manifest_path: Path, data: Path, cache_root: Path = DEFAULT_CACHE, split: str | None = None,
                hflip: bool = False) -> TokenCache:
    manifest = load_manifest(manifest_path)
    dataset = select(load_annotations(data), split)
    backbone = backbone_from_manifest(manifest)
    start = time.perf_counter()
    cache = extract(dataset, backbone, cache_root, hflip=hflip)
    views = " (and mirrored)" if hflip else ""
    console.print(f"cached tokens{views} of {len(dataset)} segments in {cache.root} ({time.perf_counter() - start:.0f} s)")
    return cache


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
) -> Manifest:
    """Train every head of ``manifest_path`` (optionally all as ``kind``) on ``split``."""
    manifest = load_manifest(manifest_path)
    if kind:
        manifest = with_kind(manifest, kind)
    dataset = select(load_annotations(data), split)
    labels = label_indices(dataset, manifest)
    backbone = backbone or backbone_from_manifest(manifest)
    tokens, mirrored = cached_views(dataset, backbone, cache_root, config.hflip)
    heads, log = train_heads(manifest, backbone.dim, backbone.num_patches, tokens, labels, config, mirrored=mirrored)
    manifest.backbone.fingerprint = backbone.fingerprint  # heads only fit these exact weights
    trained = save_trained(manifest, heads, out, dim=backbone.dim, num_tokens=backbone.num_patches, log=log,
                           config=config, backbone_source=backbone.source)
    console.print(f"trained {len(heads)} head(s) ({', '.join(h.kind for h in trained.heads)}) -> {out / 'manifest.yaml'}")
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
) -> dict:
    """Evaluate a trained manifest; writes report.json, predictions.json and PNG figures."""
    model = model or MultiTaskModel.from_manifest(load_manifest(manifest_path))
    manifest = model.manifest
    dataset = select(load_annotations(data), split)
    label_indices(dataset, manifest)  # unknown labels -> clear error before any work
    tokens = cached_tokens(dataset, model.backbone, cache_root, progress=not quiet)
    probs = predict(dict(model.heads.items()), manifest, tokens, num_clips=num_clips, orders=ORDERS)
    report = evaluate_predictions(manifest, dataset, probs)
    report.update(model=manifest.name, manifest=str(manifest_path), data=str(data), split=split,
                  num_clips=num_clips, backbone=model.backbone.source,
                  head_kinds={s.task: s.kind for s in manifest.heads})
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
        print_evaluation(report, title=f"[{manifest.name}] ")
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
) -> dict:
    """Train and evaluate the same tasks with each head kind: the papers' comparison in one run."""
    template = load_manifest(manifest_path)
    backbone = backbone_from_manifest(template)
    results: dict = {"kinds": {}, "config": asdict(config)}
    for kind in kinds:
        console.rule(f"[bold]{kind}")
        run = out / kind
        tmp_manifest = with_kind(template, kind)
        tmp_manifest.save(run / "template.yaml")
        trained = train_job(run / "template.yaml", data, run, config, cache_root=cache_root, backbone=backbone)
        model = MultiTaskModel.from_manifest(trained, backbone=backbone)
        report = evaluate_job(run / "manifest.yaml", data, run / "eval", num_clips=num_clips,
                              cache_root=cache_root, model=model, quiet=True)
        results["kinds"][kind] = {t: headline(report, t) for t in report["tasks"]}
    for task in template.tasks:
        rows = [{"kind": k, **results["kinds"][k][task]} for k in kinds]
        cols = [c for c in rows[0] if c != "kind"]
        print_table(f"{task}: head kinds compared (top-1 %)", ["kind", *cols],
                    [[r["kind"], *[pct(r[c]) for c in cols]] for r in rows])
        plot_comparison(rows, out / f"compare_{task}.png", f"{task}: head kinds compared")
    write_json(results, out / "compare.json")
    console.print(f"comparison: {out / 'compare.json'}")
    return results


__all__ = ["compare_job", "evaluate_job", "extract_job", "headline", "select", "train_job", "with_kind"]
