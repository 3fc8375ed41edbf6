"""``step-ros benchmark``: import -> manifest from a template -> compare, end to end on the NTU
fixture, and the report's Table 3 columns beside the papers' figures; the shipped templates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import TINY_OVERRIDES
from step_ros.benchmark import RECIPES, paper_row, papers_figures, template_path
from step_ros.data.importers import IMPORTERS, load_pairs, make_manifest
from step_ros.data.importers import drive_and_act, ikea_asm, ntu, ssv2  # noqa: F401 - they register themselves
from test_import_ntu import PERFORMANCES, name, tiny_video

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_runs_end_to_end_with_the_papers_columns(tmp_path):
    root = tmp_path / "ntu"
    for i, (folder, s, p, r, a) in enumerate(PERFORMANCES):
        for c in (1, 2, 3):
            tiny_video(root / folder / name(s, c, p, r, a), seed=10 * i + c)
    template = tmp_path / "tiny.yaml"
    template.write_text(yaml.safe_dump({
        "name": "tiny-ntu", "backbone": {"arch": "dinov2_vitt14", "image_size": 42, "overrides": TINY_OVERRIDES},
        "frames": 4, "frame_interval": 2, "clip_sampling": "uniform"}))  # the papers NTU protocol
    out = tmp_path / "bench"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "step_ros", "benchmark", "ntu120", "--root", str(root), "--out", str(out),
         "--protocol", "xset", "--random-weights", "0", "--template", str(template), "--kinds", "step,attentive",
         "--epochs", "2", "--batch-size", "4", "--clips", "1", "--cache", str(tmp_path / "cache"), "--device", "cpu",
         "--workers", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "benchmark.json").read_text())
    assert report["protocol"] == "xset" and report["recipe"]["optimizer"] == "sgd"  # NTU: the papers' SGD
    rows = report["tasks"]["action"]
    assert [r["kind"] for r in rows] == ["step", "attentive"]
    for r in rows:
        assert {"symmetric", "non_symmetric", "top1", "reversed", "shuffled"} <= set(r)
        assert [p["pair"] for p in r["pairs"]] == [list(x) for x in load_pairs("ntu120")["tasks"]["action"]]
    # the printed table has this run and the papers' cross-setup row for each kind
    assert "nearly symmetric" in proc.stdout and "STEP, cross-setup" in proc.stdout
    assert "WARNING: RANDOM backbone weights" in proc.stdout
    assert (out / "data" / "annotations.csv").is_file() and (out / "compare" / "step" / "eval" / "report.json").is_file()
    assert "clip_sampling: uniform" in (out / "template.yaml").read_text()  # trained and tested on uniform clips


def test_shipped_templates_give_valid_manifests(tmp_path):
    """Every dataset has a ViT-S and a ViT-B template, and each makes a valid manifest with the
    dataset's pairs (labels: the pairs' classes plus one other)."""
    for dataset in RECIPES:
        assert dataset in IMPORTERS
        pairs = load_pairs(dataset)
        assert pairs.get("rule") and pairs.get("tasks"), dataset
        for arch in ("vits14", "vitb14"):
            path = template_path(dataset, arch)
            base = yaml.safe_load(path.read_text())
            base["backbone"]["random_seed"] = 0
            imp = tmp_path / f"{dataset}-{arch}"
            imp.mkdir()
            labels = {task: sorted({x for pair in plist for x in pair}) + ["other"] for task, plist in
                      pairs["tasks"].items()}
            (imp / "labels.yaml").write_text(yaml.safe_dump(labels))
            (imp / "pairs.yaml").write_text(yaml.safe_dump(pairs))
            make_manifest(imp, base, imp / "manifest.yaml")
            text = (imp / "manifest.yaml").read_text()
            assert f"dinov2_vit{arch[3]}14" in text and "frames: 16" in text, path


def test_papers_rows_are_found_per_kind_and_protocol():
    ntu = papers_figures("ntu120")
    assert "cross-subject" in paper_row(ntu, "step", "action", "xsub")["method"]
    assert "cross-setup" in paper_row(ntu, "step", "action", "xset")["method"]
    for dataset, task in (("drive_and_act", "fine_action"), ("ikea_asm", "fine_action"), ("ssv2", "fine_action")):
        row = paper_row(papers_figures(dataset), "step", task)
        assert row is not None and row["top1"] and "source" in row, dataset
