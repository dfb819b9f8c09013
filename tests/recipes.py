"""The shipped recipes and the command each runs under, for the tests that walk them all."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def command_of(recipe: Path) -> str:
    """The subcommand a recipe's header comment runs it with: its first ``cdfsl <command>``."""
    comments = "\n".join(
        line for line in recipe.read_text().splitlines() if line.lstrip().startswith("#")
    )
    match = re.search(r"\bcdfsl (\w+)", comments)
    assert match, f"{recipe}: name the command in the header, e.g. '# Usage: cdfsl eval --config'"
    return match.group(1)
