"""Where cdfsl's shipped files live: the micro-clip weights (``assets/``) and the recipes.

In the source tree they are the top-level ``assets/`` and ``recipes/`` folders. A wheel carries
copies of them as package data, ``cdfsl/_shipped/assets/`` and ``cdfsl/_shipped/recipes/``
(``setup.py`` copies them at build time), found through :mod:`importlib.resources`, so an
installed cdfsl finds them from any working directory. ``CDFSL_ASSETS`` and ``CDFSL_RECIPES``
override both, for installs that keep them elsewhere.

A recipe is addressed by a path, or by its name relative to the recipes folder, with or
without ``.yaml``: ``micro/demo``, ``tiny/mind``, ``cdfsl/mind``.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

from cdfsl.errors import CdfslError

ASSETS_ENV = "CDFSL_ASSETS"
RECIPES_ENV = "CDFSL_RECIPES"
SHIPPED = "_shipped"  # the folder of cdfsl's package data holding assets/ and recipes/
_SOURCE_TREE = Path(__file__).resolve().parents[1]
_RECIPE_SUFFIXES = (".yaml", ".yml")


def _shipped_dir(name: str) -> Path:
    """``cdfsl/_shipped/<name>`` of an installed wheel, else the source tree's ``<name>/``."""
    packaged = files("cdfsl") / SHIPPED / name
    if packaged.is_dir():
        return Path(str(packaged))  # wheels install unzipped: a real folder
    return _SOURCE_TREE / name


def assets_dir() -> Path:
    return Path(os.environ.get(ASSETS_ENV) or _shipped_dir("assets"))


def recipes_dir() -> Path:
    return Path(os.environ.get(RECIPES_ENV) or _shipped_dir("recipes"))


def list_recipes() -> list[str]:
    """Names of the recipes under :func:`recipes_dir`, e.g. ``micro/demo``, sorted."""
    root = recipes_dir()
    found = (p for suffix in _RECIPE_SUFFIXES for p in root.rglob(f"*{suffix}"))
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in found if p.is_file())


def find_recipe(name: str | os.PathLike[str]) -> Path:
    """The recipe file ``name`` names: an existing path, or a name under :func:`recipes_dir`.

    Raises :class:`CdfslError` naming the known recipes when neither exists.
    """
    path = Path(name).expanduser()
    if path.is_file():
        return path
    root = recipes_dir()
    stem = str(name).removesuffix(".yaml").removesuffix(".yml")
    for candidate in (root / str(name), *(root / f"{stem}{s}" for s in _RECIPE_SUFFIXES)):
        if candidate.is_file():
            return candidate
    raise CdfslError(
        f"recipe {str(name)!r} is neither a file nor one of the {len(list_recipes())} recipes "
        f"under {root}; pass a YAML file or a name that `cdfsl recipes` lists (e.g. micro/demo), "
        f"or set {RECIPES_ENV}=DIR"
    )
