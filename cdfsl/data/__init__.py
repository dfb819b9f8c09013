"""Datasets, views and seeded episodes."""

from cdfsl.data.base import LabelledImages
from cdfsl.data.episodes import Episode, EpisodeIndices, EpisodeSampler, load_episode
from cdfsl.data.folder import IMAGE_EXTENSIONS, ImageFolder, readable_class_name
from cdfsl.data.views import (
    DEFAULT_VIEWS,
    ViewAugmenter,
    ViewSpec,
    clean_view_index,
    parse_views,
)

__all__ = [
    "DEFAULT_VIEWS",
    "IMAGE_EXTENSIONS",
    "Episode",
    "EpisodeIndices",
    "EpisodeSampler",
    "ImageFolder",
    "LabelledImages",
    "ViewAugmenter",
    "ViewSpec",
    "clean_view_index",
    "load_episode",
    "parse_views",
    "readable_class_name",
]
