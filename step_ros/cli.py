"""``step-ros`` / ``python -m step_ros``: one tool, one subcommand per job.

Imports are lazy so that ``step-ros --help`` is instant and ROS-free commands never load rclpy.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .resources import demo_manifest

DEMO_MANIFEST = demo_manifest()  # the checkout's, or share/step_ros's in a colcon install


def _train_config(args: argparse.Namespace):
    from .training.train import TrainConfig

    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       weight_decay=args.weight_decay, optimizer=args.optimizer, seed=args.seed, hflip=args.hflip,
                       early_stop=getattr(args, "early_stop", 0),
                       checkpoint_every=getattr(args, "checkpoint_every", TrainConfig.checkpoint_every))


def _runtime(args: argparse.Namespace):
    """Device, precision and (under torchrun) the process group; ranks other than 0 stay quiet."""
    from .console import console
    from .training.runtime import make_runtime

    runtime = make_runtime(args.device, args.precision, args.workers)
    args.runtime = runtime  # main() leaves the process group on the way out
    if not runtime.is_main:
        console.quiet = True
        logging.getLogger("step_ros").setLevel(logging.WARNING)
    return runtime


def _tokens(args: argparse.Namespace):
    from .training.jobs import TokenOptions

    return TokenOptions(frame_stride=args.frame_stride, dtype=args.token_dtype,
                        load=getattr(args, "load_tokens", "stream"))


def _add_train_args(p: argparse.ArgumentParser, hflip: bool = False) -> None:
    p.add_argument("--epochs", type=int, default=60, help="training epochs (paper: 60)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="clips per global batch, split across torchrun ranks (paper: 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, cosine annealed (paper: 1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.02)
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=hflip,
                   help="horizontal-flip augmentation (paper recipe) from cached mirrored tokens; only when a mirror "
                        "image keeps every label (no left/right classes)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="carve this fraction of each class's training videos (seeded) for validation; default: use "
                        "the annotations' `val` rows when there are any")
    p.add_argument("--early-stop", type=int, default=0, metavar="EPOCHS",
                   help="stop after this many epochs without a better validation score (0: never)")


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where it runs (also under torchrun: docs/SCALE.md)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: the GPU if there is one; "
                                                    "under torchrun each rank takes the GPU of its local rank)")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast for backbone and heads (auto: bf16 or fp16 on GPUs, fp32 on CPUs)")
    g.add_argument("--workers", type=int, default=1,
                   help="DataLoader worker processes per rank that decode videos / read tokens ahead (0: none)")


def _add_token_args(p: argparse.ArgumentParser, load: bool = False) -> None:
    g = p.add_argument_group("token cache")
    g.add_argument("--cache", type=Path, default=Path("runs/cache"), help="token cache folder")
    g.add_argument("--token-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="how tokens are stored (float16: half of float32, error 5e-4 relative)")
    g.add_argument("--frame-stride", type=int, default=1, metavar="K",
                   help="cache only every K-th frame of each segment (K must divide the frame interval): "
                        "K times less disk and extraction; clips start on that grid")
    if load:
        g.add_argument("--load-tokens", choices=["stream", "ram"], default="stream",
                       help="stream windows from the memory-mapped cache (memory O(batch)), or load every token "
                            "into RAM first (small datasets)")


def cmd_synth(args):
    from .data.synthetic import generate

    per_class = {"train": args.train, "val": args.val, "test": args.test}
    # the same actions over the same time at any frame rate: --num-frames is counted at 15 fps
    num_frames = max(2, round(args.num_frames * args.fps / 15.0))
    csv = generate(args.out, seed=args.seed, videos_per_class=per_class, unknown_per_class=args.unknown,
                   size=args.size, num_frames=num_frames, fps=args.fps)
    print(f"wrote {csv}")


def cmd_params(args):
    from .model.backbone import ARCHS
    from .model.heads import HEAD_KINDS, count_parameters, create_head, default_num_heads
    from .console import print_table

    rows = []
    for name in args.arch:
        arch = ARCHS[name]
        n = (args.image_size // arch.patch_size) ** 2
        counts = []
        for kind in HEAD_KINDS:
            opts = {} if kind == "linear" else {"num_heads": default_num_heads(arch.dim)}
            counts.append(count_parameters(create_head(kind, arch.dim, args.classes, args.frames, n, opts)))
        rows.append([name, arch.dim, *[f"{c / 1e6:.2f}M" for c in counts]])
    print_table(f"trainable head parameters ({args.classes} classes, {args.frames} frames)",
                ["backbone", "D", *HEAD_KINDS], rows)


def cmd_extract(args):
    from .training.jobs import extract_job

    extract_job(args.manifest, args.data, args.cache, split=args.split, hflip=args.hflip, runtime=_runtime(args),
                tokens=_tokens(args))


def cmd_train(args):
    from .training.jobs import train_job

    train_job(args.manifest, args.data, args.out, _train_config(args), kind=args.kind, cache_root=args.cache,
              split=args.split, runtime=_runtime(args), tokens=_tokens(args), val_fraction=args.val_fraction,
              resume=args.resume)


def cmd_evaluate(args):
    from .training.jobs import evaluate_job

    evaluate_job(args.manifest, args.data, args.out, split=args.split, num_clips=args.clips, cache_root=args.cache,
                 runtime=_runtime(args), tokens=_tokens(args), sampling=args.sampling)


def cmd_compare(args):
    from .training.jobs import compare_job

    compare_job(args.manifest, args.data, args.out, args.kinds.split(","), _train_config(args),
                cache_root=args.cache, num_clips=args.clips, runtime=_runtime(args), tokens=_tokens(args),
                val_fraction=args.val_fraction)


def _import_options(args):
    from .data.importers import ImportOptions

    return ImportOptions(protocol=args.protocol, view=args.view, fraction=args.fraction, seed=args.seed,
                         skip_missing=args.skip_missing)


def _add_import_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help="ntu60, ntu120, ikea_asm, drive_and_act or ssv2 (docs/datasets/)")
    p.add_argument("--root", type=Path, required=True, help="the dataset as downloaded (docs/datasets/<DATASET>.md)")
    p.add_argument("--protocol", default=None, help="the dataset's protocol / split (default: its standard one)")
    p.add_argument("--view", default=None, help="camera view, where the dataset has several")
    p.add_argument("--fraction", type=float, default=None,
                   help="Something-Something v2 low-data protocol: share of each class to train on (0.05, 0.10, 0.25)")
    p.add_argument("--skip-missing", action="store_true",
                   help="leave out listed videos that are absent (counted and reported) instead of stopping")


def cmd_import(args):
    from .console import console
    from .data.importers import run_import

    _, summary = run_import(args.dataset, args.root, args.out, _import_options(args))
    splits = ", ".join(f"{s}: {v['rows']}" for s, v in summary["splits"].items())
    classes = ", ".join(f"{t} {n} classes" for t, n in summary["classes"].items())
    pairs = ", ".join(f"{t} {n} pairs" for t, n in summary["pairs"].items()) or "no pairs file"
    console.print(f"{args.dataset} ({summary['protocol']}): {summary['rows']} samples ({splits}); {classes}; {pairs}")
    if summary["missing_videos"]:
        console.print(f"left out {summary['missing_videos']} listed videos that are missing (see import.json)")
    console.print(f"wrote {args.out}/annotations.csv, labels.yaml, pairs.yaml, import.json")


def cmd_benchmark(args):
    from .benchmark import RECIPES, run_benchmark

    if args.optimizer is None:
        args.optimizer = RECIPES.get(args.dataset, {}).get("optimizer", "adamw")
    run_benchmark(args.dataset, args.root, args.out, _import_options(args), arch=args.arch, weights=args.weights,
                  random_seed=args.random_weights, template=args.template, kinds=args.kinds.split(","),
                  config=_train_config(args), runtime=_runtime(args), tokens=_tokens(args), num_clips=args.clips,
                  val_fraction=args.val_fraction, cache_root=args.cache)


def cmd_migrate_cache(args):
    from .console import console
    from .training.cache import migrate

    done = migrate(args.cache, args.token_dtype)
    if not done:
        console.print(f"nothing to migrate under {args.cache}: no folder of the old float32 format")
    for folder in done:
        console.print(f"migrated {folder} to {args.token_dtype} tokens (format 2)")


def cmd_demo(args):
    from .demo import run_demo

    return run_demo(args)


def cmd_reproduce_demo(args):
    from .demo import reproduce_demo_model

    reproduce_demo_model(args.out, args.work, _train_config(args), runtime=_runtime(args), tokens=_tokens(args),
                         val_fraction=args.val_fraction)


def _lazy(module: str, func: str):
    def run(args):
        import importlib

        return getattr(importlib.import_module(module, __package__), func)(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    from .data.synthetic import DEFAULT_VIDEOS_PER_CLASS

    parser = argparse.ArgumentParser(
        prog="step-ros", description="step_ros: order-aware human action perception (STEP heads on frozen DINOv2)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    def add(name: str, func, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    def common(p, manifest_required=True, data=True, load=False):
        p.add_argument("--manifest", type=Path, required=manifest_required, default=None if manifest_required
                       else DEMO_MANIFEST, help="model manifest (YAML)")
        if data:
            p.add_argument("--data", type=Path, required=True,
                           help="annotation CSV or folder-per-class root (docs/DATA_FORMAT.md)")
        _add_token_args(p, load=load)
        _add_runtime_args(p)

    p = add("demo", cmd_demo, "main job: play a fresh synthetic demo bag to the live ROS node (or --offline)")
    p.add_argument("--offline", action="store_true", help="no ROS: evaluate the demo model on a fresh test set")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--per-class", type=int, default=None,
                   help="fresh test videos per class and context (default: 1 live, 4 offline)")
    p.add_argument("--rate", type=float, default=2.0,
                   help="bag playback rate factor (live demo); lowered when the calibration finds the node too slow")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the node on this machine first and play slower if it would not keep up")
    p.add_argument("--context", choices=["known", "unknown"], default=None, help="only this context (live demo)")
    p.add_argument("--manifest", type=Path, default=None, help="model manifest (default: models/demo)")
    p.add_argument("--node-param", action="append", default=[], metavar="NAME:=VALUE",
                   help="extra node parameter for the live demo, e.g. backend:=onnxruntime")

    p = add("synth", cmd_synth, "generate the synthetic nearly-symmetric benchmark (videos + annotations.csv)")
    p.add_argument("--out", type=Path, default=Path("data/synthetic"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=DEFAULT_VIDEOS_PER_CLASS["train"], help="training videos per class")
    p.add_argument("--val", type=int, default=DEFAULT_VIDEOS_PER_CLASS["val"])
    p.add_argument("--test", type=int, default=DEFAULT_VIDEOS_PER_CLASS["test"],
                   help="known-context test videos per class")
    p.add_argument("--unknown", type=int, default=8, help="unknown-context test videos per class")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--num-frames", type=int, default=40, help="frames per video at 15 fps (the action's duration)")
    p.add_argument("--fps", type=float, default=15.0,
                   help="frame rate: the same actions over the same time, rendered with fps/15 times the frames")

    p = add("params", cmd_params, "print trainable parameter counts of every head kind")
    p.add_argument("--arch", nargs="+", default=["dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14"])
    p.add_argument("--classes", type=int, default=34)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)

    p = add("extract", cmd_extract, "run the frozen backbone once per frame and cache tokens (resumable)")
    common(p)
    p.add_argument("--split", default=None)
    p.add_argument("--hflip", action="store_true", help="also cache the mirrored frames' tokens (for train --hflip)")

    p = add("train", cmd_train, "train the manifest's heads on cached tokens (paper recipe)")
    common(p, load=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--kind", default=None, help="train every head as this kind (step, attentive, ...)")
    p.add_argument("--split", default="train")
    _add_train_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its checkpoint (same options)")
    p.add_argument("--checkpoint-every", type=int, default=500, metavar="STEPS",
                   help="steps between resume checkpoints (one is also written every epoch and on Ctrl-C)")

    p = add("evaluate", cmd_evaluate, "accuracy overall / symmetric / reversed / shuffled, per task and class")
    common(p, load=True)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--clips", type=int, default=3, help="temporal views per video (16x3)")
    p.add_argument("--sampling", choices=["auto", "time", "frames"], default="auto",
                   help="clips by time (every sample_period_s of the manifest, each video at its own rate) or "
                        "every frame_interval-th frame")

    p = add("compare", cmd_compare, "train + evaluate each head kind on the same data (the papers' table)")
    common(p, load=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--kinds", default="step,attentive,self_attention,linear")
    p.add_argument("--clips", type=int, default=3)
    _add_train_args(p)

    p = add("import", cmd_import, "a public dataset in its publisher's layout -> annotations.csv, labels, pairs")
    _add_import_args(p)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0, help="seed of the low-data sampling")

    p = add("benchmark", cmd_benchmark,
            "the papers' comparison on a public dataset: import, extract, train and evaluate each head kind")
    _add_import_args(p)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--arch", choices=["vits14", "vitb14"], default="vitb14", help="DINOv2 size (papers: ViT-B/14)")
    w = p.add_mutually_exclusive_group(required=True)
    w.add_argument("--weights", type=Path, help="DINOv2 checkpoint: a Meta .pth or a Hugging Face folder")
    w.add_argument("--random-weights", type=int, metavar="SEED",
                   help="seeded random backbone: a smoke test of the pipeline, its figures mean nothing")
    p.add_argument("--template", type=Path, default=None,
                   help="model template (default: models/templates/<dataset>_<arch>.yaml)")
    p.add_argument("--kinds", default="step,attentive,self_attention,linear")
    p.add_argument("--clips", type=int, default=3, help="temporal views per video at test time (papers: 3)")
    _add_train_args(p)
    p.set_defaults(optimizer=None)  # the dataset's recipe (SGD on NTU, AdamW elsewhere) unless given
    _add_token_args(p, load=True)
    _add_runtime_args(p)

    p = add("reproduce-demo", cmd_reproduce_demo, "regenerate models/demo from scratch (data, cache, training)")
    p.add_argument("--out", type=Path, default=DEMO_MANIFEST.parent)
    p.add_argument("--work", type=Path, default=Path("runs/reproduce-demo"),
                   help="where the synthetic data and the token cache (<work>/cache) go")
    _add_train_args(p, hflip=True)
    g = p.add_argument_group("token cache")
    g.add_argument("--token-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    g.add_argument("--frame-stride", type=int, default=1, metavar="K", help="cache every K-th frame only")
    _add_runtime_args(p)

    p = add("migrate-cache", cmd_migrate_cache, "convert a float32 token cache (format 1) in place to format 2")
    p.add_argument("--cache", type=Path, default=Path("runs/cache"), help="token cache folder")
    p.add_argument("--token-dtype", default="float16", choices=["float16", "bfloat16", "float32"])

    # Subcommands whose arguments live beside their implementation (add_arguments/main).
    import importlib

    for name, module, help_ in MODULE_COMMANDS:
        p = add(name, _lazy(module, "main"), help_)
        importlib.import_module(module, __package__).add_arguments(p)
    return parser


#: (subcommand, module with add_arguments(parser) and main(args), help).  The modules import
#: their heavy dependencies (rclpy, rosbags, onnxruntime) inside main, so --help stays cheap.
MODULE_COMMANDS: list[tuple[str, str, str]] = [
    ("record", ".bags.record", "turn an annotated video set into a rosbag2 (MCAP or sqlite3) with ground truth"),
    ("diff-eval", ".training.paired",
     "is evaluation B better than A, or noise? paired over the same test clips, or over several training runs "
     "of each recipe (--vs), with a 95 percent interval"),
    ("replay-eval", ".bags.replay", "run the node's pipeline offline over a bag and score it against ground truth"),
    ("play", ".bags.play", "publish a bag's images on their topics in real time (ROS 2)"),
    ("soak", ".ros.soak", "soak benchmark: thousands of frames through the live node over DDS"),
    ("export", ".deploy.cli", "export backbone and heads to ONNX (checked against PyTorch), optional int8"),
    ("bench", ".deploy.bench", "benchmarks: streaming vs clip, 1 vs 3 heads, reference vs fast heads, torch vs ORT"),
    ("doctor", ".doctor", "check an install: ROS, messages, torch, GPU, backends, the model, the engine cache"),
]


def _message(exc: BaseException) -> str:
    """The user's line of an error; one raised in a DataLoader worker arrives wrapped in its
    traceback text, whose last line is the original ``Type: message``."""
    text = str(exc)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .model.device import flush_denormals

    if getattr(args, "flush_denormals", True):  # (step-ros bench --no-flush-denormals measures without)
        flush_denormals()  # before any PyTorch op starts its worker threads, so that they inherit it
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("step_ros").setLevel(logging.DEBUG if args.verbose else logging.INFO)  # not third parties
    from .training.train import TrainingInterrupted

    try:
        result = args.func(args)
    except (KeyboardInterrupt, TrainingInterrupted) as exc:
        if str(exc):
            print(f"step-ros {args.command}: {exc}", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, ImportError) as exc:  # ImportError: a missing backend or extra
        if args.verbose:
            raise
        rank = getattr(args, "runtime", None)
        who = f" (rank {rank.rank})" if rank is not None and rank.distributed else ""
        print(f"step-ros {args.command}{who}: error: {_message(exc)}", file=sys.stderr)
        return 2
    finally:
        from .training.runtime import shutdown

        shutdown(getattr(args, "runtime", None))
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
