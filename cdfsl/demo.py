"""The offline demo: every method on every micro-world target domain, 1- and 5-shot.

Computation only; ``cdfsl.commands.demo`` reads the recipe and writes the files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cdfsl.data.micro_world import MicroWorld
from cdfsl.evaluation import EpisodeProtocol, EpisodicEvaluator, FitConfig
from cdfsl.evaluation.history import TermHistory
from cdfsl.methods.base import FewShotMethod


@dataclass
class DemoCell:
    """One (domain, shot, method) evaluation and its summary."""

    domain: str
    shot: int
    method: str
    summary: dict[str, Any]

    def row(self) -> dict[str, Any]:
        s = self.summary
        return {
            "domain": self.domain, "shot": self.shot, "method": self.method,
            "accuracy": s["accuracy"], "ci95": s["ci95"], "episodes": s["episodes_done"],
            "steps": s["fit"]["steps"] if s["fit"]["steps"] is not None
            else s["fit"]["steps_per_shot"] * self.shot,
            "seconds_per_episode": s["seconds_per_episode"],
        }  # fmt: skip


def run_grid(
    methods: dict[str, FewShotMethod],
    domains: Sequence[str],
    shots: Sequence[int],
    protocol: EpisodeProtocol,
    fit: FitConfig,
    output: Path,
    images_per_class: int,
    progress: bool = True,
    config: dict[str, Any] | None = None,
) -> list[DemoCell]:
    """Evaluate each method on each domain and shot into ``output/<domain>/<k>shot/<method>``."""
    cells = []
    for domain in domains:
        dataset = MicroWorld(domain, images_per_class=images_per_class, seed=protocol.seed)
        for shot in shots:
            cell_protocol = EpisodeProtocol(
                protocol.n_way, shot, protocol.n_query, protocol.episodes, protocol.seed
            )
            for name, method in methods.items():
                evaluator = EpisodicEvaluator(
                    method, dataset, cell_protocol, output / domain / f"{shot}shot" / name, fit,
                    config={"dataset": domain, **(config or {})}, progress=progress,
                )  # fmt: skip
                cells.append(DemoCell(domain, shot, name, evaluator.run()))
    return cells


def training_curves(
    methods: dict[str, FewShotMethod],
    domain: str,
    shot: int,
    protocol: EpisodeProtocol,
    fit: FitConfig,
    images_per_class: int,
    workdir: Path,
) -> dict[str, list[dict[str, float]]]:
    """Per-step terms of episode 0 of ``domain`` at ``shot`` shots, for each trainable method."""
    dataset = MicroWorld(domain, images_per_class=images_per_class, seed=protocol.seed)
    cell = EpisodeProtocol(protocol.n_way, shot, protocol.n_query, 1, protocol.seed)
    curves = {}
    for name, method in methods.items():
        if not method.trainable:
            continue
        history = TermHistory()
        evaluator = EpisodicEvaluator(method, dataset, cell, workdir / name, fit, progress=False)
        evaluator.run_episode(0, callbacks=[history])
        curves[name] = history.steps
    return curves


def pivot_table(rows: Sequence[dict[str, Any]], fmt: Callable[[dict], str]) -> list[list[str]]:
    """Rows (shot, method) x columns (domains..., average) of formatted cells."""
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    table = [["shot", "method", *domains, "average"]]
    for shot in sorted({r["shot"] for r in rows}):
        for method in dict.fromkeys(r["method"] for r in rows):
            cells = {r["domain"]: r for r in rows if r["shot"] == shot and r["method"] == method}
            mean = float(np.mean([cells[d]["accuracy"] for d in domains]))
            table.append(
                [str(shot), method, *(fmt(cells[d]) for d in domains), f"{100 * mean:.2f}"]
            )
    return table


def markdown(table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    return "\n".join(lines)
