"""``step-ros diff-eval A B``: is evaluation B better than A, or is the difference noise?

Two evaluations of the same test videos (two ``evaluate`` folders, or their ``predictions.json``)
are compared clip by clip, per task and context.  Why paired: the same clips were scored by both,
so what decides whether a difference is real is how many clips *changed*, not the two accuracies
on their own.  With 128 test clips per context one clip is 0.8 points, and two training runs
that differ only in their seed (or in the stored token precision) typically disagree on 5-15 %
of the clips; a difference of a few points is then within the noise.  The command says so.

Per row: both top-1 accuracies, the difference B - A in points with its 95 % confidence interval,
the exact McNemar p-value (two-sided binomial test of ``b`` against ``b + c``, ``b`` and ``c`` the
clips only A, only B got right), and, for a ``--margin`` in points, a verdict.  The interval is
Agresti and Min's (Stat. Med. 2005) for matched proportions: the Wald interval of the paired
difference, ``(c - b) / n +- 1.96 sqrt(b + c - (c - b)^2 / n) / n``, after adding half a clip to
each of the four cells (both right, only A, only B, neither); it covers well even with few
changed clips, where the plain Wald interval is far too narrow.  Verdicts:

* ``equivalent within ±margin``: the whole interval lies inside ±margin;
* ``B better`` / ``A better``: the interval excludes 0;
* ``undecided``: neither -- the test set is too small to tell a ±margin difference from noise.

That interval covers the test clips, not the training: a second training run of the same recipe
is a new draw, and on the demo recipe two seeds differ by up to 4 points on 4,096 clips
(docs/RESULTS.md).  So "is recipe B within a point of recipe A" is a question about the means
over training runs, and ``diff-eval A1 A2 ... --vs B1 B2 ...`` answers it
(:func:`compare_runs`): each side's runs (two or more, every one scored on the same clips),
the difference of the mean accuracies with a 95 % Welch t interval whose variance has three
parts -- the spread between A's runs, the spread between B's runs, and the test set's own
sampling (the spread over clips of the per-clip difference in run-averaged correctness, less
the runs' share of it: a crossed runs x clips design) -- and, for the margin, how many runs per
side would decide equivalence if the spread stays as measured and the true difference were 0.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from ..console import console, print_table, write_json

Z95 = 1.959963984540054  # two-sided 95 % normal quantile

__all__ = ["compare_evaluations", "compare_runs", "load_predictions", "mcnemar_p", "paired_difference",
           "run_difference"]


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: P(a split at least as uneven as b : c | b + c, p = 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / (1 << n)  # exact integers: 2.0 ** n overflows past n = 1023
    return min(1.0, 2.0 * tail)


def _verdict(low: float, high: float, margin: float) -> str:
    """What a 95 % interval of B - A (points) says at a ±margin."""
    if -margin < low and high < margin:
        return f"equivalent within ±{margin:g}"
    if low > 0:
        return "B better"
    if high < 0:
        return "A better"
    return "undecided"


def paired_difference(a_correct: np.ndarray, b_correct: np.ndarray, margin: float = 1.0) -> dict:
    """Accuracy of A and B on the same clips, B - A in points with a 95 % interval, and a verdict."""
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_difference needs two equal-length vectors, got {a.shape} and {b.shape}")
    n = int(a.size)
    if n == 0:
        raise ValueError("paired_difference: no clips to compare")
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    diff = (only_b - only_a) / n
    # Agresti-Min: half a clip added to each of the four cells before the Wald interval, which
    # keeps it honest with few changed clips (the plain one claims a difference from 3 of 6).
    ca, cb, m = only_a + 0.5, only_b + 0.5, n + 2.0
    centre = (cb - ca) / m
    se = math.sqrt(max(0.0, ca + cb - (cb - ca) ** 2 / m)) / m
    low, high = 100 * (centre - Z95 * se), 100 * (centre + Z95 * se)
    verdict = _verdict(low, high, margin)
    return {"n": n, "acc_a": float(a.mean()), "acc_b": float(b.mean()), "diff_points": 100 * diff,
            "ci95_points": [low, high], "only_a_right": only_a, "only_b_right": only_b,
            "mcnemar_p": mcnemar_p(only_a, only_b), "verdict": verdict}


def load_predictions(path: str | Path) -> list[dict]:
    """``predictions.json`` of an ``evaluate`` run: the folder or the file."""
    p = Path(path)
    if p.is_dir():
        p = p / "predictions.json"
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no predictions.json (give an `evaluate --out` folder or the file)")
    try:
        rows = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not JSON ({exc})") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and "video" in r for r in rows):
        raise ValueError(f"{p}: expected the list of per-clip rows that `step-ros evaluate` writes")
    return rows


def _keyed(rows: list[dict], by_name: bool, source: str) -> dict[tuple[str, int], dict]:
    out = {}
    for r in rows:
        video = Path(r["video"]).name if by_name else r["video"]
        key = (video, int(r.get("start_frame", 0)))
        if key in out:
            raise ValueError(f"{source}: clip {key[0]} (start frame {key[1]}) appears twice")
        out[key] = r
    return out


def _align(runs: list[tuple[str, list[dict]]]) -> tuple[list[list[dict]], str]:
    """Every run's rows in one clip order.  Full paths first; file names when runs moved folders."""
    first_name = runs[0][0]
    for by_name in (False, True):
        keyed = [_keyed(rows, by_name, name) for name, rows in runs]
        if all(k.keys() == keyed[0].keys() for k in keyed):
            order = sorted(keyed[0])
            return [[k[key] for key in order] for k in keyed], "file name" if by_name else "path"
    name, other = next((n, k) for (n, _), k in zip(runs, keyed) if k.keys() != keyed[0].keys())
    only_first, only_other = sorted(set(keyed[0]) - set(other)), sorted(set(other) - set(keyed[0]))
    raise ValueError(f"not the same test clips: {len(only_first)} only in {first_name} (e.g. {only_first[:1]}), "
                     f"{len(only_other)} only in {name} (e.g. {only_other[:1]}); evaluate every run on the same split")


def _tasks_and_contexts(aligned: list[list[dict]], names: list[str]) -> tuple[list[str], list[str]]:
    """The first run's tasks, checked against every other run's predictions and true labels."""
    first = aligned[0]
    tasks = [k for k, v in first[0].items() if isinstance(v, dict) and "pred" in v]
    for name, rows in zip(names[1:], aligned[1:]):
        missing = [t for t in tasks if t not in rows[0]]
        if missing:
            raise ValueError(f"{name} has no predictions for task(s) {missing} of {names[0]}")
        for task in tasks:
            for x, y in zip(first, rows):
                if x[task]["true"] != y[task]["true"]:
                    raise ValueError(f"{x['video']}: the true {task} label differs ({x[task]['true']!r} in "
                                     f"{names[0]}, {y[task]['true']!r} in {name}); not the same annotations")
    contexts = ["all"] + sorted({str(x.get("context") or "") for x in first} - {""})
    return tasks, contexts


def _per_cell(paths: list[str | Path], compare) -> dict:
    """``compare((runs, clips) correctness)`` per task and context (``all`` first), every run
    on the same clips."""
    names = [str(p) for p in paths]
    aligned, matched_by = _align([(n, load_predictions(n)) for n in names])
    tasks, contexts = _tasks_and_contexts(aligned, names)
    first = aligned[0]
    keep = {ctx: np.array([ctx == "all" or x.get("context") == ctx for x in first]) for ctx in contexts}
    results: dict[str, dict[str, dict]] = {}
    for task in tasks:
        correct = np.array([[r[task]["pred"] == r[task]["true"] for r in rows] for rows in aligned])
        results[task] = {ctx: compare(correct[:, mask]) for ctx, mask in keep.items()}
    return {"clips": len(first), "matched_by": matched_by,
            "clips_per_context": dict(Counter(str(x.get("context") or "-") for x in first)), "tasks": results}


def compare_evaluations(a_path: str | Path, b_path: str | Path, margin: float = 1.0) -> dict:
    """Per task and context (``all`` first), the paired difference of B against A."""
    cells = _per_cell([a_path, b_path], lambda correct: paired_difference(correct[0], correct[1], margin))
    return {"a": str(a_path), "b": str(b_path), "margin_points": margin, **cells}


def _t975(df: np.ndarray | float) -> np.ndarray | float:
    from scipy import stats

    return stats.t.ppf(0.975, df)


def _welch(parts: list[tuple[float, int]]) -> tuple[float, float]:
    """Standard error and Welch-Satterthwaite degrees of freedom of a sum of variance terms
    ``(variance of the mean, degrees of freedom)``."""
    se2 = sum(v for v, _ in parts)
    denominator = sum(v * v / df for v, df in parts if v > 0)
    return math.sqrt(se2), (se2 * se2 / denominator if denominator > 0 else math.inf)


def runs_for_margin(var_a: float, var_b: float, var_clips: float, clips: int, margin: float,
                    most: int = 100_000) -> int | None:
    """Runs per side for which a 95 % interval around a true difference of 0 fits in ±margin.

    ``var_a``, ``var_b``: the run-to-run variances of the accuracy (fractions squared);
    ``var_clips``: the test set's share, which more runs do not shrink.  None: not within
    ``most`` runs (the test set alone is too small for the margin, or the spread too large).
    The half-width shrinks with the run count, so a bisection finds the smallest count.
    """

    def fits(n: int) -> bool:
        se, df = _welch([(var_a / n, n - 1), (var_b / n, n - 1), (var_clips, max(1, clips - 1))])
        return float(_t975(df)) * se < margin

    if not fits(most):
        return None
    low, high = 1, most  # fits(high); low does not fit (or is below the smallest count, 2)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return max(2, high)


def run_difference(a_correct: np.ndarray, b_correct: np.ndarray, margin: float = 1.0) -> dict:
    """Mean accuracy of A's runs against B's, on the same clips: ``(runs, clips)`` booleans each.

    B - A in points with a 95 % Welch t interval over the runs of both sides plus the test
    set's sampling, a verdict at ±margin, and the runs per side a ±margin verdict would take.
    """
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"run_difference needs (runs, clips) arrays over the same clips, got {a.shape} and {b.shape}")
    (na, n), nb = a.shape, b.shape[0]
    if na < 2 or nb < 2:
        raise ValueError(f"an interval over training runs needs at least 2 runs per side, got {na} and {nb}: "
                         "train another seed, or compare two evaluations clip by clip (diff-eval A B)")
    if n < 2:
        raise ValueError("run_difference: fewer than 2 clips to compare")
    acc_a, acc_b = a.mean(axis=1), b.mean(axis=1)
    var_a, var_b = float(acc_a.var(ddof=1)), float(acc_b.var(ddof=1))
    # The test set is a sample of clips too.  Its share: the spread over clips of the per-clip
    # difference of run-averaged correctness, less what the runs' clip-by-clip disagreement puts
    # into that spread (counted in var_a and var_b already, and shrinking with more runs).  A
    # run's overall shift moves every clip alike, so it is taken out of the per-clip variance.
    spread = float((b.mean(axis=0) - a.mean(axis=0)).var(ddof=1))
    run_noise = (max(0.0, float(a.var(axis=0, ddof=1).mean()) - var_a) / na
                 + max(0.0, float(b.var(axis=0, ddof=1).mean()) - var_b) / nb)
    var_clips = max(0.0, spread - run_noise) / n
    se, df = _welch([(var_a / na, na - 1), (var_b / nb, nb - 1), (var_clips, n - 1)])
    diff = float(acc_b.mean() - acc_a.mean())
    t = float(_t975(df))
    low, high = 100 * (diff - t * se), 100 * (diff + t * se)
    return {"n": n, "runs_a": na, "runs_b": nb, "acc_a": acc_a.tolist(), "acc_b": acc_b.tolist(),
            "mean_a": float(acc_a.mean()), "mean_b": float(acc_b.mean()),
            "sd_a_points": 100 * math.sqrt(var_a), "sd_b_points": 100 * math.sqrt(var_b),
            "test_set_se_points": 100 * math.sqrt(var_clips), "diff_points": 100 * diff,
            "ci95_points": [low, high], "df": df, "verdict": _verdict(low, high, margin),
            "runs_for_margin": runs_for_margin(var_a, var_b, var_clips, n, margin / 100)}


def compare_runs(a_paths: list[str | Path], b_paths: list[str | Path], margin: float = 1.0) -> dict:
    """Per task and context, the mean over B's runs against the mean over A's (same test clips)."""
    na = len(a_paths)
    cells = _per_cell([*a_paths, *b_paths], lambda correct: run_difference(correct[:na], correct[na:], margin))
    return {"a": [str(p) for p in a_paths], "b": [str(p) for p in b_paths], "margin_points": margin, **cells}


def print_comparison(result: dict) -> None:
    rows = []
    for task, by_ctx in result["tasks"].items():
        for ctx, r in by_ctx.items():
            low, high = r["ci95_points"]
            rows.append([task, ctx, r["n"], f"{100 * r['acc_a']:.1f}", f"{100 * r['acc_b']:.1f}",
                         f"{r['diff_points']:+.1f}", f"[{low:+.1f}, {high:+.1f}]",
                         f"{r['only_a_right']} / {r['only_b_right']}", f"{r['mcnemar_p']:.3f}", r["verdict"]])
    print_table(f"B - A, paired over the same clips (A: {result['a']}, B: {result['b']})",
                ["task", "context", "clips", "A top-1 %", "B top-1 %", "B - A, points", "95 % CI", "only A / only B right",
                 "McNemar p", f"verdict (margin ±{result['margin_points']:g})"], rows, text_columns=2)


def print_run_comparison(result: dict) -> None:
    rows = []
    for task, by_ctx in result["tasks"].items():
        for ctx, r in by_ctx.items():
            low, high = r["ci95_points"]
            need = r["runs_for_margin"]
            rows.append([task, ctx, r["n"], f"{100 * r['mean_a']:.1f} ± {r['sd_a_points']:.1f}",
                         f"{100 * r['mean_b']:.1f} ± {r['sd_b_points']:.1f}", f"{r['diff_points']:+.1f}",
                         f"[{low:+.1f}, {high:+.1f}]", r["verdict"], "-" if need is None else need])
    a, b = result["a"], result["b"]
    print_table(f"mean of B's {len(b)} runs - mean of A's {len(a)} runs, on the same clips",
                ["task", "context", "clips", "A top-1 %, mean ± sd", "B top-1 %, mean ± sd", "B - A, points",
                 "95 % CI", f"verdict (margin ±{result['margin_points']:g})", "runs per side for ±margin"],
                rows, text_columns=2)


def plot_run_comparison(result: dict, path: str | Path) -> Path:
    """Every run's top-1 per task and context (left), and B - A with its interval against the
    ±margin band (right): what the table says, at a glance."""
    from ..figures import plt, save_figure

    cells = [(task, ctx, r) for task, by_ctx in result["tasks"].items() for ctx, r in by_ctx.items()]
    names = [f"{task}\n{ctx}" for task, ctx, _ in cells]
    y = np.arange(len(cells))[::-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.45 * len(cells) + 1.6), sharey=True)
    for offset, side, colour in ((0.12, "a", "tab:blue"), (-0.12, "b", "tab:orange")):
        for i, (_, _, r) in zip(y, cells):
            runs = 100 * np.asarray(r[f"acc_{side}"])
            left.scatter(runs, np.full(len(runs), i + offset), s=14, color=colour, alpha=0.7,
                         label=f"{side.upper()}: {len(runs)} runs" if i == y[0] else None)
            left.plot([100 * r[f"mean_{side}"]] * 2, [i + offset - 0.15, i + offset + 0.15], color=colour, lw=2)
    left.set_yticks(y, names, fontsize=7)
    left.set_xlabel("top-1 %, each run (bar: mean)")
    left.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1), ncol=2, frameon=False)
    margin = result["margin_points"]
    right.axvspan(-margin, margin, color="tab:green", alpha=0.15, label=f"±{margin:g} points")
    right.axvline(0, color="grey", lw=0.8)
    for i, (_, _, r) in zip(y, cells):
        low, high = r["ci95_points"]
        right.plot([low, high], [i, i], color="black", lw=1.5)
        right.scatter([r["diff_points"]], [i], color="black", s=16, zorder=3)
        right.annotate(r["verdict"], (high, i), xytext=(4, -3), textcoords="offset points", fontsize=7)
    right.set_xlabel("B - A, points (95 % interval over runs and clips)")
    low, high = right.get_xlim()
    right.set_xlim(low, high + 0.3 * (high - low))  # room for the verdicts
    right.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1), frameon=False)
    fig.suptitle(f"B: {len(result['b'])} runs against A: {len(result['a'])} runs, {result['clips']} clips", fontsize=9)
    return save_figure(fig, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", type=Path, nargs="+", metavar="A",
                        help="evaluation A and evaluation B (`evaluate --out` folders or their predictions.json); "
                             "with --vs: the evaluations of recipe A's training runs")
    parser.add_argument("--vs", type=Path, nargs="+", default=None, metavar="B",
                        help="after A's: the evaluations of recipe B's training runs (each side two or more runs, "
                             "every one on the same test clips): the interval then covers the training runs, not only "
                             "the clips")
    parser.add_argument("--margin", type=float, default=1.0,
                        help="points within which A and B count as equivalent (the verdict column)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the comparison here as JSON (over runs: a PNG of it beside, same name)")


def main(args: argparse.Namespace) -> int:
    if args.margin <= 0:
        raise ValueError(f"--margin must be > 0 points, got {args.margin}")
    if args.vs is None and len(args.a) != 2:
        raise ValueError(f"give two evaluations (diff-eval A B), or runs of two recipes (diff-eval A1 A2 ... --vs "
                         f"B1 B2 ...); got {len(args.a)} evaluation(s) and no --vs")
    over_runs = args.vs is not None and (len(args.a) > 1 or len(args.vs) > 1)
    if over_runs:
        result = compare_runs(args.a, args.vs, args.margin)
        print_run_comparison(result)
        console.print(f"{result['clips']} clips matched by {result['matched_by']}; 95 % interval: Welch's t over "
                      "the runs of each side plus the test set's sampling; runs per side: what a ±margin verdict "
                      "takes if the true difference is 0 and the spread stays as measured ('-': over 100,000)")
    else:
        a, b = (args.a[0], args.vs[0]) if args.vs is not None else args.a
        result = compare_evaluations(a, b, args.margin)
        print_comparison(result)
        console.print(f"{result['clips']} clips matched by {result['matched_by']}; 95 % interval: Agresti-Min for "
                      "matched proportions; p: McNemar's exact test.  It covers the test clips, not the training: "
                      "to compare recipes, train several seeds of each and give them as A1 A2 ... --vs B1 B2 ...")
    if args.out is not None:
        console.print(f"wrote {write_json(result, args.out)}")
        if over_runs:
            console.print(f"wrote {plot_run_comparison(result, Path(args.out).with_suffix('.png'))}")
    return 0
