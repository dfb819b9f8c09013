"""Recipe keys of a results grid (``cdfsl table``, ``cdfsl demo``) and the grid they describe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser, Namespace

from cdfsl.commands import _run_args
from cdfsl.commands._recipe_file import RecipeFile
from cdfsl.errors import CdfslError
from cdfsl.fewshot.grid import Grid, Target


def add_table_arguments(parser: ArgumentParser) -> None:
    """Methods, targets (or micro-world domains), shots, backbones, episodes per shot, the
    protocol, the training settings, the reference, the output and how to run the cells."""
    parser.add_argument("--config", action=RecipeFile, help="a table recipe or a recipe name")
    parser.add_argument(
        "--methods", type=list[dict[str, Any]], default=[],
        help="the rows: {class_path, init_args} as cdfsl eval's --method, with an optional name "
        "(the row's name; default: the class name)",
    )  # fmt: skip
    parser.add_argument(
        "--targets", type=list[Target], default=[],
        help="the columns: {name, source, root, class_names, options} as cdfsl eval's --data.*, "
        "and steps_per_shot (null: the grid's)",
    )  # fmt: skip
    parser.add_argument(
        "--roots", type=dict[str, str], default={},
        help="a folder per target name, replacing that target's root: {eurosat: DIR, ...}",
    )  # fmt: skip
    parser.add_argument(
        "--domains", type=list[str] | None, default=None,
        help="micro-world target domains as the columns, instead of --targets",
    )  # fmt: skip
    parser.add_argument(
        "--images_per_class", type=int, default=40, help="of each micro-world domain (--domains)"
    )
    parser.add_argument("--shots", type=list[int], default=[1, 5])
    parser.add_argument(
        "--backbones", type=list[str], default=["clip-vit-b16"],
        help="each method runs on each (its init_args.backbone is replaced)",
    )  # fmt: skip
    parser.add_argument(
        "--pretrained", type=dict[str, str], default={},
        help="weights per backbone name, e.g. {clip-vit-b16: /path/ViT-B-16.pt} (absent: each "
        "method's own pretrained)",
    )  # fmt: skip
    parser.add_argument(
        "--episodes", type=int | dict[int, int], default={1: 800, 5: 400},
        help="episodes per cell: one count, or one per shot ({1: 800, 5: 400})",
    )  # fmt: skip
    parser.add_argument("--way", type=int, default=5)
    parser.add_argument("--query", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    _run_args.add_fit_arguments(
        parser, "episodes trained side by side per rank; null: as many as memory allows"
    )
    parser.add_argument(
        "--reference", type=str | None, default=None,
        help="the method (row name) whose accuracy the paired differences subtract, episode by "
        "episode; null: no differences",
    )  # fmt: skip
    parser.add_argument("--output", type=str, default="runs/table", help="results directory")
    parser.add_argument("--progress", type=bool, default=True)
    parser.add_argument(
        "--workers", type=int, default=1,
        help="ranks that split every cell's episodes (under torchrun: torchrun's ranks)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int | None, default=None, help="torch threads per rank (null: torch's)"
    )
    parser.add_argument(
        "--shard", type=str | None, default=None,
        help="K/N: run only episodes i with i mod N = K of every cell (then cdfsl merge OUTPUT)",
    )  # fmt: skip


def grid(cfg: Namespace) -> Grid:
    """The grid ``cfg`` describes; refuses what cannot make one, naming the key and the fix."""
    episodes = cfg.episodes
    if isinstance(episodes, int):
        episodes = {shot: episodes for shot in cfg.shots}
    fit = _run_args.fit_config(cfg)
    if cfg.workers < 1:
        raise CdfslError(f"--workers {cfg.workers}; expected 1 or more; fix --workers")
    return Grid(
        methods=tuple(_plain(m) for m in cfg.methods), targets=tuple(targets(cfg)),
        shots=tuple(cfg.shots), backbones=tuple(cfg.backbones),
        episodes={int(k): int(v) for k, v in dict(episodes).items()}, fit=fit,
        output=Path(cfg.output), way=cfg.way, query=cfg.query, seed=cfg.seed,
        pretrained=dict(cfg.pretrained or {}), reference=cfg.reference,
    )  # fmt: skip


def targets(cfg: Namespace) -> list[Target]:
    """The columns: ``cfg.targets`` with ``cfg.roots`` filled in, or the micro-world domains."""
    from dataclasses import replace

    if cfg.domains is not None and cfg.targets:
        raise CdfslError(
            f"both targets ({len(cfg.targets)}) and domains {cfg.domains} are set; expected one "
            "of the two; fix: drop one (--domains null, or --targets [])"
        )
    if cfg.domains is not None:
        from cdfsl.data.micro_world import list_domains

        known = list_domains()
        unknown = [d for d in cfg.domains if d not in known]
        if unknown:
            raise CdfslError(
                f"domains {unknown} are not micro-world domains; expected some of "
                f"{', '.join(known)}; fix --domains"
            )
        options = {"images_per_class": cfg.images_per_class, "seed": cfg.seed}
        found = [Target(d, "micro", options={"domain": d, **options}) for d in cfg.domains]
    else:
        found = [_target(t) for t in cfg.targets]
    if not found:
        raise CdfslError(
            "no targets: expected a recipe with a 'targets' list of {name, source, root, ...} "
            "or a 'domains' list of micro-world domains; fix --targets or --domains"
        )
    roots = dict(cfg.roots or {})
    names = [t.name for t in found]
    unknown = sorted(set(roots) - set(names))
    if unknown:
        raise CdfslError(
            f"roots names {', '.join(unknown)}, which no target is; expected some of "
            f"{', '.join(names)}; fix --roots"
        )
    return [replace(t, root=str(roots[t.name])) if t.name in roots else t for t in found]


def _plain(value: Any) -> Any:
    """jsonargparse's Namespaces inside a value, as plain dicts and lists."""
    if isinstance(value, Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _target(value: Any) -> Target:
    return value if isinstance(value, Target) else Target(**_plain(value))
