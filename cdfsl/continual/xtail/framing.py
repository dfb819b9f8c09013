"""How X-TAIL frames an image to the model's input size before the feature cache encodes it.

A framing maps ``(image, preprocess, seed, index)`` to the image at ``preprocess.size``:
:class:`RandomResizedCropFraming` (the reference's training crop, seeded per image) or
:class:`GeometryFraming` (a row of ``GEOMETRIES``). :class:`FramedImages` applies one to a
dataset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

from cdfsl.backbones.base import GEOMETRIES, Preprocess
from cdfsl.data.base import LabelledImages
from cdfsl.data.episodes import UniformDraws
from cdfsl.errors import CdfslError


def _as_pil(image: Tensor) -> Image.Image:
    """``(3, H, W)`` uint8 -> the same pixels as an RGB PIL image."""
    return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy(), "RGB")


@dataclass(frozen=True)
class GeometryFraming:
    """A deterministic framing: ``Preprocess.to_tensor(geometry)`` (a row of ``GEOMETRIES``)."""

    geometry: str

    def __call__(self, image: Image.Image, preprocess: Preprocess, seed: int, index: int) -> Any:
        framed = preprocess.to_tensor(self.geometry)(image)  # uint8 / 255: exact
        return _as_pil(framed.mul(255).round_().to(torch.uint8))


@dataclass(frozen=True)
class RandomResizedCropFraming:
    """torchvision's ``RandomResizedCrop(size, scale, ratio)``, its draw seeded per image.

    The reference extracts training features through CLIP's train transform,
    ``RandomResizedCrop(224, scale=(0.9, 1.0), interpolation=BICUBIC)`` (``clip/clip.py``),
    fresh per pass; here image ``index`` is cropped from the stream ``(seed, index)``, so
    features are reproducible and cacheable. :meth:`box` is torchvision's ``get_params``: ten
    tries of an area fraction uniform in ``scale`` and a log-uniform aspect ratio in
    ``ratio``, else the largest centred crop within ``ratio``.
    """

    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def box(self, width: int, height: int, draws: UniformDraws) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` of the crop in a ``width`` x ``height`` image."""

        def uniform(low: float, high: float) -> float:
            return low + (high - low) * draws.below(1 << 53) * 2.0**-53

        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * uniform(*self.scale)
            aspect = math.exp(uniform(*log_ratio))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                return draws.below(height - h + 1), draws.below(width - w + 1), h, w
        ratio = width / height
        if ratio < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif ratio > max(self.ratio):
            w, h = round(height * max(self.ratio)), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Image.Image, preprocess: Preprocess, seed: int, index: int) -> Any:
        top, left, h, w = self.box(*image.size, UniformDraws(seed, index))
        pixels = v2.functional.pil_to_tensor(image)
        interpolation = v2.InterpolationMode(preprocess.interpolation)
        crop = v2.functional.resized_crop(
            pixels, top, left, h, w, list(preprocess.size), interpolation, antialias=True
        )
        return _as_pil(crop)


def framing(name: str, crop_scale: Sequence[float] = (0.9, 1.0)) -> Any:
    """The framing ``name``: ``random_resized_crop`` (seeded, area fraction in ``crop_scale``)
    or a geometry of ``cdfsl.backbones.base.GEOMETRIES`` (``short_side_crop``, ``squash``, ...).

    A framing maps ``(image, preprocess, seed, index)`` to the image at ``preprocess.size``.
    """
    low, high = (float(v) for v in crop_scale)
    if not 0.0 < low <= high <= 1.0:
        raise CdfslError(f"train_crop_scale={list(crop_scale)}: expected 0 < low <= high <= 1")
    builders = {"random_resized_crop": lambda: RandomResizedCropFraming((low, high))}
    builders |= {g: lambda g=g: GeometryFraming(g) for g in GEOMETRIES}
    if name not in builders:
        raise CdfslError(
            f"preprocess {name!r}: expected one of {sorted(builders)} (the reference: "
            "random_resized_crop for training features, short_side_crop for test images)"
        )
    return builders[name]()


class FramedImages:
    """``dataset`` with image i framed as ``frame(dataset.load(i), preprocess, seed, i)``;
    a ``LabelledImages`` whose images already have the model's input size."""

    def __init__(
        self, dataset: LabelledImages, frame: Any, preprocess: Preprocess, seed: int
    ) -> None:
        self.dataset, self.frame, self.preprocess, self.seed = dataset, frame, preprocess, seed

    @property
    def targets(self) -> list[int]:
        return self.dataset.targets

    @property
    def class_names(self) -> list[str]:
        return self.dataset.class_names

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> Image.Image:
        return self.frame(self.dataset.load(index), self.preprocess, self.seed, index)

    def sample_id(self, index: int) -> str:
        return self.dataset.sample_id(index)

    def identity(self) -> dict[str, Any]:
        """What the framed pixels depend on besides the dataset: for the feature cache key."""
        return {"framing": repr(self.frame), "size": list(self.preprocess.size),
                "interpolation": self.preprocess.interpolation, "seed": self.seed}  # fmt: skip

    def __repr__(self) -> str:
        return f"FramedImages({self.dataset!r}, {self.frame!r})"
