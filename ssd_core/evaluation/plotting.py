"""Training curves as PNG files (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt

__all__ = ["save_curves"]


def save_curves(
    path: str | Path,
    steps: Sequence[int],
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    ylabel: str,
    xlabel: str = "step",
    log_y: bool = False,
) -> Path:
    """Plot each named series against `steps` into one PNG at `path` (parent created).

    Returns:
        The PNG's path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    marker = "o" if len(steps) <= 50 else None  # sparse series (periodic evaluations): show the points
    for name, values in series.items():
        axes.plot(steps, values, label=name, linewidth=1.2, marker=marker, markersize=3)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    if log_y:
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
