"""``cdfsl demo``: the offline main job — ZeroShot, LoRAFineTune and Mind with micro-clip on
every micro-world target domain, 5-way 1- and 5-shot, with CI95 table, files and plots.

Defaults come from ``recipes/micro/demo.yaml``; every key there is also a flag. Resumable:
a rerun with the same settings skips finished episodes. ``--workers N`` runs N ranks (torch's
elastic launcher) that share every cell's episodes; started under torchrun, torchrun's ranks do.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from cdfsl.assets import recipes_dir
from cdfsl.commands._recipe_file import RecipeFile
from cdfsl.errors import CdfslError

NAME = "demo"
HELP = "offline demo on the micro world with micro-clip (no arguments needed)"


def configure(parser: ArgumentParser) -> None:
    parser.default_config_files = [str(recipes_dir() / "micro" / "demo.yaml")]
    parser.add_argument("--config", action=RecipeFile, help="a demo recipe (micro/demo)")
    parser.add_argument("--backbone", type=str, default="micro-clip")
    parser.add_argument("--domains", type=list[str] | None, default=None)
    parser.add_argument("--shots", type=list[int], default=[1, 5])
    parser.add_argument("--way", type=int, default=5)
    parser.add_argument("--query", type=int, default=15)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images_per_class", type=int, default=40)
    parser.add_argument("--steps_per_shot", type=int, default=20)
    parser.add_argument("--steps", type=int | None, default=None)
    parser.add_argument("--precision", type=str, default="bf16-mixed")
    parser.add_argument("--accelerator", type=str, default="auto")
    parser.add_argument(
        "--episodes_per_step", type=int | None, default=None,
        help="episodes trained side by side per rank; null: as many as memory allows",
    )  # fmt: skip
    parser.add_argument(
        "--methods", type=list[dict], default=[], help="method configs (class_path, init_args)"
    )
    parser.add_argument(
        "--paired",
        type=list[str] | None,
        default=None,
        help="[BASE, OTHER]: also report OTHER - BASE accuracy paired over the same episodes",
    )
    parser.add_argument("--curves.domain", type=str | None, default=None)
    parser.add_argument("--curves.shot", type=int, default=1)
    parser.add_argument("--output", type=str, default="runs/demo")
    parser.add_argument("--progress", type=bool, default=True)
    parser.add_argument(
        "--workers", type=int, default=1,
        help="ranks that split every cell's episodes (under torchrun: torchrun's ranks)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int | None, default=None, help="torch threads per rank (null: torch's)"
    )


def run(cfg: Namespace) -> None:
    import torch

    from cdfsl import demo
    from cdfsl.data.micro_world import list_domains
    from cdfsl.engine import FitConfig
    from cdfsl.evaluation import EpisodeProtocol, distributed
    from cdfsl.evaluation.plots import plot_accuracy_by_domain, plot_training_curves
    from cdfsl.evaluation.store import write_json_atomic

    domains = cfg.domains or [d for d in list_domains() if d != "source"]
    protocol = EpisodeProtocol(cfg.way, cfg.shots[0], cfg.query, cfg.episodes, cfg.seed)
    fit = FitConfig(
        cfg.steps_per_shot, cfg.steps, cfg.precision, cfg.accelerator,
        episodes_per_step=cfg.episodes_per_step,
    )  # fmt: skip
    if not cfg.methods:
        default = recipes_dir() / "micro" / "demo.yaml"
        found = "" if default.is_file() else f" (the default recipe {default} does not exist)"
        raise CdfslError(
            f"no methods to run: expected a demo recipe with a 'methods' list{found}; pass "
            "--config micro/demo or a recipe of your own, or set CDFSL_RECIPES=DIR"
        )
    names = [demo.method_name(spec) for spec in cfg.methods]
    if len(set(names)) != len(names):
        raise CdfslError(
            f"methods {names}: each method class may appear once (rows are keyed by class name)"
        )
    if cfg.paired and (len(cfg.paired) != 2 or not set(cfg.paired) <= set(names)):
        raise CdfslError(f"paired takes two of the recipe's methods {names}, got {cfg.paired}")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    # Built here, before any rank starts, so that a recipe whose methods cannot be built (weights,
    # backbone, LoRA or view settings) stops with its one-line error; the curves reuse them.
    methods = demo.build_methods(cfg.methods, cfg.backbone)
    output = Path(cfg.output)
    cells = demo.run_grid(
        cfg.methods, cfg.backbone, domains, cfg.shots, protocol, fit, output,
        cfg.images_per_class, cfg.progress, workers=cfg.workers, threads=cfg.threads,
    )  # fmt: skip
    ranks = distributed.launched_ranks()
    if ranks is not None and ranks.rank != 0:
        return  # started under torchrun: rank 0 writes the tables and plots
    rows = [cell.row() for cell in cells]

    table = demo.pivot_table(rows, lambda r: f"{100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f}")
    text = demo.markdown(table)
    if cfg.paired:
        diffs = demo.paired_differences(cells, *cfg.paired)
        if diffs:
            paired = demo.pivot_table(
                diffs, lambda r: f"{100 * r['accuracy']:+.2f} ± {100 * r['ci95']:.2f}"
            )
            text += (
                f"\n\nPaired over the same episodes, accuracy points (mean ± CI95):\n\n"
                f"{demo.markdown(paired)}"
            )
    (output / "results.md").write_text(
        f"{cfg.way}-way, {cfg.query} queries, {cfg.episodes} episodes per cell, "
        f"backbone {cfg.backbone}; accuracy % (mean ± CI95)\n\n{text}\n"
    )
    with open(output / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(output / "results.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    plot_accuracy_by_domain(rows, output / "accuracy.png")

    curve_domain = cfg.curves.domain or domains[-1]
    curves = demo.training_curves(
        methods, curve_domain, cfg.curves.shot, protocol, fit, cfg.images_per_class,
        output / "curves",
    )  # fmt: skip
    write_json_atomic(output / "curves" / "history.json", curves)
    plot_training_curves(
        curves, output / "curves.png", f"{curve_domain}, {cfg.curves.shot}-shot, episode 0"
    )
    print(text)
    print(f"files: {output}/results.md, results.csv, results.jsonl, accuracy.png, curves.png")
