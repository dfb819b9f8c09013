"""Named dataset sources: ``source`` name -> a builder of ``LabelledImages``, one per layout."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cdfsl.data.base import LabelledImages
from cdfsl.errors import DataError

_SOURCES: dict[str, Callable[..., LabelledImages]] = {}


def register_source(name: str) -> Callable[[Callable[..., LabelledImages]], Callable]:
    """Decorator: register ``builder(root=..., class_names=..., **options)`` under ``name``."""

    def add(builder: Callable[..., LabelledImages]) -> Callable[..., LabelledImages]:
        if name in _SOURCES:
            raise ValueError(f"dataset source {name!r} is already registered")
        _SOURCES[name] = builder
        return builder

    return add


def list_sources() -> list[str]:
    return sorted(_SOURCES)


@dataclass
class DataConfig:
    """Where the images come from.

    Args:
        source: a registered layout (``folder``: one sub-folder per class).
        root: the dataset directory.
        class_names: optional file of readable class names (see the source's docs).
        options: extra keyword arguments of the source.
    """

    source: str = "folder"
    root: str | None = None
    class_names: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def build_dataset(config: DataConfig) -> LabelledImages:
    """The dataset ``config`` describes; unknown sources name the known ones."""
    if config.source not in _SOURCES:
        raise DataError(
            f"unknown dataset source {config.source!r}; known: {', '.join(list_sources())}"
        )
    return _SOURCES[config.source](
        root=config.root, class_names=config.class_names, **config.options
    )


@register_source("folder")
def _image_folder(root: str | None, class_names: str | None = None) -> LabelledImages:
    from cdfsl.data.folder import ImageFolder

    if root is None:
        raise DataError("no dataset root given; pass --data.root DIR (one sub-folder per class)")
    return ImageFolder(root, class_names_file=class_names)
