"""The offline demo: every method on every micro-world target domain, 1- and 5-shot.

Computation only; ``cdfsl.commands.demo`` reads the recipe and writes the files.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdfsl.data.micro_world import MicroWorld
from cdfsl.engine import FitConfig
from cdfsl.errors import CdfslError
from cdfsl.evaluation import EpisodeProtocol, EpisodicEvaluator, distributed
from cdfsl.evaluation.history import TermHistory
from cdfsl.evaluation.progress import RowProgress
from cdfsl.evaluation.stats import mean_ci95
from cdfsl.evaluation.store import ResultStore
from cdfsl.methods.base import FewShotMethod
from cdfsl.plumbing import ignore_noise_warnings, quiet_loggers


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
    """Instantiate each method config on ``backbone``, keyed by :func:`method_name`.

    A random-initialised backbone (``tiny-*``) is drawn from the method's seed: every rank builds
    the same one.
    """
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
    """Everything a rank needs to evaluate its share of every cell of the grid (picklable)."""

    specs: tuple[MethodSpec, ...]
    backbone: str
    protocol: EpisodeProtocol
    fit: FitConfig
    output: Path
    images_per_class: int
    config: dict[str, Any]
    threads: int | None
    jobs: tuple[tuple[str, int, str], ...]

    def cell_dir(self, domain: str, shot: int, name: str) -> Path:
        return self.output / domain / f"{shot}shot" / name


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

    ``workers > 1`` launches that many ranks with torch's elastic launcher (gloo, rendezvous on
    a free localhost port); started under torchrun, its ranks are the workers instead. Each rank
    runs every cell with its share of the episodes (``i % ranks == rank``) and ``threads`` torch
    threads; rank 0 merges each cell. Every episode is a pure function of its seed, so the rows
    do not depend on the number of ranks. Cells come back in grid order (domain, shot, method),
    to rank 0 or the one process; the other ranks of a torchrun group get an empty list.
    """
    jobs = tuple((d, k, method_name(s)) for d in domains for k in shots for s in specs)
    grid = _Grid(
        tuple(specs), backbone, protocol, fit, Path(output), images_per_class,
        {"backbone": backbone, **(config or {})}, threads, jobs,
    )  # fmt: skip
    ranks = distributed.launched_ranks()
    launch = workers > 1 and ranks is None
    count = workers if launch else ranks.world if ranks else 1
    # One bar over every cell's episodes, read from the files that every rank writes.
    bar = RowProgress(
        [grid.cell_dir(*job) for job in jobs], range(protocol.episodes),
        f"demo, {len(jobs)} cells on {count} rank{'s' * (count > 1)}",
        enabled=progress and (ranks is None or ranks.rank == 0),
    )  # fmt: skip
    with bar:
        return _launch(grid, workers) if launch else _run_ranked(grid)


def _run_ranked(grid: _Grid) -> list[DemoCell]:
    """This process's share of every cell: all of it alone, or one rank's in a launcher's group."""
    with distributed.process_group(backend="gloo"):
        return _run_cells(grid)


def _run_cells(grid: _Grid) -> list[DemoCell]:
    if grid.threads is not None:
        torch.set_num_threads(grid.threads)
    methods = build_methods(grid.specs, grid.backbone)
    shard = distributed.ranked_shard()
    data: dict[str, MicroWorld] = {}
    p = grid.protocol
    cells = []
    for domain, shot, name in grid.jobs:
        if domain not in data:
            data[domain] = MicroWorld(domain, images_per_class=grid.images_per_class, seed=p.seed)
        output = grid.cell_dir(domain, shot, name)
        evaluator = EpisodicEvaluator(
            methods[name], data[domain],
            EpisodeProtocol(p.n_way, shot, p.n_query, p.episodes, p.seed), output, grid.fit,
            config={"dataset": domain, **grid.config}, progress=False, shard=shard,
        )  # fmt: skip
        summary = evaluator.run()
        cells.append(DemoCell(domain, shot, name, summary, output))
    return cells if shard is None or shard.index == 0 else []


def _launch(grid: _Grid, workers: int) -> list[DemoCell]:
    """Run the grid on ``workers`` local ranks through torch's elastic launcher; rank 0's cells."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The launcher installs its own handlers (a signal becomes SignalException); the demo's
    # tables and plots that follow should see Ctrl-C as usual.
    handlers = {sig: signal.getsignal(sig) for sig in _LAUNCH_SIGNALS}
    with tempfile.TemporaryDirectory(prefix="cdfsl-demo-") as logs, _quiet_launcher():
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=workers, run_id=f"cdfsl-demo-{os.getpid()}",
            # Port 0: the rendezvous store binds a free port itself, with no race for one.
            rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
            monitor_interval=0.1, start_method="spawn", logs_specs=DefaultLogsSpecs(log_dir=logs),
            # On Ctrl-C a rank may sit in a barrier, deaf to signals; its rows are safe on disk.
            shutdown_timeout=1,
        )  # fmt: skip
        try:
            results = elastic_launch(config, _rank_entry)(grid)
        except SignalException:
            # The launcher has stopped every rank; finished episodes are on disk, one fsync'd
            # row each, and a row torn by the stop is cut on resume.
            raise KeyboardInterrupt from None
        except ChildFailedError as err:
            raise _rank_failure(err) from None
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    return results[0]


_LAUNCH_SIGNALS = [signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)]


def _rank_entry(grid: _Grid) -> list[DemoCell]:
    """A launched rank: its share of the grid; a CdfslError leaves it as its one line."""
    ignore_noise_warnings()  # a fresh process: the CLI's filters did not come with it
    try:
        return _run_ranked(grid)
    except CdfslError as err:
        # The launcher records a failure as "<class name>: <text>"; one class to recognise.
        raise CdfslError(str(err)) from None


def _rank_failure(err: Any) -> BaseException:
    """The first failed rank's error: its CdfslError, or its traceback in a RuntimeError."""
    rank, failure = err.get_first_failure()
    data = failure.message
    text = str(data.get("message", "") if isinstance(data, dict) else data)
    if text.startswith("CdfslError: "):
        return CdfslError(text.removeprefix("CdfslError: "))
    stack = data.get("extraInfo", {}).get("py_callstack", "") if isinstance(data, dict) else ""
    return RuntimeError(f"demo rank {rank} failed: {text}\n{stack}".rstrip())


def _quiet_launcher() -> Any:
    """Silence the launcher's own logging: a rank's error is reported once, as ours."""
    prefixes = ("torch.distributed.elastic", "torch.distributed.launcher")
    return quiet_loggers(prefixes, logging.CRITICAL)


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
            # A failed episode (no accuracy) drops out of the pair, as from each method's mean.
            rows[name] = {r["episode"]: r["accuracy"] for r in store.rows() if "accuracy" in r}
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
