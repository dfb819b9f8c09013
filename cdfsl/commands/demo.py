"""``cdfsl demo``: the offline main job — ``cdfsl table`` on the micro-world recipe: ZeroShot,
LoRAFineTune, Mind and the frozen-feature baselines with micro-clip on every micro-world target
domain, 5-way 1- and 5-shot, each against LoRAFineTune paired over the same episodes; then the
training curves of one episode per trainable method.

Defaults come from ``recipes/micro/demo.yaml``; every key there is also a flag, and every flag
of ``cdfsl table`` is one here. Resumable: a rerun with the same settings skips finished
episodes. ``--workers N`` runs N ranks (torch's elastic launcher) that share every cell's
episodes; started under torchrun, torchrun's ranks do; ``--shard K/N`` then ``cdfsl merge``.
"""

from __future__ import annotations

from jsonargparse import ArgumentParser, Namespace

from cdfsl.assets import recipes_dir
from cdfsl.commands import _table_args
from cdfsl.errors import CdfslError

NAME = "demo"
HELP = "offline demo on the micro world with micro-clip (no arguments needed)"


def configure(parser: ArgumentParser) -> None:
    parser.default_config_files = [str(recipes_dir() / "micro" / "demo.yaml")]
    _table_args.add_table_arguments(parser)
    parser.set_defaults(backbones=["micro-clip"], output="runs/demo")
    parser.add_argument(
        "--curves.domain", type=str | None, default=None,
        help="the target of the training curves (null: the last)",
    )  # fmt: skip
    parser.add_argument("--curves.shot", type=int, default=1)


def run(cfg: Namespace) -> None:
    from cdfsl.commands.table import files_line
    from cdfsl.fewshot.table import TABLE_FILES, run_table
    from cdfsl.results.shards import Shard

    if not cfg.methods:
        default = recipes_dir() / "micro" / "demo.yaml"
        found = "" if default.is_file() else f" (the default recipe {default} does not exist)"
        raise CdfslError(
            f"no methods to run: expected a demo recipe with a 'methods' list{found}; pass "
            "--config micro/demo or a recipe of your own, or set CDFSL_RECIPES=DIR"
        )
    grid = _table_args.grid(cfg)
    names = [t.name for t in grid.targets]
    curve_target = cfg.curves.domain or names[-1]
    if curve_target not in names:
        raise CdfslError(
            f"curves.domain {curve_target!r} is not one of the targets {names}; expected one of "
            "them; fix --curves.domain"
        )
    shard = Shard.parse(cfg.shard) if cfg.shard is not None else None
    text = run_table(grid, cfg.progress, cfg.workers, cfg.threads, shard)
    if text is None:
        if shard is not None:
            print(f"shard {shard.index}/{shard.count} done; then: cdfsl merge {grid.output}")
        return  # a static shard or a torchrun rank other than 0: no tables, no curves
    _curves(cfg, grid, curve_target)
    print(text)
    print(files_line(grid.output, (*TABLE_FILES, "curves.png")))


def _curves(cfg: Namespace, grid, name: str) -> None:
    """The training curves of episode 0 on target ``name`` at ``--curves.shot`` shots."""
    import pydoc

    from cdfsl.data.layout import prompt_template
    from cdfsl.fewshot import demo
    from cdfsl.fewshot.episodic import EpisodeProtocol
    from cdfsl.fewshot.grid import build_method, target_dataset
    from cdfsl.results.plots import plot_training_curves
    from cdfsl.results.store import write_json_atomic

    target = next(t for t in grid.targets if t.name == name)
    dataset = target_dataset(target)
    backbone = grid.backbones[0]
    methods = {}
    for spec, method_name in zip(grid.methods, grid.names, strict=True):
        cls = pydoc.locate(str(spec["class_path"]))
        if not getattr(cls, "trainable", True):
            continue  # no curve to draw: not built (a frozen backbone's copy saved)
        method = build_method(spec, backbone, grid.pretrained.get(backbone))
        if method.trainable:
            method.template = prompt_template(method.template, dataset)
            methods[method_name] = method
    protocol = EpisodeProtocol(grid.way, cfg.curves.shot, grid.query, 1, grid.seed)
    output = grid.output / "curves"
    curves = demo.training_curves(methods, dataset, protocol, grid.fit_for(target), output)
    write_json_atomic(output / "history.json", curves)
    title = f"{name}, {cfg.curves.shot}-shot, episode 0"
    plot_training_curves(curves, grid.output / "curves.png", title)
