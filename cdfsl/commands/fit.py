"""``cdfsl fit``: fine-tune on a small labelled folder (one support set) and save the adapters.

It runs on :class:`~lightning.pytorch.cli.LightningCLI`: beside the eval recipe's keys, every
``Trainer`` argument is a flag and a recipe key under ``trainer`` (``--trainer.logger``,
``--trainer.callbacks``, ``--trainer.devices``, ``--trainer.max_steps``), and the resolved
configuration is saved as ``config.yaml`` in the trainer's log directory (``output`` unless a
logger is given; ``cdfsl fit --config`` reruns it). The recipe's ``precision`` and
``accelerator`` apply unless ``--trainer.precision`` / ``--trainer.accelerator`` are given.
The recipe's episode keys (way, query, episodes) are accepted and unused: the whole folder is
the support set, every step sees all of it (or ``batch_size`` images), and T = steps_per_shot ·
(fewest images per class) steps, one epoch (``--steps`` or ``--trainer.max_steps`` fix T).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from cdfsl.commands import _run_args

NAME = "fit"
HELP = "fine-tune on a small labelled folder and save the adapters (LightningCLI)"
PARSER = "lightning"

#: Trainer defaults for one support set: its T steps are one epoch; no checkpoints or logger
#: unless asked for (the adapters are the result); ``default_root_dir`` None means ``output``.
#: One device (Lightning's ``auto`` takes every visible GPU); with several asked for, every rank
#: runs all T steps on the whole set (no distributed sampler: it would split the steps).
TRAINER_DEFAULTS: dict[str, Any] = {
    "devices": 1,
    "use_distributed_sampler": False,
    "max_epochs": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
}


def configure(parser: LightningArgumentParser) -> None:
    if not isinstance(parser, LightningArgumentParser):
        raise TypeError(f"cdfsl fit needs a LightningArgumentParser, got {type(parser).__name__}")
    _run_args.add_run_arguments(parser)
    parser.add_argument(
        "--seed_everything", type=bool | int, default=False,
        help="LightningCLI's seed_everything before building the classes; not needed: the "
        "method seeds its draws from --seed",
    )  # fmt: skip
    parser.add_lightning_class_args(L.Trainer, "trainer")
    parser.set_defaults({f"trainer.{key}": value for key, value in TRAINER_DEFAULTS.items()})


class FitCLI(LightningCLI):
    """LightningCLI over one support set: ``method`` (the recipe's key), ``data``, ``trainer``.

    The arguments are those :func:`configure` adds, nothing else (no optimiser flags: each
    method configures its own).
    """

    def __init__(self, config: Namespace) -> None:
        from cdfsl.cli import PARSER_MODE, LightningParser
        from cdfsl.fewshot.methods.base import FewShotMethod

        super().__init__(
            model_class=FewShotMethod,
            subclass_mode_model=True,
            parser_class=LightningParser,
            parser_kwargs={"parser_mode": PARSER_MODE},
            save_config_kwargs={"overwrite": True},
            seed_everything_default=False,
            auto_configure_optimizers=False,
            load_from_checkpoint_support=False,
            run=False,
            args=config,
        )

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        return self.parser_class(**kwargs)

    def add_default_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        pass

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        configure(parser)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # `args` is the configuration cdfsl's own parser read from the command line.
        self.config = parser.parse_object(args)

    def instantiate_classes(self) -> None:
        self.config_init = self.parser.instantiate_classes(self.config)
        self.model = self.config_init.method
        self.datamodule = None  # the support set is one in-memory tensor, see fit_support_set

    def fit_support_set(self) -> Path | None:
        """Train on the folder for T steps, save the adapters and class names; their folder
        (None on ranks other than 0 of a multi-device fit, which save nothing)."""
        import torch

        from cdfsl.engine import check_finished, cuda_numerics, support_loader, warn_if_slow_bf16
        from cdfsl.lora import save_lora
        from cdfsl.plumbing import quiet_lightning, write_bytes_atomic

        cfg, method = self.config, self.model
        _, dataset = _run_args.dataset(cfg)
        to_tensor = method.to_tensor()
        images = torch.stack([to_tensor(dataset.load(i)) for i in range(len(dataset))])
        labels = torch.tensor(dataset.targets)
        steps = cfg.trainer.max_steps
        if steps in (None, -1):
            steps = _run_args.fit_config(cfg).total_steps(int(torch.bincount(labels).min()))
        method.reset(cfg.seed)
        method.set_classes(dataset.class_names)
        method.train()  # Lightning keeps the mode it finds
        out = Path(cfg.output)
        unset = {
            "precision": (None, cfg.precision),
            "accelerator": ("auto", cfg.accelerator),
            "default_root_dir": (None, str(out)),
            "enable_progress_bar": (None, cfg.progress),
            "max_steps": (-1, steps),
            "deterministic": (None, cfg.deterministic),
        }
        overrides = {k: v for k, (default, v) in unset.items() if cfg.trainer[k] == default}
        with quiet_lightning():
            trainer = self.instantiate_trainer(**overrides)
            device_type = trainer.strategy.root_device.type
            warn_if_slow_bf16(trainer.precision, device_type)
            deterministic = bool(overrides.get("deterministic", cfg.trainer.deterministic))
            with cuda_numerics(cfg.tf32, deterministic, device_type):
                loader = support_loader(images, labels, steps, cfg.batch_size, cfg.seed)
                trainer.fit(method, loader)
        check_finished(trainer, steps)
        if not trainer.is_global_zero:  # ranks hold the same adapters: rank 0 writes them
            return None
        out.mkdir(parents=True, exist_ok=True)
        save_lora(method.backbone.lora_root(), out / "adapter.safetensors")
        classes = json.dumps(dataset.class_names, indent=2) + "\n"
        write_bytes_atomic(out / "classes.json", classes.encode())
        return out


def run(cfg: Namespace) -> None:
    config = cfg.clone()
    config.pop("config", None)
    out = FitCLI(config).fit_support_set()
    if out is not None:
        print(f"adapters: {out / 'adapter.safetensors'}  classes: {out / 'classes.json'}")
