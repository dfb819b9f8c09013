"""Arguments shared by the commands that train a method on a dataset from a YAML recipe."""

from __future__ import annotations

from typing import Any

from jsonargparse import ArgumentParser, Namespace

from cdfsl.commands._recipe_file import RecipeFile
from cdfsl.data.base import LabelledImages
from cdfsl.data.sources import DataConfig, build_dataset
from cdfsl.engine import FitConfig
from cdfsl.fewshot.methods.base import FewShotMethod
from cdfsl.plumbing import plain_json


def add_run_arguments(parser: ArgumentParser) -> None:
    """Recipe keys: method, data, episode protocol, training length, precision, output."""
    parser.add_argument("--config", action=RecipeFile, help="a YAML recipe or a recipe name")
    parser.add_subclass_arguments(FewShotMethod, "method", required=True)
    parser.add_class_arguments(DataConfig, "data")
    parser.add_argument("--way", type=int, default=5)
    parser.add_argument("--shot", type=int, default=1)
    parser.add_argument("--query", type=int, default=15)
    parser.add_argument("--episodes", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    add_fit_arguments(
        parser, "episodes trained side by side; null: as many as memory allows (rows do not change)"
    )
    parser.add_argument("--output", type=str, default="runs/cdfsl", help="results directory")
    parser.add_argument("--progress", type=bool, default=True)


def add_fit_arguments(parser: ArgumentParser, episodes_per_step_help: str) -> None:
    """The keys of a :class:`FitConfig` (read back by :func:`fit_config`): training length,
    support batches, episodes per step, precision, device and numerics."""
    parser.add_argument("--steps_per_shot", type=int, default=250, help="T = steps_per_shot·K")
    parser.add_argument("--steps", type=int | None, default=None, help="fixed T, overrides K")
    parser.add_argument(
        "--batch_size", type=int | None, default=None,
        help="support images per step; null: all of them (episodes, Mind)",
    )  # fmt: skip
    parser.add_argument(
        "--episodes_per_step", type=int | None, default=None, help=episodes_per_step_help
    )
    parser.add_argument("--precision", type=str, default="bf16-mixed")
    parser.add_argument("--accelerator", type=str, default="auto")
    parser.add_argument(
        "--tf32", type=bool, default=False, help="CUDA matmuls and convolutions in TF32"
    )
    parser.add_argument(
        "--deterministic", type=bool, default=False, help="deterministic kernels only (CUDA)"
    )
    parser.add_argument(
        "--attention", type=str, default="auto",
        help="LoRA attention kernel: auto (per device and precision), sdpa or explicit",
    )  # fmt: skip
    parser.add_argument(
        "--compile", type=str, default="eager",
        help="training forward: eager, or inductor (torch.compile; for long runs)",
    )  # fmt: skip


def fit_config(cfg: Namespace) -> FitConfig:
    return FitConfig(
        cfg.steps_per_shot, cfg.steps, cfg.precision, cfg.accelerator, cfg.batch_size,
        cfg.episodes_per_step, cfg.tf32, cfg.deterministic, cfg.attention, cfg.compile,
    )  # fmt: skip


def dataset(cfg: Namespace) -> tuple[DataConfig, LabelledImages]:
    data = DataConfig(**vars(cfg.data))
    check_source_options(data)
    return data, build_dataset(data)


def check_source_options(data: DataConfig, flag: str = "--data.options") -> None:
    """Refuse options that ``data.source``'s builder does not take, naming those it does.

    Layouts check their own options; a plain builder function (``folder``, ``micro``, ``mnist``)
    would raise a ``TypeError`` on an unknown keyword instead.
    """
    import inspect

    from cdfsl.data.sources import get_source
    from cdfsl.errors import DataError

    params = inspect.signature(get_source(data.source)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [name for name in params if name not in ("root", "class_names")]
    unknown = sorted(set(data.options) - set(accepted))
    if unknown:
        raise DataError(
            f"unknown option(s) {', '.join(unknown)} for dataset source {data.source!r}; expected "
            f"{'some of: ' + ', '.join(accepted) if accepted else 'no options'}; fix {flag}"
        )


def method(cfg: Namespace) -> FewShotMethod:
    """Instantiate ``cfg.method`` (``class_path`` + ``init_args``).

    A random-initialised backbone (``tiny-*``) is drawn from the method's ``seed``, so that every
    rank of a sharded run and every resume evaluates the same one.
    """
    parser = ArgumentParser()
    parser.add_subclass_arguments(FewShotMethod, "method")
    return parser.instantiate(Namespace(method=cfg.method)).method


def run_description(cfg: Namespace, method: FewShotMethod, dataset_label: str) -> dict[str, Any]:
    """What a ``cdfsl eval`` / ``cdfsl allway`` run adds to its evaluator's fingerprint: the
    backbone, the dataset's name, the method's and the data's arguments as the recipe gave them."""
    return {
        "backbone": method.hparams.backbone,
        "dataset": dataset_label,
        "method_args": plain_json(cfg.method.init_args),
        "data": plain_json(vars(cfg.data)),
    }
