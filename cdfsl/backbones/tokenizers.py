"""Text tokenizers for open_clip models, found locally so that nothing waits on the network.

Most open_clip text towers use the bundled BPE vocabulary (:class:`open_clip.SimpleTokenizer`).
SigLIP and SigLIP2 name a Hugging Face tokenizer instead (``text_cfg.hf_tokenizer_name``, e.g.
``timm/ViT-B-16-SigLIP``) whose files live on the hub. A local directory holding those files
(``tokenizer_config.json`` plus ``tokenizer.json``, ``spiece.model`` or ``tokenizer.model``) is
looked for, first hit wins, in:

1. ``tokenizer=DIR`` given to :func:`cdfsl.backbones.create_backbone`;
2. the ``pretrained=DIR`` directory (a local copy of the hub repo), or the folder of a
   ``pretrained=FILE`` checkpoint;
3. ``$CDFSL_TOKENIZER_DIR/<hub id>/`` (e.g. ``$CDFSL_TOKENIZER_DIR/timm/ViT-B-16-SigLIP/``), one
   root for every family, which recipes and the CLI can use without code;
4. the Hugging Face cache (``huggingface_hub.try_to_load_from_cache``: files only, no request),
   which is ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``.

Failing all four, and unless downloads are allowed, loading fails at once with a
:class:`~cdfsl.errors.WeightsError` that says which files to put where.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
from open_clip.factory import LOCAL_DIR_PREFIX
from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer, SimpleTokenizer
from torch import Tensor

from cdfsl.errors import WeightsError

TOKENIZER_DIR_ENV = "CDFSL_TOKENIZER_DIR"
_CONFIG_FILE = "tokenizer_config.json"
_VOCAB_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model")

Tokenizer = Callable[[list[str]], Tensor]


@dataclass(frozen=True)
class TokenizerSource:
    """Where a model's tokenizer comes from.

    ``hub_id`` is the Hugging Face tokenizer the model config names, or None for the bundled BPE
    vocabulary; ``location`` is a local directory with its files, or ``hub_id`` itself when a
    download was allowed, or None when no files are needed.
    """

    hub_id: str | None
    location: str | None


def _text_cfg(model: str) -> dict:
    return (open_clip.get_model_config(model) or {}).get("text_cfg", {})


def hf_tokenizer_name(model: str) -> str | None:
    """The Hugging Face tokenizer ``model``'s open_clip config names, or None (bundled BPE)."""
    if model.startswith(LOCAL_DIR_PREFIX):
        return None  # open_clip reads those tokenizer files from the model directory itself
    return _text_cfg(model).get("hf_tokenizer_name") or None


def holds_tokenizer(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` has the files a Hugging Face ``AutoTokenizer`` loads offline."""
    path = Path(directory)
    return (path / _CONFIG_FILE).is_file() and any((path / f).is_file() for f in _VOCAB_FILES)


def _cached_tokenizer_dir(hub_id: str, cache_dir: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hub_id, _CONFIG_FILE, cache_dir=cache_dir)
    if isinstance(found, str) and holds_tokenizer(Path(found).parent):
        return str(Path(found).parent)
    return None


def resolve_tokenizer(
    backbone: str,
    model: str,
    tokenizer: str | os.PathLike[str] | None = None,
    pretrained_dir: str | None = None,
    cache_dir: str | None = None,
    allow_download: bool = False,
) -> TokenizerSource:
    """Find the tokenizer files of open_clip ``model`` (registered as ``backbone``) locally.

    Raises :class:`WeightsError` (one line: what is missing and how to supply it) when the model
    needs Hugging Face tokenizer files that none of the places in the module docstring hold.
    """
    hub_id = hf_tokenizer_name(model)
    if tokenizer is not None and hub_id is None:
        raise WeightsError(
            f"tokenizer={str(tokenizer)!r} for backbone {backbone!r}, whose open_clip config names "
            "no Hugging Face tokenizer: expected tokenizer= only for such families (SigLIP, "
            "SigLIP2); drop it"
        )
    if tokenizer is not None:
        if not holds_tokenizer(tokenizer):
            raise WeightsError(
                f"tokenizer={str(tokenizer)!r} for backbone {backbone!r} is not a directory with "
                f"{_CONFIG_FILE} and one of {', '.join(_VOCAB_FILES)}; pass the directory holding "
                f"the files of {hub_id!r}"
            )
        location: str | None = str(tokenizer)
    elif hub_id is None:
        return TokenizerSource(None, None)
    else:
        location = find_tokenizer_dir(hub_id, pretrained_dir, cache_dir)
    if location is None and not allow_download:
        raise WeightsError(
            f"backbone {backbone!r} needs the Hugging Face tokenizer {hub_id!r} "
            f"({_CONFIG_FILE} and tokenizer.json or spiece.model), which is not on this machine; "
            f"pass tokenizer=DIR to create_backbone, or set {TOKENIZER_DIR_ENV}=ROOT with the "
            f"files in ROOT/{hub_id}/, or pass pretrained=DIR holding a copy of the hub repo "
            f"{hub_id}"
        )
    if importlib.util.find_spec("transformers") is None:
        raise WeightsError(
            f"backbone {backbone!r} reads its tokenizer {hub_id!r} with the transformers "
            "package, which is not installed; run `pip install transformers` (or 'cdfsl[siglip]')"
        )
    return TokenizerSource(hub_id, location or hub_id)


def find_tokenizer_dir(
    hub_id: str, pretrained_dir: str | None = None, cache_dir: str | None = None
) -> str | None:
    """A local directory with the files of Hugging Face tokenizer ``hub_id``, or None.

    Looks in ``pretrained_dir``, then ``$CDFSL_TOKENIZER_DIR/<hub_id>/``, then the Hugging Face
    cache (``cache_dir``, or the default one); never sends a request.
    """
    if pretrained_dir is not None and holds_tokenizer(pretrained_dir):
        return pretrained_dir
    root = os.environ.get(TOKENIZER_DIR_ENV, "")
    if root and holds_tokenizer(Path(root) / hub_id):
        return str(Path(root) / hub_id)
    return _cached_tokenizer_dir(hub_id, cache_dir)


def build_tokenizer(model: str, source: TokenizerSource) -> Tokenizer:
    """The tokenizer of open_clip ``model``: ``texts -> (C, context_length)`` token ids.

    Configured as open_clip's ``get_tokenizer`` does (context length, cleaning, mode), but reading
    Hugging Face files only from ``source.location``. Configs without a Hugging Face tokenizer get
    the bundled BPE, whatever their name: open_clip would guess a hub tokenizer from "siglip" in
    a name, which the random-init test configs must not trigger.
    """
    if model.startswith(LOCAL_DIR_PREFIX):
        return open_clip.get_tokenizer(model)
    text_cfg = _text_cfg(model)
    context_length = text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH)
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    if source.location is None:
        return SimpleTokenizer(context_length=context_length, **kwargs)
    local = source.location != source.hub_id
    return HFTokenizer(
        source.location,
        context_length=context_length,
        tokenizer_mode=text_cfg.get("tokenizer_mode"),
        # Passed on to AutoTokenizer: a local directory must never turn into a hub request.
        **({"local_files_only": True} if local else {}),
        **kwargs,
    )
