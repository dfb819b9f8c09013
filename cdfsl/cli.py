"""The ``cdfsl`` command. Subcommands live in ``cdfsl/commands/``, one module each.

Every recipe key is also a flag: ``cdfsl eval --config R --way 3 --shot 1 --data.root DIR``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

from jsonargparse import ArgumentParser

import cdfsl.commands
from cdfsl.errors import CdfslError


def _command_modules() -> dict[str, ModuleType]:
    modules = {}
    for info in pkgutil.iter_modules(cdfsl.commands.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"cdfsl.commands.{info.name}")
        modules[module.NAME] = module
    return dict(sorted(modules.items()))


def build_parser() -> tuple[ArgumentParser, dict[str, ModuleType]]:
    parser = ArgumentParser(prog="cdfsl", description=__doc__)
    subcommands = parser.add_subcommands(required=True, dest="command")
    modules = _command_modules()
    for name, module in modules.items():
        sub = ArgumentParser(description=module.__doc__)
        module.configure(sub)
        subcommands.add_subcommand(name, sub, help=module.HELP)
    return parser, modules


def main(argv: Sequence[str] | None = None) -> int:
    parser, modules = build_parser()
    cfg = parser.parse_args(argv)
    # The support set is one in-memory batch; Lightning's data-loader advice does not apply.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")
    try:
        modules[cfg.command].run(cfg[cfg.command])
    except CdfslError as err:
        print(f"cdfsl: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cdfsl: interrupted; finished work is saved, rerun to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
