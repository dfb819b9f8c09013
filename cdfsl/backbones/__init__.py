"""Backbones: one interface, one adapter per model family, one registry of short names."""

from cdfsl.backbones import clip as _clip  # noqa: F401  (registers the CLIP family and rows)
from cdfsl.backbones.base import Backbone, Preprocess
from cdfsl.backbones.registry import (
    BackboneEntry,
    create_backbone,
    list_backbones,
    register_backbone,
    register_family,
    weights_available,
)

__all__ = [
    "Backbone",
    "BackboneEntry",
    "Preprocess",
    "create_backbone",
    "list_backbones",
    "register_backbone",
    "register_family",
    "weights_available",
]
