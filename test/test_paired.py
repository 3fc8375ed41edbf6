"""``step-ros diff-eval``: two evaluations of the same clips compared pair by pair, and the runs of
two recipes compared over their training runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from step_ros.training.paired import (compare_evaluations, compare_runs, mcnemar_p, paired_difference, run_difference,
                                     runs_for_margin)
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


# --- several training runs per side: the interval covers the runs, not only the clips ---------

def _runs(rng: np.random.Generator, accuracy: float, spread: float, runs: int, clips: int) -> np.ndarray:
    """(runs, clips) correctness: each run its own accuracy around ``accuracy`` (sd ``spread``)."""
    rates = np.clip(rng.normal(accuracy, spread, runs), 0, 1)
    return rng.random((runs, clips)) < rates[:, None]


def test_run_interval_is_welchs_t_interval_when_the_test_set_adds_nothing():
    from scipy import stats

    rng = np.random.default_rng(3)
    for _ in range(20):  # independent clips per run: the clip share is estimated at 0 about half of the time
        a, b = _runs(rng, 0.7, 0.02, 3, 400), _runs(rng, 0.72, 0.03, 4, 400)
        r = run_difference(a, b)
        if r["test_set_se_points"] == 0:
            break
    assert r["test_set_se_points"] == 0
    welch = stats.ttest_ind(b.mean(axis=1), a.mean(axis=1), equal_var=False)
    low, high = welch.confidence_interval(0.95)
    assert r["ci95_points"] == pytest.approx([100 * low, 100 * high], rel=1e-9)
    assert r["diff_points"] == pytest.approx(100 * (b.mean(axis=1).mean() - a.mean(axis=1).mean()))
    assert r["runs_a"] == 3 and r["runs_b"] == 4 and len(r["acc_b"]) == 4
    assert r["sd_a_points"] == pytest.approx(100 * a.mean(axis=1).std(ddof=1))


def test_identical_runs_leave_the_test_set_as_the_only_noise():
    """Runs that agree clip for clip: the interval is the clips' paired interval, whatever the run count."""
    n = 20000
    a = np.zeros(n, bool)
    a[:14000] = True
    b = a.copy()
    b[14000:14400] = True  # +2 points, no clip lost
    b[:100] = False        # -0.5
    r = run_difference(np.stack([a, a]), np.stack([b, b, b]))
    d = b.astype(float) - a.astype(float)
    se = d.std(ddof=1) / math.sqrt(n)
    assert r["sd_a_points"] == r["sd_b_points"] == 0
    assert r["test_set_se_points"] == pytest.approx(100 * se)
    assert r["ci95_points"] == pytest.approx([100 * (d.mean() - 1.96 * se), 100 * (d.mean() + 1.96 * se)], abs=1e-3)
    assert r["verdict"] == "B better"
    assert r["runs_for_margin"] == 2  # runs add no noise and the clips' share (±0.2 points) fits in ±1


def test_runs_for_margin():
    # the test set alone too noisy for the margin: no number of runs helps
    assert runs_for_margin(1e-4, 1e-4, (0.6 / 100) ** 2, 4096, 0.01) is None
    # a spread of 1 point per run, no clip share: the smallest n whose interval fits in ±1 point
    n = runs_for_margin(1e-4, 1e-4, 0.0, 4096, 0.01)
    from scipy import stats

    def half_width(k: int) -> float:
        return stats.t.ppf(0.975, 2 * (k - 1)) * math.sqrt(2e-4 / k)

    assert half_width(n) < 0.01 <= half_width(n - 1)
    assert runs_for_margin(4e-4, 4e-4, 0.0, 4096, 0.01) > n  # twice the spread: more runs
    assert runs_for_margin(0.0, 0.0, 0.0, 4096, 0.01) == 2


def test_many_close_runs_are_equivalent_and_few_are_undecided():
    rng = np.random.default_rng(0)
    a, b = _runs(rng, 0.8, 0.002, 30, 4000), _runs(rng, 0.8, 0.002, 30, 4000)
    r = run_difference(a, b, margin=1.0)
    assert r["verdict"] == "equivalent within ±1", r
    few = run_difference(_runs(rng, 0.8, 0.03, 2, 4000), _runs(rng, 0.8, 0.03, 2, 4000), margin=1.0)
    assert few["verdict"] == "undecided" and few["runs_for_margin"] > 2


def test_one_run_per_side_is_refused_with_what_to_do():
    a = np.ones((1, 10), bool)
    with pytest.raises(ValueError, match="at least 2 runs per side, got 1 and 2.*train another seed"):
        run_difference(a, np.ones((2, 10), bool))
    with pytest.raises(ValueError, match="same clips"):
        run_difference(np.ones((2, 10), bool), np.ones((2, 9), bool))


def test_compare_runs_per_task_and_context(tmp_path):
    contexts = ["known"] * 6 + ["unknown"] * 4
    truth = {"fine": ["a", "b"] * 5}
    right, wrong = ["a", "b"] * 5, ["b", "a"] * 5
    runs = {  # A: 10 / 10 and 8 / 10 right; B: 6 / 10 and 6 / 10
        "a1": right, "a2": right[:8] + wrong[8:], "b1": right[:6] + wrong[6:], "b2": wrong[:4] + right[4:],
    }
    for name, pred in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(_rows({"fine": pred}, truth, contexts, "d")))
    paths = {k: tmp_path / f"{k}.json" for k in runs}
    r = compare_runs([paths["a1"], paths["a2"]], [paths["b1"], paths["b2"]])
    assert r["a"] == [str(paths["a1"]), str(paths["a2"])] and r["clips"] == 10
    fine = r["tasks"]["fine"]
    assert list(fine) == ["all", "known", "unknown"]
    assert fine["all"]["acc_a"] == [1.0, 0.8] and fine["all"]["acc_b"] == [0.6, 0.6]
    assert fine["all"]["diff_points"] == pytest.approx(-30)
    assert fine["known"]["acc_a"] == [1.0, 1.0] and fine["known"]["acc_b"] == [1.0, 1 / 3]
    assert fine["unknown"]["n"] == 4
    (tmp_path / "other.json").write_text(json.dumps(_rows({"fine": right[:9]}, {"fine": truth["fine"][:9]},
                                                          contexts[:9], "d")))
    with pytest.raises(ValueError, match=f"not the same test clips: 1 only in {paths['a1']}.* 0 only in .*other"):
        compare_runs([paths["a1"], tmp_path / "other.json"], [paths["b1"], paths["b2"]])


def test_cli_compares_runs_of_two_recipes(tmp_path):
    truth = {"fine": ["a", "b"] * 6}
    contexts = ["known"] * 12
    preds = {"a1": ["a", "b"] * 6, "a2": ["a", "b"] * 5 + ["b", "b"], "b1": ["a", "a"] * 6, "b2": ["a", "b"] * 6}
    for name, pred in preds.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(_rows({"fine": pred}, truth, contexts, "d")))
    out = tmp_path / "runs.json"
    run = step_ros("diff-eval", str(tmp_path / "a1.json"), str(tmp_path / "a2.json"), "--vs", str(tmp_path / "b1.json"),
                   str(tmp_path / "b2.json"), "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "mean of B's 2 runs - mean of A's 2 runs" in run.stdout and "Welch" in run.stdout
    saved = json.loads(out.read_text())["tasks"]["fine"]["all"]
    assert saved["runs_a"] == saved["runs_b"] == 2 and saved["verdict"] == "undecided"
    assert (tmp_path / "runs.png").stat().st_size > 10_000  # the picture of the table, beside it
    # one run per side with --vs: the clip-by-clip comparison, and it says what it does not cover
    run = step_ros("diff-eval", str(tmp_path / "a1.json"), "--vs", str(tmp_path / "b1.json"))
    assert run.returncode == 0, run.stderr
    assert "McNemar" in run.stdout and "not the training" in run.stdout
    line = one_error_line(step_ros("diff-eval", str(tmp_path / "a1.json")), "diff-eval")
    assert "give two evaluations" in line and "--vs" in line
    line = one_error_line(step_ros("diff-eval", str(tmp_path / "a1.json"), str(tmp_path / "a2.json"),
                                   "--vs", str(tmp_path / "b1.json")), "diff-eval")
    assert "at least 2 runs per side, got 2 and 1" in line


def test_run_interval_covers_the_true_difference_of_two_recipes():
    """Simulated recipes on a crossed runs x clips design: the 95 % interval holds the difference
    over the population of clips in about 95 % of repetitions.  Here recipe B helps some clips
    and hurts others (its effect varies from clip to clip), so the test set's own sampling is
    most of the noise: without that share the interval covers about 75 %."""
    rng = np.random.default_rng(0)

    def draw(runs: int, clips: int, base: np.ndarray, effect: np.ndarray) -> np.ndarray:
        logit = base + effect + rng.normal(0, 1.0, (runs, clips))  # runs disagree clip by clip
        return rng.random((runs, clips)) < 1 / (1 + np.exp(-logit))

    def population(size: int = 400_000) -> float:
        base, effect = rng.normal(1.0, 2.0, size), rng.normal(0.1, 2.0, size)
        pa = 1 / (1 + np.exp(-(base + rng.normal(0, 1.0, size))))
        pb = 1 / (1 + np.exp(-(base + effect + rng.normal(0, 1.0, size))))
        return 100 * float(pb.mean() - pa.mean())

    truth = population()
    repetitions, covered = 200, 0
    for _ in range(repetitions):
        base, effect = rng.normal(1.0, 2.0, 300), rng.normal(0.1, 2.0, 300)
        low, high = run_difference(draw(10, 300, base, 0.0), draw(10, 300, base, effect))["ci95_points"]
        covered += low <= truth <= high
    assert 0.88 <= covered / repetitions <= 0.99, covered / repetitions
