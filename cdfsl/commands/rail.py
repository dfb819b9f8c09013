"""``cdfsl rail``: X-TAIL over a domain sequence with zero-shot, fine-tuning and RAIL.

Prints the K×K accuracy matrix (row: after learning a domain; column: the domain tested) and
Transfer / Average / Last of each method, and writes them under ``--output``. A rerun with the
same recipe resumes where it stopped. Every recipe key is a flag: ``--primal.hidden 4000``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jsonargparse import ArgumentParser, Namespace

from cdfsl.commands._recipe_file import RecipeFile

if TYPE_CHECKING:  # the CLI imports every command at start-up; torch loads only when run
    from cdfsl.continual.xtail import XTailConfig

NAME = "rail"
HELP = "X-TAIL continual learning over a domain sequence: zero-shot, fine-tuning, RAIL"


def configure(parser: ArgumentParser) -> None:
    """The keys of :class:`cdfsl.continual.xtail.XTailConfig` at the top level."""
    from cdfsl.continual.xtail import XTailConfig

    parser.add_argument("--config", action=RecipeFile, help="a YAML recipe or a name (rail/micro)")
    parser.add_class_arguments(XTailConfig, nested_key=None, as_group=False)


def config_from(cfg: Namespace) -> XTailConfig:
    """The parsed ``cdfsl rail`` arguments as an ``XTailConfig``."""
    from cdfsl.continual.xtail import XTailConfig

    parser = ArgumentParser()
    configure(parser)
    values = parser.instantiate_classes(Namespace(**vars(cfg)))
    return XTailConfig(**{k: v for k, v in vars(values).items() if k != "config"})


def run(cfg: Namespace) -> None:
    from pathlib import Path

    from cdfsl.continual.xtail import XTailRun

    config = config_from(cfg)
    runner = XTailRun(config)
    results = runner.run()
    print(runner.report(results))
    out = Path(config.output)
    print(f"\nresults: {out / 'summary.json'}  {out / 'summary.md'}  heatmaps: {out / 'xtail.png'}")
