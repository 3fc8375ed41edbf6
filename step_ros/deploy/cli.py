"""``step-ros export``: the manifest's backbone and heads to ONNX, each checked against PyTorch."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", type=Path, required=True, help="trained model manifest")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <manifest dir>/onnx)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--int8", action="store_true", help="also write a dynamically quantised int8 backbone")
    parser.add_argument("--no-heads", action="store_true", help="export the backbone only")


def main(args: argparse.Namespace) -> int:
    from ..model.manifest import load_manifest
    from ..model.multitask import MultiTaskModel
    from ..console import print_table
    from .export import export_backbone, export_heads, quantize_int8

    model = MultiTaskModel.from_manifest(load_manifest(args.manifest))
    out = args.out or args.manifest.parent / "onnx"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    result = export_backbone(model.backbone, out / "backbone.onnx", args.opset, fingerprint=model.backbone.fingerprint)
    for r in [result] + ([] if args.no_heads else [export_heads(model, out / "heads.onnx", args.opset)]):
        for output, err in r.max_abs_error.items():
            rows.append([r.path.name, output, f"{err:.2e}", f"{r.seconds:.1f}"])
    if args.int8:
        path = quantize_int8(out / "backbone.onnx", out / "backbone.int8.onnx")
        rows.append([path.name, "tokens", "accuracy cost: `step-ros bench`", "-"])
    print_table(f"ONNX export to {out} (max abs error vs PyTorch on real inputs)",
                ["file", "output", "max abs err", "s"], rows)
    return 0
