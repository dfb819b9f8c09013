"""Short backbone names -> (open_clip model, default weights, family class), and the one factory.

Adding a model is adding a row with ``BACKBONES.add(BackboneEntry(...))``; adding a family is
adding a family class and ``FAMILIES.add(BackboneFamily(matches, cls))``. Weights (and the
Hugging Face tokenizer files some families need, see :mod:`cdfsl.backbones.tokenizers`) are
looked up in local caches only, unless downloads are allowed explicitly: offline, a missing file
fails at once with a message instead of hanging on network retries.

The Hugging Face conventions hold: the cache is ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub`` (read by ``huggingface_hub`` when it is imported), and
``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) forbids downloads even where
``CDFSL_ALLOW_DOWNLOAD=1`` or ``allow_download=True`` asks for them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.factory import LOCAL_DIR_PREFIX

from cdfsl.backbones.base import Backbone
from cdfsl.backbones.tokenizers import TokenizerSource, build_tokenizer, resolve_tokenizer
from cdfsl.errors import WeightsError
from cdfsl.registry import Registry

_CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(_CONFIG_DIR)

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz")
# The weight file names of open_clip's hub repos, looked for in a pretrained=DIR copy of one.
_HUB_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")
ALLOW_DOWNLOAD_ENV = "CDFSL_ALLOW_DOWNLOAD"
OFFLINE_ENVS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@dataclass(frozen=True)
class BackboneEntry:
    """One registered backbone.

    ``model`` is an open_clip model name (or ``local-dir:PATH``); ``pretrained`` the default
    weights: an open_clip tag, a local file, or None for random initialisation.
    """

    name: str
    model: str
    pretrained: str | None
    description: str = ""
    # How to obtain the weights when they are missing, appended to the error message.
    how_to_get: str = ""


BACKBONES: Registry[str, BackboneEntry] = Registry(
    "backbone", fix="list them with cdfsl backbones", error=WeightsError, key_of=lambda e: e.name
)
"""Short backbone names -> their entries (``BACKBONES.add(entry)``)."""


@dataclass(frozen=True)
class BackboneFamily:
    """Routes the open_clip model names for which ``matches(name)`` holds to the class ``cls``."""

    matches: Callable[[str], bool]
    cls: type[Backbone]


FAMILIES: Registry[str, BackboneFamily] = Registry(
    "backbone family", error=WeightsError, key_of=lambda family: family.cls.__name__
)
"""Family class names -> their rules (``FAMILIES.add(BackboneFamily(matches, cls))``); rules
are tried newest first, so a specific family added after the generic CLIP rule wins."""


def list_backbones() -> list[BackboneEntry]:
    return list(BACKBONES.values())


def resolve_entry(name: str) -> BackboneEntry:
    """A registry row for ``name``: a short name, or any open_clip model name as-is."""
    if name in BACKBONES:
        return BACKBONES[name]
    if name.startswith(LOCAL_DIR_PREFIX) or name in open_clip.list_models():
        return BackboneEntry(name=name, model=name, pretrained=None)
    known = ", ".join(sorted(BACKBONES))
    raise WeightsError(
        f"unknown backbone {name!r}: use a registered name ({known}) or an open_clip model "
        "name (open_clip.list_models())"
    )


def _family_for(model_name: str) -> type[Backbone]:
    for family in reversed(list(FAMILIES.values())):
        if family.matches(model_name):
            return family.cls
    raise WeightsError(f"no backbone family class accepts open_clip model {model_name!r}")


@dataclass(frozen=True)
class _Weights:
    checkpoint: str | None
    tag_cfg: dict


def _cached_checkpoint(tag_cfg: dict, cache_dir: str | None) -> str | None:
    """The local file holding a tag's weights, looking in caches only (no network)."""
    if "file" in tag_cfg and os.path.isfile(tag_cfg["file"]):
        return tag_cfg["file"]
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        # open_clip's convention: "org/repo/" (trailing slash) means the default file names.
        repo_id, filename = os.path.split(hub)
        names = (
            [filename]
            if filename
            else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        )
        for fname in names:
            found = try_to_load_from_cache(repo_id, fname, cache_dir=cache_dir)
            if isinstance(found, str):
                return found
    url = tag_cfg.get("url", "")
    if url:
        root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "clip"
        candidate = root / os.path.basename(url)
        if candidate.is_file():
            return str(candidate)
    return None


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is on (1/ON/YES/TRUE, as HF reads)."""
    return any(
        os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
        for name in OFFLINE_ENVS
    )


def _downloads_allowed(allow_download: bool | None) -> bool:
    if hub_offline():
        return False
    if allow_download is not None:
        return allow_download
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "") not in ("", "0", "false", "False")


def resolve_weights(
    entry: BackboneEntry,
    pretrained: str | None,
    cache_dir: str | None = None,
    allow_download: bool | None = None,
) -> _Weights:
    """Map ``pretrained`` ("default", a tag, a file, a directory, or None) to a local file.

    A directory is a local copy of an open_clip hub repo: its ``open_clip_model.safetensors`` (or
    ``open_clip_pytorch_model.bin``) is loaded with the default tag's preprocessing.
    """
    if pretrained == "default":
        pretrained = entry.pretrained
    default_tag_cfg = (
        open_clip.get_pretrained_cfg(entry.model, entry.pretrained) if entry.pretrained else {}
    )
    if entry.model.startswith(LOCAL_DIR_PREFIX):
        folder = Path(entry.model.removeprefix(LOCAL_DIR_PREFIX))
        if not (folder / "open_clip_config.json").is_file():
            hint = entry.how_to_get or "point the backbone at a folder holding both files"
            raise WeightsError(
                f"backbone {entry.name!r} expects open_clip_config.json and weights in "
                f"{folder}, which has none; {hint}"
            )
        return _Weights(None, {})
    if pretrained is None:
        return _Weights(None, {})
    path = Path(pretrained).expanduser()
    if path.is_dir():
        found = [path / name for name in _HUB_WEIGHT_FILES if (path / name).is_file()]
        if not found:
            raise WeightsError(
                f"directory {pretrained!r} for backbone {entry.name!r} has no "
                f"{' or '.join(_HUB_WEIGHT_FILES)}; pass the checkpoint file itself, or a copy "
                "of the model's open_clip hub repo"
            )
        return _Weights(str(found[0]), default_tag_cfg)
    if path.is_file():
        # A local copy of the default weights keeps the default tag's preprocessing.
        return _Weights(str(path), default_tag_cfg)
    if os.sep in pretrained or path.suffix in _CHECKPOINT_SUFFIXES:
        raise WeightsError(
            f"checkpoint file {pretrained!r} for backbone {entry.name!r} does not exist; "
            "pass the path of an open_clip state dict (.pt/.bin/.safetensors)"
        )
    tag_cfg = open_clip.get_pretrained_cfg(entry.model, pretrained)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(entry.model) or ["none"]
        raise WeightsError(
            f"open_clip has no tag {pretrained!r} for {entry.model!r} (known: {', '.join(tags)}); "
            "pass a known tag or a local checkpoint file"
        )
    cached = _cached_checkpoint(tag_cfg, cache_dir)
    if cached is not None:
        return _Weights(cached, tag_cfg)
    if not _downloads_allowed(allow_download):
        how = "unset HF_HUB_OFFLINE and set" if hub_offline() else "set"
        raise WeightsError(
            f"weights for {entry.model!r} tag {pretrained!r} are not in the local cache; pass "
            f"pretrained=/path/to/checkpoint (an open_clip state dict), or {how} "
            f"{ALLOW_DOWNLOAD_ENV}=1 on a machine with network access to download them once"
        )
    try:
        return _Weights(open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir), tag_cfg)
    except Exception as err:  # network and hub errors come in many types
        raise WeightsError(
            f"download of {entry.model!r} tag {pretrained!r} failed ({type(err).__name__}); "
            "pass pretrained=/path/to/checkpoint instead"
        ) from err


@contextmanager
def _random_init_quiet(active: bool) -> Iterator[None]:
    """Drop open_clip's "initialized randomly" warning where random init was asked for."""
    if not active:
        yield
        return

    def drop(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    logging.root.addFilter(drop)
    try:
        yield
    finally:
        logging.root.removeFilter(drop)


def create_backbone(
    name: str,
    pretrained: str | None = "default",
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
    allow_download: bool | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    init_seed: int = 0,
) -> Backbone:
    """Build a backbone by short name or open_clip model name.

    ``pretrained``: "default" (the registry's weights for ``name``), an open_clip tag, a local
    checkpoint file, a local copy of the model's open_clip hub repo (a directory), or None for
    random initialisation (as in open_clip). ``tokenizer``: a directory with the Hugging Face
    tokenizer files of families that need them (SigLIP, SigLIP2); see
    :mod:`cdfsl.backbones.tokenizers` for the other places they are looked for. Every file is
    found before anything is built, so a missing one fails at once. A random initialisation is
    drawn from ``torch.manual_seed(init_seed)`` (the global generator is left as it was), so the
    same name and seed give the same model in every process.
    """
    entry = resolve_entry(name)
    weights, tokenizer_source = _resolve_files(
        entry, pretrained, cache_dir, _downloads_allowed(allow_download), tokenizer
    )
    kwargs: dict = {}
    if weights.tag_cfg:
        kwargs["force_quick_gelu"] = bool(weights.tag_cfg.get("quick_gelu", False))
        kwargs["force_preprocess_cfg"] = {
            k: weights.tag_cfg[k] for k in _PREPROCESS_KEYS if k in weights.tag_cfg
        }
    try:
        with _random_init_quiet(weights.checkpoint is None), torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = open_clip.create_model(
                entry.model, pretrained=weights.checkpoint, device=device, **kwargs
            )
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise WeightsError(
            f"could not build backbone {name!r} from {entry.model!r}: {err}"
        ) from err
    tokenize = build_tokenizer(entry.model, tokenizer_source)
    backbone = _family_for(entry.model).from_open_clip(entry.name, model, tokenize)
    return backbone.to(device)


def _resolve_files(
    entry: BackboneEntry,
    pretrained: str | None,
    cache_dir: str | None,
    allow_download: bool,
    tokenizer: str | os.PathLike[str] | None,
) -> tuple[_Weights, TokenizerSource]:
    """Weights and tokenizer source; a missing weight file and tokenizer are named together."""
    tokenizer_problem = None
    try:
        source = resolve_tokenizer(
            entry.name, entry.model, tokenizer, _pretrained_dir(entry, pretrained), cache_dir,
            allow_download,
        )  # fmt: skip
    except WeightsError as err:
        tokenizer_problem = str(err)
    problems: list[str] = []
    try:
        # The tokenizer is checked first so that a doomed load never downloads gigabytes.
        allow = allow_download and tokenizer_problem is None
        weights = resolve_weights(entry, pretrained, cache_dir, allow)
    except WeightsError as err:
        problems.append(str(err))
    if tokenizer_problem is not None:
        problems.append(tokenizer_problem)
    if problems:
        raise WeightsError("; also, ".join(problems))
    return weights, source


def _pretrained_dir(entry: BackboneEntry, pretrained: str | None) -> str | None:
    """The local folder ``pretrained`` names (a directory, or a checkpoint file's folder).

    A downloaded hub repo keeps its tokenizer files beside the weights. None for tags and None.
    """
    if pretrained == "default":
        pretrained = entry.pretrained
    if pretrained is None:
        return None
    path = Path(pretrained).expanduser()
    if path.is_dir():
        return str(path)
    return str(path.parent) if path.is_file() else None


def weights_available(entry: BackboneEntry, cache_dir: str | None = None) -> bool:
    """Whether ``entry``'s default weights and tokenizer load without network access."""
    if entry.model.startswith(LOCAL_DIR_PREFIX):
        return (
            Path(entry.model.removeprefix(LOCAL_DIR_PREFIX)) / "open_clip_config.json"
        ).is_file()
    try:
        _resolve_files(entry, "default", cache_dir, allow_download=False, tokenizer=None)
    except WeightsError:
        return False
    return True
