"""``step-ros bench --suite data``: the training pipeline at scale, old against new, in one run.

Every figure is measured by running the real commands (``step-ros extract`` / ``train``, and
``torchrun`` for the 2-process rows) as child processes on the same synthetic videos:

1. cache bytes per frame: float32 files (format 1's dtype) against float16, and float16 with
   frame stride 2 (bytes per *video* frame);
2. peak memory of ``train`` at two dataset sizes ``--scale`` apart, tokens in RAM (float32,
   the old path) against streamed (float16); proportional set size summed over the process
   tree, so DataLoader workers count once for what they share;
3. training throughput, windows/s, streamed against in RAM, for STEP heads (compute-bound) and
   linear heads (the input pipeline alone);
4. extraction frames/s: one process with 2 threads against ``torchrun`` 2 processes x 1 thread.

The backbone has the real DINOv2 ViT-S/14 token shape at 224 px (257 tokens x 384) but only
``--layers`` transformer layers (default 1 of 12), to keep extraction cheap: tokens cost the
same to store, read and train on whatever the depth.  Random weights: no figure here depends
on weight values.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from ..console import console, print_table, write_json


def _tree_memory(pid: int) -> tuple[float, float]:
    """(PSS of the process and its descendants, RSS of the process alone), in MiB."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
        rss = root.memory_info().rss
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    pss = 0
    for p in procs:
        try:
            pss += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pss / 2**20, rss / 2**20


def run_measured(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
                 interval: float = 0.05) -> dict:
    """Run ``cmd``, sampling memory every ``interval`` s; wall time, peaks and the output tail."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peaks = {"pss": 0.0, "rss": 0.0}
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        pss, rss = _tree_memory(proc.pid)
        peaks["pss"], peaks["rss"] = max(peaks["pss"], pss), max(peaks["rss"], rss)
        time.sleep(interval)
    reader.join()
    seconds = time.perf_counter() - start
    if proc.returncode:
        tail = "".join(output)[-3000:]
        raise RuntimeError(f"benchmark step failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return {"seconds": seconds, "peak_pss_mib": peaks["pss"], "peak_rss_main_mib": peaks["rss"]}


def bench_manifest(arch: str, layers: int, image_size: int, frames: int, interval: int) -> dict:
    from ..data.synthetic import ATOMIC_ACTIONS, FINE_ACTIONS, OBJECTS, SYMMETRIC_PAIRS

    return {
        "name": f"bench-data-{arch}-{layers}layer",
        "backbone": {"arch": arch, "random_seed": 0, "image_size": image_size, "overrides": {"num_layers": layers}},
        "frames": frames,
        "frame_interval": interval,
        "heads": [
            {"task": "fine_action", "labels": FINE_ACTIONS, "symmetric_pairs": [list(p) for p in SYMMETRIC_PAIRS]},
            {"task": "atomic_action", "labels": ATOMIC_ACTIONS},
            {"task": "object_in_use", "labels": OBJECTS},
        ],
    }


def _subset_csv(full: Path, out: Path, per_class: int) -> int:
    """The first ``per_class`` videos of each fine_action class (the smaller dataset)."""
    with full.open() as f:
        rows = list(csv.DictReader(f))
    kept, seen = [], {}
    for row in rows:
        label = row["fine_action"]
        if seen.get(label, 0) < per_class:
            seen[label] = seen.get(label, 0) + 1
            row = {**row, "video": str((full.parent / row["video"]).resolve())}
            kept.append(row)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    return len(kept)


def _cache_bytes(folder: Path) -> tuple[int, int]:
    """(bytes, cached rows) of every token file under ``folder``."""
    from safetensors import safe_open

    total, rows = 0, 0
    for path in folder.rglob("*.safetensors"):
        total += path.stat().st_size
        with safe_open(str(path), "pt") as f:
            rows += f.get_slice("tokens").get_shape()[0]
    return total, rows


def run_data_bench(args: argparse.Namespace) -> dict:
    from ..data.synthetic import generate

    work = Path(args.work)
    for stale in ("c32", "c16", "x1", "x2", "xs2", "runs"):  # every figure from this run, nothing cached
        shutil.rmtree(work / stale, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    manifest = work / "manifest.yaml"
    manifest.write_text(yaml.safe_dump(bench_manifest(args.arch, args.layers, args.image_size, args.frames,
                                                      args.interval)))
    span = (args.frames - 1) * args.interval + 1
    num_frames = max(args.video_frames, span)
    large_per_class = args.per_class * args.scale
    console.print(f"bench data: {large_per_class} and {args.per_class} videos per class, {num_frames} frames each")
    big = generate(work / "videos", seed=0, videos_per_class={"train": large_per_class, "val": 0, "test": 0},
                   unknown_per_class=0, size=args.video_size, num_frames=num_frames, progress=True)
    small = work / "small.csv"
    n_small = _subset_csv(big, small, args.per_class)
    n_large = _subset_csv(big, work / "large.csv", large_per_class)
    if n_small < args.batch_size:  # the memory peaks would compare a part batch with full ones
        raise SystemExit(f"--per-class {args.per_class} gives {n_small} small-set videos, fewer than --batch-size "
                         f"{args.batch_size}: raise --per-class or lower --batch-size so that both sets train on "
                         "full batches")
    large = work / "large.csv"
    env2 = {"OMP_NUM_THREADS": str(args.threads)}
    base = [py, "-m", "step_ros"]
    common = ["--manifest", str(manifest), "--workers", str(args.workers)]
    rows: list[dict] = []
    figures: dict = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                if k not in ("func", "runtime")},
                     "datasets": {"small_videos": n_small, "large_videos": n_large, "frames_per_video": num_frames}}

    # 1. the caches of the large set: float32 (format 1's dtype, for the in-RAM path) and float16
    # 4. extraction speed on the small set: 1 process x 2 threads against torchrun 2 x 1 thread
    extractions = {}
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "step_ros"]
    for name, data, cache, extra, launcher in [
        ("float32, large set", large, "c32", ["--token-dtype", "float32"], base),
        ("float16, large set", large, "c16", [], base),
        ("float16, 1 process x 2 threads", small, "x1", [], base),
        ("float16, torchrun 2 processes x 1 thread", small, "x2", [], torchrun),
        ("float16, frame stride 2, 1 process x 2 threads", small, "xs2", ["--frame-stride", "2"], base),
    ]:
        console.print(f"extract: {name}")
        m = run_measured([*launcher, "extract", *common, "--data", str(data), "--cache", str(work / cache), *extra],
                         env=env2 if launcher is base else {"OMP_NUM_THREADS": "1"})
        size, cached = _cache_bytes(work / cache)
        frames_in = (n_large if data == large else n_small) * num_frames
        extractions[name] = {**m, "bytes": size, "cached_rows": cached, "video_frames": frames_in,
                             "frames_per_s": frames_in / m["seconds"]}
    s1 = extractions["float16, 1 process x 2 threads"]
    per_frame = {name: e["bytes"] / e["video_frames"] for name, e in extractions.items()}
    base32 = per_frame["float32, large set"]
    rows.append({"group": "cache bytes per frame", "name": "float32 (format 1)", "value": base32, "unit": "B/frame",
                 "baseline": "float32", "ratio": 1.0})
    rows.append({"group": "cache bytes per frame", "name": "float16", "value": per_frame["float16, large set"],
                 "unit": "B/frame", "baseline": "float32", "ratio": per_frame["float16, large set"] / base32})
    rows.append({"group": "cache bytes per frame", "name": "float16, frame stride 2 (per video frame)",
                 "value": per_frame["float16, frame stride 2, 1 process x 2 threads"], "unit": "B/frame",
                 "baseline": "float32",
                 "ratio": per_frame["float16, frame stride 2, 1 process x 2 threads"] / base32})
    for name in ("float16, 1 process x 2 threads", "float16, torchrun 2 processes x 1 thread",
                 "float16, frame stride 2, 1 process x 2 threads"):
        e = extractions[name]
        rows.append({"group": "extraction", "name": name.removeprefix("float16, "), "value": e["frames_per_s"],
                     "unit": "video frames/s", "baseline": "1 process x 2 threads",
                     "ratio": e["frames_per_s"] / s1["frames_per_s"]})

    # 2 + 3. training: memory at two sizes, throughput; old path (RAM, float32) vs streamed (float16)
    paths = {"in RAM, float32 (old path)": ["--load-tokens", "ram", "--token-dtype", "float32", "--cache",
                                            str(work / "c32")],
             "streamed, float16": ["--load-tokens", "stream", "--cache", str(work / "c16")]}
    train_runs = {}
    # The small set is one batch: it trains --scale epochs, so both sizes make as many optimizer
    # steps and the peaks compare steady states (the first step allocates the optimizer's state).
    for kind in ("step", "linear"):
        for size_name, data in (("small", small), ("large", large)):
            if kind == "linear" and size_name == "small":
                continue
            epochs = args.epochs * (args.scale if size_name == "small" else 1)
            for path_name, extra in paths.items():
                out = work / "runs" / f"{kind}-{size_name}-{path_name.split(',')[0].replace(' ', '_')}"
                console.print(f"train: {kind} heads, {size_name} dataset, tokens {path_name}")
                m = run_measured([*base, "train", *common, "--data", str(data), "--out", str(out), "--kind", kind,
                                  "--epochs", str(epochs), "--batch-size", str(args.batch_size), *extra], env=env2)
                log = json.loads((out / "train_log.json").read_text())
                last = log["epochs"][-1]
                train_runs[(kind, size_name, path_name)] = {**m, "windows_per_s": last["windows_per_s"],
                                                           "epoch_seconds": last["seconds"]}
    old, new = paths
    for path_name in paths:
        for size_name, n in (("small", n_small), ("large", n_large)):
            r = train_runs[("step", size_name, path_name)]
            rows.append({"group": "train peak memory (PSS, process tree)", "name": f"{path_name}, {n} videos",
                         "value": r["peak_pss_mib"], "unit": "MiB", "baseline": f"{path_name}, {n_small} videos",
                         "ratio": r["peak_pss_mib"] / train_runs[("step", "small", path_name)]["peak_pss_mib"],
                         "peak_rss_main_mib": r["peak_rss_main_mib"]})
    streamed, in_ram = train_runs[("step", "large", new)], train_runs[("step", "large", old)]
    rows.append({"group": "train peak memory (PSS, process tree)",
                 "name": f"streamed against old path, {n_large} videos", "value": streamed["peak_pss_mib"],
                 "unit": "MiB", "baseline": f"{old}, {n_large} videos",
                 "ratio": streamed["peak_pss_mib"] / in_ram["peak_pss_mib"]})
    for kind in ("step", "linear"):
        b = train_runs[(kind, "large", old)]["windows_per_s"]
        for path_name in paths:
            v = train_runs[(kind, "large", path_name)]["windows_per_s"]
            rows.append({"group": f"train throughput, {kind} heads", "name": path_name, "value": v,
                         "unit": "windows/s", "baseline": old, "ratio": v / b})
    figures["rows"] = rows
    figures["extractions"] = extractions
    figures["train_runs"] = {" | ".join(k): v for k, v in train_runs.items()}
    return figures


def print_data_bench(result: dict) -> None:
    d = result["datasets"]
    table = [[r["group"], r["name"], f"{r['value']:,.1f} {r['unit']}", f"x{r['ratio']:.3f}", r["baseline"]]
             for r in result["rows"]]
    print_table(f"step-ros bench --suite data ({d['small_videos']} / {d['large_videos']} videos of "
                f"{d['frames_per_video']} frames; same run)", ["group", "row", "value", "ratio", "baseline"], table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("--suite data")
    g.add_argument("--layers", type=int, default=1, help="transformer layers of the backbone (real token shape)")
    g.add_argument("--per-class", type=int, default=2,
                   help="videos per class of the smaller dataset (16 classes; 2 give one full batch of 32)")
    g.add_argument("--scale", type=int, default=10, help="the larger dataset has this many times more videos")
    g.add_argument("--video-frames", type=int, default=32, help="frames per synthetic video")
    g.add_argument("--video-size", type=int, default=128, help="synthetic video side in pixels")
    g.add_argument("--epochs", type=int, default=1, help="training epochs per run (throughput of the last)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--workers", type=int, default=1, help="DataLoader workers of every run")
    g.add_argument("--work", type=Path, default=Path("runs/bench-data"), help="videos, caches and runs go here")


def main(args: argparse.Namespace) -> int:
    result = run_data_bench(args)
    print_data_bench(result)
    path = write_json(result, Path(args.out) / "bench_data.json")
    console.print(f"wrote {path}")
    return 0


__all__ = ["add_arguments", "bench_manifest", "main", "print_data_bench", "run_data_bench", "run_measured"]
