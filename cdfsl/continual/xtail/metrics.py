"""X-TAIL metrics of an accuracy matrix ``a[t][k]``, their markdown tables and heatmaps."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cdfsl.continual.xtail.learners import title_of
from cdfsl.errors import CdfslError


def xtail_metrics(matrix: Sequence[Sequence[float]] | np.ndarray) -> dict[str, float]:
    """Transfer, Average and Last of a ``(K, K)`` matrix ``a[t][k]`` (row: after step t).

    Transfer = mean over k >= 2 of the mean over t < k of a[t][k] (only entries above the
    diagonal: domains not learned yet; NaN when K = 1); Average = mean over k of the mean over
    all t of a[t][k]; Last = mean over k of a[K][k].
    """
    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise CdfslError(f"accuracy matrix of shape {a.shape}: expected (K, K) with K >= 1")
    k = a.shape[0]
    transfer = [a[:col, col].mean() for col in range(1, k)]
    return {
        "transfer": float(np.mean(transfer)) if transfer else math.nan,
        "average": float(a.mean(axis=0).mean()),
        "last": float(a[-1].mean()),
    }


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def format_matrix(matrix: Sequence[Sequence[float]], domains: Sequence[str]) -> str:
    """A markdown table of ``a[t][k]`` in percent: one row per step, one column per domain."""
    lines = [
        "| after \\ on | " + " | ".join(domains) + " |",
        "|---|" + "---:|" * len(domains),
    ]
    for name, row in zip(domains, matrix, strict=False):
        lines.append(f"| {name} | " + " | ".join(_pct(v) for v in row) + " |")
    return "\n".join(lines)


def format_summary(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table: method, Transfer, Average, Last (%), seconds and peak memory per update."""
    lines = [
        "| method | Transfer | Average | Last | s / domain update "
        "| update peak RSS (MB) | update extra RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, res in results.items():
        m = res["metrics"]
        secs, peak = res.get("update_seconds_mean"), res.get("update_peak_rss_mb_max")
        extra = res.get("update_extra_rss_mb_max")
        lines.append(
            f"| {title_of(name)} | {_pct(m['transfer'])} | {_pct(m['average'])} "
            f"| {_pct(m['last'])} | {'-' if secs is None else f'{secs:.2f}'} "
            f"| {'-' if peak is None else f'{peak:.0f}'} "
            f"| {'-' if extra is None else f'{extra:.0f}'} |"
        )
    return "\n".join(lines)


def plot_matrices(matrices: Mapping[str, Sequence[Sequence[float]]], domains: Sequence[str]) -> Any:
    """A matplotlib ``Figure`` with one annotated heatmap per method, titled with its metrics."""
    from cdfsl.results.plots import plot_matrix_heatmaps

    panels = []
    for name, matrix in matrices.items():
        m = xtail_metrics(matrix)
        title = (
            f"{title_of(name)}\nT {_pct(m['transfer'])}  A {_pct(m['average'])}  "
            f"L {_pct(m['last'])}"
        )
        panels.append((title, matrix))
    return plot_matrix_heatmaps(panels, domains)
