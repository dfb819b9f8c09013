"""The offline demo: every method on every micro-world target domain, 1- and 5-shot.

Computation only; ``cdfsl.commands.demo`` reads the recipe and writes the files.
"""

from __future__ import annotations

import copy
import multiprocessing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cdfsl.data.micro_world import MicroWorld
from cdfsl.errors import CdfslError
from cdfsl.evaluation import EpisodeProtocol, EpisodicEvaluator, FitConfig
from cdfsl.evaluation.history import TermHistory
from cdfsl.evaluation.stats import mean_ci95
from cdfsl.evaluation.store import ResultStore
from cdfsl.methods.base import FewShotMethod


@dataclass
class DemoCell:
    """One (domain, shot, method) evaluation and its summary."""

    domain: str
    shot: int
    method: str
    summary: dict[str, Any]
    output_dir: Path

    def row(self) -> dict[str, Any]:
        s = self.summary
        return {
            "domain": self.domain, "shot": self.shot, "method": self.method,
            "accuracy": s["accuracy"], "ci95": s["ci95"], "episodes": s["episodes_done"],
            "steps": s["fit"]["steps"] if s["fit"]["steps"] is not None
            else s["fit"]["steps_per_shot"] * self.shot,
            "seconds_per_episode": s["seconds_per_episode"],
        }  # fmt: skip


MethodSpec = dict[str, Any]  # {"class_path": ..., "init_args": {...}}, as in the recipe


def method_name(spec: MethodSpec) -> str:
    """The table name of a method config: its class name."""
    return str(spec["class_path"]).rsplit(".", 1)[-1]


def build_methods(specs: Sequence[MethodSpec], backbone: str) -> dict[str, FewShotMethod]:
    """Instantiate each method config on ``backbone``, keyed by :func:`method_name`."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(FewShotMethod, "method")
    methods = {}
    for spec in specs:
        # A deep copy: jsonargparse turns the nested dicts of what it parses into Namespaces.
        init_args = {**copy.deepcopy(spec.get("init_args", {})), "backbone": backbone}
        spec = {**spec, "init_args": init_args}
        methods[method_name(spec)] = parser.instantiate(
            parser.parse_object({"method": spec})
        ).method
    return methods


@dataclass(frozen=True)
class _Grid:
    """Everything a worker needs to evaluate any cell of the grid (picklable)."""

    specs: tuple[MethodSpec, ...]
    backbone: str
    protocol: EpisodeProtocol
    fit: FitConfig
    output: Path
    images_per_class: int
    config: dict[str, Any]
    threads: int | None


_WORKER: dict[str, Any] = {}


def _start_worker(grid: _Grid, episodes: Any = None) -> None:
    if grid.threads is not None:
        torch.set_num_threads(grid.threads)
    methods = build_methods(grid.specs, grid.backbone)
    _WORKER.update(grid=grid, methods=methods, data={}, episodes=episodes)


def _run_cell(domain: str, shot: int, name: str, progress: bool = False) -> DemoCell:
    grid: _Grid = _WORKER["grid"]
    if domain not in _WORKER["data"]:
        _WORKER["data"][domain] = MicroWorld(
            domain, images_per_class=grid.images_per_class, seed=grid.protocol.seed
        )
    p = grid.protocol
    output = grid.output / domain / f"{shot}shot" / name
    evaluator = EpisodicEvaluator(
        _WORKER["methods"][name], _WORKER["data"][domain],
        EpisodeProtocol(p.n_way, shot, p.n_query, p.episodes, p.seed), output, grid.fit,
        config={"dataset": domain, **grid.config}, progress=progress,
    )  # fmt: skip
    queue = _WORKER.get("episodes")
    report = None if queue is None else (lambda row: queue.put(row["accuracy"]))
    return DemoCell(domain, shot, name, evaluator.run(on_episode=report), output)


def run_grid(
    specs: Sequence[MethodSpec],
    backbone: str,
    domains: Sequence[str],
    shots: Sequence[int],
    protocol: EpisodeProtocol,
    fit: FitConfig,
    output: Path,
    images_per_class: int,
    progress: bool = True,
    config: dict[str, Any] | None = None,
    workers: int = 1,
    threads: int | None = None,
) -> list[DemoCell]:
    """Evaluate each method on each domain and shot into ``output/<domain>/<k>shot/<method>``.

    ``workers > 1`` spreads the cells over that many processes with ``threads`` torch threads
    each. Every episode is a pure function of its seed, so a cell's rows do not depend on
    which process ran it. Cells come back in grid order (domain, shot, method).
    """
    grid = _Grid(
        tuple(specs), backbone, protocol, fit, Path(output), images_per_class,
        {"backbone": backbone, **(config or {})}, threads,
    )  # fmt: skip
    jobs = [(d, k, method_name(s)) for d in domains for k in shots for s in specs]
    if workers <= 1:
        _start_worker(grid)
        try:
            return [_run_cell(*job, progress=progress) for job in jobs]
        finally:
            _WORKER.clear()
    # Most shots first: 5-shot training cells dominate; zero-shot cells take a second anywhere.
    order = sorted(jobs, key=lambda j: -j[1])
    done: dict[tuple[str, int, str], DemoCell] = {}
    context = multiprocessing.get_context("spawn")  # fork after torch/OpenMP start is unsafe
    episodes = context.Queue()  # workers put one item per finished episode, for the bar
    # Pool's exit terminates the workers, so Ctrl-C (or a failed cell) stops at once: finished
    # episodes are on disk, one fsync'd row each, and a row torn by the kill is cut on resume.
    with (
        context.Pool(workers, initializer=_start_worker, initargs=(grid, episodes)) as pool,
        tqdm(
            total=len(jobs) * protocol.episodes, disable=not progress, unit="ep",
            desc=f"demo, {len(jobs)} cells on {workers} workers",
        ) as bar,
    ):  # fmt: skip
        pending = pool.imap_unordered(_run_job, order)
        while len(done) < len(jobs):
            try:
                job, cell = pending.next(timeout=0.5)
            except multiprocessing.TimeoutError:
                pass
            else:
                done[job] = cell
                bar.set_postfix_str(f"cells {len(done)}/{len(jobs)}")
            while not episodes.empty():
                episodes.get()
                bar.update(1)
        # Resumed episodes were never reported; the bar ends full either way.
        bar.update(bar.total - bar.n)
    return [done[job] for job in jobs]


def _run_job(job: tuple[str, int, str]) -> tuple[tuple[str, int, str], DemoCell]:
    try:
        return job, _run_cell(*job)
    except KeyboardInterrupt:
        # A pool worker dies on BaseException and its task never returns; report it instead.
        raise CdfslError(f"worker interrupted in {job}") from None


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


def paired_differences(cells: Sequence[DemoCell], base: str, other: str) -> list[dict[str, Any]]:
    """Per (domain, shot): ``other`` minus ``base`` accuracy, paired over the same episodes.

    Both methods see identical seeded episodes, so the per-episode difference removes the
    episode-to-episode spread that dominates each method's own CI95.
    """
    by_key = {(c.domain, c.shot, c.method): c for c in cells}
    out = []
    for domain, shot in dict.fromkeys((c.domain, c.shot) for c in cells):
        if (domain, shot, base) not in by_key or (domain, shot, other) not in by_key:
            continue
        rows = {}
        for name in (base, other):
            store = ResultStore(by_key[domain, shot, name].output_dir / "results.jsonl")
            rows[name] = {r["episode"]: r["accuracy"] for r in store.rows()}
        common = sorted(set(rows[base]) & set(rows[other]))
        stats = mean_ci95([rows[other][e] - rows[base][e] for e in common])
        out.append({
            "domain": domain, "shot": shot, "method": f"{other} - {base}",
            "accuracy": stats["mean"], "ci95": stats["ci95"], "episodes": len(common),
        })  # fmt: skip
    return out


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
