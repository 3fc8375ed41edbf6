"""One frozen backbone, any number of named heads: the model a manifest describes.

The backbone runs once per frame; every head reads the same window of tokens, so adding a
task costs one small head, not another backbone pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .backbone import Backbone, build_backbone
from .heads import create_head, default_num_heads, head_options
from .manifest import HeadSpec, Manifest, ManifestError

CHECKPOINT_FORMAT = "step_ros.head/1"


class CheckpointError(ValueError):
    """A head checkpoint is missing, unreadable, or does not fit its manifest entry."""


def resolved_options(spec: HeadSpec, dim: int) -> dict[str, Any]:
    """Head options with the defaults filled in (attention heads follow the backbone: D/64)."""
    opts = head_options(spec.kind, spec.options)
    if spec.kind != "linear":
        opts.setdefault("num_heads", default_num_heads(dim))
    return opts


def build_head(spec: HeadSpec, dim: int, frames: int, num_tokens: int) -> nn.Module:
    return create_head(spec.kind, dim, len(spec.labels), frames, num_tokens, resolved_options(spec, dim))


def save_head(
    head: nn.Module, spec: HeadSpec, path: str | Path, *, dim: int, frames: int, num_tokens: int,
    backbone: str = "", extra: dict[str, Any] | None = None,
) -> Path:
    """safetensors weights with the head's full config in the metadata (config beside weights)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "task": spec.task,
        "kind": spec.kind,
        "labels": json.dumps(spec.labels),
        "symmetric_pairs": json.dumps([list(p) for p in spec.symmetric_pairs]),
        "options": json.dumps(resolved_options(spec, dim)),
        "dim": str(dim),
        "frames": str(frames),
        "num_tokens": str(num_tokens),
        "backbone": backbone,
        **{k: str(v) for k, v in (extra or {}).items()},
    }
    state = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(path), metadata=meta)
    return path


def read_head_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_head_weights(head: nn.Module, spec: HeadSpec, path: Path) -> None:
    """Load a checkpoint into ``head`` after checking it was trained for this task and labels."""
    if not path.is_file():
        raise CheckpointError(f"heads[{spec.task}].checkpoint: {path} does not exist")
    try:
        state = load_file(str(path))
        meta = read_head_metadata(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if meta.get("format") == CHECKPOINT_FORMAT:
        if meta.get("kind") != spec.kind:
            raise CheckpointError(f"{path}: checkpoint is a {meta.get('kind')!r} head, manifest says {spec.kind!r}")
        labels = json.loads(meta.get("labels", "[]"))
        if labels != spec.labels:
            raise CheckpointError(
                f"{path}: checkpoint labels {labels} differ from the manifest's labels for task {spec.task!r} "
                f"{spec.labels} (order matters: it is the class index)"
            )
    expected = head.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match a {spec.kind!r} head (missing {missing}, unexpected {unexpected})")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(state[key].shape)}, the head for task {spec.task!r} "
                f"needs {tuple(tensor.shape)} (different backbone width, frames or number of labels?)"
            )
    head.load_state_dict(state, strict=True)


def backbone_from_manifest(manifest: Manifest) -> Backbone:
    spec = manifest.backbone
    backbone = build_backbone(
        spec.arch, spec.weights, random_seed=spec.random_seed, image_size=spec.image_size, overrides=spec.overrides
    )
    if spec.fingerprint:
        actual = backbone.fingerprint
        if actual != spec.fingerprint:
            raise ManifestError(
                f"backbone.fingerprint: the loaded backbone weights hash to {actual}, the manifest expects "
                f"{spec.fingerprint}; the heads were trained on other backbone weights"
            )
    return backbone


class MultiTaskModel(nn.Module):
    """Backbone + ``heads`` (a ModuleDict keyed by task)."""

    def __init__(self, manifest: Manifest, backbone: Backbone, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.manifest = manifest
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)

    @classmethod
    def from_manifest(
        cls, manifest: Manifest, *, backbone: Backbone | None = None, load_checkpoints: bool = True
    ) -> "MultiTaskModel":
        """Build the model; with ``load_checkpoints`` every head must have a checkpoint."""
        backbone = backbone or backbone_from_manifest(manifest)
        heads = {}
        for spec in manifest.heads:
            head = build_head(spec, backbone.dim, manifest.frames, backbone.num_patches)
            if load_checkpoints:
                if spec.checkpoint is None:
                    raise ManifestError(f"heads[{spec.task}].checkpoint: missing; the head has no trained weights")
                load_head_weights(head, spec, spec.checkpoint)
            heads[spec.task] = head.eval()
        return cls(manifest, backbone, heads)

    @property
    def tasks(self) -> list[str]:
        return list(self.heads.keys())

    def forward(self, window: torch.Tensor) -> dict[str, torch.Tensor]:
        """All heads on one shared window (B, T, 1 + n, D) -> {task: logits (B, C)}."""
        return {task: head(window) for task, head in self.heads.items()}


__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "MultiTaskModel",
    "backbone_from_manifest",
    "build_head",
    "load_head_weights",
    "read_head_metadata",
    "resolved_options",
    "save_head",
]
