"""``cdfsl merge OUTPUT``: merge the shards of ``cdfsl eval --shard K/N`` runs into one result.

    cdfsl eval --config R --output OUT --shard 0/2    # e.g. two tasks of a job array
    cdfsl eval --config R --output OUT --shard 1/2
    cdfsl merge OUT

Writes ``OUT/results.jsonl`` (every row once, sorted by episode) and ``OUT/summary.json``, as a
one-process run would, then deletes the merged shard files. Refuses while episodes of the
recorded protocol are missing, naming them, unless ``--allow_partial``.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from cdfsl.errors import CdfslError

NAME = "merge"
HELP = "merge the shard files of cdfsl eval --shard K/N runs into results.jsonl and summary.json"


def configure(parser: ArgumentParser) -> None:
    parser.add_argument("output", type=str, help="the --output directory of the shards")
    parser.add_argument(
        "--allow_partial", type=bool, default=False,
        help="merge and summarise even when episodes are missing",
    )  # fmt: skip


def run(cfg: Namespace) -> None:
    from cdfsl.evaluation import shards, summary_table
    from cdfsl.evaluation.runner import summarize_rows
    from cdfsl.evaluation.store import write_json_atomic

    output = Path(cfg.output)
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
    rows = shards.merge(output)
    summary = summarize_rows(rows, config)
    write_json_atomic(output / "summary.json", summary)
    print(summary_table([summary]))
    print(f"results: {output / 'results.jsonl'}  summary: {output / 'summary.json'}")
