"""``cdfsl data``: check a dataset folder against its layout, or list the layouts.

    cdfsl data check NAME ROOT [--options JSON] [--class_names FILE] [--decode false]
                     [--workers N] [--progress false]
    cdfsl data list

``check`` prints the images per class and split, notes and every problem (the file, what was
expected, the fix) and exits non-zero if there is any. Once the listing is sound it decodes every
image as a run reads it, on ``--workers`` threads (default: every available core), and names
each one that fails; ``--decode false`` stops after the listing. ``cdfsl eval`` runs the same
listing checks before training (they are part of building the dataset), but decodes an image
only when an episode draws it.
"""

from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING, Any, Literal

from jsonargparse import ArgumentParser, Namespace

if TYPE_CHECKING:
    from cdfsl.data.layout import Problem

NAME = "data"
HELP = "check a dataset folder against a layout (data check NAME ROOT) or list layouts"


def configure(parser: ArgumentParser) -> None:
    parser.add_argument(
        "action", type=Literal["check", "list"], help="check a folder, or list the layouts"
    )
    parser.add_argument("name", type=str | None, nargs="?", default=None, help="dataset source")
    parser.add_argument("root", type=str | None, nargs="?", default=None, help="dataset folder")
    parser.add_argument(
        "--options", type=dict[str, Any], default={}, help='source options, e.g. {"split": "val"}'
    )
    parser.add_argument("--class_names", type=str | None, default=None, help="names JSON file")
    parser.add_argument(
        "--decode", type=bool, default=True, help="decode every image (false: list files only)"
    )
    parser.add_argument(
        "--workers", type=int | None, default=None, help="decoding threads (default: all cores)"
    )
    parser.add_argument("--progress", type=bool, default=True, help="show a decoding progress bar")


def _list() -> None:
    from cdfsl.data.sources import describe_source, list_sources

    names = list_sources()
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {describe_source(name)}")


def _unreadable(
    config: Any, notes: list[str], workers: int | None, progress: bool
) -> list[Problem]:
    """A ``Problem`` for every image of every split of ``config`` that cannot be decoded."""
    from cdfsl.data.decode import unreadable_images
    from cdfsl.data.layout import Layout
    from cdfsl.data.sources import build_dataset, get_source

    source = get_source(config.source)
    with warnings.catch_warnings():
        # Building warns the report's notes again; they are printed once, with the report.
        for note in notes:
            warnings.filterwarnings("ignore", message=re.escape(note))
        if isinstance(source, Layout):
            splits = source.splits(config.root, config.class_names, **config.options)
            datasets = list(splits.values())
        else:
            datasets = [build_dataset(config)]
    return unreadable_images(datasets, workers, progress)


def run(cfg: Namespace) -> None:
    from cdfsl.commands._run_args import check_source_options
    from cdfsl.data.sources import DataConfig, validate_source
    from cdfsl.errors import DataError

    if cfg.action == "list":
        _list()
        return
    if cfg.name is None or cfg.root is None:
        raise DataError(
            "cdfsl data check needs a source NAME and a ROOT folder; e.g. cdfsl data check "
            "isic2018 /data/ISIC2018 (cdfsl data list names the sources)"
        )
    config = DataConfig(cfg.name, cfg.root, cfg.class_names, dict(cfg.options))
    check_source_options(config, "--options")
    report = validate_source(config)
    if cfg.decode and report.ok:
        report.problems.extend(_unreadable(config, report.notes, cfg.workers, cfg.progress))
    print(report.format())
    if not report.ok:
        raise DataError(
            f"{len(report.problems)} problem(s) in {cfg.root} as {cfg.name!r}; fix them as "
            "listed above"
        )
