"""Reports people look at: console tables (rich) and PNG figures (matplotlib, headless)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)  # logs: wide tables


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def write_json(data: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))  # Paths and the like as text
    return path


def print_table(title: str, columns: list[str], rows: Iterable[Iterable[Any]]) -> None:
    table = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[str(x) for x in row])
    console.print(table)


def print_evaluation(report: dict, title: str = "") -> None:
    """One table per task: rows = order x context, columns = the papers' accuracies."""
    for task, r in report["tasks"].items():
        rows = []
        for order, by_ctx in r["orders"].items():
            for ctx, s in by_ctx.items():
                rows.append([f"{order} / {ctx}", pct(s["top1"]), pct(s["symmetric"]), pct(s["non_symmetric"]),
                             pct(s["within_pair"]), s["n"]])
        print_table(f"{title}{task}: top-1 %", ["order / context", "all", "nearly symmetric", "non-symmetric",
                                                "within pair", "clips"], rows)
        worst = sorted(r["per_class"], key=lambda c: c["accuracy"])[:6]
        print_table(
            f"{task}: weakest classes",
            ["class", "acc %", "most confused with", "rate %", "acc reversed %"],
            [[c["label"] + (" *" if c["symmetric"] else ""), pct(c["accuracy"]), c["confused_with"] or "-",
              pct(c["confusion_rate"]), pct(c.get("accuracy_reversed"))] for c in worst],
        )


def save_figure(fig, path: str | Path) -> Path:
    """Write a figure as PNG and free it (long jobs draw many)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_confusion(matrix: np.ndarray, labels: list[str], path: str | Path, title: str) -> Path:
    m = np.asarray(matrix, dtype=float)
    norm = m / np.maximum(1, m.sum(1, keepdims=True))
    size = max(5, 0.45 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(labels)):
        for j in range(len(labels)):
            if m[i, j]:
                ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_per_class(per_class: list[dict], path: str | Path, title: str) -> Path:
    labels = [c["label"] for c in per_class]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(labels) + 2), 4))
    ax.bar(x - 0.2, [c["accuracy"] for c in per_class], 0.4, label="frames in order")
    if "accuracy_reversed" in per_class[0]:
        ax.bar(x + 0.2, [c["accuracy_reversed"] for c in per_class], 0.4, label="frames reversed")
    for i, c in enumerate(per_class):
        if c["symmetric"]:
            ax.axvspan(i - 0.5, i + 0.5, color="orange", alpha=0.08, lw=0)
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title + "  (shaded: nearly symmetric)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_training(log: list[dict], path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    epochs = [e["epoch"] for e in log]
    ax.plot(epochs, [e["loss"] for e in log], label="loss (last batch)")
    for key in [k for k in log[0] if k.startswith("train_acc/")]:
        ax.plot(epochs, [e[key] for e in log], label=key)
    ax.set_xlabel("epoch")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_comparison(rows: list[dict], path: str | Path, title: str) -> Path:
    """Grouped bars: one group per metric, one bar per head kind."""
    metrics = [k for k in rows[0] if k != "kind"]
    x = np.arange(len(metrics))
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(metrics) + 2), 4))
    for i, r in enumerate(rows):
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, [r[m] or 0 for m in metrics], width, label=r["kind"])
    ax.set_xticks(x, metrics, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("top-1")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_histogram(values_ms: dict[str, list[float]], path: str | Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, v in values_ms.items():
        ax.hist(v, bins=40, alpha=0.6, label=f"{name} (median {np.median(v):.1f} ms)")
    ax.set_xlabel("ms")
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


__all__ = [
    "console",
    "pct",
    "plot_comparison",
    "plot_confusion",
    "plot_histogram",
    "plot_per_class",
    "plot_training",
    "print_evaluation",
    "print_table",
    "save_figure",
    "write_json",
]
