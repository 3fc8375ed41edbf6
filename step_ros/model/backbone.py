"""Frozen DINOv2 backbone on Hugging Face ``transformers`` (the one forward implementation).

Why transformers: it is maintained, runs on the CPU torch here, exports to ONNX and loads
Hugging Face safetensors folders directly.  Meta's ``dinov2_vit*14*_pretrain.pth`` state dicts
are converted key by key into the same modules, so both formats give identical tokens.

Note (SPEC section 5): for the models *without* registers, Meta's own code interpolates the
518-px position grid with a (16 + 0.1)/37 scale while transformers resizes straight to the
target grid; tokens differ by about 3 % relative from Meta's reference implementation.  We use
the transformers forward everywhere (training, export, node), so the heads always see the
tokens they were trained on.

Weights are never unpickled with code execution: Meta files go through
``torch.load(weights_only=True)``, Hugging Face folders must hold safetensors.
Without weights the backbone can only be built in an explicit "random weights, seed N" mode
whose initialisation uses NumPy's frozen ``RandomState`` stream, so it is identical on every
machine and library version; it is announced loudly on every build.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .onednn import use_onednn_linears

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneError(ValueError):
    """A backbone cannot be built or its weights do not fit (message names the cause)."""


@dataclass(frozen=True)
class BackboneArch:
    """Shape of a DINOv2 ViT (the fields a checkpoint must agree with)."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    registers: int = 0
    swiglu: bool = False
    patch_size: int = 14
    mlp_ratio: int = 4

    @property
    def dim(self) -> int:
        return self.hidden_size


def _arch(name: str, d: int, depth: int, heads: int, swiglu: bool = False) -> list[BackboneArch]:
    return [
        BackboneArch(name, d, depth, heads, 0, swiglu),
        BackboneArch(name + "_reg", d, depth, heads, 4, swiglu),
    ]


#: Registry of named architectures.  ``dinov2_vitt14`` has no published weights: it is the
#: DINOv2 architecture at ViT-Ti width, used with random weights by the demo and the tests.
ARCHS: dict[str, BackboneArch] = {
    a.name: a
    for a in (
        _arch("dinov2_vitt14", 192, 12, 3)
        + _arch("dinov2_vits14", 384, 12, 6)
        + _arch("dinov2_vitb14", 768, 12, 12)
        + _arch("dinov2_vitl14", 1024, 24, 16)
        + _arch("dinov2_vitg14", 1536, 40, 24, swiglu=True)
    )
}


def resolve_arch(name: str, overrides: dict[str, Any] | None = None) -> BackboneArch:
    """Registry lookup plus explicit overrides (tests use tiny ViTs this way)."""
    if name not in ARCHS:
        raise BackboneError(f"backbone.arch: unknown architecture {name!r}; known: {', '.join(ARCHS)}")
    arch = ARCHS[name]
    if overrides:
        bad = set(overrides) - set(BackboneArch.__dataclass_fields__) - {"name"}
        if bad:
            raise BackboneError(f"backbone.overrides: unknown field(s) {sorted(bad)}")
        arch = replace(arch, **overrides)
    return arch


def _hf_config(arch: BackboneArch, image_size: int):
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    common = dict(
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        mlp_ratio=arch.mlp_ratio,
        patch_size=arch.patch_size,
        image_size=image_size,
        use_swiglu_ffn=arch.swiglu,
        layerscale_value=1.0,
    )
    if arch.registers:
        return Dinov2WithRegistersConfig(num_register_tokens=arch.registers, **common)
    return Dinov2Config(**common)


def _hf_model_class(arch: BackboneArch):
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    return Dinov2WithRegistersModel if arch.registers else Dinov2Model


# --------------------------------------------------------------------------- weights


def sincos_position_table(shape: tuple[int, ...]) -> np.ndarray:
    """2-D sine-cosine position embeddings (MAE style) for a (1, 1 + g*g, D) table, CLS row 0.

    Random-weight mode only: a trained ViT's tokens know where in the image they are; tiny
    random position vectors would drown in the patch content, leaving every frame a bag of
    tokens in which no motion direction is visible.
    """
    _, rows, dim = shape
    grid = int(round((rows - 1) ** 0.5))
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        angle = coord[:, None] * omega[None, :]
        parts += [np.sin(angle), np.cos(angle)]
    table = np.zeros((rows, dim))
    table[1:, : 4 * quarter] = np.concatenate(parts, axis=1)
    return table[None]


def seeded_state_dict(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic initialisation independent of torch/transformers versions.

    Same scheme as transformers' DINOv2 init (truncated normal std 0.02, zero biases, unit
    norms, LayerScale 1) but drawn from NumPy's legacy ``RandomState``, whose stream is frozen;
    position embeddings are a fixed 2-D sine-cosine table (:func:`sincos_position_table`).
    """
    out = {}
    for name, tensor in model.state_dict().items():
        shape = tuple(tensor.shape)
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        if name.endswith("position_embeddings"):
            value = sincos_position_table(shape)
        elif name.endswith("bias") or name.endswith("mask_token"):
            value = np.zeros(shape)
        elif "norm" in module or name.endswith("lambda1"):
            value = np.ones(shape)
        else:
            rs = np.random.RandomState((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**32))
            value = np.clip(rs.standard_normal(shape), -2.0, 2.0) * 0.02
        out[name] = torch.from_numpy(value.astype(np.float32))
    return out


_META_LAYER_MAP = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "attn.proj.weight": "attention.o_proj.weight",
    "attn.proj.bias": "attention.o_proj.bias",
    "ls1.gamma": "layer_scale1.lambda1",
    "ls2.gamma": "layer_scale2.lambda1",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "mlp.w3.weight": "mlp.down_proj.weight",
    "mlp.w3.bias": "mlp.down_proj.bias",
}
_META_TOP_MAP = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}


def meta_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Meta's DINOv2 keys to the transformers modules' (in-memory) names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)  # block_chunks layout
        if key in _META_TOP_MAP:
            out[_META_TOP_MAP[key]] = value
            continue
        m = re.match(r"blocks\.(\d+)\.(.+)$", key)
        if not m:
            raise BackboneError(f"unexpected key {key!r} in Meta DINOv2 checkpoint")
        i, rest = m.groups()
        prefix = f"encoder.layer.{i}."
        if rest in ("attn.qkv.weight", "attn.qkv.bias"):
            q, k, v = value.chunk(3, dim=0)
            kind = rest.rsplit(".", 1)[1]
            out[prefix + f"attention.q_proj.{kind}"] = q
            out[prefix + f"attention.k_proj.{kind}"] = k
            out[prefix + f"attention.v_proj.{kind}"] = v
        elif rest in ("mlp.w12.weight", "mlp.w12.bias"):
            gate, up = value.chunk(2, dim=0)
            kind = rest.rsplit(".", 1)[1]
            out[prefix + f"mlp.gate_proj.{kind}"] = gate
            out[prefix + f"mlp.up_proj.{kind}"] = up
        elif rest in _META_LAYER_MAP:
            out[prefix + _META_LAYER_MAP[rest]] = value
        else:
            raise BackboneError(f"unexpected key {key!r} in Meta DINOv2 checkpoint")
    return out


def hf_to_meta(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`meta_to_hf` (used to write Meta-format files, e.g. in tests)."""
    top = {v: k for k, v in _META_TOP_MAP.items()}
    layer = {v: k for k, v in _META_LAYER_MAP.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        i, rest = re.match(r"encoder\.layer\.(\d+)\.(.+)$", key).groups()
        kind = rest.rsplit(".", 1)[1]
        if rest.startswith("attention.q_proj"):
            parts = [state[f"encoder.layer.{i}.attention.{p}_proj.{kind}"] for p in "qkv"]
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, 0)
        elif rest.startswith("mlp.gate_proj"):
            parts = [state[f"encoder.layer.{i}.mlp.{p}_proj.{kind}"] for p in ("gate", "up")]
            out[f"blocks.{i}.mlp.w12.{kind}"] = torch.cat(parts, 0)
        elif rest in layer:
            out[f"blocks.{i}.{layer[rest]}"] = value
    return out


def _check_shapes(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise BackboneError(
            f"{source}: checkpoint does not match the architecture "
            f"(missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''})"
        )
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise BackboneError(
                f"{source}: {key} has shape {tuple(state[key].shape)}, the architecture needs {tuple(tensor.shape)}"
            )


def _load_meta(path: Path, arch: BackboneArch) -> nn.Module:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)  # never executes pickled code
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise BackboneError(f"{path}: not a loadable DINOv2 state dict ({type(exc).__name__}: {exc})") from None
    if isinstance(raw, dict) and "model" in raw and isinstance(raw["model"], dict):
        raw = raw["model"]
    if not isinstance(raw, dict) or "pos_embed" not in raw:
        raise BackboneError(f"{path}: not a Meta DINOv2 state dict (no 'pos_embed' key)")
    grid = int(round((raw["pos_embed"].shape[1] - 1) ** 0.5))
    model = _hf_model_class(arch)(_hf_config(arch, grid * arch.patch_size))
    state = meta_to_hf(raw)
    _check_shapes(model, state, str(path))
    model.load_state_dict(state, strict=True)
    return model


def _load_hf(path: Path, arch: BackboneArch) -> nn.Module:
    if not (path / "config.json").is_file():
        raise BackboneError(f"{path}: a Hugging Face model folder needs config.json")
    if not any(path.glob("*.safetensors")):
        raise BackboneError(f"{path}: no *.safetensors weights (pickled .bin weights are refused)")
    import json

    config = json.loads((path / "config.json").read_text())
    for field_name, want in (("hidden_size", arch.hidden_size), ("num_hidden_layers", arch.num_layers),
                             ("num_attention_heads", arch.num_heads)):
        if config.get(field_name) != want:
            raise BackboneError(
                f"{path}: config.json {field_name}={config.get(field_name)} but backbone.arch "
                f"{arch.name!r} has {want}"
            )
    if int(config.get("num_register_tokens", 0)) != arch.registers:
        raise BackboneError(
            f"{path}: config.json has {config.get('num_register_tokens', 0)} register tokens, "
            f"backbone.arch {arch.name!r} has {arch.registers}"
        )
    try:
        model, info = _hf_model_class(arch).from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                                            output_loading_info=True)
    except Exception as exc:  # noqa: BLE001
        raise BackboneError(f"{path}: cannot load Hugging Face DINOv2 weights: {exc}") from None
    # transformers initialises a tensor the file lacks and only reports it: a backbone that
    # silently differs from the checkpoint.  Refuse, like the Meta .pth path does.
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(m[0]) if isinstance(m, (tuple, list)) else str(m)
                        for m in (info.get("mismatched_keys") or []))
    if missing or mismatched:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)})")
        if mismatched:
            parts.append(f"tensors of the wrong shape {mismatched[:8]} ({len(mismatched)})")
        raise BackboneError(f"{path}: incomplete DINOv2 checkpoint: {'; '.join(parts)}")
    return model


def state_fingerprint(model: nn.Module) -> str:
    """Short hash of all weights, stored in manifests to catch a backbone that changed."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def as_frames(frames: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Frames as a tensor on ``device`` (default: where they are; NumPy arrays are on the CPU).

    Not ``torch.as_tensor``: that puts NumPy data on the *default* device, which need not be
    where the model is.
    """
    x = frames if isinstance(frames, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(frames))
    return x if device is None or x.device == torch.device(device) else x.to(device)


def preprocess_frames(
    frames: torch.Tensor, image_size: int, mean: torch.Tensor | None = None, std: torch.Tensor | None = None
) -> torch.Tensor:
    """DINOv2 eval transform: resize shorter side to S*256/224 (bicubic, antialiased),
    centre crop S, scale to [0, 1], ImageNet mean/std.  Input (B, H, W, 3) uint8 RGB.

    The one implementation of the transform, free of any module: the backbone, the inference
    backends and the extraction workers (which decode and preprocess ahead) all call it, on
    whatever device ``frames`` live on.
    """
    x = as_frames(frames)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 RGB (B, H, W, 3), got {tuple(x.shape)} {x.dtype}")
    if mean is None:
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    if std is None:
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    # planar (NCHW-contiguous) before the resize: the antialiased kernel is 10-30 % faster on it
    # than on the channels-last strides of the permuted frames, with bit-identical results
    x = x.permute(0, 3, 1, 2).contiguous().float().div_(255.0)
    size, top, left = _resize_and_crop(*x.shape[-2:], image_size)
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    x = x[:, :, top : top + image_size, left : left + image_size]
    return (x - mean) / std


def _resize_and_crop(h: int, w: int, image_size: int) -> tuple[tuple[int, int], int, int]:
    """(resized (H, W), crop top, crop left) of the DINOv2 eval transform for an h x w frame."""
    short = round(image_size * 256 / 224)
    scale = short / min(h, w)
    size = (max(image_size, round(h * scale)), max(image_size, round(w * scale)))
    return size, (size[0] - image_size) // 2, (size[1] - image_size) // 2


def crop_box(h: int, w: int, image_size: int) -> tuple[float, float, float, float]:
    """(top, left, height, width) in frame pixels of what the backbone sees of an h x w frame:
    where its patch grid lies (the debug image draws attention maps there)."""
    size, top, left = _resize_and_crop(h, w, image_size)
    sy, sx = size[0] / h, size[1] / w
    return top / sy, left / sx, image_size / sy, image_size / sx


# --------------------------------------------------------------------------- module


class Backbone(nn.Module):
    """Frozen DINOv2: uint8 RGB frames -> per-frame tokens ``(1 + n, D)`` (CLS, then patches).

    Build with :func:`build_backbone`.  ``forward`` takes already preprocessed pixels
    (B, 3, S, S), which is the exported graph; ``encode`` takes raw frames.
    """

    def __init__(self, model: nn.Module, arch: BackboneArch, image_size: int, source: str) -> None:
        super().__init__()
        self.model = model.eval()
        self.arch = arch
        self.image_size = image_size
        self.source = source
        self.num_patches = (image_size // arch.patch_size) ** 2
        self.released = False
        self._resize_position_embeddings()
        for p in self.parameters():
            p.requires_grad_(False)
        # Frozen and used for inference: its Linear layers run oneDNN on the CPU (MKL, which PyTorch
        # uses otherwise, takes its AVX2 kernels on AMD CPUs: less than half the speed); see .onednn
        self.onednn_linears = use_onednn_linears(self.model)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        return self.arch.hidden_size

    @functools.cached_property
    def fingerprint(self) -> str:
        """Hash of the (frozen) weights; computed once."""
        return state_fingerprint(self)

    def _resize_position_embeddings(self) -> None:
        """Interpolate the position grid to ``image_size`` once, with transformers' own function.

        The forward then takes transformers' no-interpolation branch: the same numbers as
        interpolating on every call, without the per-frame cost, and a static ONNX graph.
        """
        emb = self.model.embeddings
        if emb.position_embeddings.shape[1] == self.num_patches + 1:
            return
        dummy = torch.zeros(1, self.num_patches + 1, self.dim)
        with torch.no_grad():
            resized = emb.interpolate_pos_encoding(dummy, self.image_size, self.image_size).clone()
        emb.position_embeddings = nn.Parameter(resized, requires_grad=False)
        self.model.config.image_size = self.image_size

    def preprocess(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """DINOv2 eval transform of uint8 RGB frames (B, H, W, 3), on the backbone's device.

        Frames travel to the device as uint8, the smallest form of them."""
        return preprocess_frames(as_frames(frames, self.mean.device), self.image_size, self.mean, self.std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.model(pixel_values=pixels).last_hidden_state
        # drop register tokens: CLS, [registers], patches
        return torch.cat([hidden[:, :1], hidden[:, 1 + self.arch.registers :]], dim=1)

    def release_weights(self) -> None:
        """Free the weights once another backend (ONNX Runtime, TensorRT) holds its own copy.

        The fingerprint, sizes and preprocessing constants stay; ``encode`` afterwards is an error.
        """
        _ = self.fingerprint  # computed while the weights exist
        self.model.to("meta")
        self.released = True

    @torch.inference_mode()
    def encode(self, frames: np.ndarray | torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Raw uint8 RGB frames (B, H, W, 3) -> tokens (B, 1 + n, D), on the backbone's device."""
        if self.released:
            raise RuntimeError("this backbone's weights were released (an ONNX Runtime / TensorRT backend runs it)")
        frames = as_frames(frames)
        if frames.ndim == 3:
            frames = frames[None]
        parts = [self(self.preprocess(frames[i : i + batch_size])) for i in range(0, len(frames), batch_size)]
        return torch.cat(parts)


def build_backbone(
    arch: str | BackboneArch,
    weights: str | Path | None = None,
    *,
    random_seed: int | None = None,
    image_size: int = 224,
    overrides: dict[str, Any] | None = None,
) -> Backbone:
    """Build the frozen backbone from Meta ``.pth``, a Hugging Face folder, or seeded random weights.

    Exactly one of ``weights`` / ``random_seed`` must be given: random weights are never a
    silent fallback for a missing file.
    """
    from ..support import check_environment

    check_environment()  # every model starts here: an unsupported torch fails now, in one line
    spec = arch if isinstance(arch, BackboneArch) else resolve_arch(arch, overrides)
    if image_size % spec.patch_size:
        raise BackboneError(f"backbone.image_size {image_size} must be a multiple of the patch size {spec.patch_size}")
    if weights is not None and random_seed is not None:
        raise BackboneError("give either backbone.weights or backbone.random_seed, not both")
    if weights is None and random_seed is None:
        raise BackboneError(
            "backbone.weights is not set: give the path of a DINOv2 checkpoint (Meta .pth or a "
            "Hugging Face folder), or set backbone.random_seed to run with random weights on purpose"
        )
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.exists():
            raise BackboneError(f"backbone.weights: {path} does not exist")
        model = _load_hf(path, spec) if path.is_dir() else _load_meta(path, spec)
        source = str(path)
    else:
        model = _hf_model_class(spec)(_hf_config(spec, image_size))
        model.load_state_dict(seeded_state_dict(model, int(random_seed)), strict=True)
        source = f"random weights, seed {int(random_seed)}"
        log.warning(
            "BACKBONE HAS RANDOM WEIGHTS (%s, seed %d): not a pretrained DINOv2; "
            "predictions only mean something for heads trained on this same random backbone",
            spec.name,
            int(random_seed),
        )
    return Backbone(model, spec, image_size, source)


__all__ = [
    "ARCHS",
    "as_frames",
    "Backbone",
    "BackboneArch",
    "BackboneError",
    "build_backbone",
    "crop_box",
    "hf_to_meta",
    "meta_to_hf",
    "preprocess_frames",
    "resolve_arch",
    "seeded_state_dict",
    "state_fingerprint",
]
