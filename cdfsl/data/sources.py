"""Named dataset sources: ``source`` name -> a builder of ``LabelledImages``, one per layout.

The layouts ``folder`` (``cdfsl.data.folder``: one sub-folder per class), those of
``cdfsl.data.cdfsl_targets`` (the BSCD-FSL targets), ``cdfsl.data.fsl`` (the eleven CoOp
datasets) and ``cdfsl.data.domainbed`` are registered under their names, beside the generated
``micro`` world, ``mnist`` and ``idx`` (any IDX dataset, named by a class-names file). A source
that is a ``Layout`` also validates a folder without building (``validate_source``: what
``cdfsl data check`` prints) and, if it has train / test splits, lists them (``build_splits``);
``build_dataset`` runs the same checks and raises ``DataError`` before any training starts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdfsl.data import cdfsl_targets, domainbed, fsl
from cdfsl.data.base import LabelledImages
from cdfsl.data.folder import FOLDER
from cdfsl.data.layout import DataReport, Layout
from cdfsl.errors import DataError
from cdfsl.registry import Registry

SOURCES: Registry[str, Callable[..., LabelledImages]] = Registry(
    "dataset source", fix="fix --data.source (cdfsl data list describes them)", error=DataError
)
"""Dataset sources: name -> ``builder(root=..., class_names=..., **options)`` (a ``Layout``)."""

#: Decorator: register ``builder(root=..., class_names=..., **options)`` under ``name``.
register_source = SOURCES.register


for _layout in (FOLDER, *cdfsl_targets.LAYOUTS, *fsl.LAYOUTS, *domainbed.LAYOUTS):
    register_source(_layout.name)(_layout)


def list_sources() -> list[str]:
    return sorted(SOURCES)


def get_source(name: str) -> Callable[..., LabelledImages]:
    """The builder (or ``Layout``) registered as ``name``; unknown names list the known ones."""
    return SOURCES.lookup(name)


def describe_source(name: str) -> str:
    """One line on what folder the source ``name`` expects."""
    source = get_source(name)
    text = getattr(source, "description", None) or (source.__doc__ or "").strip()
    return text.splitlines()[0] if text else ""


@dataclass
class DataConfig:
    """Where the images come from.

    Args:
        source: a registered layout (``folder``: one sub-folder per class; ``cdfsl data list``
            names them all).
        root: the dataset directory.
        class_names: optional file of readable class names (see the source's docs).
        options: extra keyword arguments of the source, e.g. ``{"split": "train"}`` or
            ``{"target_domain": "sketch"}``.
    """

    source: str = "folder"
    root: str | None = None
    class_names: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def build_dataset(config: DataConfig) -> LabelledImages:
    """The dataset ``config`` describes, checked; unknown sources name the known ones."""
    return get_source(config.source)(
        root=config.root, class_names=config.class_names, **config.options
    )


def build_splits(config: DataConfig) -> dict[str, LabelledImages]:
    """Every split (``train``, ``val``, ``test``, ...) of the dataset ``config`` describes."""
    source = get_source(config.source)
    if not _has_splits(source):
        layouts = [n for n, s in sorted(SOURCES.items()) if _has_splits(s)]
        raise DataError(
            f"dataset source {config.source!r} has no splits; expected a source with train and "
            f"test splits such as {', '.join(layouts[:6])}, ...; fix --data.source"
        )
    assert isinstance(source, Layout)
    return source.splits(root=config.root, class_names=config.class_names, **config.options)


def _has_splits(source: Callable[..., LabelledImages]) -> bool:
    """A layout with train / test splits (``folder`` and the CDFSL targets have only ``all``)."""
    return isinstance(source, Layout) and source.has_splits


def validate_source(config: DataConfig) -> DataReport:
    """What is wrong with the folder ``config`` describes, and its images per class and split.

    Sources without a ``validate`` are built; the error they raise becomes the report's problem.
    """
    source = get_source(config.source)
    validate = getattr(source, "validate", None)
    if validate is not None:
        return validate(root=config.root, class_names=config.class_names, **config.options)
    report = DataReport(config.source, Path(config.root or "."))
    try:
        dataset = build_dataset(config)
    except DataError as err:
        report.add("", str(err), "", "")
        return report
    report.classes = list(getattr(dataset, "classes", dataset.class_names))
    report.class_names = list(dataset.class_names)
    counts = Counter(dataset.targets)
    report.counts["all"] = [counts[c] for c in range(len(dataset.class_names))]
    return report


@register_source("mnist")
def _mnist(root: str | None, class_names: str | None = None, split: str = "test") -> LabelledImages:
    """MNIST's original IDX files in root, root/mnist or root/MNIST/raw (split: train, test)."""
    from cdfsl.data.mnist import Mnist

    if class_names is not None:
        raise DataError(
            "mnist's class names are the digits 0..9: expected no --data.class_names; drop it, "
            "or read another IDX dataset (Fashion-MNIST, KMNIST) with --data.source idx"
        )
    return Mnist(root, split)


@register_source("idx")
def _idx(root: str | None, class_names: str | None = None, split: str = "test") -> LabelledImages:
    """IDX files (Fashion-MNIST, KMNIST, ...) in root, named by class_names (split: train, test)."""
    from cdfsl.data.mnist import IdxImages

    if class_names is None:
        raise DataError(
            "source 'idx' has no class names of its own: expected --data.class_names FILE, a "
            'JSON list of names in label order (["T-shirt/top", "trouser", ...]); pass it'
        )
    return IdxImages(root, class_names, split)


@register_source("micro")
def _micro(
    root: str | None = None, class_names: str | None = None, domain: str = "chestx-like",
    images_per_class: int = 60, seed: int = 0,
) -> LabelledImages:  # fmt: skip
    """cdfsl's generated micro world (no root): options domain, images_per_class, seed."""
    from cdfsl.data.micro_world import MicroWorld

    if root is not None or class_names is not None:
        raise DataError(
            "the micro world is generated, so it takes no --data.root or --data.class_names; "
            'choose it with --data.options \'{"domain": "isic-like"}\''
        )
    return MicroWorld(domain, images_per_class=images_per_class, seed=seed)
