"""``step-ros diff-eval``: two evaluations of the same clips compared pair by pair."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from step_ros.training.paired import compare_evaluations, mcnemar_p, paired_difference
from test_cli import one_error_line, step_ros


def test_mcnemar_exact_values():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(3, 3) == 1.0
    assert mcnemar_p(0, 6) == pytest.approx(2 / 64)  # all six changes one way
    assert mcnemar_p(9, 1) == pytest.approx(2 * (1 + 10) / 1024)
    assert mcnemar_p(1, 9) == mcnemar_p(9, 1)
    # thousands of changed clips (a large test set): exact integers, no float overflow
    assert mcnemar_p(600, 600) == 1.0
    assert mcnemar_p(1000, 1200) == pytest.approx(math.erfc(199.5 / math.sqrt(2200) / math.sqrt(2)), rel=0.05)


def test_paired_interval_is_the_standard_error_of_the_per_clip_difference():
    rng = np.random.default_rng(0)
    a = rng.random(500) < 0.8
    b = a.copy()
    flip = rng.choice(500, 60, replace=False)
    b[flip] = ~b[flip]
    r = paired_difference(a, b)
    d = b.astype(float) - a.astype(float)  # +1 only B right, -1 only A right
    # Agresti-Min: the per-clip differences with half a clip added to each of the four cells
    d = np.concatenate([d, [1.0, -1.0, 0.0, 0.0]])
    w = np.concatenate([np.ones(500), np.full(4, 0.5)])
    mean = np.average(d, weights=w)
    se = math.sqrt(np.average((d - mean) ** 2, weights=w) / w.sum())
    assert r["only_a_right"] == int((a & ~b).sum()) and r["only_b_right"] == int((b & ~a).sum())
    assert r["diff_points"] == pytest.approx(100 * (b.mean() - a.mean()))
    assert r["ci95_points"] == pytest.approx([100 * (mean - 1.96 * se), 100 * (mean + 1.96 * se)], abs=1e-3)
    assert r["acc_a"] == pytest.approx(a.mean()) and r["acc_b"] == pytest.approx(b.mean())


def test_few_changed_clips_are_no_evidence():
    """3 of 6 clips lost (McNemar p = 0.25): the plain Wald interval, [-90, -10], would call A better."""
    a = np.ones(6, bool)
    b = np.array([True, False] * 3)
    r = paired_difference(a, b)
    assert r["mcnemar_p"] == pytest.approx(0.25)
    assert r["ci95_points"] == pytest.approx([-79.04, 4.04], abs=0.01)  # centre -3/8, se sqrt(2.875) / 8
    assert r["verdict"] == "undecided"
    assert paired_difference(a, a)["verdict"] == "undecided"  # 6 clips, none changed: still too few to say


def test_verdicts():
    n = 20000
    a = np.ones(n, bool)
    a[:4000] = False
    same = a.copy()
    same[[0, 5000]] = ~same[[0, 5000]]  # one clip gained, one lost: 0 points, tight interval
    assert paired_difference(a, same, margin=1.0)["verdict"] == "equivalent within ±1"
    better = a.copy()
    better[:1000] = True  # +5 points, no clip lost
    assert paired_difference(a, better)["verdict"] == "B better"
    assert paired_difference(better, a)["verdict"] == "A better"
    # 128 clips, B gets 6 more right and 4 fewer: +1.6 points, well within the noise
    small_a = np.zeros(128, bool)
    small_a[:100] = True
    small_b = small_a.copy()
    small_b[:4] = False
    small_b[100:106] = True
    r = paired_difference(small_a, small_b)
    assert r["verdict"] == "undecided" and r["ci95_points"][0] < -1 and r["ci95_points"][1] > 1


def _rows(preds: dict[str, list[str]], truth: dict[str, list[str]], contexts: list[str], folder: str) -> list[dict]:
    n = len(contexts)
    return [{"video": f"/{folder}/videos/v{i:03d}.mp4", "start_frame": 0, "context": contexts[i],
             **{t: {"true": truth[t][i], "pred": preds[t][i], "confidence": 0.9} for t in truth}} for i in range(n)]


def test_compare_evaluations_per_task_and_context(tmp_path):
    contexts = ["known"] * 6 + ["unknown"] * 4
    truth = {"fine": ["a", "b"] * 5, "obj": ["x"] * 10}
    a = _rows({"fine": ["a", "b"] * 5, "obj": ["x"] * 5 + ["y"] * 5}, truth, contexts, "d")
    b = _rows({"fine": ["b", "b"] * 5, "obj": ["x"] * 10}, truth, contexts, "d")
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "predictions.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b[::-1]))  # order does not matter
    r = compare_evaluations(tmp_path / "A", tmp_path / "b.json")
    assert r["clips"] == 10 and r["matched_by"] == "path"
    fine, obj = r["tasks"]["fine"], r["tasks"]["obj"]
    assert list(fine) == ["all", "known", "unknown"]
    assert fine["all"]["only_a_right"] == 5 and fine["all"]["only_b_right"] == 0
    assert fine["known"]["n"] == 6 and fine["known"]["diff_points"] == pytest.approx(-50)
    assert obj["all"]["diff_points"] == pytest.approx(50) and obj["known"]["only_b_right"] == 1
    assert obj["unknown"]["acc_a"] == 0 and obj["unknown"]["acc_b"] == 1


def test_moved_folders_match_by_file_name_and_other_clips_are_refused(tmp_path):
    contexts = ["known"] * 4
    truth = {"fine": ["a"] * 4}
    (tmp_path / "a.json").write_text(json.dumps(_rows({"fine": ["a"] * 4}, truth, contexts, "one")))
    (tmp_path / "b.json").write_text(json.dumps(_rows({"fine": ["a"] * 4}, truth, contexts, "two")))
    assert compare_evaluations(tmp_path / "a.json", tmp_path / "b.json")["matched_by"] == "file name"
    (tmp_path / "c.json").write_text(json.dumps(_rows({"fine": ["a"] * 3}, {"fine": ["a"] * 3}, contexts[:3], "one")))
    with pytest.raises(ValueError, match="not the same test clips: 1 only in"):
        compare_evaluations(tmp_path / "a.json", tmp_path / "c.json")
    (tmp_path / "d.json").write_text(json.dumps(_rows({"fine": ["a"] * 4}, {"fine": ["b"] * 4}, contexts, "one")))
    with pytest.raises(ValueError, match="true fine label differs"):
        compare_evaluations(tmp_path / "a.json", tmp_path / "d.json")


def test_cli_writes_the_comparison_and_errors_are_one_line(tmp_path):
    truth = {"fine": ["a", "b"] * 3}
    contexts = ["known"] * 6
    (tmp_path / "a.json").write_text(json.dumps(_rows({"fine": ["a", "b"] * 3}, truth, contexts, "d")))
    (tmp_path / "b.json").write_text(json.dumps(_rows({"fine": ["a", "a"] * 3}, truth, contexts, "d")))
    out = tmp_path / "diff.json"
    run = step_ros("diff-eval", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "undecided" in run.stdout
    assert json.loads(out.read_text())["tasks"]["fine"]["all"]["only_a_right"] == 3
    line = one_error_line(step_ros("diff-eval", str(tmp_path / "a.json"), str(tmp_path / "nothing")), "diff-eval")
    assert "no predictions.json" in line
    (tmp_path / "bad.json").write_text("{not json")
    assert "not JSON" in one_error_line(step_ros("diff-eval", str(tmp_path / "a.json"), str(tmp_path / "bad.json")),
                                        "diff-eval")


def test_the_demo_models_own_evaluation_against_a_changed_copy(tmp_path):
    """The rows `step-ros evaluate` really writes (the demo model's predictions.json)."""
    from conftest import ROOT

    demo = ROOT / "models" / "demo" / "eval"
    rows = json.loads((demo / "predictions.json").read_text())
    same = compare_evaluations(demo, demo)
    assert same["clips"] == len(rows) and set(same["tasks"]) == {"fine_action", "atomic_action", "object_in_use"}
    assert set(same["tasks"]["fine_action"]) == {"all", "known", "unknown"}
    assert all(r["only_a_right"] == r["only_b_right"] == 0 for t in same["tasks"].values() for r in t.values())
    right = next(i for i, r in enumerate(rows) if r["fine_action"]["pred"] == r["fine_action"]["true"])
    rows[right]["fine_action"]["pred"] = "hold" if rows[right]["fine_action"]["true"] != "hold" else "blink"
    (tmp_path / "changed.json").write_text(json.dumps(rows))
    r = compare_evaluations(demo, tmp_path / "changed.json")["tasks"]
    ctx = rows[right]["context"]
    assert r["fine_action"][ctx]["only_a_right"] == 1 and r["fine_action"][ctx]["only_b_right"] == 0
    assert r["atomic_action"]["all"]["only_a_right"] == 0
