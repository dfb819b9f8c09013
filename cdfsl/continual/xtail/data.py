"""X-TAIL data: each domain's splits from a recipe, its few-shot draw and its prompt names.

One domain's path: :func:`build_split` (train, test) -> :func:`few_shot_indices` on the train
split -> :class:`Subset` -> :func:`prompt_names` -> :class:`DomainSplit`; the runner then
frames and encodes both splits into a :class:`Domain`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cdfsl.data.base import LabelledImages
from cdfsl.data.episodes import UniformDraws
from cdfsl.data.mnist import TORCHVISION_CLASSES
from cdfsl.data.sources import DataConfig, build_dataset
from cdfsl.data.wrappers import Subset
from cdfsl.engine import episode_seed
from cdfsl.errors import CdfslError
from cdfsl.features import ImageFeatures
from cdfsl.registry import Registry, import_class_path

if TYPE_CHECKING:
    from cdfsl.continual.xtail.config import XTailConfig


def build_split(spec: Mapping[str, Any], data_root: str | None = None) -> LabelledImages:
    """A dataset split from a recipe mapping: ``class_path`` + ``init_args``, or a DataConfig.

    ``data_root`` stands in for the ``root`` of a DataConfig mapping that has none.
    """
    spec = dict(spec)
    if "class_path" in spec:
        path = str(spec.pop("class_path"))
        init_args = dict(spec.pop("init_args", None) or {})
        cls = import_class_path(path, "LabelledImages class", "cdfsl.data.micro_world.MicroWorld")
        if spec:
            raise CdfslError(
                f"split with class_path {path!r} has extra keys {sorted(spec)}: expected only "
                "class_path and init_args; move them under init_args"
            )
        return cls(**init_args)
    allowed = set(DataConfig.__dataclass_fields__)
    if not set(spec) <= allowed:
        raise CdfslError(
            f"split keys {sorted(set(spec) - allowed)} unknown: expected {sorted(allowed)} of a "
            "registered source, or class_path + init_args"
        )
    data = DataConfig(**spec)
    if data.root is None:
        data.root = data_root
    return build_dataset(data)


def _draw_with_replacement(draws: UniformDraws, members: Sequence[int], shots: int) -> list[int]:
    """``shots`` uniform draws with replacement: the reference's ``random.choices(items, k)``."""
    return [int(members[draws.below(len(members))]) for _ in range(shots)]


def _keep_all(draws: UniformDraws, members: Sequence[int], shots: int) -> list[int]:
    """Every image of the class once (cdfsl's earlier rule)."""
    return [int(m) for m in members]


SMALL_CLASS_DRAWS = Registry(
    "small-class draw",
    {
        "with_replacement": _draw_with_replacement,
        "keep_all": _keep_all,
    },
)
"""How :func:`few_shot_indices` draws a class with fewer images than ``shots``: name ->
fn(draws, member indices, shots). ``with_replacement`` is the reference's
(``DatasetBase.generate_fewshot_dataset``: ``random.sample`` when a class has at least
``num_shots`` items, else ``random.choices(items, k=num_shots)``)."""


def few_shot_indices(
    targets: Sequence[int], shots: int | None, seed: int, small_classes: str = "with_replacement"
) -> list[int]:
    """``shots`` indices per class drawn without replacement, sorted (repeats kept).

    A class with fewer than ``shots`` images is drawn by ``SMALL_CLASS_DRAWS[small_classes]``.
    Class c's draw depends only on ``(seed, c)``, through the version-stable raw stream that
    ``cdfsl.data.episodes`` draws episodes from; ``shots=None`` keeps every index.
    """
    small = SMALL_CLASS_DRAWS.get(small_classes)
    if small is None:
        raise CdfslError(
            f"small_classes={small_classes!r}: expected one of {sorted(SMALL_CLASS_DRAWS)} "
            "(with_replacement is the reference's)"
        )
    if shots is None:
        return list(range(len(targets)))
    if shots < 1:
        raise CdfslError(f"shots={shots}: expected an integer >= 1 or null for the whole split")
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(targets):
        by_class.setdefault(int(c), []).append(i)
    chosen: list[int] = []
    for c, members in sorted(by_class.items()):
        draws = UniformDraws(seed, c)
        if len(members) >= shots:
            chosen.extend(draws.sample(members, shots))
        else:
            chosen.extend(small(draws, members, shots))
    return sorted(chosen)


# -- class names -----------------------------------------------------------------------------
def _mnist_reference_names(names: Sequence[str]) -> list[str]:
    """MNIST's prompt names in the reference: torchvision's classes as ``number: "0 - zero"``
    (``scenario_datasets/collections.py``: ``'number: "{}"'.format(classname)``)."""
    if len(names) != len(TORCHVISION_CLASSES):
        raise CdfslError(f"MNIST with {len(names)} classes: expected the ten digits")
    return [f'number: "{name}"' for name in TORCHVISION_CLASSES]


def _satellite_location(names: Sequence[str]) -> list[str]:
    """EuroSAT's names in the reference: the CoOp split's name + " satellite location"
    (``scenario_datasets/eurosat.py`` renames every train and test item so)."""
    return [f"{name} satellite location" for name in names]


CLASS_NAME_STYLES: Registry[str, dict[str, Any]] = Registry(
    "class name style",
    {
        "rail_reference": {
            "mnist": _mnist_reference_names,
            "cdfsl.data.mnist.Mnist": _mnist_reference_names,
            "eurosat-fsl": _satellite_location,
            "eurosat": _satellite_location,
        },
        "dataset": {},
    },
)
"""How a domain's class names become prompt names: style -> {split's ``source`` (or
``class_path``) -> fn(names) -> names}; a dataset the style does not name keeps its names.
``rail_reference`` is the reference's; ``dataset`` keeps every dataset's own names. (Every
other Order-I dataset's names come from the same CoOp split files in the reference and cdfsl,
underscores read as spaces.)"""


def prompt_names(style: str, spec: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    """``names`` of the dataset built from split ``spec`` as ``CLASS_NAME_STYLES[style]`` says."""
    rules = CLASS_NAME_STYLES.get(style)
    if rules is None:
        raise CdfslError(
            f"class_name_style={style!r}: expected one of {sorted(CLASS_NAME_STYLES)} "
            "(rail_reference is the reference's)"
        )
    rule = rules.get(spec.get("source") or spec.get("class_path"))
    return list(rule(names)) if rule is not None else list(names)


@dataclass
class DomainSplit:
    """One domain's data before any model sees it: the drawn training shots (unframed), the
    test split and the prompt names (after ``class_name_style``)."""

    name: str
    train: Subset
    test: LabelledImages
    class_names: list[str]


def domain_splits(cfg: XTailConfig) -> list[DomainSplit]:
    """Every domain of ``cfg``, built and checked as a run builds them (no backbone needed).

    Domain t's shots come from ``few_shot_indices`` seeded ``episode_seed(cfg.seed, t)``.
    """
    out = []
    for position, dcfg in enumerate(cfg.domains):
        full_train = build_split(dcfg.train, cfg.data_root)
        test = build_split(dcfg.test, cfg.data_root)
        if list(full_train.class_names) != list(test.class_names):
            raise CdfslError(
                f"domain {dcfg.name!r}: train and test splits have different class names; "
                "expected the same classes in the same order in both splits"
            )
        shots_seed = episode_seed(cfg.seed, position)
        picked = few_shot_indices(full_train.targets, cfg.shots, shots_seed, cfg.small_classes)
        names = prompt_names(cfg.class_name_style, dcfg.test, test.class_names)
        out.append(DomainSplit(dcfg.name, Subset(full_train, picked), test, names))
    return out


@dataclass
class Domain:
    """A domain as the runner uses it: splits, cached features and its slice of the union."""

    name: str
    class_names: list[str]  # prompt names (after class_name_style)
    offset: int  # union index of its first class
    train: LabelledImages
    test: LabelledImages
    train_feats: ImageFeatures
    test_feats: ImageFeatures

    @property
    def end(self) -> int:
        return self.offset + len(self.class_names)
