"""The ``cdfsl`` command: ``eval``, ``fit`` and ``backbones`` over YAML recipes (jsonargparse).

Every recipe key is also a flag: ``--way 3 --shot 1 --steps 20 --data.root DIR``.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from cdfsl.data.sources import DataConfig, build_dataset
from cdfsl.errors import CdfslError
from cdfsl.methods.base import FewShotMethod


def _add_run_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML recipe")
    parser.add_subclass_arguments(FewShotMethod, "method", required=True)
    parser.add_class_arguments(DataConfig, "data")
    parser.add_argument("--steps_per_shot", type=int, default=250, help="T = steps_per_shot·K")
    parser.add_argument("--steps", type=int | None, default=None, help="fixed T, overrides K")
    parser.add_argument("--precision", type=str, default="bf16-mixed")
    parser.add_argument("--accelerator", type=str, default="auto")
    parser.add_argument("--output", type=str, default="runs/cdfsl", help="results directory")
    parser.add_argument("--progress", type=bool, default=True)
    # Episode keys live in the same recipes; `fit` trains on the whole folder and ignores them.
    parser.add_argument("--way", type=int, default=5)
    parser.add_argument("--shot", type=int, default=1)
    parser.add_argument("--query", type=int, default=15)
    parser.add_argument("--episodes", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="cdfsl", description=__doc__)
    commands = parser.add_subcommands(required=True, dest="command")

    evaluate = ArgumentParser(description="Episodic N-way K-shot evaluation (resumable).")
    _add_run_arguments(evaluate)
    commands.add_subcommand("eval", evaluate, help="episodic evaluation")

    fit = ArgumentParser(description="Fine-tune on a labelled folder and save the adapters.")
    _add_run_arguments(fit)
    commands.add_subcommand("fit", fit, help="fine-tune on a small labelled folder")

    listing = ArgumentParser(description="List registered backbones.")
    commands.add_subcommand("backbones", listing, help="list backbones and local weights")
    return parser


def _fit_config(cfg: Namespace):
    from cdfsl.evaluation import FitConfig

    return FitConfig(cfg.steps_per_shot, cfg.steps, cfg.precision, cfg.accelerator)


def _dataset_label(data: DataConfig) -> str:
    return Path(data.root).name if data.root else data.source


def run_eval(cfg: Namespace) -> dict:
    from cdfsl.evaluation import EpisodeProtocol, EpisodicEvaluator, summary_table

    protocol = EpisodeProtocol(cfg.way, cfg.shot, cfg.query, cfg.episodes, cfg.seed)
    data_cfg = DataConfig(**vars(cfg.data))
    dataset = build_dataset(data_cfg)
    init = ArgumentParser()
    init.add_subclass_arguments(FewShotMethod, "method")
    method = init.instantiate_classes(Namespace(method=cfg.method)).method
    evaluator = EpisodicEvaluator(
        method, dataset, protocol, cfg.output, _fit_config(cfg),
        config={
            "backbone": method.hparams.backbone,
            "dataset": _dataset_label(data_cfg),
            "method_args": _plain(cfg.method.init_args),
            "data": _plain(vars(cfg.data)),
        },
        progress=cfg.progress,
    )  # fmt: skip
    summary = evaluator.run()
    print(summary_table([summary]))
    out = Path(cfg.output)
    print(f"results: {out / 'results.jsonl'}  summary: {out / 'summary.json'}")
    return summary


def run_fit(cfg: Namespace) -> Path:
    import json

    import torch

    from cdfsl.evaluation import fit_episode
    from cdfsl.lora import save_lora

    dataset = build_dataset(DataConfig(**vars(cfg.data)))
    init = ArgumentParser()
    init.add_subclass_arguments(FewShotMethod, "method")
    method = init.instantiate_classes(Namespace(method=cfg.method)).method
    to_tensor = method.backbone.preprocess.to_tensor()
    images = torch.stack([to_tensor(dataset.load(i)) for i in range(len(dataset))])
    labels = torch.tensor(dataset.targets)
    shots = int(torch.bincount(labels).min())
    fit = _fit_config(cfg)
    method.reset(cfg.seed)
    method.set_classes(dataset.class_names)
    fit_episode(method, images, labels, fit.total_steps(shots), fit)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    save_lora(method.backbone.lora_root(), out / "adapter.safetensors")
    (out / "classes.json").write_text(json.dumps(dataset.class_names, indent=2) + "\n")
    print(f"adapters: {out / 'adapter.safetensors'}  classes: {out / 'classes.json'}")
    return out


def run_backbones(cfg: Namespace) -> None:
    import open_clip

    from cdfsl.backbones import list_backbones, weights_available

    print(f"{'name':<16} {'open_clip model':<20} {'weights':<10} {'input':<8} local")
    for entry in list_backbones():
        model_cfg = open_clip.get_model_config(entry.model) or {}
        size = model_cfg.get("vision_cfg", {}).get("image_size", "?")
        local = "yes" if weights_available(entry) else "no"
        print(
            f"{entry.name:<16} {entry.model:<20} {entry.pretrained or '-':<10} {size!s:<8} {local}"
        )


def _plain(obj):
    """Namespaces and dataclasses from jsonargparse as JSON-ready dicts."""
    if isinstance(obj, Namespace):
        return {k: _plain(v) for k, v in vars(obj).items()}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(obj)
    return obj


_COMMANDS = {"eval": run_eval, "fit": run_fit, "backbones": run_backbones}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    cfg = parser.parse_args(argv)
    # The support set is one in-memory batch; Lightning's data-loader advice does not apply.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")
    try:
        _COMMANDS[cfg.command](cfg[cfg.command])
    except CdfslError as err:
        print(f"cdfsl: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cdfsl: interrupted; finished episodes are saved, rerun to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
