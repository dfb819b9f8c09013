"""Backbones: one interface, one class per model family, one registry of short names."""

from cdfsl.backbones import clip as _clip  # noqa: F401  (registers the CLIP family and rows)
from cdfsl.backbones import pe_core as _pe_core  # noqa: F401  (PE-Core family and rows)
from cdfsl.backbones import siglip as _siglip  # noqa: F401  (SigLIP, SigLIP2 family and rows)
from cdfsl.backbones.base import Backbone, Preprocess
from cdfsl.backbones.registry import (
    BACKBONES,
    FAMILIES,
    BackboneEntry,
    BackboneFamily,
    create_backbone,
    list_backbones,
    weights_available,
)
from cdfsl.backbones.tokenizers import TOKENIZER_DIR_ENV

__all__ = [
    "BACKBONES",
    "FAMILIES",
    "TOKENIZER_DIR_ENV",
    "Backbone",
    "BackboneEntry",
    "BackboneFamily",
    "Preprocess",
    "create_backbone",
    "list_backbones",
    "weights_available",
]
