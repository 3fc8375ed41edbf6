"""Headless matplotlib and the figure helpers every package uses (PNG files people look at)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_figure(fig, path: str | Path) -> Path:
    """Write a figure as PNG and free it (long jobs draw many)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_histogram(values_ms: dict[str, list[float]], path: str | Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, v in values_ms.items():
        ax.hist(v, bins=40, alpha=0.6, label=f"{name} (median {np.median(v):.1f} ms)")
    ax.set_xlabel("ms")
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


__all__ = ["plot_histogram", "plt", "save_figure"]
