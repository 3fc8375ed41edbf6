"""``step-ros bench --suite replay``: replay-eval's two pipelines on the demo bag, in one run.

The bag is the live demo's (``scripts/demo.sh``): a fresh synthetic test set recorded with
``step-ros record``, replayed for the demo model.  Rows, each the median of ``--repeat`` runs:

1. ``stream``: the node's engine frame by frame with the exact fast heads, which is what
   ``replay-eval`` ran before the batched pipeline (it now also skips converting frames the
   sampling passes over, so this baseline is, if anything, faster than the old code);
2. ``batched-torch``: decode ahead, the backbone on batches of sampled frames, the heads on
   batches of due windows (``--runner auto``), all in PyTorch (``--head-kernels torch``);
3. ``batched`` (the default; when onnxruntime is installed): the same with the heads' batches
   through ONNX Runtime graphs (:mod:`step_ros.model.indexed_onnx`);
4. ``batched-ort``: also the backbone's batches through ONNX Runtime (``--backend onnxruntime``,
   the dynamic-batch graph).

The rows take turns within each repeat (stream, batched, ..., then again), so that a slow minute
of a shared VM falls on all of them rather than on one row; each row's first run is a warm-up.

With ``--busy N`` (default 1) every row runs again while N other processes keep a core each busy
(a robot's CPU is never idle: planners, drivers, the DDS stack): per-frame work with OpenMP threads
suffers most there, batched work least.

The predictions of the two are compared (same stamps, same labels, probabilities within 1e-5);
a difference is an error, not a footnote.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..console import console, print_table, write_json

ATOL = 1e-5


class Config(NamedTuple):
    """One row: what ``replay_eval`` runs, and the key the JSON and the speed-ups use."""

    name: str
    key: str
    pipeline: str
    encode: Any = None  # the backbone: None is PyTorch, else an encoder
    head_kernels: str = "auto"


def _same_predictions(a: dict, b: dict) -> tuple[bool, float]:
    pa, pb = a["predictions"], b["predictions"]
    if len(pa) != len(pb):
        return False, float("inf")
    worst = 0.0
    for x, y in zip(pa, pb):
        if x["stamp"] != y["stamp"]:
            return False, float("inf")
        for task, e in x["tasks"].items():
            f = y["tasks"][task]
            if e["label"] != f["label"]:
                return False, float("inf")
            worst = max(worst, float(np.max(np.abs(np.asarray(e["probs"]) - np.asarray(f["probs"])))))
    return worst <= ATOL, worst


@contextmanager
def busy_cores(n: int):
    """``n`` processes spinning on the CPU for as long as the block runs: a loaded robot computer."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def run(args: argparse.Namespace) -> dict:
    from ..demo import fresh_test_set
    from ..model.manifest import load_manifest
    from ..model.multitask import MultiTaskModel
    from ..resources import demo_manifest
    from .record import record
    from .replay import replay_eval

    manifest_path = Path(args.manifest) if args.manifest else demo_manifest()
    manifest = load_manifest(manifest_path)
    model = MultiTaskModel.from_manifest(manifest).eval()
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        if args.bag:
            bag = Path(args.bag)
        else:
            csv = fresh_test_set(Path(tmp) / "data", args.bag_per_class)
            bag = record(csv, Path(tmp) / "bag", manifest=manifest, progress=False)
        configs = [Config("stream (the node's engine, frame by frame)", "stream", "stream"),
                   Config("batched, PyTorch backbone and heads (--head-kernels torch)", "batched-torch", "batched",
                          head_kernels="torch")]
        ort = _onnxruntime_encoder(model)
        if ort is not None:
            configs += [Config("batched, ONNX Runtime heads (default)", "batched", "batched"),
                        Config("batched, ONNX Runtime backbone and heads (--backend onnxruntime)", "batched-ort",
                               "batched", encode=ort)]
        rows, reports = [], {}
        loads = [0] + ([args.busy] if args.busy > 0 else [])
        for load in loads:
            times: dict[str, list[float]] = {c.key: [] for c in configs}
            with busy_cores(load):
                for rep in range(args.repeat + 1):  # round 0 warms up
                    for c in configs:
                        report = replay_eval(bag, manifest, None, model=model, pipeline=c.pipeline, encode=c.encode,
                                             head_kernels=c.head_kernels, save_probs=True, quiet=True, progress=False)
                        if rep:
                            times[c.key].append(report["timing"]["wall_s"])
                        reports[(c.key, load)] = report
            for c in configs:
                report, wall = reports[(c.key, load)], statistics.median(times[c.key])
                rows.append({"name": c.name, "pipeline": c.key, "busy_cores": load,
                             "runner": report["settings"]["runner"], "backbone": report["settings"]["encode"],
                             "head_kernels": report["settings"]["head_kernels"],
                             "wall_s": round(wall, 3), "frames": report["frames"]["valid"],
                             "frames_per_s": round(report["frames"]["valid"] / wall, 1),
                             "predictions": report["num_predictions"], "times_s": times[c.key]})
        checks = [_same_predictions(reports[("stream", 0)], r) for r in reports.values()]
        speedups = {load: {c.key: round(reports_wall(rows, "stream", load) / reports_wall(rows, c.key, load), 2)
                           for c in configs[1:]} for load in loads}
        result = {"bag": str(bag) if args.bag else "fresh demo test set (record)", "manifest": str(manifest_path),
                  "repeat": args.repeat, "rows": rows, "speedup_by_busy_cores": speedups,
                  "identical_predictions": all(c[0] for c in checks), "max_prob_diff": max(c[1] for c in checks)}
    return result


def _onnxruntime_encoder(model):
    """The ONNX Runtime backbone, made and warmed once (its dynamic-batch graph exported before
    any timing), or None without onnxruntime."""
    try:
        from ..deploy.backends import BackendUnavailable, create_encoder
        from ..deploy.export import sample_frames

        encoder = create_encoder("onnxruntime", model.backbone, device="cpu")
    except (ImportError, BackendUnavailable) as exc:
        console.print(f"[yellow]skipping the ONNX Runtime row: {exc}[/]")
        return None
    encoder.encode(sample_frames(2))
    return encoder


def reports_wall(rows: list[dict], pipeline: str, load: int) -> float:
    return next(r["wall_s"] for r in rows if r["pipeline"] == pipeline and r["busy_cores"] == load)


def main(args: argparse.Namespace) -> int:
    result = run(args)
    table = [[r["name"], r["busy_cores"], r["backbone"], f"{r['runner']} ({r['head_kernels']})", r["frames"],
              r["predictions"],
              f"{r['wall_s']:.3f}", f"{r['frames_per_s']:.0f}",
              f"{reports_wall(result['rows'], 'stream', r['busy_cores']) / r['wall_s']:.2f}x"]
             for r in result["rows"]]
    print_table("step-ros bench --suite replay (same bag, same model, one run, rows in turn)",
                ["row", "busy cores", "backbone", "heads", "frames", "predictions", "wall s (median)", "frames/s",
                 "speed vs stream, same load"], table)
    verdict = "identical" if result["identical_predictions"] else "DIFFERENT"
    console.print(f"predictions {verdict} (max probability difference {result['max_prob_diff']:.2e}, "
                  f"tolerance {ATOL:g})")
    out = Path(args.out)
    write_json(result, out / "bench_replay.json")
    console.print(f"wrote {out / 'bench_replay.json'}")
    return 0 if result["identical_predictions"] else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--suite replay")
    group.add_argument("--bag", default=None, help="bag to replay (default: record a fresh demo test set)")
    group.add_argument("--manifest", default=None, help="model manifest (default: the demo model)")
    group.add_argument("--per-class-bag", type=int, default=4, dest="bag_per_class",
                       help="videos per class in the recorded test set (known and unknown)")
    group.add_argument("--busy", type=int, default=1,
                       help="also run both rows with this many other processes spinning on the CPU (0: skip)")
