"""PNG figures of evaluation results (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_by_domain(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Grouped bars of mean accuracy ± CI95 per domain and method, one panel per shot.

    ``rows``: dicts with ``domain``, ``method``, ``shot``, ``accuracy`` and ``ci95`` (fractions).
    """
    plt = _pyplot()
    shots = sorted({r["shot"] for r in rows})
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(shots), figsize=(5 * len(shots), 3.6), squeeze=False)
    width = 0.8 / len(methods)
    for ax, shot in zip(axes[0], shots, strict=True):
        for m, method in enumerate(methods):
            cells = {r["domain"]: r for r in rows if r["shot"] == shot and r["method"] == method}
            xs = [d + (m - (len(methods) - 1) / 2) * width for d in range(len(domains))]
            means = [100 * cells[d]["accuracy"] if d in cells else 0.0 for d in domains]
            errs = [100 * cells[d]["ci95"] if d in cells else 0.0 for d in domains]
            ax.bar(xs, means, width, yerr=errs, capsize=2, label=method)
        ax.set_xticks(range(len(domains)), domains, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{shot}-shot")
        ax.set_ylim(0, 100)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training_curves(
    histories: dict[str, list[dict[str, float]]], path: str | Path, title: str = ""
) -> Path:
    """One panel per logged quantity (loss terms, alignment metrics), one line per method."""
    plt = _pyplot()
    keys = sorted({k for steps in histories.values() for row in steps for k in row} - {"step"})
    cols = 4
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
    # One colour per method across panels: the cycle restarts in each panel.
    colours = {method: f"C{i}" for i, method in enumerate(histories)}
    for ax, key in zip(axes.flat, keys, strict=False):
        for method, steps in histories.items():
            points = [(row["step"], row[key]) for row in steps if key in row]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(
                    xs,
                    ys,
                    label=method,
                    color=colours[method],
                    lw=1.2,
                    marker="." if len(xs) < 20 else None,
                )
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    # One legend for the figure: not every method logs every quantity.
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_matrix_heatmaps(
    panels: Sequence[tuple[str, Sequence[Sequence[float]]]],
    labels: Sequence[str],
    xlabel: str = "evaluated on",
    ylabel: str = "after learning",
) -> Any:
    """A matplotlib ``Figure`` (Agg canvas) with one annotated heatmap per panel.

    ``panels``: (title, ``(K, K)`` matrix) pairs of fractions (drawn in percent, 0-100);
    ``labels``: the K row and column names. The caller saves the figure.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = len(labels)
    n = max(1, len(panels))
    side = 1.0 + 0.55 * k
    fig = Figure(figsize=(side * n + 0.6, side + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (title, matrix) in zip(fig.subplots(1, n, squeeze=False)[0], panels, strict=False):
        a = 100 * np.asarray(matrix, dtype=np.float64)
        im = ax.imshow(a, vmin=0, vmax=100, cmap="viridis")
        for t in range(a.shape[0]):
            for col in range(a.shape[1]):
                colour = "black" if a[t, col] > 60 else "white"
                ax.text(
                    col, t, f"{a[t, col]:.0f}", ha="center", va="center", fontsize=7, color=colour
                )
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(k), labels, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(k), labels, fontsize=7)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
    fig.colorbar(im, ax=fig.axes, shrink=0.8, label="accuracy (%)")
    return fig
