"""Training and evaluation reports: per-task tables and the figures of a run (PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..console import pct, print_table
from ..figures import plt, save_figure


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


def plot_training(log: list[dict], path: str | Path, selected: int | None = None) -> Path:
    """Loss, training accuracy and validation accuracy on separate axes, the kept epoch marked.

    Separate panels because the two accuracies mean different things: a head at 100 % train
    and chance on validation must look wrong at a glance, not like two lines near each other.
    """
    epochs = [e["epoch"] for e in log]
    tasks = [k.split("/", 1)[1] for k in log[0] if k.startswith("train_acc/")]
    has_val = "val_loss" in log[0]
    fig, axes = plt.subplots(1, 3 if has_val else 2, figsize=(13 if has_val else 9, 3.6))
    axes[0].plot(epochs, [e["loss"] for e in log], label="train (epoch mean)")
    if has_val:
        axes[0].plot(epochs, [e["val_loss"] for e in log], label="validation")
    axes[0].set_title("loss (sum over tasks)")
    panels = [(axes[1], "train_acc", "training accuracy (random clips)")]
    if has_val:
        panels.append((axes[2], "val_acc", "validation accuracy (centred clip)"))
    for ax, key, title in panels:
        for task in tasks:
            ax.plot(epochs, [e[f"{key}/{task}"] for e in log], label=task)
        ax.set_ylim(0, 1.02)
        ax.set_title(title)
    for ax in axes:
        ax.set_xlabel("epoch")
        if selected is not None:
            ax.axvline(selected, color="grey", ls="--", lw=1, label=f"kept: epoch {selected}")
        ax.legend(fontsize=7)
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


__all__ = [
    "plot_comparison",
    "plot_confusion",
    "plot_per_class",
    "plot_training",
    "print_evaluation",
]
