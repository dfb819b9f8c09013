"""``cdfsl eval``: episodic N-way K-shot evaluation of a recipe on a dataset (resumable)."""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from cdfsl.commands import _run_args

NAME = "eval"
HELP = "episodic N-way K-shot evaluation (resumable)"


def configure(parser: ArgumentParser) -> None:
    _run_args.add_run_arguments(parser)


def run(cfg: Namespace) -> None:
    from cdfsl.data.layout import check_episode_supply, prompt_template
    from cdfsl.evaluation import EpisodeProtocol, EpisodicEvaluator, summary_table

    protocol = EpisodeProtocol(cfg.way, cfg.shot, cfg.query, cfg.episodes, cfg.seed)
    # build_dataset has validated the folder; classes too small for the episodes are named
    # here, before the backbone loads.
    data, dataset = _run_args.dataset(cfg)
    check_episode_supply(dataset, cfg.way, cfg.shot, cfg.query)
    cfg.method.init_args.template = prompt_template(cfg.method.init_args.template, dataset)
    method = _run_args.method(cfg)
    label = Path(data.root).name if data.root and data.source == "folder" else data.source
    evaluator = EpisodicEvaluator(
        method, dataset, protocol, cfg.output, _run_args.fit_config(cfg),
        config={
            "backbone": method.hparams.backbone,
            "dataset": label,
            "method_args": _run_args.plain(cfg.method.init_args),
            "data": _run_args.plain(vars(cfg.data)),
        },
        progress=cfg.progress,
    )  # fmt: skip
    summary = evaluator.run()
    print(summary_table([summary]))
    out = Path(cfg.output)
    print(f"results: {out / 'results.jsonl'}  summary: {out / 'summary.json'}")
