"""Episodic evaluation, resumable result rows and statistics over episodes."""

from cdfsl.evaluation.allway import AllWayEvaluator, AllWayProtocol, allway_table, draw_per_class
from cdfsl.evaluation.report import summary_table
from cdfsl.evaluation.runner import (
    EpisodeProtocol,
    EpisodicEvaluator,
    FitConfig,
    episode_seed,
    fit_episode,
    predict_logits,
)
from cdfsl.evaluation.stats import EpisodeAccuracy, mean_ci95
from cdfsl.evaluation.store import ResultStore, write_json_atomic
from cdfsl.evaluation.xtail import XTailConfig, XTailRun, xtail_metrics

__all__ = [
    "AllWayEvaluator",
    "AllWayProtocol",
    "EpisodeAccuracy",
    "EpisodeProtocol",
    "EpisodicEvaluator",
    "FitConfig",
    "ResultStore",
    "XTailConfig",
    "XTailRun",
    "allway_table",
    "draw_per_class",
    "episode_seed",
    "fit_episode",
    "mean_ci95",
    "predict_logits",
    "summary_table",
    "write_json_atomic",
    "xtail_metrics",
]
