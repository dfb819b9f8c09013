"""A results grid: every method on every target, shot and backbone, each cell a ``cdfsl eval``.

Cell (backbone, target, shot, method) is an episodic run (:class:`EpisodicEvaluator`) in
``OUTPUT/<backbone>/<target>/<K>shot/<method>``: its rows, ``run.json``, ``summary.json`` and
shards, as ``cdfsl eval --output`` writes them. Every method of a (backbone, target, shot) sees
the same seeded episodes (episode *i* depends only on the seed and *i*), so two methods' rows
pair per episode. ``OUTPUT/grid.json`` records which cells make the table; the tables
(:mod:`cdfsl.fewshot.table`) are made from the cells' rows alone, so ``cdfsl merge OUTPUT``
can write them after ``--shard K/N`` runs as well.

Computation only: ``cdfsl table`` and ``cdfsl demo`` read the recipe and write the files.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from cdfsl.data.base import LabelledImages
from cdfsl.data.sources import DataConfig, build_dataset
from cdfsl.engine import FitConfig
from cdfsl.errors import CdfslError
from cdfsl.fewshot.episodic import EpisodeProtocol, EpisodicEvaluator, merge_output
from cdfsl.fewshot.methods.base import FewShotMethod
from cdfsl.plumbing import ignore_noise_warnings, quiet_loggers
from cdfsl.results import distributed, shards
from cdfsl.results.progress import RowProgress
from cdfsl.results.shards import Shard
from cdfsl.results.store import plain_json, write_json_atomic

#: The grid's record in its output folder: the cells of the table, for ``cdfsl merge``.
GRID_FILE = "grid.json"

MethodSpec = dict[str, Any]
"""A method of the grid: ``{"class_path": ..., "init_args": {...}}`` as in ``cdfsl eval``'s
recipes, with an optional ``name`` (its row in the table; default: the class name)."""


def method_name(spec: Mapping[str, Any]) -> str:
    """A method's row name: its ``name``, else its class name."""
    return str(spec.get("name") or str(spec["class_path"]).rsplit(".", 1)[-1])


def _method_namespace(spec: Mapping[str, Any], backbone: str, pretrained: str | None) -> dict:
    # A deep copy: jsonargparse turns the nested dicts of what it parses into Namespaces.
    init_args = {**copy.deepcopy(dict(spec.get("init_args") or {})), "backbone": backbone}
    if pretrained is not None:
        init_args["pretrained"] = pretrained
    return {"class_path": spec["class_path"], "init_args": init_args}


def _method_parser() -> Any:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(FewShotMethod, "method")
    return parser


def check_methods(specs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The specs' row names; refuses duplicates and specs that do not parse (nothing is built)."""
    for spec in specs:
        extra = sorted(set(spec) - {"class_path", "init_args", "name"})
        if "class_path" not in spec or extra:
            wrong = f"keys {', '.join(extra)}" if extra else "no class_path"
            raise CdfslError(
                f"method {dict(spec)} has {wrong}; expected {{class_path, init_args, name}}; fix "
                "that entry of the recipe's methods"
            )
    names = [method_name(spec) for spec in specs]
    if not names:
        raise CdfslError(
            "no methods to run: expected a recipe with a 'methods' list of {class_path, "
            "init_args}; fix: pass --config with such a recipe (cdfsl recipes lists them)"
        )
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CdfslError(
            f"methods {names} name {', '.join(twice)} more than once; expected one row per "
            "method; fix: give each a distinct 'name:' in the recipe"
        )
    parser = _method_parser()
    for spec, name in zip(specs, names, strict=True):
        try:
            parser.parse_object({"method": _method_namespace(spec, "tiny-clip", None)})
        except Exception as err:  # jsonargparse's parse errors are plain ValueErrors
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise CdfslError(
                f"method {name!r} ({spec.get('class_path')}) does not parse: {reason}; expected a "
                "FewShotMethod class_path and its init_args; fix the recipe's methods entry"
            ) from None
    return names


def build_method(spec: Mapping[str, Any], backbone: str, pretrained: str | None = None) -> Any:
    """Instantiate one method spec on ``backbone`` (``pretrained`` None: the spec's weights).

    A random-initialised backbone (``tiny-*``) is drawn from the method's seed: every rank builds
    the same one.
    """
    parser = _method_parser()
    namespace = parser.parse_object({"method": _method_namespace(spec, backbone, pretrained)})
    return parser.instantiate(namespace).method


def check_buildable(grid: Grid) -> None:
    """Build every method of ``grid`` on every backbone once, one at a time, before anything is
    written: a setting that fails only at construction (a LoRA rank of 0, an unknown backbone,
    weights that are not local) stops the grid at once with its one-line error, not inside a
    rank, nor when its first cell comes up hours into the run."""
    from cdfsl.cli import cdfsl_error_in

    for backbone in grid.backbones:
        for spec, name in zip(grid.methods, grid.names, strict=True):
            try:
                build_method(spec, backbone, grid.pretrained.get(backbone))
            except Exception as err:
                found = cdfsl_error_in(err)
                if found is None:
                    raise
                raise type(found)(f"method {name!r} on backbone {backbone}: {found}") from None


@dataclass(frozen=True)
class Target:
    """A dataset the grid evaluates on: one column of the table.

    Args:
        name: the column (and the cell folders') name.
        source, root, class_names, options: where the images come from, as ``cdfsl eval``'s
            ``--data.*`` (``micro`` with ``options: {domain: isic-like}`` for the micro world).
        steps_per_shot: T = steps_per_shot·K on this target (null: the grid's), e.g. the Mind
            reference's halved schedule for ChestX.
    """

    name: str
    source: str = "folder"
    root: str | None = None
    class_names: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    steps_per_shot: int | None = None

    def data(self) -> DataConfig:
        return DataConfig(self.source, self.root, self.class_names, dict(self.options))


@dataclass(frozen=True)
class GridCell:
    """One (backbone, target, shot, method) episodic run and its folder."""

    backbone: str
    target: str
    shot: int
    method: str
    episodes: int
    folder: Path


@dataclass(frozen=True)
class Grid:
    """Methods × targets × shots × backbones on seeded N-way K-shot episodes (picklable).

    ``episodes``: per shot (``{1: 800, 5: 400}``); ``pretrained``: weights per backbone name
    (absent: each method's own ``pretrained``); ``fit``: the training settings of every cell, a
    target's ``steps_per_shot`` aside.
    """

    methods: tuple[MethodSpec, ...]
    targets: tuple[Target, ...]
    shots: tuple[int, ...]
    backbones: tuple[str, ...]
    episodes: Mapping[int, int]
    fit: FitConfig
    output: Path
    way: int = 5
    query: int = 15
    seed: int = 0
    pretrained: Mapping[str, str] = field(default_factory=dict)
    reference: str | None = None

    def __post_init__(self) -> None:
        names = check_methods(self.methods)
        if self.reference is not None and self.reference not in names:
            raise CdfslError(
                f"reference {self.reference!r} is not one of the methods {names}; expected the "
                "name of the row the paired differences subtract; fix --reference (or null)"
            )
        axes = {"targets": [t.name for t in self.targets], "shots": list(self.shots),
                "backbones": list(self.backbones)}  # fmt: skip
        for kind, values in axes.items():
            if not values or len(set(values)) != len(values):
                raise CdfslError(
                    f"grid {kind} {values}; expected at least one, each once; fix the recipe's "
                    f"{kind}"
                )
        for kind, values in (("method", names), ("target", axes["targets"])):
            for name in values:
                if not name or name in (".", "..") or "/" in name or "\\" in name:
                    raise CdfslError(
                        f"{kind} name {name!r}; expected a name that can be a folder (no '/'); "
                        f"fix that {kind}'s name in the recipe"
                    )
        for target in self.targets:
            check_target(target)
        if any(k < 1 for k in self.shots):
            raise CdfslError(f"shots {list(self.shots)}; expected shots >= 1; fix --shots")
        missing = [k for k in self.shots if k not in self.episodes]
        if missing:
            raise CdfslError(
                f"episodes {dict(self.episodes)} has no count for shot(s) {missing}; expected one "
                "count per shot; fix: --episodes N, or one per shot such as '{1: 800, 5: 400}'"
            )
        if any(int(self.episodes[k]) < 1 for k in self.shots):
            raise CdfslError(
                f"episodes {dict(self.episodes)}; expected at least 1 per shot; fix --episodes"
            )

    @property
    def names(self) -> list[str]:
        return [method_name(spec) for spec in self.methods]

    def protocol(self, shot: int) -> EpisodeProtocol:
        return EpisodeProtocol(self.way, shot, self.query, int(self.episodes[shot]), self.seed)

    def fit_for(self, target: Target) -> FitConfig:
        if target.steps_per_shot is None:
            return self.fit
        return replace(self.fit, steps_per_shot=target.steps_per_shot)

    def cell_dir(self, backbone: str, target: str, shot: int, method: str) -> Path:
        return self.output / backbone / target / f"{shot}shot" / method

    def cells(self) -> list[GridCell]:
        """Every cell, in table order: backbone, shot, method, target."""
        return [
            GridCell(b, t.name, k, m, int(self.episodes[k]), self.cell_dir(b, t.name, k, m))
            for b in self.backbones
            for k in self.shots
            for m in self.names
            for t in self.targets
        ]

    def record(self) -> dict[str, Any]:
        """What ``grid.json`` holds: the cells (folders relative to the output) and their axes."""
        return {
            "way": self.way, "query": self.query, "seed": self.seed,
            "episodes": {str(k): int(self.episodes[k]) for k in self.shots},
            "backbones": list(self.backbones), "targets": [t.name for t in self.targets],
            "shots": list(self.shots), "methods": self.names, "reference": self.reference,
            "cells": [
                {**asdict(c), "folder": c.folder.relative_to(self.output).as_posix()}
                for c in self.cells()
            ],
        }  # fmt: skip


def recorded_cells(output: str | Path) -> tuple[dict[str, Any], list[GridCell]]:
    """The record and cells of the grid in ``output`` (its ``grid.json``)."""
    output = Path(output)
    path = output / GRID_FILE
    if not path.is_file():
        raise CdfslError(
            f"{path} does not exist; expected the output of cdfsl table or cdfsl demo; fix: "
            "run the grid into that folder first"
        )
    record = json.loads(path.read_text())
    cells = [GridCell(**{**c, "folder": output / c["folder"]}) for c in record["cells"]]
    return record, cells


def is_grid_output(output: str | Path) -> bool:
    return (Path(output) / GRID_FILE).is_file()


def run_grid(
    grid: Grid,
    progress: bool = True,
    workers: int = 1,
    threads: int | None = None,
    shard: Shard | None = None,
) -> list[GridCell] | None:
    """Evaluate every cell of ``grid`` (resumable); its cells once every episode is done.

    ``workers > 1`` launches that many ranks with torch's elastic launcher (gloo, rendezvous on
    a free localhost port); started under torchrun, its ranks are the workers instead. Each rank
    runs every cell with its share of the episodes (``i % ranks == rank``) and ``threads`` torch
    threads; rank 0 merges each cell. ``shard`` (``--shard K/N``) runs one static share of every
    cell into its shards, for ``cdfsl merge``, and returns None, as do ranks other than 0 of a
    torchrun group. One progress bar counts every cell's episodes.
    """
    ranks = distributed.launched_ranks()
    if shard is not None and (ranks is not None or workers > 1):
        world = ranks.world if ranks else workers
        raise CdfslError(
            f"--shard {shard.index}/{shard.count} with {world} ranks; expected one of the two; "
            "fix: drop --shard (the ranks split the episodes) or run one process (--workers 1)"
        )
    launch = workers > 1 and ranks is None
    count = workers if launch else ranks.world if ranks else 1
    check_buildable(grid)
    grid.output.mkdir(parents=True, exist_ok=True)
    if ranks is None or ranks.rank == 0:
        write_json_atomic(grid.output / GRID_FILE, grid.record())
    cells = grid.cells()

    def share(cell: GridCell) -> range | list[int]:
        episodes = range(cell.episodes)
        return episodes if shard is None else [i for i in episodes if shard.owns(i)]

    where = f"shard {shard.index}/{shard.count}" if shard else f"{count} rank{'s' * (count > 1)}"
    # One bar over every cell's episodes, read from the files that every rank writes.
    bar = RowProgress(
        [c.folder for c in cells], (), f"{len(cells)} cells on {where}",
        enabled=progress and (ranks is None or ranks.rank == 0),
        wanted_by_dir=[share(c) for c in cells],
    )  # fmt: skip
    job = _Job(grid, threads, shard)
    with bar:
        done = _launch(job, workers) if launch else _run_ranked(job)
    return cells if done else None


@dataclass(frozen=True)
class _Job:
    """What a rank needs to run its share of the grid (picklable)."""

    grid: Grid
    threads: int | None
    shard: Shard | None


def _run_ranked(job: _Job) -> bool:
    """This process's share of every cell; whether it holds the merged cells (rank 0, or alone
    without a static shard)."""
    with distributed.process_group(backend="gloo"):
        shard = job.shard or distributed.ranked_shard()
        _run_cells(job.grid, shard, job.threads)
        return shard is None or (shard.ranked and shard.index == 0)


def check_target(target: Target) -> None:
    """Refuse a target whose source is unknown, whose options its source does not take, or
    that names no root where its source reads a folder; builds nothing."""
    import inspect

    from cdfsl.commands._run_args import check_source_options
    from cdfsl.data.sources import get_source, list_sources

    data = target.data()
    if data.source not in list_sources():
        raise CdfslError(
            f"target {target.name!r} has source {data.source!r}; expected one of "
            f"{', '.join(list_sources())}; fix that target's source (cdfsl data list describes "
            "them)"
        )
    root = inspect.signature(get_source(data.source)).parameters.get("root")
    if data.root is None and root is not None and root.default is inspect.Parameter.empty:
        raise CdfslError(
            f"target {target.name!r} (source {data.source}) has no root; expected the folder of "
            f"its images; fix: --roots '{{{target.name}: DIR}}', or its root in the recipe"
        )
    check_source_options(data, f"the options of target {target.name!r}")


def target_dataset(target: Target) -> LabelledImages:
    """``target``'s dataset, checked (:func:`check_target`) and built as ``cdfsl eval`` builds
    its ``--data``."""
    check_target(target)
    return build_dataset(target.data())


def _datasets(grid: Grid) -> dict[str, LabelledImages]:
    """Every target's dataset, checked before any backbone loads."""
    from cdfsl.data.layout import check_episode_supply

    datasets = {}
    for target in grid.targets:
        datasets[target.name] = target_dataset(target)
        check_episode_supply(datasets[target.name], grid.way, max(grid.shots), grid.query)
    return datasets


def _run_cells(grid: Grid, shard: Shard | None, threads: int | None) -> None:
    from cdfsl.data.layout import prompt_template

    if threads is not None:
        torch.set_num_threads(threads)
    datasets = _datasets(grid)
    for backbone in grid.backbones:
        # One method (one backbone copy) in memory at a time: a grid of nine methods on a
        # ViT-B/16 would otherwise hold nine.
        for spec, name in zip(grid.methods, grid.names, strict=True):
            method = build_method(spec, backbone, grid.pretrained.get(backbone))
            generic = method.template
            for target in grid.targets:
                dataset = datasets[target.name]
                # cdfsl eval's prompt: a dataset's own template replaces the generic one.
                method.template = prompt_template(generic, dataset)
                for shot in grid.shots:
                    evaluator = EpisodicEvaluator(
                        method, dataset, grid.protocol(shot),
                        grid.cell_dir(backbone, target.name, shot, name), grid.fit_for(target),
                        config={
                            "backbone": backbone, "dataset": target.name,
                            "data": plain_json(asdict(target.data())),
                            "template": method.template,
                        },
                        progress=False, shard=shard,
                    )  # fmt: skip
                    evaluator.run()
            del method


def merge_grid(output: str | Path, allow_partial: bool = False) -> list[GridCell]:
    """Merge the shards of every cell of the grid in ``output`` (``cdfsl merge``); its cells.

    Refuses, naming the cells and their missing episodes, while any cell lacks episodes, unless
    ``allow_partial``. A cell without shards (merged already, or run whole) is left as it is, so
    a second merge changes nothing.
    """
    output = Path(output)
    _, cells = recorded_cells(output)
    gaps = []
    for cell in cells:
        missing = sorted(set(range(cell.episodes)) - set(shards.finished_rows(cell.folder)))
        if missing:
            gaps.append(f"{cell.folder.relative_to(output)} lacks {shards.describe(missing)}")
    if gaps and not allow_partial:
        shown = "; ".join(gaps[:3]) + (f"; and {len(gaps) - 3} more" if len(gaps) > 3 else "")
        raise CdfslError(
            f"{len(gaps)} of {len(cells)} cells of {output} miss episodes ({shown}); expected "
            "every episode; fix: run the missing shards (cdfsl table --shard K/N) to the end, or "
            "pass --allow_partial"
        )
    for cell in cells:
        if shards.shard_configs(cell.folder):
            merge_output(cell.folder)
    return cells


def _launch(job: _Job, workers: int) -> bool:
    """Run the grid on ``workers`` local ranks through torch's elastic launcher."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The launcher installs its own handlers (a signal becomes SignalException); the tables
    # and plots that follow should see Ctrl-C as usual.
    handlers = {sig: signal.getsignal(sig) for sig in _LAUNCH_SIGNALS}
    with tempfile.TemporaryDirectory(prefix="cdfsl-grid-") as logs, _quiet_launcher():
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=workers, run_id=f"cdfsl-grid-{os.getpid()}",
            # Port 0: the rendezvous store binds a free port itself, with no race for one.
            rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
            monitor_interval=0.1, start_method="spawn", logs_specs=DefaultLogsSpecs(log_dir=logs),
            # On Ctrl-C a rank may sit in a barrier, deaf to signals; its rows are safe on disk.
            shutdown_timeout=1,
        )  # fmt: skip
        try:
            results = elastic_launch(config, _rank_entry)(job)
        except SignalException:
            # The launcher has stopped every rank; finished episodes are on disk, one fsync'd
            # row each, and a row torn by the stop is cut on resume.
            raise KeyboardInterrupt from None
        except ChildFailedError as err:
            raise _rank_failure(err) from None
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    return bool(results[0])


_LAUNCH_SIGNALS = [signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)]


def _rank_entry(job: _Job) -> bool:
    """A launched rank: its share of the grid; a CdfslError leaves it as its one line."""
    ignore_noise_warnings()  # a fresh process: the CLI's filters did not come with it
    try:
        return _run_ranked(job)
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
    return RuntimeError(f"grid rank {rank} failed: {text}\n{stack}".rstrip())


def _quiet_launcher() -> Any:
    """Silence the launcher's own logging: a rank's error is reported once, as ours."""
    prefixes = ("torch.distributed.elastic", "torch.distributed.launcher")
    return quiet_loggers(prefixes, logging.CRITICAL)
