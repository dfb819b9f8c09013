"""``--config`` of every subcommand: a YAML file, a shipped recipe's name, or a YAML string."""

from __future__ import annotations

from jsonargparse import ActionConfigFile

from cdfsl.assets import find_recipe
from cdfsl.errors import CdfslError


def _is_yaml_text(value: str) -> bool:
    """Whether ``value`` is a config written inline (``--config '{way: 3}'``), not a name."""
    return "\n" in value or ": " in value or value.lstrip().startswith("{")


class RecipeFile(ActionConfigFile):
    """jsonargparse's config-file action that also takes ``micro/demo``-style recipe names.

    A name that is neither a file nor a recipe ends the parse with one ``cdfsl: error:`` line
    and exit status 2, as every cdfsl error does.
    """

    def __call__(self, parser, cfg, values, option_string=None):
        try:
            located = str(find_recipe(values))
        except CdfslError as err:
            if not _is_yaml_text(str(values)):
                parser.exit(2, f"cdfsl: error: {err}\n")
            located = values
        self.apply_config(parser, cfg, self.dest, located)
