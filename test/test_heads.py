"""Heads: parameter budgets (SPEC section 1), order sensitivity, ablation switches."""

from __future__ import annotations

import pytest
import torch

from step_ros.model.heads import HEAD_KINDS, count_parameters, create_head

D_VITB, T, N_VITB = 768, 16, 256


def test_parameter_budgets_vit_b():
    # SPEC: ViT-B STEP head about 2.6M, attentive probing about 7.3M (174 classes, SSv2)
    step = count_parameters(create_head("step", D_VITB, 174, T, N_VITB, {"num_heads": 12}))
    attentive = count_parameters(create_head("attentive", D_VITB, 174, T, N_VITB, {"num_heads": 12}))
    assert step == pytest.approx(2.6e6, rel=0.05), step
    assert attentive == pytest.approx(7.3e6, rel=0.02), attentive
    assert attentive / step == pytest.approx(3.0, rel=0.1)  # "only 1/3 of the tunable parameters"
    # frame-wise PE is T*D parameters, token-wise T*n*D
    tokenwise = count_parameters(create_head("step", D_VITB, 174, T, N_VITB, {"num_heads": 12, "pe_scope": "token"}))
    assert tokenwise - step == T * N_VITB * D_VITB - T * D_VITB


def _window(b=2, t=4, n=9, d=32, seed=0):
    return torch.randn(b, t, 1 + n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "kind, options, order_sensitive",
    [
        ("step", {}, True),
        ("step", {"pe_position": "after"}, False),  # PE after attention: permutation invariant
        ("step", {"pe": "sinusoidal"}, True),
        ("step", {"pe": "hybrid", "block": "full"}, True),
        ("step", {"pe_scope": "token", "tokens": "both", "global_cls": False}, True),
        ("self_attention", {}, False),  # no temporal PE: blind to frame order
        ("attentive", {}, False),
        ("attentive", {"pe": "learnable"}, True),
        ("linear", {}, False),
    ],
)
def test_order_sensitivity(kind, options, order_sensitive):
    torch.manual_seed(0)
    head = create_head(kind, 32, 5, 4, 9, {**({"num_heads": 4} if kind != "linear" else {}), **options}).eval()
    if hasattr(head, "temporal_pe") and head.temporal_pe is not None:
        torch.nn.init.normal_(head.temporal_pe, std=1.0)  # trained-like PE magnitude
    w = _window()
    with torch.no_grad():
        base = head(w)
        reversed_ = head(w.flip(1))
        shuffled = head(w[:, [2, 0, 3, 1]])
    differs = not torch.allclose(base, reversed_, atol=1e-5) and not torch.allclose(base, shuffled, atol=1e-5)
    assert differs == order_sensitive


def test_unknown_kind_and_option_are_named():
    with pytest.raises(ValueError, match="unknown head kind 'mlp'"):
        create_head("mlp", 32, 5, 4, 9)
    with pytest.raises(ValueError, match="bogus"):
        create_head("step", 32, 5, 4, 9, {"bogus": 1})
    assert set(HEAD_KINDS) == {"step", "self_attention", "attentive", "linear"}


def test_cls_attention_is_the_global_cls_row_of_the_attention():
    """The map the debug image shows: the global CLS query's softmax row, frame tokens only."""
    import math

    from step_ros.model.heads import StepHead

    torch.manual_seed(0)
    head = StepHead(32, 5, 4, 9, num_heads=4).eval()
    window = torch.randn(2, 4, 10, 32)
    maps = head.cls_attention(window)
    assert maps.shape == (2, 4, 9) and (maps >= 0).all() and float(maps.sum(dim=(1, 2)).max()) < 1.0
    # Independently: the attention matrix from the head's own qkv projection.
    x = window[:, :, 1:] + head.positional()
    x = torch.cat([head.global_cls.expand(2, -1, -1), x.reshape(2, 36, 32)], dim=1)
    q, k, _ = head.attn.qkv(x).reshape(2, 37, 3, 4, 8).permute(2, 0, 3, 1, 4)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)  # (B, H, N, N)
    torch.testing.assert_close(maps, probs[:, :, 0, 1:].mean(1).reshape(2, 4, 9))


@pytest.mark.parametrize("options", [
    {},  # STEP as the papers define it
    {"pe": "none"},
    {"pe": "sinusoidal", "global_cls": False},
    {"pe": "hybrid", "pe_scope": "token"},
    {"tokens": "both"},
    {"tokens": "cls"},
    {"token_pool": 2},
    {"pe_position": "after"},  # not decomposable: the plain forward
    {"block": "full"},
])
@pytest.mark.parametrize("kernels", ["torch", "onnxruntime"])
def test_forward_indexed_equals_the_forward_of_each_window(options, kernels, monkeypatch):
    """Windows that share frames (offline replay): each frame projected once, positions added per
    window; configurations the algebra does not cover take the plain forward.  ``onnxruntime``:
    the same through the ONNX Runtime graph (split into one window per call here, as a batch
    whose score matrices pass the memory cap would be)."""
    from step_ros.model import indexed_onnx

    torch.manual_seed(1)
    head = create_head("step", 32, 6, 4, 16, {"num_heads": 4, **options}).eval()
    with torch.no_grad():  # a sharper head than its init, so that a wrong weight would show
        for prm in head.parameters():
            prm.mul_(8.0)
    frames = torch.randn(11, 17, 32)
    index = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4], [4, 5, 6, 7], [5, 5, 5, 6], [10, 9, 8, 7], [2, 7, 3, 10],
                          [6, 7, 8, 9], [7, 8, 9, 10], [0, 0, 0, 0]])  # overlapping, padded, reversed, shuffled
    if kernels == "onnxruntime":
        pytest.importorskip("onnxruntime", reason="the ONNX Runtime graph needs onnxruntime")
        monkeypatch.setattr(indexed_onnx, "SCORES_BYTES", 1)
    run, name = indexed_onnx.indexed_heads({"task": head}, kernels)
    assert name == kernels
    supported = indexed_onnx.indexed_onnx_unsupported(head) is None
    assert supported == ("pe_position" not in options and "block" not in options)
    assert isinstance(run["task"], indexed_onnx.OnnxIndexedHead) == (kernels == "onnxruntime" and supported)
    with torch.inference_mode():
        expected = head(frames[index])
        got = run["task"](frames, index)
    assert got.shape == expected.shape == (9, 6)
    assert float(expected.std()) > 1.0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)  # logits of tens: float32 rounding
