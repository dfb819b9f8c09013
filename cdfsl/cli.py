"""The ``cdfsl`` command. Subcommands live in ``cdfsl/commands/``, one module each.

Every recipe key is also a flag: ``cdfsl eval --config R --way 3 --shot 1 --data.root DIR``.
A :class:`~cdfsl.errors.CdfslError` raised while the recipe is parsed or its objects are built
reaches the user as one line, ``cdfsl: error: ...``, and exit status 2, also when jsonargparse
has wrapped it in errors of its own.

Recipes are read in jsonargparse's ``omegaconf+`` mode (LightningCLI offers it too): a recipe may
interpolate its own keys (``output: runs/${method.init_args.backbone}-${shot}shot``), resolved
after the flags are merged, so ``--shot 5`` changes what was interpolated from ``shot`` as well;
``--print_config`` shows the resolved values (see :mod:`cdfsl.commands._recipe_file`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningArgumentParser

import cdfsl.commands
from cdfsl.commands._recipe_file import PARSER_MODE, configure_recipe_reading
from cdfsl.errors import CdfslError
from cdfsl.plumbing import ignore_noise_warnings

#: Environment a subcommand needs set before torch loads: OpenMP reads it once, at load time,
#: and building the parser loads torch. On a shared 2-core machine OpenMP's default
#: busy-waiting made pretraining's 2-thread steps 2-4x slower (numerics unchanged).
EARLY_ENVIRONMENT: dict[str, dict[str, str]] = {"pretrain-micro": {"OMP_WAIT_POLICY": "PASSIVE"}}


def _set_early_environment(argv: Sequence[str]) -> None:
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if "torch" not in sys.modules:
        for key, value in EARLY_ENVIRONMENT.get(command or "", {}).items():
            os.environ.setdefault(key, value)


def _command_modules() -> dict[str, ModuleType]:
    modules = {}
    for info in pkgutil.iter_modules(cdfsl.commands.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"cdfsl.commands.{info.name}")
        modules[module.NAME] = module
    return dict(sorted(modules.items()))


def cdfsl_error_in(error: BaseException | None) -> CdfslError | None:
    """The first ``CdfslError`` in ``error``'s chain of causes and contexts, or None.

    jsonargparse reports a class that fails to build as a ``ValueError`` (often several deep,
    one per Union it tried) raised ``from`` the class's own error.
    """
    seen: set[int] = set()
    todo = [error]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        if isinstance(current, CdfslError):
            return current
        seen.add(id(current))
        todo += [current.__cause__, current.__context__]
    return None


def parse_error_line(message: str, error: BaseException | None) -> str:
    """jsonargparse's parse failure as one line: where it failed, then the innermost reason.

    ``Parser key "method": ...`` over a dozen lines of Union subtypes and given values becomes
    ``Parser key "method": Option 'bakbone' is not accepted``.
    """
    head = next((line.strip() for line in message.splitlines() if line.strip()), "bad arguments")
    innermost = error
    while innermost is not None and innermost.__cause__ is not None:
        innermost = innermost.__cause__
    lines = str(innermost).strip().splitlines() if innermost is not None else []
    reason = lines[0].strip() if lines else ""
    if not reason or reason in head:
        return head
    return f"{head.rstrip(':')}: {reason}"


class _OneLineErrors:
    """A jsonargparse parser's failures reach the user as one ``cdfsl: error:`` line.

    A failure caused by a ``CdfslError`` raises that error (``main`` prints it); any other
    failure of the command line is printed as :func:`parse_error_line` with exit status 2.
    jsonargparse's inner parsers (``exit_on_error`` false) raise as before, and with
    ``JSONARGPARSE_DEBUG`` set every failure is jsonargparse's own.
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        found = cdfsl_error_in(ex)
        if found is not None:
            raise found
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        failed = getattr(ex, "subcommand_parser", None) or self
        command = failed.prog.replace(" [options]", "")
        self.exit(2, f"cdfsl: error: {parse_error_line(message, ex)}; {command} --help lists "
                  "the options\n")  # fmt: skip


class _Parser(_OneLineErrors, ArgumentParser):
    """jsonargparse's parser with :class:`_OneLineErrors`."""


class LightningParser(_OneLineErrors, LightningArgumentParser):
    """LightningCLI's parser (``add_lightning_class_args``) with :class:`_OneLineErrors`."""


#: The parser class of each kind a command module may ask for with ``PARSER = "..."``.
PARSERS: dict[str, type[ArgumentParser]] = {"jsonargparse": _Parser, "lightning": LightningParser}

#: What ``cdfsl --help`` says: where to start, not how the code is laid out.
USAGE = """\
Few-shot fine-tuning of vision-language models (CLIP, SigLIP, PE-Core) on target domains far
from their pretraining data, with Mind, its LoRA baseline, RAIL and RD-MLDG. Start with
`cdfsl demo` (offline, no arguments); `cdfsl recipes` lists ready recipes; `cdfsl eval --config
NAME --data.root DIR` evaluates one on your images (one folder per class); `cdfsl data check
SOURCE DIR` checks a dataset folder first. Every recipe key is also a flag (`--shot 5`), and
`--print_config` shows the resolved settings. Errors are one line, `cdfsl: error: ...`."""


def build_parser() -> tuple[ArgumentParser, dict[str, ModuleType]]:
    configure_recipe_reading()
    parser = _Parser(prog="cdfsl", description=USAGE, parser_mode=PARSER_MODE)
    subcommands = parser.add_subcommands(required=True, dest="command")
    modules = _command_modules()
    for name, module in modules.items():
        kind = PARSERS[getattr(module, "PARSER", "jsonargparse")]
        sub = kind(description=module.__doc__, parser_mode=PARSER_MODE)
        module.configure(sub)
        subcommands.add_subcommand(name, sub, help=module.HELP)
    return parser, modules


def main(argv: Sequence[str] | None = None) -> int:
    _set_early_environment(sys.argv[1:] if argv is None else argv)
    parser, modules = build_parser()
    ignore_noise_warnings()
    try:
        cfg = parser.parse_args(argv)
        modules[cfg.command].run(cfg[cfg.command])
    except KeyboardInterrupt:
        print("cdfsl: interrupted; finished work is saved, rerun to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`cdfsl recipes | head`): stop quietly, as Unix tools do, and
        # point stdout at /dev/null so the interpreter's last flush does not raise again.
        _silence_stdout()
        return 141
    except Exception as err:
        found = cdfsl_error_in(err)
        if found is None:
            raise
        print(f"cdfsl: error: {_one_line(found)}", file=sys.stderr)
        return 2
    return 0


def _silence_stdout() -> None:
    # A replaced stdout (a test's, a notebook's) may have no file descriptor to redirect.
    with contextlib.suppress(AttributeError, OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _one_line(error: CdfslError) -> str:
    """``str(error)`` on one line: a message that spans lines has them joined by ``; ``."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
