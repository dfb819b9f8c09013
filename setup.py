"""Build hook: the wheel carries the top-level ``recipes/`` and ``assets/micro-clip/`` as package
data under ``cdfsl/_shipped/`` (see ``cdfsl/assets.py``). Everything else is in pyproject.toml.

The source tree keeps them at the top level for contributors; an editable install reads them
there, so the copy is made for regular builds only.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = {"recipes": "recipes", "assets/micro-clip": "assets/micro-clip"}  # source -> _shipped/
SKIPPED = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")


class BuildPyWithShippedFiles(build_py):
    """``build_py`` that also copies :data:`SHIPPED` into ``cdfsl/_shipped/``."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "cdfsl" / "_shipped"
        shutil.rmtree(target, ignore_errors=True)  # a reused build/ must not keep removed files
        for source, dest in SHIPPED.items():
            if not (ROOT / source).is_dir():
                raise FileNotFoundError(f"{ROOT / source}: shipped with the wheel, but missing")
            shutil.copytree(ROOT / source, target / dest, ignore=SKIPPED, dirs_exist_ok=True)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        target = Path(self.build_lib) / "cdfsl" / "_shipped"
        return outputs + [str(p) for p in target.rglob("*") if p.is_file()]


setup(cmdclass={"build_py": BuildPyWithShippedFiles})
