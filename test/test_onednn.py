"""The backbone's Linear layers through oneDNN: same numbers as F.linear (float32 rounding), same
parameters and keys, a safe fallback wherever the packed path does not apply."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import TINY_OVERRIDES, random_frames
from step_ros.model.backbone import build_backbone
from step_ros.model.onednn import OneDnnLinear, onednn_linear_available, use_onednn_linears

pytestmark = pytest.mark.skipif(not onednn_linear_available(),
                                reason="this PyTorch has no oneDNN packed linear (torch.ops.mkldnn._linear_pointwise)")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 32, bias=False), nn.LayerNorm(32))


def test_switched_layers_compute_what_they_did_with_the_same_state():
    plain = _model().eval()
    fast = copy.deepcopy(plain)
    assert use_onednn_linears(fast) == 2
    assert [type(m) for m in fast if isinstance(m, nn.Linear)] == [OneDnnLinear, OneDnnLinear]
    assert list(fast.state_dict()) == list(plain.state_dict())
    for shape in [(1, 48), (257, 48), (3, 17, 48)]:
        x = torch.randn(shape)
        with torch.inference_mode():
            torch.testing.assert_close(fast(x), plain(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(fast(x[..., ::2, :]), plain(x[..., ::2, :]), atol=1e-5, rtol=1e-5)  # strided
    assert fast[0]._packed is not None  # the packed path ran


def test_an_updated_weight_is_repacked():
    fast = _model().eval()
    use_onednn_linears(fast)
    x = torch.randn(5, 48)
    with torch.inference_mode():
        before = fast(x)
    with torch.no_grad():
        fast[0].weight.mul_(-1.0)  # in place: same storage, new version
    with torch.inference_mode():
        after = fast(x)
    reference = copy.deepcopy(fast)
    for m in reference.modules():
        if isinstance(m, OneDnnLinear):
            m.__class__ = nn.Linear
    torch.testing.assert_close(after, reference(x).detach(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after, before, atol=1e-3)


def test_fallbacks_autograd_copies_and_other_dtypes():
    plain = _model()
    fast = copy.deepcopy(plain)
    use_onednn_linears(fast)
    x = torch.randn(4, 48)
    for m in (plain, fast):  # recording autograd: the plain path, the same gradients
        (m(x) ** 3).sum().backward()
    assert float(fast[0].weight.grad.abs().sum()) > 0
    torch.testing.assert_close(fast[0].weight.grad, plain[0].weight.grad)
    with torch.inference_mode():
        y = fast(x)
    twin = copy.deepcopy(fast)  # the packed weight is not copied (it cannot be), only repacked
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), y)
        made_here = copy.deepcopy(twin)  # weights that are inference tensors (no version counter)
        torch.testing.assert_close(made_here(x), y)
    torch.testing.assert_close(fast.double()(x.double()).detach(), y.double(), atol=1e-5, rtol=1e-5)


def test_backbone_uses_it_and_the_switch_turns_it_off(monkeypatch):
    on = build_backbone("dinov2_vitt14", None, image_size=56, random_seed=3, overrides=TINY_OVERRIDES)
    assert on.onednn_linears == sum(isinstance(m, OneDnnLinear) for m in on.modules()) > 0
    monkeypatch.setenv("STEP_ROS_ONEDNN", "0")
    off = build_backbone("dinov2_vitt14", None, image_size=56, random_seed=3, overrides=TINY_OVERRIDES)
    assert off.onednn_linears == 0 and not any(isinstance(m, OneDnnLinear) for m in off.modules())
    assert on.fingerprint == off.fingerprint
    frames = random_frames(3, 64, 80)
    torch.testing.assert_close(on.encode(frames), off.encode(frames), atol=1e-4, rtol=1e-4)


def test_moving_or_releasing_the_weights_drops_the_packed_copy(tiny_model):
    """A packed weight is a second copy: moving the module (or releasing a backbone whose graph
    backend took over, as the node does on a small-memory robot) must not keep it alive."""
    backbone = copy.deepcopy(tiny_model.backbone)
    backbone.encode(random_frames(1, 64, 80))
    linears = [m for m in backbone.modules() if isinstance(m, OneDnnLinear)]
    assert linears and all(m._packed is not None for m in linears)
    backbone.release_weights()
    assert all(m._packed is None for m in linears)
