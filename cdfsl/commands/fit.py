"""``cdfsl fit``: fine-tune on a small labelled folder (one support set) and save the adapters.

The recipe's episode keys (way, query, episodes) are accepted and unused: the whole folder is
the support set, every step sees all of it, and T = steps_per_shot · (fewest images per class).
"""

from __future__ import annotations

import json
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from cdfsl.commands import _run_args

NAME = "fit"
HELP = "fine-tune on a small labelled folder and save the adapters"


def configure(parser: ArgumentParser) -> None:
    _run_args.add_run_arguments(parser)


def run(cfg: Namespace) -> None:
    import torch

    from cdfsl.evaluation import fit_episode
    from cdfsl.lora import save_lora

    _, dataset = _run_args.dataset(cfg)
    method = _run_args.method(cfg)
    to_tensor = method.to_tensor()
    images = torch.stack([to_tensor(dataset.load(i)) for i in range(len(dataset))])
    labels = torch.tensor(dataset.targets)
    fit = _run_args.fit_config(cfg)
    method.reset(cfg.seed)
    method.set_classes(dataset.class_names)
    fit_episode(method, images, labels, fit.total_steps(int(torch.bincount(labels).min())), fit)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    save_lora(method.backbone.lora_root(), out / "adapter.safetensors")
    (out / "classes.json").write_text(json.dumps(dataset.class_names, indent=2) + "\n")
    print(f"adapters: {out / 'adapter.safetensors'}  classes: {out / 'classes.json'}")
