"""How every subcommand reads its recipe: ``--config`` and the interpolation it may use.

``--config`` takes a YAML file, a shipped recipe's name, or a YAML string. Recipes are read in
jsonargparse's ``omegaconf+`` mode: a recipe's ``${...}`` interpolations are resolved after the
flags are merged, so ``--shot 5`` also changes ``output: runs/mind-${shot}shot``. A path in an
interpolation is the recipe's own key (``${data.source}``), whichever subcommand reads it.

One resolver serves per-target and per-shot values::

    steps_per_shot: "${cdfsl.pick:${data.source},{chestx:125},250}"
    episodes: "${cdfsl.pick:${shot},{1:800,5:400}}"

Quote the value and write the table without a space after its colons: jsonargparse 4.53 checks
a recipe's defaults before resolving them and reads ``{chestx: 125}`` as YAML, not as text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jsonargparse import ActionConfigFile, set_parsing_settings

from cdfsl.assets import find_recipe
from cdfsl.errors import CdfslError
from cdfsl.registry import Registry

#: jsonargparse's parser mode for recipes: OmegaConf interpolation over the merged config.
PARSER_MODE = "omegaconf+"

_NO_DEFAULT = object()


def pick(key: Any, table: dict, default: Any = _NO_DEFAULT, *, _node_: Any = None) -> Any:
    """``${cdfsl.pick:KEY,{k: v, ...}[,DEFAULT]}``: ``table``'s value for ``KEY``.

    Keys match by their text (``${shot}`` is 5, the table's key ``5``). Without a default, a key
    the table lacks raises a :class:`CdfslError` that names the recipe key and the flag to give.
    """
    for candidate, value in table.items():
        if str(candidate) == str(key):
            return value
    if default is not _NO_DEFAULT:
        return default
    name = _node_._get_full_key(None).split(".", 1)[-1] if _node_ is not None else "this key"
    raise CdfslError(
        f"the recipe's {name} has no value for {key!r} (it has one for "
        f"{', '.join(map(str, table))}); give --{name} explicitly"
    )


RESOLVERS: Registry[str, Callable[..., Any]] = Registry("recipe resolver", {"cdfsl.pick": pick})
"""OmegaConf resolvers a recipe may call, by name."""


def configure_recipe_reading() -> None:
    """Register :data:`RESOLVERS` and root each recipe's interpolations at the recipe itself.

    jsonargparse nests a subcommand's recipe under the subcommand's name (``eval.shot``);
    ``omegaconf_absolute_to_relative_paths`` makes ``${shot}`` in it mean ``eval.shot``.
    """
    from omegaconf import OmegaConf

    # omegaconf 2.4 renamed register_new_resolver; pyproject allows 2.3.
    register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
    for name, resolver in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            register(name, resolver)
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)


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
