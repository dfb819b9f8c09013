"""``cdfsl data``: check a dataset folder against its layout, or list the layouts.

    cdfsl data check NAME ROOT [--options JSON] [--class_names FILE] [--decode true]
    cdfsl data list

``check`` prints the images per class and split, notes and every problem (the file, what was
expected, the fix) and exits non-zero if there is any; ``--decode true`` also opens every image.
``cdfsl eval`` runs the same checks before training (they are part of building the dataset).
"""

from __future__ import annotations

from typing import Any, Literal

from jsonargparse import ArgumentParser, Namespace

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
    parser.add_argument("--decode", type=bool, default=False, help="also open every image")


def _list() -> None:
    from cdfsl.data.sources import describe_source, list_sources

    names = list_sources()
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {describe_source(name)}")


def _decode_problems(config: Any) -> list[str]:
    """The message of every image of every split that cannot be opened."""
    from tqdm.auto import tqdm

    from cdfsl.data.layout import Layout
    from cdfsl.data.sources import build_dataset, get_source
    from cdfsl.errors import DataError

    source = get_source(config.source)
    if isinstance(source, Layout):
        splits = source.splits(config.root, config.class_names, **config.options)
        datasets = list(splits.values())
    else:
        datasets = [build_dataset(config)]
    # Splits may overlap (a DomainBed train split holds the domains); open each file once.
    todo = {ds.sample_id(i): (ds, i) for ds in datasets for i in range(len(ds))}
    failures = []
    for dataset, index in tqdm(todo.values(), desc="decoding", unit="img"):
        try:
            dataset.load(index)
        except DataError as err:
            failures.append(str(err))
    return failures


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
        for message in _decode_problems(config):
            report.add("", message, "", "")
    print(report.format())
    if not report.ok:
        raise DataError(
            f"{len(report.problems)} problem(s) in {cfg.root} as {cfg.name!r}; fix them as "
            "listed above"
        )
