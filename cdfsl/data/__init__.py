"""Datasets, views and seeded episodes."""

from cdfsl.data.base import LabelledImages
from cdfsl.data.domainbed import LeaveOneDomainOut, leave_one_domain_out
from cdfsl.data.episodes import Episode, EpisodeIndices, EpisodeSampler, load_episode
from cdfsl.data.folder import (
    FOLDER,
    IMAGE_EXTENSIONS,
    ClassFolders,
    ImageFolder,
    readable_class_name,
)
from cdfsl.data.layout import (
    DataReport,
    ImageList,
    Layout,
    Problem,
    check_episode_supply,
    prompt_template,
)
from cdfsl.data.sources import (
    DataConfig,
    build_dataset,
    build_splits,
    list_sources,
    register_source,
    validate_source,
)
from cdfsl.data.views import (
    DEFAULT_VIEWS,
    ViewAugmenter,
    ViewSpec,
    clean_view_index,
    parse_views,
)
from cdfsl.data.wrappers import ConcatImages, Subset

__all__ = [
    "DEFAULT_VIEWS",
    "FOLDER",
    "IMAGE_EXTENSIONS",
    "ClassFolders",
    "ConcatImages",
    "DataConfig",
    "DataReport",
    "Episode",
    "EpisodeIndices",
    "EpisodeSampler",
    "ImageFolder",
    "ImageList",
    "LabelledImages",
    "Layout",
    "LeaveOneDomainOut",
    "Problem",
    "Subset",
    "ViewAugmenter",
    "ViewSpec",
    "build_dataset",
    "build_splits",
    "check_episode_supply",
    "clean_view_index",
    "leave_one_domain_out",
    "list_sources",
    "load_episode",
    "parse_views",
    "prompt_template",
    "readable_class_name",
    "register_source",
    "validate_source",
]
