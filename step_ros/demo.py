"""The built-in default job and the recipe that produced the demo model.

``step-ros demo`` needs no camera and no download: it generates a fresh synthetic test set
(a different seed from the one the demo heads were trained on) and runs the demo model on it.
``step-ros reproduce-demo`` regenerates ``models/demo`` from scratch with one command.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .model.manifest import load_manifest
from .model.multitask import MultiTaskModel
from .training.jobs import TokenOptions, evaluate_job, train_job
from .console import console, step
from .resources import demo_manifest, demo_template
from .training.runtime import Runtime
from .training.train import TrainConfig

DEMO_MANIFEST = demo_manifest()  # the checkout's, or share/step_ros's in a colcon install
DEMO_TEMPLATE = demo_template()
TRAIN_SEED = 0  # synthetic data the demo heads were trained on
DEMO_SEED = 2026  # fresh test data for the demo run: never seen in training


def fresh_test_set(out: Path, per_class: int, seed: int = DEMO_SEED) -> Path:
    from .data.synthetic import generate

    return generate(out, seed=seed, videos_per_class={"train": 0, "val": 0, "test": per_class},
                    unknown_per_class=per_class, progress=True)


def run_offline(args: argparse.Namespace) -> dict:
    """Evaluate the demo model on a freshly generated synthetic test set and print the report."""
    manifest = args.manifest or DEMO_MANIFEST
    model = MultiTaskModel.from_manifest(load_manifest(manifest))
    step("demo model", f"{manifest} (backbone: {model.backbone.source})")
    csv = fresh_test_set(args.out / "data", args.per_class or 4)
    return evaluate_job(manifest, csv, args.out / "eval", cache_root=args.out / "cache", model=model)


def run_demo(args: argparse.Namespace) -> int:
    if args.offline:
        run_offline(args)
        return 0
    from .ros.demo import run_live_demo

    return run_live_demo(args)


def reproduce_demo_model(out: Path, work: Path, config: TrainConfig, runtime: Runtime | None = None,
                         tokens: TokenOptions = TokenOptions(), val_fraction: float = 0.0) -> None:
    """Synthetic data (seed 0, default size) -> token cache -> STEP heads -> models/demo.

    The heads kept are those of the epoch with the best validation score (the benchmark's
    ``val`` split); the evaluation below is on its test split.
    """
    from .data.synthetic import generate

    csv = generate(work / "data", seed=TRAIN_SEED)
    trained = train_job(DEMO_TEMPLATE, csv, out, config, cache_root=work / "cache", runtime=runtime, tokens=tokens,
                        val_fraction=val_fraction)
    keep = {spec.checkpoint.resolve() for spec in trained.heads}
    for stale in (out / "heads").glob("*.safetensors"):  # heads of tasks no longer in the template
        if stale.resolve() not in keep:
            stale.unlink()
    console.print(f"backbone fingerprint {trained.backbone.fingerprint} recorded in {out / 'manifest.yaml'}")
    evaluate_job(out / "manifest.yaml", csv, out / "eval", cache_root=work / "cache", runtime=runtime, tokens=tokens)


__all__ = ["DEMO_MANIFEST", "fresh_test_set", "reproduce_demo_model", "run_demo", "run_offline"]
