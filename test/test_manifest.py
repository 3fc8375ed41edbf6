"""Manifest validation names the bad field; head checkpoints must fit their manifest entry."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from conftest import ROOT, tiny_manifest_dict
from step_ros.model.manifest import ManifestError, load_manifest, parse_manifest
from step_ros.model.multitask import CheckpointError, MultiTaskModel, save_head


def _write(tmp_path, data, name="manifest.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.pop("backbone"), "backbone: missing"),
        (lambda d: d["backbone"].pop("arch"), "backbone.arch: missing"),
        (lambda d: d["backbone"].pop("random_seed"), "backbone.weights: missing"),
        (lambda d: d["backbone"].update(arch="vit_huge"), "backbone.arch: unknown architecture"),
        (lambda d: d.update(frames=0), "frames: must be positive"),
        (lambda d: d.update(frame_interval="2"), "frame_interval: must be int"),
        (lambda d: d.update(heads=[]), "heads: needs at least one head"),
        (lambda d: d["heads"][1].pop("labels"), "heads[1].labels: missing"),
        (lambda d: d["heads"][0].pop("task"), "heads[0].task: missing"),
        (lambda d: d["heads"][0].update(kind="mlp"), "heads[0].kind: unknown head kind"),
        (lambda d: d["heads"][0].update(symmetric_pairs=[["pick_up", "jump"]]), "heads[0].symmetric_pairs[0]"),
        (lambda d: d["heads"][1].update(task="task_step"), "heads[1].task: duplicate"),
        (lambda d: d["heads"][0].update(lables=["a"]), "heads[0].lables: unknown field"),
        (lambda d: d["heads"][0].update(labels=["a", "a"]), "heads[0].labels: duplicate label"),
    ],
)
def test_errors_name_the_field(tmp_path, mutate, field):
    data = copy.deepcopy(tiny_manifest_dict())
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert field in str(err.value) and str(path) in str(err.value)


def test_roundtrip_and_relative_paths(tmp_path):
    data = tiny_manifest_dict()
    data["heads"][0]["checkpoint"] = "heads/a.safetensors"
    m = load_manifest(_write(tmp_path, data))
    assert m.heads[0].checkpoint == tmp_path / "heads/a.safetensors"
    assert m.heads[0].counterpart("pick_up") == "put_down" and m.heads[0].counterpart("wave") is None
    with pytest.raises(ManifestError, match="label 'jump' is not in the labels of task 'task_step'"):
        m.heads[0].index("jump")
    out = m.save(tmp_path / "copy" / "m.yaml")
    again = load_manifest(out)
    assert again.heads[0].checkpoint.resolve() == (tmp_path / "heads/a.safetensors").resolve()
    assert again.to_dict() is not None and again.tasks == m.tasks


def test_missing_manifest_and_bad_yaml(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("heads: [unclosed")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(bad)


def test_head_checkpoints_are_checked_against_the_manifest(tmp_path):
    m = parse_manifest(tiny_manifest_dict(), ROOT)
    model = MultiTaskModel.from_manifest(m, load_checkpoints=False)
    d, n, t = model.backbone.dim, model.backbone.num_patches, m.frames
    for spec in m.heads:
        spec.checkpoint = save_head(model.heads[spec.task], spec, tmp_path / f"{spec.task}.safetensors",
                                    dim=d, frames=t, num_tokens=n)
    loaded = MultiTaskModel.from_manifest(m, backbone=model.backbone)
    for task in m.tasks:
        for a, b in zip(model.heads[task].state_dict().values(), loaded.heads[task].state_dict().values()):
            torch.testing.assert_close(a, b)

    # a checkpoint trained with other labels
    other = copy.deepcopy(m)
    other.heads[0].labels = ["pick_up", "put_down", "jump"]
    with pytest.raises(CheckpointError, match="labels"):
        MultiTaskModel.from_manifest(other, backbone=model.backbone)
    # a checkpoint whose shapes do not match (another head's weights, other frame count)
    wrong = copy.deepcopy(m)
    wrong.frames = 6
    with pytest.raises(CheckpointError, match="has shape"):
        MultiTaskModel.from_manifest(wrong, backbone=model.backbone)
    # a corrupt file and a missing one
    (tmp_path / "corrupt.safetensors").write_bytes(b"garbage")
    wrong.frames = m.frames
    wrong.heads[0].checkpoint = tmp_path / "corrupt.safetensors"
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        MultiTaskModel.from_manifest(wrong, backbone=model.backbone)
    wrong.heads[0].checkpoint = tmp_path / "missing.safetensors"
    with pytest.raises(CheckpointError, match="does not exist"):
        MultiTaskModel.from_manifest(wrong, backbone=model.backbone)
    wrong.heads[0].checkpoint = None
    with pytest.raises(ManifestError, match="checkpoint: missing"):
        MultiTaskModel.from_manifest(wrong, backbone=model.backbone)
