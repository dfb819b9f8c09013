"""Episodic evaluation, resumable result rows and statistics over episodes."""

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

__all__ = [
    "EpisodeAccuracy",
    "EpisodeProtocol",
    "EpisodicEvaluator",
    "FitConfig",
    "ResultStore",
    "episode_seed",
    "fit_episode",
    "mean_ci95",
    "predict_logits",
    "summary_table",
    "write_json_atomic",
]
