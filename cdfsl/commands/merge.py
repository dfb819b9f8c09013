"""``cdfsl merge OUTPUT``: merge the shards of ``cdfsl eval --shard K/N`` runs into one result.

    cdfsl eval --config R --output OUT --shard 0/2    # e.g. two tasks of a job array
    cdfsl eval --config R --output OUT --shard 1/2
    cdfsl merge OUT

Writes ``OUT/results.jsonl`` (every row once, sorted by episode) and ``OUT/summary.json``, as a
one-process run would, then deletes the merged shard files. Refuses while episodes of the
recorded protocol are missing, naming them, unless ``--allow_partial``.

An ``OUT`` of ``cdfsl table --shard K/N`` (or ``cdfsl demo --shard K/N``) runs, recognised by
its ``grid.json``, has each cell merged so, then its tables written as one run would write them.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from cdfsl.errors import CdfslError

NAME = "merge"
HELP = "merge the shards of cdfsl eval (or cdfsl table) --shard K/N runs into one result"


def configure(parser: ArgumentParser) -> None:
    parser.add_argument("output", type=str, help="the --output directory of the shards")
    parser.add_argument(
        "--allow_partial", type=bool, default=False,
        help="merge and summarise even when episodes are missing",
    )  # fmt: skip


def run(cfg: Namespace) -> None:
    from cdfsl.fewshot.episodic import merge_output
    from cdfsl.fewshot.grid import is_grid_output
    from cdfsl.results import shards, summary_table

    output = Path(cfg.output)
    if is_grid_output(output):
        _merge_table(output, cfg.allow_partial)
        return
    config = shards.recorded_config(output)
    episodes = int(config["protocol"]["episodes"])
    missing = sorted(set(range(episodes)) - set(shards.finished_rows(output)))
    if missing and not cfg.allow_partial:
        counts = {shards.Shard.from_name(p.stem).count for p in shards.shard_configs(output)}
        owners = ""
        if len(counts) == 1:  # then the missing episodes name their shards
            (n,) = counts
            owners = " (shards " + ", ".join(f"{k}/{n}" for k in sorted({i % n for i in missing}))
            owners += ")"
        raise CdfslError(
            f"{output} lacks {len(missing)} of {episodes} episodes: "
            f"{shards.describe(missing)}{owners}; expected every episode of the recorded "
            "protocol; fix: run the missing shards to the end, or pass --allow_partial"
        )
    summary = merge_output(output)
    print(summary_table([summary]))
    print(f"results: {output / 'results.jsonl'}  summary: {output / 'summary.json'}")


def _merge_table(output: Path, allow_partial: bool) -> None:
    from cdfsl.commands.table import files_line
    from cdfsl.fewshot.table import TABLE_FILES, merge_table

    print(merge_table(output, allow_partial))
    print(files_line(output, TABLE_FILES))
