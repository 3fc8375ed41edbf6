"""The shipped demo model: its random backbone is rebuilt bit-identically, and it is order-aware."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from step_ros.data.synthetic import SYMMETRIC_PAIRS, render_clip
from step_ros.demo import DEMO_MANIFEST
from step_ros.model.manifest import load_manifest
from step_ros.model.multitask import MultiTaskModel


@pytest.fixture(scope="module")
def demo():
    # from_manifest checks backbone.fingerprint: the seeded weights must hash to what the
    # heads were trained on, on this machine and with these library versions
    return MultiTaskModel.from_manifest(load_manifest(DEMO_MANIFEST))


def test_demo_manifest_describes_three_tasks_on_a_random_backbone(demo):
    m = demo.manifest
    assert m.tasks == ["fine_action", "atomic_action", "object_in_use"]
    assert m.backbone.random_seed == 0 and m.backbone.fingerprint == demo.backbone.fingerprint
    assert demo.backbone.source == "random weights, seed 0"  # labelled as such
    assert len(m.head("fine_action").symmetric_pairs) == len(SYMMETRIC_PAIRS)


def test_demo_step_head_tells_an_action_from_its_reversal(demo):
    """Reversing a clip should move the STEP head's vote to the pair's other member."""
    m = demo.manifest
    spec = m.head("fine_action")
    span = (m.frames - 1) * m.frame_interval + 1
    flips = 0
    with torch.inference_mode():
        for a, b in SYMMETRIC_PAIRS:
            clip = render_clip(a, seed=11, context="known", num_frames=span)[:: m.frame_interval]
            tokens = demo.backbone.encode(clip)
            fwd = torch.softmax(demo.heads["fine_action"](tokens[None])[0], -1).numpy()
            rev = torch.softmax(demo.heads["fine_action"](tokens.flip(0)[None])[0], -1).numpy()
            ia, ib = spec.index(a), spec.index(b)
            flips += (fwd[ia] > fwd[ib]) and (rev[ib] > rev[ia])
    assert flips >= len(SYMMETRIC_PAIRS) // 2, f"only {flips} of {len(SYMMETRIC_PAIRS)} pairs flip under reversal"
    assert np.isfinite(fwd).all()
