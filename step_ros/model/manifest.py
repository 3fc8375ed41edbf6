"""The model manifest: the one file a user edits to describe a deployed model.

```yaml
name: my-cell
backbone:
  arch: dinov2_vits14          # registry name (step_ros.model.backbone.ARCHS)
  weights: dinov2_vits14_pretrain.pth   # Meta .pth or Hugging Face folder; relative to this file
  # random_seed: 0             # instead of weights: explicit random-weights mode
  image_size: 224
frames: 16                     # T, frames per window
frame_interval: 2              # sample every k-th frame of the training videos
sample_period_s: 0.0667        # the time between two samples: frame_interval / the videos' fps
                               # (filled in by `train`); the node samples cameras by time
heads:
  - task: fine_action
    kind: step                 # step | attentive | self_attention | linear
    labels: [pick_up, put_down, wave]
    symmetric_pairs: [[pick_up, put_down]]
    checkpoint: heads/fine_action.safetensors
    options: {num_heads: 6}
```

Validation happens on load; every error names the file and the field (``heads[1].labels``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .heads import HEAD_KINDS


#: ``interval``: T frames one sample period apart (a camera stream); ``uniform``: one frame from
#: each of T equal segments of the whole video (the papers' NTU protocol, offline only).
CLIP_SAMPLINGS = ("interval", "uniform")


class ManifestError(ValueError):
    """A manifest is missing a field or has a bad value; the message names the field."""


@dataclass
class BackboneSpec:
    arch: str
    weights: Path | None = None
    random_seed: int | None = None
    image_size: int = 224
    overrides: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | None = None

    def to_dict(self, base: Path | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"arch": self.arch, "image_size": self.image_size}
        if self.weights is not None:
            out["weights"] = _relative(self.weights, base)
        if self.random_seed is not None:
            out["random_seed"] = self.random_seed
        if self.overrides:
            out["overrides"] = dict(self.overrides)
        if self.fingerprint:
            out["fingerprint"] = self.fingerprint
        return out


@dataclass
class HeadSpec:
    task: str
    kind: str
    labels: list[str]
    symmetric_pairs: list[tuple[str, str]] = field(default_factory=list)
    checkpoint: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def index(self, label: str) -> int:
        """Class index of ``label``; unknown labels are an error naming the task."""
        try:
            return self.labels.index(label)
        except ValueError:
            raise ManifestError(f"label {label!r} is not in the labels of task {self.task!r}") from None

    def counterpart(self, label: str) -> str | None:
        """The other label of ``label``'s nearly symmetric pair, if it has one."""
        for a, b in self.symmetric_pairs:
            if label == a:
                return b
            if label == b:
                return a
        return None

    @property
    def symmetric_labels(self) -> set[str]:
        return {x for pair in self.symmetric_pairs for x in pair}

    def to_dict(self, base: Path | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task, "kind": self.kind, "labels": list(self.labels)}
        if self.symmetric_pairs:
            out["symmetric_pairs"] = [list(p) for p in self.symmetric_pairs]
        if self.checkpoint is not None:
            out["checkpoint"] = _relative(self.checkpoint, base)
        if self.options:
            out["options"] = dict(self.options)
        return out


@dataclass
class Manifest:
    backbone: BackboneSpec
    heads: list[HeadSpec]
    frames: int = 16
    frame_interval: int = 2
    #: Seconds between two samples of a window, as trained (frame_interval / the training videos'
    #: frame rate).  None: an old manifest; cameras are then sampled every frame_interval-th frame.
    sample_period_s: float | None = None
    #: How training and evaluation draw a clip from a video: ``interval`` (T frames, one every
    #: sample period: what a camera stream gives, the default) or ``uniform`` (T equal segments
    #: of the whole video, one frame each: the papers' NTU protocol; offline only).
    clip_sampling: str = "interval"
    name: str = "model"
    description: str = ""
    path: Path | None = None

    def head(self, task: str) -> HeadSpec:
        for h in self.heads:
            if h.task == task:
                return h
        raise ManifestError(f"no head for task {task!r}; tasks: {', '.join(self.tasks)}")

    @property
    def tasks(self) -> list[str]:
        return [h.task for h in self.heads]

    def to_dict(self, base: Path | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out.update(
            backbone=self.backbone.to_dict(base),
            frames=self.frames,
            frame_interval=self.frame_interval,
        )
        if self.sample_period_s is not None:
            out["sample_period_s"] = round(float(self.sample_period_s), 9)
        if self.clip_sampling != "interval":
            out["clip_sampling"] = self.clip_sampling
        out["heads"] = [h.to_dict(base) for h in self.heads]
        return out

    def save(self, path: str | Path) -> Path:
        """Write YAML; paths are stored relative to the manifest's folder."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(path.parent.resolve()), sort_keys=False, width=100))
        self.path = path
        return path


def _relative(p: Path, base: Path | None) -> str:
    if base is None:
        return str(p)
    try:
        return str(Path(p).resolve().relative_to(base))
    except ValueError:
        return str(p)


class _Fields:
    """Typed access to a mapping that reports the dotted field name on error."""

    def __init__(self, data: Any, where: str, source: str) -> None:
        if not isinstance(data, dict):
            raise ManifestError(f"{source}: {where or 'manifest'} must be a mapping, got {type(data).__name__}")
        self.data, self.where, self.source = data, where, source

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, message: str) -> ManifestError:
        return ManifestError(f"{self.source}: {self.name(key)}: {message}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., positive: bool = False) -> Any:
        if key not in self.data or self.data[key] is None:
            if default is ...:
                raise self.fail(key, "missing (required field)")
            return default
        value = self.data[key]
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(key, f"must be {names}, got {value!r}")
        if positive and value <= 0:
            raise self.fail(key, f"must be positive, got {value}")
        return value

    def unknown(self, allowed: set[str]) -> None:
        extra = sorted(set(self.data) - allowed)
        if extra:
            raise self.fail(extra[0], f"unknown field (allowed: {', '.join(sorted(allowed))})")


def _path(value: str | None, base: Path) -> Path | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def parse_manifest(data: Any, base: Path, source: str = "manifest") -> Manifest:
    """Validate a manifest mapping; relative paths resolve against ``base``."""
    top = _Fields(data, "", source)
    top.unknown({"name", "description", "backbone", "frames", "frame_interval", "sample_period_s", "clip_sampling",
                 "heads"})
    bb = _Fields(top.get("backbone", dict), "backbone", source)
    bb.unknown({"arch", "weights", "random_seed", "image_size", "overrides", "fingerprint"})
    from .backbone import ARCHS

    arch = bb.get("arch", str)
    if arch not in ARCHS:
        raise bb.fail("arch", f"unknown architecture {arch!r} (known: {', '.join(ARCHS)})")
    weights = bb.get("weights", str, None)
    seed = bb.get("random_seed", int, None)
    if weights is None and seed is None:
        raise bb.fail("weights", "missing: give a checkpoint path, or random_seed for random weights on purpose")
    if weights is not None and seed is not None:
        raise bb.fail("random_seed", "give either weights or random_seed, not both")
    backbone = BackboneSpec(
        arch=arch,
        weights=_path(weights, base),
        random_seed=seed,
        image_size=bb.get("image_size", int, 224, positive=True),
        overrides=bb.get("overrides", dict, {}),
        fingerprint=bb.get("fingerprint", str, None),
    )
    frames = top.get("frames", int, 16, positive=True)
    interval = top.get("frame_interval", int, 1, positive=True)
    period = top.get("sample_period_s", (int, float), None, positive=True)
    clip_sampling = top.get("clip_sampling", str, "interval")
    if clip_sampling not in CLIP_SAMPLINGS:
        raise top.fail("clip_sampling", f"must be one of {', '.join(CLIP_SAMPLINGS)}, got {clip_sampling!r}")
    raw_heads = top.get("heads", list)
    if not raw_heads:
        raise top.fail("heads", "needs at least one head")
    heads: list[HeadSpec] = []
    for i, raw in enumerate(raw_heads):
        h = _Fields(raw, f"heads[{i}]", source)
        h.unknown({"task", "kind", "labels", "symmetric_pairs", "checkpoint", "options"})
        task = h.get("task", str)
        if task in {x.task for x in heads}:
            raise h.fail("task", f"duplicate task {task!r}")
        kind = h.get("kind", str, "step")
        if kind not in HEAD_KINDS:
            raise h.fail("kind", f"unknown head kind {kind!r} (known: {', '.join(HEAD_KINDS)})")
        labels = h.get("labels", list)
        if len(labels) < 2:
            raise h.fail("labels", "needs at least two labels")
        for j, label in enumerate(labels):
            if not isinstance(label, str) or not label:
                raise h.fail(f"labels[{j}]", f"must be a non-empty string, got {label!r}")
        if len(set(labels)) != len(labels):
            dup = next(x for x in labels if labels.count(x) > 1)
            raise h.fail("labels", f"duplicate label {dup!r}")
        pairs: list[tuple[str, str]] = []
        for j, pair in enumerate(h.get("symmetric_pairs", list, [])):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise h.fail(f"symmetric_pairs[{j}]", f"must be a pair of labels, got {pair!r}")
            for label in pair:
                if label not in labels:
                    raise h.fail(f"symmetric_pairs[{j}]", f"label {label!r} is not in labels")
            pairs.append((pair[0], pair[1]))
        heads.append(
            HeadSpec(
                task=task,
                kind=kind,
                labels=list(labels),
                symmetric_pairs=pairs,
                checkpoint=_path(h.get("checkpoint", str, None), base),
                options=h.get("options", dict, {}),
            )
        )
    return Manifest(
        backbone=backbone,
        heads=heads,
        frames=frames,
        frame_interval=interval,
        sample_period_s=None if period is None else float(period),
        clip_sampling=clip_sampling,
        name=top.get("name", str, "model"),
        description=top.get("description", str, ""),
    )


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest file (YAML or JSON; JSON is valid YAML)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML/JSON: {exc}") from None
    manifest = parse_manifest(data, path.parent.resolve(), str(path))
    manifest.path = path
    return manifest


__all__ = ["BackboneSpec", "CLIP_SAMPLINGS", "HeadSpec", "Manifest", "ManifestError", "load_manifest",
           "parse_manifest"]
