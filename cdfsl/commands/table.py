"""``cdfsl table``: one results grid (methods × targets × shots × backbones) as paper tables.

    cdfsl table --config cdfsl/table --roots '{eurosat: DIR, isic2018: DIR, ...}'

Every cell runs through ``cdfsl eval``'s evaluator, and every method of a (backbone, target,
shot) sees the same seeded episodes, so the differences from ``--reference`` are paired per
episode. Resumable: a rerun skips finished episodes. ``--workers N`` (or torchrun's ranks)
split every cell's episodes; ``--shard K/N`` runs one share of every cell, and ``cdfsl merge
OUTPUT`` merges them once all are done and writes the tables. Writes ``OUTPUT/results.md``,
``results.csv``, ``results.tex`` (booktabs), ``results.jsonl`` and ``accuracy.png``; the cells
are ``OUTPUT/<backbone>/<target>/<K>shot/<method>``, each as ``cdfsl eval --output`` writes it.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from cdfsl.commands import _table_args

NAME = "table"
HELP = "a results grid (methods x targets x shots x backbones) as md/csv/tex tables with CI95"


def configure(parser: ArgumentParser) -> None:
    _table_args.add_table_arguments(parser)


def run(cfg: Namespace) -> str | None:
    """Run the grid and print its tables; the markdown, or None where no tables were written
    (a static shard, a torchrun rank other than 0)."""
    from cdfsl.fewshot.table import TABLE_FILES, run_table
    from cdfsl.results.shards import Shard

    grid = _table_args.grid(cfg)
    shard = Shard.parse(cfg.shard) if cfg.shard is not None else None
    text = run_table(grid, cfg.progress, cfg.workers, cfg.threads, shard)
    if text is None:
        if shard is not None:
            print(
                f"shard {shard.index}/{shard.count} of {len(grid.cells())} cells done in "
                f"{grid.output}; once all {shard.count} shards are done: cdfsl merge {grid.output}"
            )
        return None
    print(text)
    print(files_line(grid.output, TABLE_FILES))
    return text


def files_line(output: str | Path, names: tuple[str, ...]) -> str:
    return f"files: {Path(output) / names[0]}, {', '.join(names[1:])}"
