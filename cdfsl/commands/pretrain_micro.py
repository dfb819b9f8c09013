"""``cdfsl pretrain-micro``: pretrain micro-clip on the micro world's source stream (CPU).

``cdfsl pretrain-micro --output assets/micro-clip`` wrote the shipped model; the same seed gives
the same bytes. See :mod:`cdfsl.pretrain_micro` for what is trained and why.
"""

from __future__ import annotations

import shlex
import sys

from jsonargparse import ArgumentParser, Namespace

NAME = "pretrain-micro"
HELP = "pretrain the micro CLIP on the micro world (CPU, ~13 min on 2 cores)"


def configure(parser: ArgumentParser) -> None:
    parser.add_argument("--output", type=str, required=True, help="folder to write (local-dir)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="model init and data seed")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval_images_per_class", type=int, default=50)
    parser.add_argument("--num_workers", type=int, default=1, help="data rendering processes")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")


def run(cfg: Namespace) -> None:
    import logging

    from cdfsl.pretrain_micro import log, pretrain_micro

    logging.basicConfig(format="%(asctime)s %(name)s %(message)s")
    log.setLevel(logging.INFO)  # open_clip logs its loading steps at INFO on the root logger
    pretrain_micro(
        cfg.output,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        lr=cfg.lr,
        eval_images_per_class=cfg.eval_images_per_class,
        num_workers=cfg.num_workers,
        threads=cfg.threads,
        command=command_line(),
    )


def command_line() -> str:
    """How this run was started, for the model card: ``cdfsl pretrain-micro ...``."""
    args = sys.argv[1:]
    if NAME in args:
        args = args[args.index(NAME) + 1 :]
    return shlex.join(["cdfsl", NAME, *args])
