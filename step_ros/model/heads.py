"""Heads: small trainable modules that turn a window of frozen backbone tokens into logits.

Every head takes a window ``(B, T, 1 + n, D)`` (row 0 of each frame is the backbone's CLS
token, rows 1.. its patch tokens) and returns logits ``(B, num_classes)``.

Kinds (the ``kind`` field of a manifest head, see :data:`HEAD_KINDS`):

* ``step``: STEP (SPEC section 1): frame-wise learnable temporal PE added to every patch
  token *before* attention, one global CLS token, one bare multi-head self-attention layer,
  mean pooling over all output tokens, one linear classifier.  Ablation switches of the
  papers are constructor arguments; ``token_pool`` (not in the papers) averages k x k patch
  neighbourhoods first: a cheaper, approximate variant for slow CPUs (see :func:`pool_patch_grid`).
* ``self_attention``: the self-attention probing baseline (frame patch + CLS tokens, a
  standard transformer block, mean pooling) -- expressed as a preset of the same class.
* ``attentive``: attentive probing (V-JEPA / CoCa pooler): one learnable query
  cross-attends over all tokens, with its MLP; permutation invariant by construction.
* ``linear``: mean of the frame CLS tokens, then a linear (or small MLP) classifier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

PEType = Literal["learnable", "sinusoidal", "hybrid", "none"]
PEScope = Literal["frame", "token"]
PEPosition = Literal["before", "after"]
TokenSet = Literal["patch", "cls", "both"]
BlockType = Literal["attention", "attention_ln_skip", "full"]


def select_tokens(window: torch.Tensor, tokens: TokenSet) -> torch.Tensor:
    """(B, T, 1 + n, D) -> (B, T, m, D) with the frame tokens a head looks at."""
    if tokens == "patch":
        return window[:, :, 1:]
    if tokens == "cls":
        return window[:, :, :1]
    if tokens == "both":
        return window
    raise ValueError(f"tokens must be 'patch', 'cls' or 'both', got {tokens!r}")


def pool_patch_grid(patches: torch.Tensor, k: int) -> torch.Tensor:
    """Average k x k neighbourhoods of the square patch grid: (..., n, D) -> (..., n / k^2, D).

    Why: a STEP head's cost grows with the square of its tokens, so pooling 2 x 2 makes it
    ~16x cheaper per frame.  A head with ``token_pool > 1`` is a cheaper *model*, not the same
    logits: its accuracy cost is measured, not assumed (docs/RESULTS.md).
    """
    if k == 1:
        return patches
    *lead, n, d = patches.shape
    g = math.isqrt(n)
    if g * g != n or g % k:
        raise ValueError(f"token_pool {k} needs a square patch grid with a side divisible by {k}, got {n} tokens")
    x = patches.reshape(*lead, g // k, k, g // k, k, d).mean(dim=(-4, -2))
    return x.reshape(*lead, (g // k) ** 2, d)


def sinusoidal_table(positions: int, dim: int) -> torch.Tensor:
    """Fixed sine/cosine table (Vaswani et al.), one row per frame position."""
    pos = torch.arange(positions, dtype=torch.float64)[:, None]
    i = torch.arange(0, dim, 2, dtype=torch.float64)
    angle = pos / (10000.0 ** (i / dim))
    table = torch.zeros(positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : dim // 2])
    return table.float()


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and a fused SDPA kernel.

    The parameter layout (``qkv``: D -> 3D, rows q|k|v; ``proj``: D -> D) is what the exact
    streaming engine (:mod:`step_ros.model.fast_step`) and ONNX export rely on.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the token width {dim}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class StepHead(nn.Module):
    """STEP head (and, through its switches, the self-attention probing baseline)."""

    def __init__(
        self,
        dim: int,
        num_classes: int,
        frames: int,
        num_tokens: int,
        num_heads: int = 8,
        pe: PEType = "learnable",
        pe_scope: PEScope = "frame",
        pe_position: PEPosition = "before",
        global_cls: bool = True,
        tokens: TokenSet = "patch",
        block: BlockType = "attention",
        mlp_ratio: float = 4.0,
        token_pool: int = 1,
    ) -> None:
        super().__init__()
        self.frames, self.pe, self.pe_scope, self.pe_position = frames, pe, pe_scope, pe_position
        self.tokens, self.block = tokens, block
        if not isinstance(token_pool, int) or token_pool < 1:
            raise ValueError(f"token_pool must be a positive integer, got {token_pool!r}")
        if token_pool > 1:
            if tokens != "patch":
                raise ValueError(f"token_pool {token_pool} pools the patch grid: it needs tokens='patch', "
                                 f"got {tokens!r}")
            g = math.isqrt(num_tokens)
            if g * g != num_tokens or g % token_pool:
                raise ValueError(f"token_pool {token_pool} must divide the side of the square patch grid "
                                 f"({num_tokens} tokens)")
        self.token_pool = token_pool
        per_frame = {"patch": num_tokens // token_pool**2, "cls": 1, "both": num_tokens + 1}[tokens]
        pe_shape = (frames, 1, dim) if pe_scope == "frame" else (frames, per_frame, dim)
        if pe in ("learnable", "hybrid"):
            self.temporal_pe = nn.Parameter(torch.zeros(pe_shape))
            nn.init.trunc_normal_(self.temporal_pe, std=0.02)
        if pe in ("sinusoidal", "hybrid"):
            fixed = sinusoidal_table(frames, dim)[:, None, :].expand(pe_shape).clone()
            self.register_buffer("fixed_pe", fixed, persistent=False)
        if pe not in ("learnable", "sinusoidal", "hybrid", "none"):
            raise ValueError(f"pe must be learnable, sinusoidal, hybrid or none, got {pe!r}")
        if global_cls:
            self.global_cls = nn.Parameter(torch.zeros(1, 1, dim))
            nn.init.trunc_normal_(self.global_cls, std=0.02)
        else:
            self.global_cls = None
        self.attn = MultiHeadAttention(dim, num_heads)
        if block in ("attention_ln_skip", "full"):
            self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if block == "full":
            self.norm2 = nn.LayerNorm(dim, eps=1e-6)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if block not in ("attention", "attention_ln_skip", "full"):
            raise ValueError(f"block must be attention, attention_ln_skip or full, got {block!r}")
        self.classifier = nn.Linear(dim, num_classes)

    def positional(self) -> torch.Tensor | None:
        """Temporal PE of shape (T, 1 or m, D), or None."""
        if self.pe == "none":
            return None
        pe = 0.0
        if self.pe in ("learnable", "hybrid"):
            pe = pe + self.temporal_pe
        if self.pe in ("sinusoidal", "hybrid"):
            pe = pe + self.fixed_pe
        return pe

    def attend(self, x: torch.Tensor, attention: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The block; ``attention`` replaces ``self.attn`` (the naive benchmark baseline uses it)."""
        attention = attention or self.attn
        if self.block == "attention":
            return attention(x)
        x = x + attention(self.norm1(x))
        if self.block == "full":
            x = x + self.mlp(self.norm2(x))
        return x

    def pooled(
        self, window: torch.Tensor, attention: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The mean-pooled attention output p (B, D) that the classifier reads."""
        x = pool_patch_grid(select_tokens(window, self.tokens), self.token_pool)
        b, t, m, d = x.shape
        if t != self.frames:
            raise ValueError(f"head expects {self.frames} frames, window has {t}")
        pe = self.positional()
        if pe is not None and self.pe_position == "before":
            x = x + pe
        x = x.reshape(b, t * m, d)
        if self.global_cls is not None:
            x = torch.cat([self.global_cls.expand(b, -1, -1), x], dim=1)
        y = self.attend(x, attention)
        if pe is not None and self.pe_position == "after":
            start = 0 if self.global_cls is None else 1
            frames_out = y[:, start:].reshape(b, t, m, d) + pe
            y = torch.cat([y[:, :start], frames_out.reshape(b, t * m, d)], dim=1)
        return y.mean(dim=1)

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooled(window))

    def forward_indexed(self, frames: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Logits of many windows that share frames: window ``w`` is ``frames[index[w]]``.

        ``frames`` (U, 1 + n, D), ``index`` (P, T) -> (P, C); equal to ``forward(frames[index])``
        up to float rounding.  Why: offline, every frame sits in up to T windows.  With the PE
        added before a bare attention block, ``qkv(x + pe_t) = qkv(x) + W pe_t``, so each frame is
        projected once and each window only adds its positions' terms; and the mean over queries
        commutes with the output projection.  Other blocks (a LayerNorm first) run the plain forward.
        """
        if self.block != "attention" or (self.pe != "none" and self.pe_position != "before"):
            return self(frames[index])
        x = pool_patch_grid(select_tokens(frames[:, None], self.tokens), self.token_pool)[:, 0]  # (U, m, D)
        p, t = index.shape
        _, m, d = x.shape
        if t != self.frames:
            raise ValueError(f"head expects {self.frames} frames, windows have {t}")
        attn = self.attn
        cls = 1 if self.global_cls is not None else 0
        rows = x.new_empty(p, cls + t * m, 3 * d)  # written once: no concatenation pass
        if cls:
            rows[:, 0] = attn.qkv(self.global_cls).reshape(3 * d)
        frames_part = rows[:, cls:].view(p, t, m, 3 * d)
        gathered = attn.qkv(x)[index]  # (P, T, m, 3D): each frame projected once, gathered per window
        pe = self.positional()
        if pe is not None:  # (T, 1 or m, 3D): the positions' share, added on the way into rows
            torch.add(gathered, F.linear(pe, attn.qkv.weight), out=frames_part)
        else:
            frames_part.copy_(gathered)
        h = attn.num_heads
        qkv = rows.reshape(p, -1, 3, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (P, H, N, d / H), one fused kernel
        pooled = attn.proj(out.mean(dim=2).reshape(p, d))
        return self.classifier(pooled)

    @torch.inference_mode()
    def cls_attention(self, window: torch.Tensor) -> torch.Tensor:
        """How the global CLS token attends to each frame's tokens: (B, T, m), mean over attention
        heads, softmax over all tokens (so a frame's map sums to its share of the attention).

        What the papers' attention figure shows.  One query row: cheap beside the head itself.
        """
        if self.global_cls is None:
            raise ValueError("cls_attention needs a head with a global CLS token")
        x = pool_patch_grid(select_tokens(window, self.tokens), self.token_pool)
        b, t, m, d = x.shape
        pe = self.positional()
        if pe is not None and self.pe_position == "before":
            x = x + pe
        x = torch.cat([self.global_cls.expand(b, -1, -1), x.reshape(b, t * m, d)], dim=1)
        if self.block != "attention":
            x = self.norm1(x)
        h = self.attn.num_heads
        w, bias = self.attn.qkv.weight, self.attn.qkv.bias
        q = F.linear(x[:, :1], w[:d], bias[:d]).reshape(b, 1, h, d // h).transpose(1, 2)  # (B, H, 1, d)
        k = F.linear(x, w[d : 2 * d], bias[d : 2 * d]).reshape(b, -1, h, d // h).transpose(1, 2)  # (B, H, N, d)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)[:, :, 0]  # (B, H, N)
        return weights[:, :, 1:].mean(1).reshape(b, t, m)


class LinearHead(nn.Module):
    """Linear probing: mean of the frames' CLS tokens -> linear (or one-hidden-layer MLP)."""

    def __init__(self, dim: int, num_classes: int, frames: int, num_tokens: int, hidden: int = 0) -> None:
        super().__init__()
        self.frames = frames
        if hidden:
            self.classifier = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes))
        else:
            self.classifier = nn.Linear(dim, num_classes)

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        return self.classifier(window[:, :, 0].mean(dim=1))


class AttentiveHead(nn.Module):
    """Attentive probing: a learnable query cross-attends over all frame tokens (V-JEPA pooler).

    Without PE the output does not depend on the order of frames: this is the baseline
    STEP is compared against.  ``pe='learnable'`` is the papers' "+ learnable PE" variant.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        frames: int,
        num_tokens: int,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        tokens: TokenSet = "patch",
        pe: Literal["none", "learnable"] = "none",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the token width {dim}")
        self.frames, self.tokens, self.num_heads = frames, tokens, num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.temporal_pe = None
        if pe == "learnable":
            self.temporal_pe = nn.Parameter(torch.zeros(frames, 1, dim))
            nn.init.trunc_normal_(self.temporal_pe, std=0.02)
        elif pe != "none":
            raise ValueError(f"attentive head pe must be 'none' or 'learnable', got {pe!r}")
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        x = select_tokens(window, self.tokens)
        b, t, m, d = x.shape
        if self.temporal_pe is not None:
            x = x + self.temporal_pe
        x = self.norm1(x.reshape(b, t * m, d))
        h = self.num_heads
        q = self.q(self.query.expand(b, -1, -1)).reshape(b, 1, h, d // h).transpose(1, 2)
        k, v = self.kv(x).reshape(b, t * m, 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, d)
        y = self.query + self.proj(out)
        y = y + self.mlp(self.norm2(y))
        return self.classifier(y[:, 0])


@dataclass(frozen=True)
class HeadKind:
    """A named, reproducible head configuration (timm-style registry entry)."""

    name: str
    factory: Callable[..., nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""


HEAD_KINDS: dict[str, HeadKind] = {
    k.name: k
    for k in [
        HeadKind("step", StepHead, {}, "STEP: frame-wise learnable PE, global CLS, bare attention"),
        HeadKind(
            "self_attention",
            StepHead,
            {"pe": "none", "global_cls": False, "tokens": "both", "block": "full"},
            "self-attention probing: patch + CLS tokens, transformer block, mean pooling",
        ),
        HeadKind("attentive", AttentiveHead, {}, "attentive probing: learnable query cross-attention + MLP"),
        HeadKind("linear", LinearHead, {}, "linear probing: mean of frame CLS tokens"),
    ]
}


def head_options(kind: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full option set of a head: the kind's preset, overridden by ``options``."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown head kind {kind!r}; known: {', '.join(HEAD_KINDS)}")
    return {**HEAD_KINDS[kind].defaults, **(options or {})}


def create_head(
    kind: str, dim: int, num_classes: int, frames: int, num_tokens: int, options: dict[str, Any] | None = None
) -> nn.Module:
    """Build a head by registry name. Unknown options fail with the option's name."""
    opts = head_options(kind, options)
    try:
        return HEAD_KINDS[kind].factory(dim, num_classes, frames, num_tokens, **opts)
    except TypeError as exc:  # unexpected keyword -> name it
        raise ValueError(f"bad option for head kind {kind!r}: {exc}") from None


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def default_num_heads(dim: int) -> int:
    """Attention heads of 64 channels, as in the DINOv2 backbones the heads sit on."""
    return max(1, dim // 64)


__all__ = [
    "HEAD_KINDS",
    "AttentiveHead",
    "LinearHead",
    "MultiHeadAttention",
    "StepHead",
    "count_parameters",
    "create_head",
    "default_num_heads",
    "head_options",
    "pool_patch_grid",
    "select_tokens",
    "sinusoidal_table",
]
