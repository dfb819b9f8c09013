"""Evaluation protocols (episodic, all-way, X-TAIL), resumable result rows and statistics.

Training is the engine's: :mod:`cdfsl.engine` (``FitConfig``, ``fit_episode``, ...)."""

from cdfsl.continual.xtail import XTailConfig, XTailRun, xtail_metrics
from cdfsl.evaluation.allway import AllWayEvaluator, AllWayProtocol, allway_table, draw_per_class
from cdfsl.evaluation.runner import EpisodeProtocol, EpisodicEvaluator
from cdfsl.results.report import summary_table
from cdfsl.results.stats import EpisodeAccuracy, mean_ci95
from cdfsl.results.store import ResultStore, write_json_atomic

__all__ = [
    "AllWayEvaluator",
    "AllWayProtocol",
    "EpisodeAccuracy",
    "EpisodeProtocol",
    "EpisodicEvaluator",
    "ResultStore",
    "XTailConfig",
    "XTailRun",
    "allway_table",
    "draw_per_class",
    "mean_ci95",
    "summary_table",
    "write_json_atomic",
    "xtail_metrics",
]
