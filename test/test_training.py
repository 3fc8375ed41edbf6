"""extract -> train -> evaluate on a tiny synthetic set, end to end through the real video files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from conftest import synthetic_manifest
from step_ros.data.synthetic import FINE_ACTIONS, generate
from step_ros.model.manifest import load_manifest
from step_ros.model.multitask import MultiTaskModel
from step_ros.data.annotations import load_annotations
from step_ros.data.video import read_video
from step_ros.model.multitask import backbone_from_manifest
from step_ros.training.cache import CacheError
from step_ros.training.jobs import evaluate_job, extract_job, select, train_job
from step_ros.training.loader import Split, TokensInRam, WindowDataset
from step_ros.training.train import TrainConfig, train_heads


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    csv = generate(root, seed=1, videos_per_class={"train": 2, "val": 0, "test": 1}, unknown_per_class=1,
                   size=64, num_frames=12, progress=False)
    template = synthetic_manifest(root / "template.yaml", "tiny-synthetic")
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
    with pytest.raises(CacheError, match="extract --hflip"):
        plain.load(sample, hflip=True)
    cache = extract_job(template, csv, tmp_path / "cache", split="test", hflip=True)
    assert len(list(cache.root.glob("*-hflip.safetensors"))) == 2 * len(FINE_ACTIONS)
    backbone = backbone_from_manifest(load_manifest(template))
    frames = read_video(sample.video, sample.start_frame, sample.end_frame)
    mirrored = cache.load(sample, hflip=True)
    assert mirrored.dtype == torch.float16
    expected = backbone.encode(np.ascontiguousarray(frames[:, :, ::-1]))
    torch.testing.assert_close(mirrored.float(), expected, rtol=1e-3, atol=1e-3)  # float16 rounding only
    assert not torch.allclose(mirrored, cache.load(sample))  # a different view, not a copy


def test_hflip_windows_come_from_either_view_and_keep_frame_order():
    tokens = [torch.arange(10.0).view(10, 1, 1).expand(10, 2, 3).clone() for _ in range(4)]
    mirrored = [-t for t in tokens]
    windows = WindowDataset(TokensInRam(tokens, mirrored), frames=4, frame_interval=2, seed=0, hflip=True)
    signs = []
    for epoch in range(20):
        for i in range(4):
            _, _, w = windows[(epoch, i, 1.0)]  # (T, 1 + n, D)
            frame_ids = w[:, 0, 0]
            assert (frame_ids.abs().diff() == 2).all()  # order and interval kept in both views
            if frame_ids.abs().sum() > 0:
                signs.append(int(torch.sign(frame_ids.sum())))
    assert set(signs) == {1, -1}
    # The window of a (seed, epoch, sample) does not depend on what else was drawn before it.
    assert torch.equal(windows[(3, 2, 1.0)][2], windows[(3, 2, 1.0)][2])
    plain = WindowDataset(TokensInRam(tokens), frames=4, frame_interval=2, seed=0)
    assert all((plain[(e, 1, 1.0)][2] >= 0).all() for e in range(10))  # without hflip: the plain view only


def test_train_with_hflip_records_it_and_needs_the_mirrored_tokens(tiny_data):
    root, csv, template = tiny_data
    config = TrainConfig(epochs=1, batch_size=8, hflip=True)
    train_job(template, csv, root / "flip", config, cache_root=root / "cache")
    assert json.loads((root / "flip" / "train_log.json").read_text())["config"]["hflip"] is True
    manifest = load_manifest(template)
    tokens = [torch.zeros(12, 5, 192)]
    labels = {s.task: torch.zeros(1, dtype=torch.long) for s in manifest.heads}
    with pytest.raises(ValueError, match="mirrored"):
        train_heads(manifest, 192, 4, Split(TokensInRam(tokens), labels), config, progress=False)
