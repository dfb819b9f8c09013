"""The offline demo's training curves: per-step terms of one episode for each trainable method.

The demo's table is ``cdfsl table``'s (:mod:`cdfsl.fewshot.grid`,
:mod:`cdfsl.fewshot.table`) on the micro-world recipe; ``cdfsl.commands.demo`` runs it and
then these curves.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cdfsl.data.base import LabelledImages
from cdfsl.engine import FitConfig
from cdfsl.fewshot.episodic import EpisodeProtocol, EpisodicEvaluator
from cdfsl.fewshot.methods.base import FewShotMethod
from cdfsl.results.history import TermHistory


def training_curves(
    methods: Mapping[str, FewShotMethod],
    dataset: LabelledImages,
    protocol: EpisodeProtocol,
    fit: FitConfig,
    workdir: Path,
) -> dict[str, list[dict[str, float]]]:
    """Per-step terms of episode 0 of ``protocol`` on ``dataset``, for each trainable method."""
    cell = EpisodeProtocol(protocol.n_way, protocol.k_shot, protocol.n_query, 1, protocol.seed)
    curves = {}
    for name, method in methods.items():
        if not method.trainable:
            continue
        history = TermHistory()
        evaluator = EpisodicEvaluator(method, dataset, cell, workdir / name, fit, progress=False)
        evaluator.run_episode(0, callbacks=[history])
        curves[name] = history.steps
    return curves
