"""Where cdfsl's shipped files live: ``assets/`` (weights) and ``recipes/`` in the source tree.

``CDFSL_ASSETS`` and ``CDFSL_RECIPES`` override the locations, for installs that keep them
elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

_PROJECT = Path(__file__).resolve().parents[1]


def assets_dir() -> Path:
    return Path(os.environ.get("CDFSL_ASSETS", _PROJECT / "assets"))


def recipes_dir() -> Path:
    return Path(os.environ.get("CDFSL_RECIPES", _PROJECT / "recipes"))
