"""``cdfsl allway``: the all-way K-shot protocol (CoOp / CLIP-LoRA) on a dataset with splits.

    cdfsl allway --config RECIPE --data.source oxford-pets --data.root DATA [--shots [1,2,4]]

K images per class from train for each K of ``--shots`` and seed of ``--seeds``, validation from
val, accuracy on the whole test split; results are resumable (see
``cdfsl.fewshot.allway``). The recipe's episode keys (way, shot, query, episodes, seed) are
accepted and unused. A recipe that keeps the generic prompt gets the dataset's own template.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from cdfsl.commands import _run_args
from cdfsl.errors import CdfslError

NAME = "allway"
HELP = "all-way K-shot evaluation on train/val/test splits, over shots and seeds (resumable)"


def configure(parser: ArgumentParser) -> None:
    _run_args.add_run_arguments(parser)
    parser.add_argument("--shots", type=list[int], default=[1, 2, 4, 8, 16], help="K values")
    parser.add_argument("--seeds", type=list[int], default=[1, 2, 3], help="one draw per seed")
    parser.add_argument("--max_val_shots", type=int, default=4, help="val images per class cap")
    parser.add_argument(
        "--score_batch_size", type=int, default=256, help="images per scoring batch"
    )
    parser.add_argument("--workers", type=int, default=0, help="image-loading processes")


def run(cfg: Namespace) -> None:
    from cdfsl.data.layout import prompt_template
    from cdfsl.data.sources import DataConfig, build_splits
    from cdfsl.fewshot.allway import AllWayEvaluator, AllWayProtocol, allway_table
    from cdfsl.results.distributed import launched_ranks

    ranks = launched_ranks()
    if ranks is not None:
        # Every rank would run every (K, seed) and append the same rows to one file.
        raise CdfslError(
            f"cdfsl allway under a launcher of WORLD_SIZE={ranks.world}; expected one process "
            "(all-way runs are not sharded); fix: run cdfsl allway without torchrun"
        )
    protocol = AllWayProtocol(tuple(cfg.shots), tuple(cfg.seeds), cfg.max_val_shots)
    data = DataConfig(**vars(cfg.data))
    _run_args.check_source_options(data)
    splits = build_splits(data)
    train = splits.get("train")
    if train is not None:
        cfg.method.init_args.template = prompt_template(cfg.method.init_args.template, train)
    method = _run_args.method(cfg)
    evaluator = AllWayEvaluator(
        method, splits, protocol, cfg.output, _run_args.fit_config(cfg),
        config=_run_args.run_description(cfg, method, data.source),
        progress=cfg.progress, batch_size=cfg.score_batch_size, workers=cfg.workers,
    )  # fmt: skip
    summary = evaluator.run()
    print(allway_table(summary))
    out = Path(cfg.output)
    print(f"results: {out / 'results.jsonl'}  summary: {out / 'summary.json'}")
