"""``cdfsl eval``: episodic N-way K-shot evaluation of a recipe on a dataset (resumable).

Under ``torchrun --nproc_per_node N --no-python cdfsl eval ...`` the ranks split the episodes
and rank 0 merges them; ``--shard K/N`` runs one share alone, for ``cdfsl merge`` to merge.
``--export_manifest FILE`` writes the protocol's episodes as JSONL and trains nothing;
``--manifest FILE`` evaluates the episodes of such a file instead of sampling them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from jsonargparse import ArgumentParser, Namespace

from cdfsl.commands import _run_args
from cdfsl.errors import CdfslError

if TYPE_CHECKING:
    from cdfsl.data.base import LabelledImages
    from cdfsl.data.episodes import EpisodeManifest
    from cdfsl.results.shards import Shard

NAME = "eval"
HELP = "episodic N-way K-shot evaluation (resumable)"


def configure(parser: ArgumentParser) -> None:
    _run_args.add_run_arguments(parser)
    parser.add_argument(
        "--shard", type=str | None, default=None,
        help="K/N: run only episodes i with i mod N = K, into OUTPUT/shards (then cdfsl merge)",
    )  # fmt: skip
    parser.add_argument(
        "--retry_failed", type=bool, default=False,
        help="rerun the episodes whose rows failed (non-finite loss or logits); else kept",
    )  # fmt: skip
    parser.add_argument(
        "--manifest", type=str | None, default=None,
        help="JSONL of episodes (from --export_manifest or another toolkit) to evaluate, the "
        "first --episodes of them, instead of sampling; the run's fingerprint records its sha256",
    )  # fmt: skip
    parser.add_argument(
        "--export_manifest", type=str | None, default=None,
        help="write the protocol's episodes (index, seed, classes, support and query ids "
        "relative to the dataset root, labels) as JSONL to this file and exit; trains nothing",
    )  # fmt: skip


def run(cfg: Namespace) -> None:
    from cdfsl.results import distributed
    from cdfsl.results.shards import Shard

    if cfg.export_manifest is not None:
        _export_manifest(cfg)
        return
    shard = Shard.parse(cfg.shard) if cfg.shard is not None else None
    ranks = distributed.launched_ranks()
    if shard is not None and ranks is not None:
        raise CdfslError(
            f"--shard {cfg.shard} under a launcher of WORLD_SIZE={ranks.world}; expected one of "
            "the two; fix: drop --shard (the ranks split the episodes) or run without torchrun"
        )
    with distributed.process_group():
        _evaluate(cfg, shard or distributed.ranked_shard())


def _export_manifest(cfg: Namespace) -> None:
    from cdfsl.data.layout import check_episode_supply
    from cdfsl.fewshot.episodic import EpisodeProtocol, protocol_manifest
    from cdfsl.results.store import ResultStore

    protocol = EpisodeProtocol(cfg.way, cfg.shot, cfg.query, cfg.episodes, cfg.seed)
    _, dataset = _run_args.dataset(cfg)
    check_episode_supply(dataset, cfg.way, cfg.shot, cfg.query)
    lines = protocol_manifest(dataset, protocol)
    ResultStore(cfg.export_manifest).replace(lines)
    print(
        f"manifest: {cfg.export_manifest} ({len(lines)} episodes, {cfg.way}-way {cfg.shot}-shot "
        f"{cfg.query}-query, seed {cfg.seed}); evaluate it with --manifest {cfg.export_manifest}"
    )


def _read_manifest(path: str, dataset: LabelledImages) -> EpisodeManifest:
    from cdfsl.data.episodes import EpisodeManifest
    from cdfsl.results.store import ResultStore

    if not Path(path).is_file():
        raise CdfslError(
            f"--manifest {path} is not a file; expected a JSONL manifest, e.g. from cdfsl eval "
            "--export_manifest FILE; fix the path"
        )
    return EpisodeManifest(ResultStore(path).rows(), dataset, source=path)


def _evaluate(cfg: Namespace, shard: Shard | None) -> None:
    from dataclasses import replace

    from cdfsl.data.layout import check_episode_supply, prompt_template
    from cdfsl.fewshot.episodic import EpisodeProtocol, EpisodicEvaluator, check_manifest
    from cdfsl.results import summary_table
    from cdfsl.results.shards import describe, finished_rows

    protocol = EpisodeProtocol(cfg.way, cfg.shot, cfg.query, cfg.episodes, cfg.seed)
    # build_dataset has validated the folder; classes too small for the episodes, or a
    # manifest's missing files, are named here, before the backbone loads.
    data, dataset = _run_args.dataset(cfg)
    manifest = None
    if cfg.manifest is not None:
        manifest = _read_manifest(cfg.manifest, dataset)
        protocol = replace(protocol, episodes=min(cfg.episodes, manifest.episodes))
        check_manifest(manifest, protocol)
    else:
        check_episode_supply(dataset, cfg.way, cfg.shot, cfg.query)
    cfg.method.init_args.template = prompt_template(cfg.method.init_args.template, dataset)
    method = _run_args.method(cfg)
    label = Path(data.root).name if data.root and data.source == "folder" else data.source
    evaluator = EpisodicEvaluator(
        method, dataset, protocol, cfg.output, _run_args.fit_config(cfg),
        config=_run_args.run_description(cfg, method, label),
        progress=cfg.progress, shard=shard, manifest=manifest, retry_failed=cfg.retry_failed,
    )  # fmt: skip
    summary = evaluator.run()
    out = Path(cfg.output)
    if summary is None:  # a static shard
        share = [i for i in range(protocol.episodes) if shard.owns(i)]
        done = len(set(share) & set(finished_rows(out)))
        print(
            f"shard {shard.index}/{shard.count}: {done} of its {len(share)} episodes done, rows "
            f"in {shard.rows_path(out)}; once all {shard.count} shards are done: cdfsl merge {out}"
        )
        return
    if shard is not None and shard.index != 0:
        return  # rank 0 reports for the group
    print(summary_table([summary]))
    print(f"results: {out / 'results.jsonl'}  summary: {out / 'summary.json'}")
    if summary["episodes_failed"]:
        print(
            f"failed episodes: {describe(summary['failed_episodes'])}; a rerun keeps their rows "
            "unless --retry_failed"
        )
