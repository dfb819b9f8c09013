"""``cdfsl recipes``: the shipped recipes by name, each with the first line of its header.

Any subcommand's ``--config`` takes these names (``cdfsl eval --config tiny/mind``);
``cdfsl recipes NAME`` prints the file a name resolves to. ``CDFSL_RECIPES`` sets the folder.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from cdfsl.assets import find_recipe, list_recipes, recipes_dir

NAME = "recipes"
HELP = "list the shipped recipes (names that --config accepts), or print where one lives"


def configure(parser: ArgumentParser) -> None:
    parser.add_argument(
        "name", type=str | None, nargs="?", default=None, help="print this recipe's path"
    )


def headline(path: Path) -> str:
    """The first comment line of a recipe, without the ``#``; empty when it has none."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            return ""
    return ""


def run(cfg: Namespace) -> None:
    if cfg.name is not None:
        print(find_recipe(cfg.name))
        return
    names = list_recipes()
    width = max((len(n) for n in names), default=0)
    for name in names:
        print(f"{name:<{width}}  {headline(find_recipe(name))}".rstrip())
    print(f"{len(names)} recipes in {recipes_dir()}; use a name as --config NAME")
