"""A seeded synthetic benchmark of nearly symmetric actions, with known and unknown contexts.

Why: no real dataset can be downloaded here, and the property the project is about
(telling an action from its time reversal) needs a benchmark where it is exact. Each
symmetric pair ``(a, b)`` renders ``b`` as the frames of ``a`` in reverse order, so a head
that ignores frame order is at chance on the pairs by construction. The other classes are
palindromic in time (reversal leaves them the same class), like the papers' non-symmetric
classes. Colours, background styles and object shape variants are split into a *known*
set (train / val / test) and a held-out *unknown* set (test only), so accuracy on unknown
contexts measures generalisation rather than memorisation.

Three tasks per video: ``fine_action`` (16 classes), ``atomic_action`` (a coarser,
reversal-invariant motion family) and ``object_in_use`` (which kind of object moves).

Drawing is vectorised numpy over the whole ``(F, H, W)`` clip with anti-aliased signed
distance functions; every video's randomness comes from a seed derived from
``(seed, split, context, class, index)``, so output does not depend on generation order.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from step_ros.data.video import write_video

__all__ = [
    "DEFAULT_VIDEOS_PER_CLASS",
    "FINE_ACTIONS",
    "SYMMETRIC_PAIRS",
    "PALINDROMIC_ACTIONS",
    "ATOMIC_ACTIONS",
    "ATOMIC_OF",
    "OBJECTS",
    "CONTEXTS",
    "TASKS",
    "ClipParams",
    "sample_params",
    "video_params",
    "render_clip",
    "reverse_of",
    "generate",
]

SYMMETRIC_PAIRS: list[tuple[str, str]] = [
    ("approach", "recede"),
    ("rise", "fall"),
    ("open", "close"),
    ("merge", "split"),
    ("appear", "disappear"),
    ("pick_up", "put_down"),
]
#: Classes whose motion is the same played backwards (trajectory f(s) == f(1 - s)).
PALINDROMIC_ACTIONS: list[str] = ["shake", "pulse", "blink", "hold"]
FINE_ACTIONS: list[str] = [a for pair in SYMMETRIC_PAIRS for a in pair] + PALINDROMIC_ACTIONS

#: fine action -> atomic action (coarse motion family; both members of a pair map together).
ATOMIC_OF: dict[str, str] = {
    "approach": "scale",
    "recede": "scale",
    "rise": "vertical",
    "fall": "vertical",
    "open": "separation",
    "close": "separation",
    "merge": "separation",
    "split": "separation",
    "appear": "visibility",
    "disappear": "visibility",
    "blink": "visibility",
    "pick_up": "grasp",
    "put_down": "grasp",
    "shake": "oscillate",
    "pulse": "oscillate",
    "hold": "static",
}
ATOMIC_ACTIONS: list[str] = list(dict.fromkeys(ATOMIC_OF[a] for a in FINE_ACTIONS))

OBJECTS: list[str] = ["ball", "box", "bar", "ring"]
CONTEXTS: tuple[str, str] = ("known", "unknown")
TASKS: list[str] = ["fine_action", "atomic_action", "object_in_use"]

# Shape variant of each object kind per context: coarse shape is shared (round / square /
# elongated / hollow), details differ, so recognising the kind must generalise.
_VARIANTS: dict[str, dict[str, str]] = {
    "known": {"ball": "disc", "box": "square", "bar": "rect", "ring": "annulus"},
    "unknown": {"ball": "banded_disc", "box": "crossed_square", "bar": "capsule", "ring": "dotted_ring"},
}
_COLORS: dict[str, list[tuple[int, int, int]]] = {
    "known": [(215, 45, 45), (45, 90, 225), (50, 175, 70), (235, 205, 40)],  # red blue green yellow
    "unknown": [(245, 135, 25), (35, 200, 215), (150, 65, 205), (240, 105, 175)],  # orange cyan purple pink
}
_BACKGROUNDS: dict[str, list[str]] = {
    "known": ["solid", "gradient", "stripes"],
    "unknown": ["checker", "noise"],
}
_HAND_COLORS: dict[str, list[tuple[int, int, int]]] = {
    "known": [(228, 190, 155), (140, 95, 65)],  # skin tones
    "unknown": [(238, 238, 242), (60, 62, 75)],  # gloves
}
_TABLE_COLORS: list[tuple[int, int, int]] = [(135, 90, 50), (210, 180, 135)]

_REVERSE: dict[str, str] = {**{a: b for a, b in SYMMETRIC_PAIRS}, **{b: a for a, b in SYMMETRIC_PAIRS}}
_FORWARD: frozenset[str] = frozenset(a for a, _ in SYMMETRIC_PAIRS)
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def reverse_of(fine_action: str) -> str:
    """The class a clip becomes when played backwards (itself for palindromic classes)."""
    if fine_action not in ATOMIC_OF:
        raise ValueError(f"unknown fine action {fine_action!r}; expected one of {FINE_ACTIONS}")
    return _REVERSE.get(fine_action, fine_action)


@dataclass(frozen=True)
class ClipParams:
    """Everything random about one video except the action. Shared by a pair's two classes.

    Lengths are fractions of the frame size; ``seed`` drives the sensor noise, the noise
    background texture and the hold jitter.
    """

    context: str
    object_kind: str
    color: tuple[int, int, int]
    hand_color: tuple[int, int, int]
    table_color: tuple[int, int, int]
    background: str
    bg_color1: tuple[int, int, int]
    bg_color2: tuple[int, int, int]
    bg_scale: float  # stripe period / checker cell, fraction of the frame
    bg_angle: float  # radians, gradient / stripes direction
    radius: float  # object base radius (diameter ~ 0.22-0.30 of the frame)
    cx: float  # centre jitter in [-1, 1]
    cy: float
    extent: float  # motion extent multiplier in [0.8, 1]
    t0: float  # motion starts (fraction of the clip)
    t1: float  # motion ends
    gamma: float  # speed profile: progress = u ** gamma
    cycles: int  # oscillations for palindromic classes
    axis: int  # 0 horizontal, 1 vertical (open/close, merge/split)
    table: bool  # draw a table line as a distractor (always for pick_up/put_down)
    table_y: float
    noise_std: float
    seed: int

    @property
    def variant(self) -> str:
        return _VARIANTS[self.context][self.object_kind]


def _luma(c: tuple[int, int, int] | np.ndarray) -> float:
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


def _contrasting(options: list[tuple[int, int, int]], against: float) -> tuple[int, int, int]:
    return max(options, key=lambda c: abs(_luma(c) - against))


def sample_params(
    context: str = "known",
    rng: np.random.Generator | int | None = None,
    object_kind: str | None = None,
) -> ClipParams:
    """Draw one video's context and motion variation (``rng`` may be a seed)."""
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
    if object_kind is not None and object_kind not in OBJECTS:
        raise ValueError(f"object_kind must be one of {OBJECTS}, got {object_kind!r}")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    kind = object_kind if object_kind is not None else OBJECTS[int(rng.integers(len(OBJECTS)))]
    palette = _COLORS[context]
    base = np.array(palette[int(rng.integers(len(palette)))], dtype=float)
    color = tuple(int(v) for v in np.clip(base + rng.integers(-15, 16, 3), 0, 255))
    lum = _luma(color)
    # Background: muted tone on the side (dark / light) that contrasts with the object.
    dark = float(rng.uniform(25, 85))
    light = float(rng.uniform(165, 228))
    if abs(dark - lum) >= 70 and abs(light - lum) >= 70:
        bg_l = dark if rng.random() < 0.5 else light
    else:
        bg_l = dark if abs(dark - lum) > abs(light - lum) else light
    tint = rng.integers(-14, 15, 3)
    bg1 = np.clip(bg_l + tint, 0, 255)
    delta = float(rng.uniform(22, 42)) * (1 if bg_l < 128 else -1)
    bg2 = np.clip(bg1 + delta + rng.integers(-8, 9, 3), 0, 255)
    styles = _BACKGROUNDS[context]
    return ClipParams(
        context=context,
        object_kind=kind,
        color=color,  # type: ignore[arg-type]
        hand_color=_contrasting(_HAND_COLORS[context], bg_l),
        table_color=_contrasting(_TABLE_COLORS, bg_l),
        background=styles[int(rng.integers(len(styles)))],
        bg_color1=tuple(int(v) for v in bg1),  # type: ignore[arg-type]
        bg_color2=tuple(int(v) for v in bg2),  # type: ignore[arg-type]
        bg_scale=float(rng.uniform(0.1, 0.22)),
        bg_angle=float(rng.uniform(0, np.pi)),
        radius=float(rng.uniform(0.11, 0.15)),
        cx=float(rng.uniform(-1, 1)),
        cy=float(rng.uniform(-1, 1)),
        extent=float(rng.uniform(0.8, 1.0)),
        t0=float(rng.uniform(0.0, 0.12)),
        t1=float(rng.uniform(0.88, 1.0)),
        gamma=float(rng.uniform(0.75, 1.35)),
        cycles=int(rng.integers(2, 4)),
        axis=int(rng.integers(2)),
        table=bool(rng.random() < 0.3),
        table_y=float(rng.uniform(0.8, 0.86)),
        noise_std=float(rng.uniform(1.0, 3.0)),
        seed=int(rng.integers(2**31 - 1)),
    )


# ----------------------------------------------------------------------------- drawing


def _soft(sdf: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in pixels (negative inside)."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


def _col(v: np.ndarray | float) -> np.ndarray:
    """Per-frame values (F,) -> (F, 1, 1) for broadcasting against (1, H, W) grids."""
    return np.asarray(v, dtype=np.float32).reshape(-1, 1, 1)


def _shape(variant: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage and 'darker detail' masks of an object centred at the origin of (dx, dy)."""
    adx, ady = np.abs(dx), np.abs(dy)
    if variant in ("disc", "banded_disc"):
        mask = _soft(np.sqrt(dx * dx + dy * dy) - r)
        if variant == "banded_disc":
            return mask, mask * _soft(ady - 0.28 * r)
        return mask, np.zeros_like(mask)
    if variant in ("square", "crossed_square"):
        mask = _soft(np.maximum(adx, ady) - 0.9 * r)
        if variant == "crossed_square":
            cross = np.maximum(_soft(adx - 0.14 * r), _soft(ady - 0.14 * r))
            return mask, mask * cross
        return mask, np.zeros_like(mask)
    if variant == "rect":
        mask = _soft(np.maximum(adx - 1.5 * r, ady - 0.5 * r))
        return mask, np.zeros_like(mask)
    if variant == "capsule":
        qx = np.maximum(adx - 1.0 * r, 0.0)
        mask = _soft(np.sqrt(qx * qx + dy * dy) - 0.5 * r)
        return mask, mask * _soft(1.0 * r - adx)
    if variant == "annulus":
        d = np.sqrt(dx * dx + dy * dy)
        return _soft(np.abs(d - 0.75 * r) - 0.25 * r), np.zeros(np.broadcast(dx, dy, r).shape, np.float32)
    if variant == "dotted_ring":
        d = np.sqrt(dx * dx + dy * dy)
        mask = _soft(np.minimum(np.abs(d - 0.86 * r) - 0.14 * r, d - 0.22 * r))
        return mask, np.zeros_like(mask)
    raise ValueError(f"unknown shape variant {variant!r}")


_HAS_DETAIL: dict[str, bool] = {
    "disc": False, "banded_disc": True, "square": False, "crossed_square": True,
    "rect": False, "capsule": True, "annulus": False, "dotted_ring": False,
}


#: Half width and half height of each variant's bounding box, in units of its radius.
_HALF_EXTENT: dict[str, tuple[float, float]] = {
    "rect": (1.5, 0.5), "capsule": (1.5, 0.5), "square": (0.9, 0.9), "crossed_square": (0.9, 0.9),
}


def _span(lo: np.ndarray, hi: np.ndarray, size: int) -> slice:
    """Pixel index range covering [min(lo), max(hi)] plus the anti-aliasing margin."""
    start = int(np.floor(float(np.min(lo)) - 1.0))
    stop = int(np.ceil(float(np.max(hi)) + 2.0))
    return slice(max(0, start), min(size, max(0, stop)))


def _half_height(variant: str) -> float:
    """Half height of a variant in units of its radius (for resting on the table)."""
    return {"rect": 0.5, "capsule": 0.5, "square": 0.9, "crossed_square": 0.9}.get(variant, 1.0)


def _background(p: ClipParams, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    c1 = np.array(p.bg_color1, np.float32)
    c2 = np.array(p.bg_color2, np.float32)
    proj = x * np.cos(p.bg_angle) + y * np.sin(p.bg_angle)
    period = max(4.0, p.bg_scale * size)
    if p.background == "solid":
        t = np.zeros((size, size), np.float32)
    elif p.background == "gradient":
        t = (proj - proj.min()) / max(1e-6, float(proj.max() - proj.min()))
    elif p.background == "stripes":
        t = np.clip(0.5 + 2.0 * np.sin(2 * np.pi * proj / period), 0, 1)
    elif p.background == "checker":
        t = ((np.floor(x / period) + np.floor(y / period)) % 2).astype(np.float32)
    elif p.background == "noise":
        rng = np.random.default_rng([p.seed, 2])
        n = 6
        grid = rng.random((n, n)).astype(np.float32)
        pos = np.linspace(0, n - 1, size, dtype=np.float32)
        i0 = np.minimum(np.floor(pos).astype(int), n - 2)
        f = pos - i0
        rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]  # (size, n)
        t = rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]
        t = np.clip((t - 0.5) * 1.6 + 0.5, 0, 1)
    else:
        raise ValueError(f"unknown background style {p.background!r}")
    return c1 * (1 - t[..., None]) + c2 * t[..., None]


class _Canvas:
    """A float (F, H, W, 3) clip being painted back to front."""

    def __init__(self, background: np.ndarray, num_frames: int) -> None:
        size = background.shape[0]
        self.img = np.empty((num_frames, size, size, 3), np.float32)  # C-contiguous
        self.img[:] = background
        self.x = np.arange(size, dtype=np.float32).reshape(1, 1, size)
        self.y = np.arange(size, dtype=np.float32).reshape(1, size, 1)

    def paint(self, mask: np.ndarray, color: tuple[int, int, int], dark: np.ndarray | None = None,
              alpha: np.ndarray | None = None, box: tuple[slice, slice] | None = None) -> None:
        """Alpha-blend ``color`` (darkened by ``dark``) where ``mask`` covers.

        ``box`` (rows, cols) says the masks cover only that part of the frame. Only covered
        pixels are touched, which keeps rendering fast (objects are ~5-20% of a frame).
        """
        view = self.img if box is None else self.img[:, box[0], box[1]]
        shape = view.shape[:3]
        m = mask if alpha is None else mask * _col(alpha)
        m = np.broadcast_to(m, shape)
        idx = np.nonzero(m)
        w = m[idx][:, None]
        src = np.array(color, np.float32)
        if dark is not None:
            src = src * (1.0 - 0.5 * np.broadcast_to(dark, shape)[idx][:, None])
        px = view[idx]
        view[idx] = px + (src - px) * w

    def table(self, y_top: float, color: tuple[int, int, int]) -> None:
        size = self.img.shape[1]
        h = max(2.0, 0.03 * size)
        band = _soft(np.abs(self.y - (y_top + h / 2)) - h / 2)
        self.paint(np.broadcast_to(band, (1, size, size)), color)


def _progress(p: ClipParams, s: np.ndarray) -> np.ndarray:
    """Monotonic motion progress in [0, 1] over clip time s in [0, 1] (pairs)."""
    u = np.clip((s - p.t0) / (p.t1 - p.t0), 0.0, 1.0)
    return u**p.gamma


def _render_forward(action: str, p: ClipParams, size: int, num_frames: int) -> np.ndarray:
    """Noise-free float clip of a forward pair member or a palindromic class."""
    F, S = num_frames, float(size)
    i = np.arange(F, dtype=np.float64)
    s = i / max(1, F - 1)
    # u = |2s - 1| computed from integers: exactly symmetric in time, so palindromic
    # classes (functions of u only) are bit-exact under reversal.
    u = np.abs(2 * i - (F - 1)) / max(1, F - 1)
    k = p.cycles
    osc = (-1.0) ** k * np.cos(np.pi * k * u)  # == cos(2 pi k s), palindromic
    prog = _progress(p, s)
    var = p.variant
    R = p.radius * S
    cx0 = S / 2 + p.cx * 0.1 * S
    cy0 = S / 2 + p.cy * 0.1 * S
    ones = np.ones(F)
    canvas = _Canvas(_background(p, size), F)
    X, Y = canvas.x, canvas.y

    def obj(cx: np.ndarray, cy: np.ndarray, r: np.ndarray, alpha: np.ndarray | None = None) -> None:
        # Evaluate the shape only inside the box the object sweeps over the whole clip.
        hw, hh = _HALF_EXTENT.get(var, (1.0, 1.0))
        rows = _span(cy - hh * r, cy + hh * r, size)
        cols = _span(cx - hw * r, cx + hw * r, size)
        if rows.stop <= rows.start or cols.stop <= cols.start:
            return  # entirely outside the frame
        mask, dark = _shape(var, X[..., cols] - _col(cx), Y[:, rows] - _col(cy), _col(r))
        canvas.paint(mask, p.color, dark if _HAS_DETAIL[var] else None, alpha, box=(rows, cols))

    if p.table or action == "pick_up":
        canvas.table(p.table_y * S, p.table_color)

    if action == "approach":  # grows as if moving toward the camera
        r = R * (0.45 + (1.85 * p.extent - 0.45) * prog)
        obj(cx0 * ones, cy0 * ones, r)
    elif action == "rise":
        span = 0.32 * p.extent * S
        cy = S / 2 + p.cy * 0.04 * S + span * (1 - 2 * prog)
        obj(cx0 * ones, cy, R * ones)
    elif action == "open":  # two halves of one object slide apart
        gap = prog * p.extent * 1.7 * R
        r = _col(1.15 * R * ones)
        g = _col(gap / 2)
        along, across = (X - cx0, Y - cy0) if p.axis == 0 else (Y - cy0, X - cx0)
        masks, darks = [], []
        for sign in (-1.0, 1.0):
            a = along - sign * g  # coordinate in the half's own frame
            keep = _soft(-sign * a)  # side of the cut; the two sides sum to 1 (no seam)
            dx, dy = (a, across) if p.axis == 0 else (across, a)
            m, d = _shape(var, dx, dy, r)
            masks.append(m * keep)
            darks.append(d * keep)
        dark = np.minimum(darks[0] + darks[1], 1.0) if _HAS_DETAIL[var] else None
        canvas.paint(np.minimum(masks[0] + masks[1], 1.0), p.color, dark)
    elif action == "merge":  # two objects meet and fuse into one bigger object
        dist = 0.62 * p.extent * S * np.clip(1 - prog / 0.75, 0, 1)
        r = R * (0.72 + 0.28 * np.clip((prog - 0.75) / 0.25, 0, 1))
        cxm, cym = S / 2 + p.cx * 0.04 * S, cy0
        for sign in (-1.0, 1.0):
            if p.axis == 0:
                obj(cxm + sign * dist / 2, cym * ones, r)
            else:
                obj(cx0 * ones, S / 2 + p.cy * 0.04 * S + sign * dist / 2, r)
    elif action == "appear":  # fades in
        obj(cx0 * ones, cy0 * ones, R * ones, alpha=prog)
    elif action == "pick_up":  # hand comes down to the object on the table, both go up
        r = 0.95 * R
        rest = p.table_y * S - _half_height(var) * r
        top_off = _half_height(var) * r
        reach = np.clip(prog / 0.45, 0, 1)
        lift = np.clip((prog - 0.55) / 0.45, 0, 1)
        lift_to = rest - p.extent * (rest - (0.16 * S + top_off))
        cy = rest + (lift_to - rest) * lift
        grasp = cy - top_off + 0.15 * r  # hand tip when holding
        tip = np.where(lift > 0, grasp, 0.1 * S + (rest - top_off + 0.15 * r - 0.1 * S) * reach)
        obj(cx0 * ones, cy, r * ones)
        tipc = _col(tip)
        palm_h = 0.35 * r
        arm = _soft(np.maximum(np.abs(X - cx0) - 0.3 * r, (Y - (tipc - palm_h)) - 0.0))
        palm = _soft(np.maximum(np.abs(X - cx0) - 0.6 * r, np.abs(Y - (tipc - palm_h / 2)) - palm_h / 2))
        canvas.paint(np.maximum(arm, palm), p.hand_color)
    elif action == "shake":  # x = A cos(2 pi k s)
        obj(cx0 - p.cx * 0.06 * S + 0.28 * p.extent * S * osc, cy0 * ones, R * ones)
    elif action == "pulse":  # size oscillates
        obj(cx0 * ones, cy0 * ones, R * (1 + 0.42 * p.extent * osc))
    elif action == "blink":  # on / off, visible at both ends
        obj(cx0 * ones, cy0 * ones, R * ones, alpha=np.clip(0.5 + 2.5 * osc, 0, 1))
    elif action == "hold":  # static with small jitter, mirrored in time
        rng = np.random.default_rng([p.seed, 3])
        jit = rng.normal(0, 0.6, (F, 2))
        half = np.minimum(np.arange(F), F - 1 - np.arange(F))
        jit = jit[half]
        obj(cx0 + jit[:, 0], cy0 + jit[:, 1], R * ones)
    else:
        raise ValueError(f"not a forward action: {action!r}")
    return canvas.img


def render_clip(
    fine_action: str,
    params: ClipParams | None = None,
    *,
    seed: int = 0,
    context: str = "known",
    object_kind: str | None = None,
    size: int = 128,
    num_frames: int = 40,
    noise: bool = True,
) -> np.ndarray:
    """Render one video as ``(num_frames, size, size, 3)`` uint8 RGB.

    ``params`` defaults to ``sample_params(context, seed, object_kind)``. For a pair
    ``(a, b)`` with the same params, ``render_clip(b) == render_clip(a)[::-1]`` exactly
    (sensor noise included). ``noise=False`` drops the sensor noise; the rest is
    deterministic, so palindromic classes then equal their own reversal.
    """
    if fine_action not in ATOMIC_OF:
        raise ValueError(f"unknown fine action {fine_action!r}; expected one of {FINE_ACTIONS}")
    if size < 16 or size % 2:
        raise ValueError(f"size must be an even number >= 16, got {size}")
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2, got {num_frames}")
    if params is None:
        params = sample_params(context, seed, object_kind)
    backwards = fine_action in _REVERSE and fine_action not in _FORWARD
    forward = _REVERSE[fine_action] if backwards else fine_action
    img = _render_forward(forward, params, size, num_frames)
    if noise and params.noise_std > 0:
        # Luminance sensor noise, one draw per pixel shared by R, G, B. Triangular
        # (sum of two uniforms, std 1/sqrt(6)): looks like Gaussian grain at a quarter of
        # the cost of a normal draw.
        rng = np.random.default_rng([params.seed, 1])
        grain = rng.random(img.shape[:3], dtype=np.float32)
        grain += rng.random(img.shape[:3], dtype=np.float32)
        grain -= np.float32(1.0)
        grain *= np.float32(params.noise_std * np.sqrt(6.0))
        img += grain[..., None]
    np.clip(img, 0.0, 255.0, out=img)
    img += np.float32(0.5)  # round half up, then truncate
    out = img.astype(np.uint8)
    return np.ascontiguousarray(out[::-1]) if backwards else out


# ----------------------------------------------------------------------------- dataset


def video_params(seed: int, split: str, context: str, fine_action: str, index: int) -> ClipParams:
    """The params ``generate`` uses for video ``index`` of a (split, context, class) group.

    Seeded from all five values (not from a running generator), so any single video can
    be re-rendered without generating the others.
    """
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
    ids = [seed, _SPLIT_IDS[split], CONTEXTS.index(context), FINE_ACTIONS.index(fine_action), index]
    rng = np.random.default_rng(np.random.SeedSequence(ids))
    # Kinds rotate with the index, offset by class, so even one video per class covers all.
    kind = OBJECTS[(index + FINE_ACTIONS.index(fine_action)) % len(OBJECTS)]
    return sample_params(context, rng, kind)


def _plan(
    videos_per_class: Mapping[str, int], unknown_per_class: int
) -> list[tuple[str, str, str, int]]:
    jobs: list[tuple[str, str, str, int]] = []
    groups = [(split, "known", n) for split, n in videos_per_class.items()]
    groups.append(("test", "unknown", unknown_per_class))
    for split, context, n in groups:
        for action in FINE_ACTIONS:
            for k in range(int(n)):
                jobs.append((split, context, action, k))
    return jobs


def _make_one(job: tuple[str, str, str, int], seed: int, size: int, num_frames: int, fps: float,
              out_dir: Path) -> list[str]:
    split, context, action, k = job
    params = video_params(seed, split, context, action, k)
    frames = render_clip(action, params, size=size, num_frames=num_frames)
    rel = f"videos/{split}_{context}_{action}_{k:03d}.mp4"
    # ultrafast keeps encoding as cheap as rendering; crf 12 keeps the decoded frames
    # within ~1.5 grey levels of the rendered ones (mostly the sensor noise).
    write_video(out_dir / rel, frames, fps, crf=12, preset="ultrafast")
    return [rel, action, ATOMIC_OF[action], params.object_kind, split, context]


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# 384 training videos per class (6464 videos in all): with 96 the demo heads reached 64.8 %
# on known contexts, with 192 79.7 %, with 384 and hflip 94.5 % (docs/DECISIONS.md 11);
# extraction and training time scale linearly with it.
DEFAULT_VIDEOS_PER_CLASS: Mapping[str, int] = {"train": 384, "val": 4, "test": 8}


def generate(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    videos_per_class: Mapping[str, int] | None = None,
    unknown_per_class: int = 8,
    size: int = 128,
    num_frames: int = 40,
    fps: float = 15,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Write ``out_dir/videos/*.mp4`` and ``out_dir/annotations.csv``; return the CSV path.

    ``videos_per_class`` maps known-context splits to videos per class (default
    ``DEFAULT_VIDEOS_PER_CLASS``: 384 / 4 / 8 for train / val / test); ``unknown_per_class``
    videos per class go to split ``test`` with context ``unknown``. Object kinds cycle over
    ``OBJECTS`` within each (split, context, class), offset per class, so every kind appears
    in both contexts (and in every class when a group has at least four videos).

    ``workers`` processes render and encode (default: one per available CPU, but a single
    process for fewer than 64 videos, where starting processes costs more than it saves).
    Every video is seeded on its own, so the output is identical for any ``workers``.
    """
    if videos_per_class is None:
        videos_per_class = DEFAULT_VIDEOS_PER_CLASS
    if size < 16 or size % 2:
        raise ValueError(f"size must be an even number >= 16 (yuv420p video), got {size}")
    unknown_splits = set(videos_per_class) - set(_SPLIT_IDS)
    if unknown_splits:
        raise ValueError(f"splits must be among {sorted(_SPLIT_IDS)}, got {sorted(unknown_splits)}")
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    jobs = _plan(videos_per_class, unknown_per_class)
    if workers is None:
        workers = _available_cpus() if len(jobs) >= 64 else 1
    rows: list[list[str]] = []
    if workers <= 1:
        with tqdm(total=len(jobs), desc="synthetic videos", unit="video", disable=not progress) as bar:
            for job in jobs:
                rows.append(_make_one(job, seed, size, num_frames, fps, out))
                bar.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from functools import partial

        fn = partial(_make_one, seed=seed, size=size, num_frames=num_frames, fps=fps, out_dir=out)
        # fork where available: spawn would re-run the caller's __main__ (breaks scripts
        # without a main guard and stdin scripts). Workers only use numpy and PyAV, and
        # are forked at the first submit, before this function starts any thread.
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            results = pool.map(fn, jobs, chunksize=4)
            with tqdm(total=len(jobs), desc="synthetic videos", unit="video", disable=not progress) as bar:
                for row in results:
                    rows.append(row)
                    bar.update()
    csv_path = out / "annotations.csv"
    tmp = out / ".annotations.csv.partial"
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", *TASKS, "split", "context"])
        writer.writerows(rows)
    os.replace(tmp, csv_path)
    return csv_path
