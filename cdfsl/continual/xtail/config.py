"""X-TAIL recipe settings: the domain sequence, the backbone, the methods and where results go.

Every field is a ``cdfsl rail`` flag (``--primal.hidden 4000``); a method's own settings
(``primal``, ``dual``, ``finetune``) are read by its learner (:mod:`.learners`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cdfsl.continual.xtail.learners import METHODS
from cdfsl.data.views import ViewSpec
from cdfsl.lora import LoRAConfig


@dataclass
class DomainConfig:
    """One domain of the sequence.

    ``train`` and ``test`` each describe a dataset split: either a :class:`DataConfig` mapping
    (``source``, ``root``, ``class_names``, ``options``) of a registered source, or
    ``class_path`` + ``init_args`` of any ``LabelledImages`` class. Both splits must share
    their class names.
    """

    name: str
    train: dict[str, Any]
    test: dict[str, Any]


@dataclass
class PrimalConfig:
    """:class:`~cdfsl.continual.rail.PrimalRegressor` settings (the paper's H and lambda).

    ``random_init``: ``uniform_fan_in`` (the reference's ``nn.Linear`` layer) or ``normal``.
    """

    hidden: int = 15000
    reg: float = 0.1
    seed: int = 0
    random_init: str = "uniform_fan_in"
    dtype: str = "float64"
    block_size: int = 1024


@dataclass
class DualConfig:
    """:class:`~cdfsl.continual.rail.DualRegressor` settings (the paper's gamma and lambda)."""

    gamma: float = 0.1
    reg: float = 1e-3
    dtype: str = "float64"
    block_size: int = 1024


@dataclass
class FineTuneConfig:
    """The sequential fine-tuning baseline: ``steps`` LoRA-CE steps per domain.

    ``images_per_step``: training images drawn per step; None uses all of the domain's shots.
    """

    steps: int = 50
    images_per_step: int | None = None
    lr: float = 2e-4
    weight_decay: float = 1e-2
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    views: list[ViewSpec] | None = None
    precision: str = "32-true"
    accelerator: str = "auto"


@dataclass
class XTailConfig:
    """An X-TAIL run: the domain sequence, the backbone, the methods and where results go.

    ``shots``: training images per class drawn from each train split (seeded by ``seed`` and
    the domain's position); None uses the whole split. ``small_classes``: how a class with
    fewer images than ``shots`` is drawn, a row of :data:`SMALL_CLASS_DRAWS` (default
    ``with_replacement``, the reference's; ``keep_all`` keeps its images once each).
    ``class_name_style``: a row of :data:`CLASS_NAME_STYLES`, how the datasets' class names
    become prompt names (default ``rail_reference``; ``dataset`` keeps them).
    ``train_preprocess`` / ``test_preprocess``: how images are framed to the model's input
    size, a name :func:`framing` knows (defaults: the reference's seeded
    ``random_resized_crop`` of area ``train_crop_scale`` for training features, CLIP's
    ``short_side_crop`` for test images; ``squash`` was cdfsl's earlier choice for both).
    ``methods``: names of registered learners (:data:`~cdfsl.continual.xtail.LEARNERS`),
    run in registration order; default the built-in :data:`METHODS`.
    ``beta``: RAIL-Fusion's regressor weight.
    ``data_root``: the ``root`` of every split given by a registered source without one (the
    folder that holds all the datasets).
    ``device``: "auto" (CUDA when present), "cpu" or "cuda" for features and regressors.
    """

    domains: list[DomainConfig] = field(default_factory=list)
    data_root: str | None = None
    backbone: str = "micro-clip"
    pretrained: str | None = "default"
    template: str = "a photo of a {}."
    shots: int | None = 16
    small_classes: str = "with_replacement"
    class_name_style: str = "rail_reference"
    train_preprocess: str = "random_resized_crop"
    train_crop_scale: tuple[float, float] = (0.9, 1.0)
    test_preprocess: str = "short_side_crop"
    seed: int = 0
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    beta: float = 0.8
    primal: PrimalConfig = field(default_factory=PrimalConfig)
    dual: DualConfig = field(default_factory=DualConfig)
    finetune: FineTuneConfig = field(default_factory=FineTuneConfig)
    output: str = "runs/rail"
    cache_dir: str | None = None
    batch_size: int = 256
    device: str = "auto"
    progress: bool = True
