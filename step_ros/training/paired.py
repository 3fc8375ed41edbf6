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

__all__ = ["compare_evaluations", "load_predictions", "mcnemar_p", "paired_difference"]


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: P(a split at least as uneven as b : c | b + c, p = 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / (1 << n)  # exact integers: 2.0 ** n overflows past n = 1023
    return min(1.0, 2.0 * tail)


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
    if -margin < low and high < margin:
        verdict = f"equivalent within ±{margin:g}"
    elif low > 0:
        verdict = "B better"
    elif high < 0:
        verdict = "A better"
    else:
        verdict = "undecided"
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


def _match(a_rows: list[dict], b_rows: list[dict], a_name: str, b_name: str) -> tuple[list[tuple[dict, dict]], str]:
    """Pairs of rows for the same clip.  Full paths first; file names when both sides moved folders."""
    for by_name in (False, True):
        a, b = _keyed(a_rows, by_name, a_name), _keyed(b_rows, by_name, b_name)
        if a.keys() == b.keys():
            return [(a[k], b[k]) for k in sorted(a)], "file name" if by_name else "path"
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    raise ValueError(f"not the same test clips: {len(only_a)} only in {a_name} (e.g. {only_a[:1]}), "
                     f"{len(only_b)} only in {b_name} (e.g. {only_b[:1]}); evaluate both on the same split")


def compare_evaluations(a_path: str | Path, b_path: str | Path, margin: float = 1.0) -> dict:
    """Per task and context (``all`` first), the paired difference of B against A."""
    a_name, b_name = str(a_path), str(b_path)
    pairs, matched_by = _match(load_predictions(a_path), load_predictions(b_path), a_name, b_name)
    tasks = [k for k, v in pairs[0][0].items() if isinstance(v, dict) and "pred" in v]
    missing = [t for t in tasks if t not in pairs[0][1]]
    if missing:
        raise ValueError(f"{b_name} has no predictions for task(s) {missing} of {a_name}")
    contexts = ["all"] + sorted({str(x.get("context") or "") for x, _ in pairs} - {""})
    results: dict[str, dict[str, dict]] = {}
    for task in tasks:
        for x, y in pairs:
            if x[task]["true"] != y[task]["true"]:
                raise ValueError(f"{x['video']}: the true {task} label differs ({x[task]['true']!r} in {a_name}, "
                                 f"{y[task]['true']!r} in {b_name}); not the same annotations")
        results[task] = {}
        for ctx in contexts:
            sel = [(x, y) for x, y in pairs if ctx == "all" or x.get("context") == ctx]
            a_ok = np.array([x[task]["pred"] == x[task]["true"] for x, _ in sel])
            b_ok = np.array([y[task]["pred"] == y[task]["true"] for _, y in sel])
            results[task][ctx] = paired_difference(a_ok, b_ok, margin)
    contexts_n = Counter(str(x.get("context") or "-") for x, _ in pairs)
    return {"a": a_name, "b": b_name, "clips": len(pairs), "matched_by": matched_by, "margin_points": margin,
            "clips_per_context": dict(contexts_n), "tasks": results}


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", type=Path, help="evaluation A: an `evaluate --out` folder or its predictions.json")
    parser.add_argument("b", type=Path, help="evaluation B, of the same test clips")
    parser.add_argument("--margin", type=float, default=1.0,
                        help="points within which A and B count as equivalent (the verdict column)")
    parser.add_argument("--out", type=Path, default=None, help="write the comparison here as JSON")


def main(args: argparse.Namespace) -> int:
    if args.margin <= 0:
        raise ValueError(f"--margin must be > 0 points, got {args.margin}")
    result = compare_evaluations(args.a, args.b, args.margin)
    print_comparison(result)
    console.print(f"{result['clips']} clips matched by {result['matched_by']}; 95 % interval: Agresti-Min for "
                  "matched proportions; p: McNemar's exact test")
    if args.out is not None:
        console.print(f"wrote {write_json(result, args.out)}")
    return 0
