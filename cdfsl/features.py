"""Frozen image and text features, computed once per (backbone, dataset, split) and cached.

A cache entry's key hashes everything the features depend on: the backbone's name, family
and weights (every tensor of its state dict), its preprocessing, the dataset's content (length,
class names, targets, sample ids, a few images' pixels and an optional identity mapping such as
its data config), and this module's format version. Changing any of them cannot reuse stale
features. Entries are written through a temporary file and a rename, so a kill never leaves a
half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm.auto import tqdm

from cdfsl.backbones.base import Backbone
from cdfsl.data.base import LabelledImages
from cdfsl.errors import CdfslError
from cdfsl.plumbing import PROMPT_TEMPLATE, save_torch_atomic

CACHE_ENV = "CDFSL_FEATURE_CACHE"
"""Environment variable that moves the default cache directory."""
DEFAULT_CACHE_DIR = Path("~/.cache/cdfsl/features")
FORMAT_VERSION = 1  # bump when what an entry holds, or how features are computed, changes
_PROBE_IMAGES = 4  # images whose pixels enter the dataset fingerprint


def _digest(parts: Sequence[Any]) -> str:
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True).encode()).hexdigest()


def backbone_fingerprint(backbone: Backbone) -> str:
    """A hash of the backbone's name, class, preprocessing and every tensor of its state dict.

    Hashing the weights themselves (not a file name) also separates two random initialisations,
    a fine-tuned copy and a different checkpoint under the same name.
    """
    h = hashlib.blake2b(digest_size=32)
    h.update(json.dumps([backbone.name, type(backbone).__qualname__]).encode())
    h.update(json.dumps(asdict(backbone.preprocess), sort_keys=True).encode())
    for key, value in sorted(backbone.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dataset_fingerprint(dataset: LabelledImages, identity: Mapping[str, Any] | None = None) -> str:
    """A hash of the dataset's length, class names, targets, sample ids and a few images.

    ``identity`` (e.g. the data config that built the dataset) is hashed too. The pixels of up
    to four images spread over the dataset catch sources whose ids do not change with their
    content (a generator re-seeded, a file replaced in place).
    """
    n = len(dataset)
    h = hashlib.blake2b(digest_size=32)
    head = [n, list(dataset.class_names), list(dataset.targets), dict(identity or {})]
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    for i in range(n):
        h.update(dataset.sample_id(i).encode() + b"\0")
    probes = sorted({(n - 1) * j // max(1, _PROBE_IMAGES - 1) for j in range(_PROBE_IMAGES)})
    for i in probes if n else []:
        image = dataset.load(i)
        h.update(f"{image.mode}{image.size}".encode())
        h.update(image.tobytes())
    return h.hexdigest()


@torch.no_grad()
def encode_images(
    backbone: Backbone,
    dataset: LabelledImages,
    batch_size: int = 256,
    progress: bool = True,
    desc: str = "features",
    geometry: str = "squash",
) -> Tensor:
    """Every image of ``dataset`` -> ``(N, D)`` L2-normalised float32 features, eval mode.

    Images go through ``backbone.preprocess.to_tensor(geometry)`` and ``backbone.normalize``, as
    the methods feed them.
    """
    to_tensor = backbone.preprocess.to_tensor(geometry)
    was_training = backbone.training
    backbone.eval()
    chunks = []
    try:
        with tqdm(total=len(dataset), desc=desc, unit="img", disable=not progress) as bar:
            for start in range(0, len(dataset), batch_size):
                stop = min(start + batch_size, len(dataset))
                images = torch.stack([to_tensor(dataset.load(i)) for i in range(start, stop)])
                images = backbone.normalize(images.to(backbone.device))
                feats = backbone.encode_image(images).float()
                chunks.append(F.normalize(feats, dim=-1).cpu())
                bar.update(stop - start)
    finally:
        backbone.train(was_training)
    if not chunks:
        raise CdfslError(f"dataset {dataset!r} is empty: expected at least one image")
    return torch.cat(chunks)


@dataclass
class ImageFeatures:
    """Cached image features of one dataset split.

    ``features: (N, D)`` L2-normalised float32, ``labels: (N,)`` long, one ``sample_ids`` entry
    per row, the dataset's ``class_names`` and the cache ``key`` they were stored under.
    """

    features: Tensor
    labels: Tensor
    sample_ids: list[str]
    class_names: list[str]
    key: str


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "backbone"


class FeatureCache:
    """Image and text features of frozen backbones under ``root``.

    ``root`` defaults to ``$CDFSL_FEATURE_CACHE`` or else ``~/.cache/cdfsl/features``. Entries
    live in ``root/<backbone name>/<key>.pt``; an unreadable entry is recomputed.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        chosen = root if root is not None else os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
        self.root = Path(chosen).expanduser()
        self.hits = 0
        self.misses = 0

    def _path(self, backbone: Backbone, key: str) -> Path:
        return self.root / _safe_name(backbone.name) / f"{key}.pt"

    def _load(self, path: Path, key: str) -> dict[str, Any] | None:
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a truncated or foreign file: recompute and overwrite it
            return None
        return entry if isinstance(entry, dict) and entry.get("key") == key else None

    def image_features(
        self,
        backbone: Backbone,
        dataset: LabelledImages,
        identity: Mapping[str, Any] | None = None,
        batch_size: int = 256,
        progress: bool = True,
        backbone_key: str | None = None,
        desc: str = "features",
    ) -> ImageFeatures:
        """The features of ``dataset`` under ``backbone``, from the cache or computed and stored.

        ``backbone_key``: a :func:`backbone_fingerprint` already computed for this backbone
        (hashing the weights of a large model takes a second; pass it when calling often).
        """
        fingerprint = backbone_key or backbone_fingerprint(backbone)
        key = _digest(
            ["image", FORMAT_VERSION, fingerprint, dataset_fingerprint(dataset, identity)]
        )
        path = self._path(backbone, key)
        entry = self._load(path, key)
        if entry is None:
            self.misses += 1
            feats = encode_images(backbone, dataset, batch_size, progress, desc)
            entry = {
                "key": key,
                "features": feats,
                "labels": torch.tensor(list(dataset.targets), dtype=torch.long),
                "sample_ids": [dataset.sample_id(i) for i in range(len(dataset))],
                "class_names": list(dataset.class_names),
            }
            save_torch_atomic(entry, path)
        else:
            self.hits += 1
        return ImageFeatures(
            entry["features"], entry["labels"], entry["sample_ids"], entry["class_names"], key
        )

    def text_features(
        self,
        backbone: Backbone,
        class_names: Sequence[str],
        template: str = PROMPT_TEMPLATE,
        backbone_key: str | None = None,
    ) -> Tensor:
        """``(C, D)`` L2-normalised float32 features of ``template`` filled with each name."""
        if "{}" not in template:
            raise CdfslError(f"template {template!r} has no '{{}}' for the class name")
        fingerprint = backbone_key or backbone_fingerprint(backbone)
        key = _digest(["text", FORMAT_VERSION, fingerprint, template, list(class_names)])
        path = self._path(backbone, key)
        entry = self._load(path, key)
        if entry is None:
            self.misses += 1
            was_training = backbone.training
            backbone.eval()
            try:
                feats = backbone.text_features([template.format(c) for c in class_names]).cpu()
            finally:
                backbone.train(was_training)
            entry = {"key": key, "features": feats}
            save_torch_atomic(entry, path)
        else:
            self.hits += 1
        return entry["features"]


class FramedRows:
    """Rows ``indices`` of ``dataset``, each framed to the model's input size by ``to_tensor``.

    A ``LabelledImages`` whose images are ``to_tensor``'s output as 8-bit RGB (exact: framed
    tensors are ``uint8 / 255``), so :func:`encode_images` feeds the encoder the pixels a method
    would; ``framing`` names ``to_tensor`` (geometry, filter, size) for the cache key.
    """

    def __init__(
        self,
        dataset: LabelledImages,
        indices: Sequence[int],
        to_tensor: Any,
        framing: Mapping[str, Any],
    ) -> None:
        self.dataset, self.indices = dataset, [int(i) for i in indices]
        self.to_tensor, self.framing = to_tensor, dict(framing)

    @property
    def targets(self) -> list[int]:
        full = self.dataset.targets
        return [int(full[i]) for i in self.indices]

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset.class_names)

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> Any:
        from PIL import Image

        framed = self.to_tensor(self.dataset.load(self.indices[index]))
        pixels = framed.mul(255).round_().to(torch.uint8).permute(1, 2, 0).contiguous()
        return Image.fromarray(pixels.numpy(), "RGB")

    def sample_id(self, index: int) -> str:
        return self.dataset.sample_id(self.indices[index])


class EpisodeFeatures:
    """Clean features of the dataset images a run touches, looked up by dataset index.

    Built once per (backbone weights, dataset, the touched rows, framing) through a
    :class:`FeatureCache`, so every episode, method and rerun over the same images reads the same
    stored entry instead of encoding them again.
    """

    def __init__(self, features: ImageFeatures, indices: Sequence[int], size: int) -> None:
        self.entry = features
        self._row = torch.full((size,), -1, dtype=torch.long)
        self._row[torch.as_tensor(list(indices), dtype=torch.long)] = torch.arange(len(indices))

    @classmethod
    def build(
        cls,
        cache: FeatureCache,
        backbone: Backbone,
        dataset: LabelledImages,
        indices: Sequence[int],
        to_tensor: Any,
        framing: Mapping[str, Any],
        progress: bool = True,
    ) -> EpisodeFeatures:
        """Encode (or read back) the rows ``indices`` of ``dataset`` framed by ``to_tensor``."""
        touched = sorted({int(i) for i in indices})
        if not touched:
            raise CdfslError("no images to encode: expected the indices of at least one episode")
        rows = FramedRows(dataset, touched, to_tensor, framing)
        entry = cache.image_features(
            backbone, rows, identity={"framing": rows.framing, "rows": "episode images"},
            progress=progress, desc="episode features",
        )  # fmt: skip
        return cls(entry, touched, len(dataset))

    def __call__(self, indices: Sequence[int]) -> Tensor:
        """``(len(indices), D)`` features of dataset rows ``indices``."""
        rows = self._row[torch.as_tensor(list(indices), dtype=torch.long)]
        if bool((rows < 0).any()):
            missing = [int(i) for i, r in zip(indices, rows.tolist(), strict=True) if r < 0]
            raise CdfslError(
                f"dataset rows {missing[:5]} were not encoded: expected only the images of the "
                "episodes the features were built for; rebuild EpisodeFeatures with them"
            )
        return self.entry.features[rows]
