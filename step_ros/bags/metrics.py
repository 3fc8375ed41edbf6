"""What a planner needs to know about a stream of predictions, scored against labelled intervals.

Definitions (docs/BAGS.md, "Metrics for planners"), per task:

- **window accuracy**: complete windows lying wholly inside one labelled interval, scored
  against its label (windows straddling two actions are not scored: either label is defensible);
- **segment accuracy**: per labelled interval with scored windows, its last window right, and the
  majority of its windows right (ties go to the label seen first);
- **time to recognition**: from an action's start to the stamp of the first prediction inside it
  that is confident, stable and correct (the newest frame's stamp: when the node can publish);
  median and p95 over recognised actions, and the share never recognised;
- **false switches**: changes of the predicted label, between consecutive scored windows inside
  one interval, to a label other than the interval's (a change *to* the right label is the
  recognition, measured above), per minute of observed time (first to last scored window of
  each interval); also counted over the confident and stable predictions only, what a cautious
  planner acts on;
- **counterpart share**: of the scored windows whose true class has a nearly symmetric twin,
  the share that names the twin.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..model.manifest import HeadSpec, Manifest
from .truth import Interval, Truth

__all__ = ["Record", "score", "score_window_labels"]


@dataclass
class Record:
    """One prediction (replayed, or read from a recorded HumanAction topic)."""

    stamp: float
    window_start: float
    complete: bool
    labels: dict[str, str]  # task -> predicted label (top-1 after smoothing)
    confidence: dict[str, float]
    confident: dict[str, bool]
    stable: dict[str, bool] = field(default_factory=dict)
    probs: dict[str, np.ndarray] = field(default_factory=dict)
    top_k: dict[str, list] = field(default_factory=dict)
    compute_ms: float | None = None


def _acc(mask: np.ndarray, correct: np.ndarray) -> float | None:
    return round(float(correct[mask].mean()), 4) if mask.any() else None


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def score_window_labels(spec: HeadSpec | None, pred: list[str], true: list[str], confident: list[bool],
                        probs: np.ndarray | None) -> dict:
    """Accuracy overall / nearly symmetric / non-symmetric (+ within pair from probs)."""
    pred_a, true_a = np.array(pred, dtype=object), np.array(true, dtype=object)
    correct = pred_a == true_a
    sym_labels = spec.symmetric_labels if spec is not None else set()
    is_sym = np.array([t in sym_labels for t in true], dtype=bool)
    conf = np.array(confident, dtype=bool)
    counterpart = [spec.counterpart(t) if spec is not None else None for t in true]
    named_twin = np.array([c is not None and p == c for p, c in zip(pred, counterpart)], dtype=bool)
    out = {
        "n": int(len(true)),
        "top1": _acc(np.ones(len(true), bool), correct),
        "symmetric": _acc(is_sym, correct),
        "non_symmetric": _acc(~is_sym, correct),
        "n_symmetric": int(is_sym.sum()),
        "counterpart_share": _acc(is_sym, named_twin),
        "confident_coverage": round(float(conf.mean()), 4) if len(conf) else None,
        "confident_accuracy": _acc(conf, correct),
        "within_pair": None,
    }
    if spec is not None and probs is not None and spec.symmetric_pairs and len(true):
        within = []
        for a, b in spec.symmetric_pairs:
            ia, ib = spec.labels.index(a), spec.labels.index(b)
            for own, twin, name in ((ia, ib, a), (ib, ia, b)):
                rows = true_a == name
                within.extend((probs[rows, own] > probs[rows, twin]).tolist())
        out["within_pair"] = round(float(np.mean(within)), 4) if within else None
    return out


def _by_interval(scored: list[tuple[Record, Interval]]) -> list[tuple[Interval, list[Record]]]:
    """The scored windows of each interval, oldest first."""
    by_iv: dict[int, tuple[Interval, list[Record]]] = {}
    for r, iv in scored:
        by_iv.setdefault(id(iv), (iv, []))[1].append(r)
    return [(iv, sorted(rs, key=lambda r: r.stamp)) for iv, rs in by_iv.values()]


def _segments(task: str, scored: list[tuple[Record, Interval]]) -> dict:
    groups = _by_interval(scored)
    last = majority = 0
    for iv, rs in groups:
        last += rs[-1].labels[task] == iv.label
        majority += Counter(r.labels[task] for r in rs).most_common(1)[0][0] == iv.label
    n = len(groups)
    return {"n": n, "last_window": _r(last / n) if n else None, "majority": _r(majority / n) if n else None}


def _recognition(task: str, intervals: list[Interval], records: list[Record], stamps: np.ndarray) -> dict:
    times, never, empty = [], 0, 0
    for iv in intervals:
        lo = int(np.searchsorted(stamps, iv.start - 1e-6, side="left"))
        hit = None
        seen = False
        for r in records[lo:]:
            if r.stamp > iv.end + 1e-6:
                break
            if not iv.contains(r.stamp):
                continue
            seen = True
            if r.labels.get(task) == iv.label and r.confident.get(task) and r.stable.get(task):
                hit = r
                break
        if hit is None:
            never += 1
            empty += not seen
        else:
            times.append(hit.stamp - iv.start)
    n = len(intervals)
    a = np.asarray(times)
    return {
        "actions": n,
        "recognised": len(times),
        "never_recognised": never,
        "never_fraction": _r(never / n) if n else None,
        "without_predictions": empty,
        "median_s": _r(np.median(a), 3) if a.size else None,
        "p95_s": _r(np.percentile(a, 95), 3) if a.size else None,
        "max_s": _r(a.max(), 3) if a.size else None,
    }


def _false_switches(labels: list[str], truth: str) -> int:
    return sum(a != b and b != truth for a, b in zip(labels, labels[1:]))


def _switches(task: str, scored: list[tuple[Record, Interval]]) -> dict:
    switches = stable_switches = 0
    observed = 0.0
    for iv, rs in _by_interval(scored):
        switches += _false_switches([r.labels[task] for r in rs], iv.label)
        held = [r.labels[task] for r in rs if r.confident.get(task) and r.stable.get(task)]
        stable_switches += _false_switches(held, iv.label)
        observed += rs[-1].stamp - rs[0].stamp
    per_min = (lambda k: _r(60.0 * k / observed, 3) if observed > 0 else None)
    return {"switches": switches, "per_min": per_min(switches), "confident_stable_switches": stable_switches,
            "confident_stable_per_min": per_min(stable_switches), "observed_s": _r(observed, 3)}


def score(records: list[Record], manifest: Manifest, truth: Truth) -> dict:
    """Per task, per context (``all`` and each context of the truth): every metric above."""
    specs = {h.task: h for h in manifest.heads}
    records = sorted((r for r in records if r.complete), key=lambda r: r.stamp)
    out: dict[str, Any] = {}
    for task in truth.tasks:
        spec = specs.get(task)
        rows = [r for r in records if task in r.labels]
        row_stamps = np.array([r.stamp for r in rows])
        ivs = truth.by_task[task]
        if spec is not None:
            ivs = [iv for iv in ivs if iv.label in spec.labels]
        known_ids = {id(iv) for iv in ivs}
        inside = [(r, iv) for r in rows if (iv := truth.window(task, r.window_start, r.stamp)) is not None]
        scored = [(r, iv) for r, iv in inside if id(iv) in known_ids]
        unknown_windows = len(inside) - len(scored)
        by_ctx = {}
        for ctx in ["all", *truth.contexts]:
            sel = scored if ctx == "all" else [(r, iv) for r, iv in scored if iv.context == ctx]
            sel_ivs = ivs if ctx == "all" else [iv for iv in ivs if iv.context == ctx]
            if not sel and not sel_ivs:
                continue
            probs = None
            if spec is not None and sel and all(task in r.probs for r, _ in sel):
                probs = np.stack([r.probs[task] for r, _ in sel])
            entry = score_window_labels(spec, [r.labels[task] for r, _ in sel], [iv.label for _, iv in sel],
                                        [r.confident.get(task, False) for r, _ in sel], probs)
            entry["segments"] = _segments(task, sel)
            entry["recognition"] = _recognition(task, sel_ivs, rows, row_stamps)
            entry["switches"] = _switches(task, sel)
            by_ctx[ctx] = entry
        per_class = []
        if spec is not None and scored:
            for label in spec.labels:
                sel = [r for r, iv in scored if iv.label == label]
                if not sel:
                    continue
                wrong = Counter(r.labels[task] for r in sel if r.labels[task] != label)
                confused, count = wrong.most_common(1)[0] if wrong else (None, 0)
                twin = spec.counterpart(label)
                per_class.append({
                    "label": label, "support": len(sel), "symmetric": twin is not None,
                    "accuracy": _r(sum(r.labels[task] == label for r in sel) / len(sel)),
                    "confused_with": confused, "confusion_rate": _r(count / len(sel)),
                    "counterpart_share": _r(sum(r.labels[task] == twin for r in sel) / len(sel)) if twin else None,
                })
        out[task] = {"contexts": by_ctx, "true_label_not_in_manifest": unknown_windows, "per_class": per_class,
                     "in_manifest": spec is not None}
    return out
