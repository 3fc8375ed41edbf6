"""extract -> train -> evaluate on a tiny synthetic set, end to end through the real video files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from conftest import TINY_OVERRIDES
from step_ros.data.synthetic import ATOMIC_ACTIONS, FINE_ACTIONS, OBJECTS, SYMMETRIC_PAIRS, generate
from step_ros.model.manifest import load_manifest
from step_ros.model.multitask import MultiTaskModel
from step_ros.data.annotations import load_annotations
from step_ros.data.video import read_video
from step_ros.model.multitask import backbone_from_manifest
from step_ros.training.jobs import evaluate_job, extract_job, select, train_job
from step_ros.training.train import TrainConfig, sample_windows, train_heads


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    csv = generate(root, seed=1, videos_per_class={"train": 2, "val": 0, "test": 1}, unknown_per_class=1,
                   size=64, num_frames=12, progress=False)
    manifest = {
        "name": "tiny-synthetic",
        "backbone": {"arch": "dinov2_vitt14", "random_seed": 0, "image_size": 42, "overrides": TINY_OVERRIDES},
        "frames": 4,
        "frame_interval": 2,
        "heads": [
            {"task": "fine_action", "labels": FINE_ACTIONS, "symmetric_pairs": [list(p) for p in SYMMETRIC_PAIRS]},
            {"task": "atomic_action", "labels": ATOMIC_ACTIONS},
            {"task": "object_in_use", "labels": OBJECTS},
        ],
    }
    template = root / "template.yaml"
    template.write_text(yaml.safe_dump(manifest))
    return root, csv, template


def test_extract_is_resumable(tiny_data):
    root, csv, template = tiny_data
    cache = extract_job(template, csv, root / "cache", split="test")
    files = sorted(cache.root.glob("*.safetensors"))
    assert len(files) == 2 * len(FINE_ACTIONS)  # known + unknown test videos
    mtimes = [f.stat().st_mtime_ns for f in files]
    files[0].unlink()  # an interrupted run: one file missing
    extract_job(template, csv, root / "cache", split="test")
    assert [f.stat().st_mtime_ns for f in sorted(cache.root.glob("*.safetensors"))][1:] == mtimes[1:]


def test_train_then_evaluate_writes_report_and_figures(tiny_data):
    root, csv, template = tiny_data
    config = TrainConfig(epochs=2, batch_size=8)
    trained = train_job(template, csv, root / "run", config, cache_root=root / "cache")
    assert all(h.checkpoint.is_file() for h in trained.heads)
    again = load_manifest(root / "run" / "manifest.yaml")
    assert again.backbone.fingerprint  # the heads are tied to these backbone weights
    report = evaluate_job(root / "run" / "manifest.yaml", csv, root / "eval", cache_root=root / "cache", quiet=True)
    fine = report["tasks"]["fine_action"]
    assert set(fine["orders"]) == {"normal", "reversed", "shuffled"}
    assert set(fine["orders"]["normal"]) == {"all", "known", "unknown"}
    s = fine["orders"]["normal"]["all"]
    assert s["n"] == 2 * len(FINE_ACTIONS) and 0 <= s["top1"] <= 1 and s["within_pair"] is not None
    assert len(fine["per_class"]) == len(FINE_ACTIONS)
    assert np.asarray(fine["confusion"]).sum() == s["n"]
    for name in ("report.json", "predictions.json", "confusion_fine_action.png", "per_class_fine_action.png"):
        assert (root / "eval" / name).stat().st_size > 0
    preds = json.loads((root / "eval" / "predictions.json").read_text())
    assert preds[0]["fine_action"]["pred"] in FINE_ACTIONS


def test_attentive_baseline_is_blind_to_order(tiny_data):
    root, csv, template = tiny_data
    trained = train_job(template, csv, root / "att", TrainConfig(epochs=1, batch_size=8), kind="attentive",
                        cache_root=root / "cache")
    assert {h.kind for h in trained.heads} == {"attentive"}
    model = MultiTaskModel.from_manifest(trained)
    report = evaluate_job(root / "att" / "manifest.yaml", csv, None, cache_root=root / "cache", model=model,
                          quiet=True)
    o = report["tasks"]["fine_action"]["orders"]
    assert o["reversed"]["all"]["top1"] == o["normal"]["all"]["top1"]
    assert o["shuffled"]["all"]["top1"] == o["normal"]["all"]["top1"]
    per_class = report["tasks"]["fine_action"]["per_class"]
    assert all(c["accuracy_reversed"] == c["accuracy"] for c in per_class)


def test_label_not_in_manifest_is_an_error(tiny_data, tmp_path):
    root, csv, template = tiny_data
    data = yaml.safe_load(template.read_text())
    data["heads"][0]["labels"] = [x for x in FINE_ACTIONS if x != "wave" and x != "hold"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(Exception, match="hold"):
        train_job(bad, csv, tmp_path / "out", TrainConfig(epochs=1), cache_root=root / "cache")


def test_hflip_cache_holds_the_mirrored_frames_tokens(tiny_data, tmp_path):
    root, csv, template = tiny_data
    plain = extract_job(template, csv, tmp_path / "cache", split="test")
    sample = select(load_annotations(csv), "test")[0]
    with pytest.raises(FileNotFoundError, match="extract --hflip"):
        plain.load(sample, hflip=True)
    cache = extract_job(template, csv, tmp_path / "cache", split="test", hflip=True)
    assert len(list(cache.root.glob("*-hflip.safetensors"))) == 2 * len(FINE_ACTIONS)
    backbone = backbone_from_manifest(load_manifest(template))
    frames = read_video(sample.video, sample.start_frame, sample.end_frame)
    mirrored = cache.load(sample, hflip=True)
    torch.testing.assert_close(mirrored, backbone.encode(np.ascontiguousarray(frames[:, :, ::-1])))
    assert not torch.allclose(mirrored, cache.load(sample))  # a different view, not a copy


def test_hflip_windows_come_from_either_view_and_keep_frame_order():
    tokens = [torch.arange(10.0).view(10, 1, 1).expand(10, 2, 3).clone() for _ in range(4)]
    mirrored = [-t for t in tokens]
    rng = np.random.default_rng(0)
    signs = []
    for _ in range(20):
        w = sample_windows(tokens, np.arange(4), 4, 2, rng, mirrored)  # (B, T, 1 + n, D)
        frame_ids = w[:, :, 0, 0]
        assert ((frame_ids.abs().diff(dim=1) == 2).all())  # order and interval kept in both views
        signs += [int(torch.sign(f.sum())) for f in frame_ids if f.abs().sum() > 0]
    assert set(signs) == {1, -1}
    # Without mirrored tokens the random stream is the one training used before hflip existed.
    a = sample_windows(tokens, np.arange(4), 4, 2, np.random.default_rng(1))
    b = sample_windows(tokens, np.arange(4), 4, 2, np.random.default_rng(1), None)
    assert torch.equal(a, b) and (a >= 0).all()


def test_train_with_hflip_records_it_and_needs_the_mirrored_tokens(tiny_data):
    root, csv, template = tiny_data
    config = TrainConfig(epochs=1, batch_size=8, hflip=True)
    train_job(template, csv, root / "flip", config, cache_root=root / "cache")
    assert json.loads((root / "flip" / "train_log.json").read_text())["config"]["hflip"] is True
    manifest = load_manifest(template)
    tokens = [torch.zeros(12, 5, 192)]
    with pytest.raises(ValueError, match="hflip"):
        train_heads(manifest, 192, 4, tokens, {}, config, progress=False)
