"""The Backbone interface: what methods need from a vision-language model, and nothing more."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import v2

from cdfsl.registry import Registry

#: Resampling filters of the resize that frames an image (antialiased, as PIL's resize).
INTERPOLATIONS: Registry[str, v2.InterpolationMode] = Registry(
    "interpolation",
    {
        "bicubic": v2.InterpolationMode.BICUBIC,
        "bilinear": v2.InterpolationMode.BILINEAR,
        "nearest": v2.InterpolationMode.NEAREST,
    },
)


@dataclass(frozen=True)
class Preprocess:
    """Input geometry and colour statistics, taken from the model's own preprocessing config."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    @classmethod
    def from_open_clip(cls, cfg: dict) -> Preprocess:
        size = cfg["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        return cls(size, tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic"))

    def to_tensor(
        self, geometry: str = "squash", interpolation: str | None = None
    ) -> Callable[[Image.Image], Tensor]:
        """PIL RGB image -> ``(3, H, W)`` float in [0, 1] at ``size``, framed by ``geometry``.

        ``geometry`` names a row of :data:`GEOMETRIES`: ``"squash"`` resizes to ``size`` whatever
        the aspect ratio (the Mind reference's episodic loader, ``Resize([224, 224])``);
        ``"resize_crop"`` resizes to 1.15·size and centre-crops ``size`` (the reference's other
        loader package, which its ``main.py`` does not use); ``"short_side_crop"`` resizes the
        short side to the size and centre-crops (CLIP's own preprocessing, the RAIL reference's
        test transform). ``interpolation`` is a key of :data:`INTERPOLATIONS`; None takes the
        model's own (``self.interpolation``).
        """
        frame = GEOMETRIES.lookup(geometry, "geometry")
        name = self.interpolation if interpolation is None else interpolation
        mode = INTERPOLATIONS.lookup(name, "interpolation")
        # Framed on the PIL image, so the resize is PIL's own (torchvision's tensor resize of
        # uint8 differs from it by up to 2 levels when upsampling).
        return v2.Compose(
            [
                *frame(self.size, mode),
                v2.PILToTensor(),
                v2.ToDtype(torch.float32, scale=True),
            ]
        )


def _squash(size: tuple[int, int], interpolation: v2.InterpolationMode) -> list[nn.Module]:
    return [v2.Resize(size, interpolation=interpolation)]


def _resize_crop(size: tuple[int, int], interpolation: v2.InterpolationMode) -> list[nn.Module]:
    # The reference's Resize([int(s·1.15), int(s·1.15)]) then CenterCrop(s): a square squash
    # with a 1.15 margin, so the crop drops the outer ~13% of each side.
    enlarged = (int(size[0] * RESIZE_CROP_RATIO), int(size[1] * RESIZE_CROP_RATIO))
    return [v2.Resize(enlarged, interpolation=interpolation), v2.CenterCrop(size)]


def _short_side_crop(size: tuple[int, int], interpolation: v2.InterpolationMode) -> list[nn.Module]:
    return [v2.Resize(min(size), interpolation=interpolation), v2.CenterCrop(size)]


#: The Mind reference's resize margin before its centre crop (``Resize(int(224·1.15))``).
RESIZE_CROP_RATIO = 1.15

#: How an image is framed to the model's input size: name -> fn(size, interpolation) -> the
#: geometric transforms, applied to the PIL image before it becomes a tensor.
GEOMETRIES: Registry[str, Callable[[tuple[int, int], v2.InterpolationMode], list[nn.Module]]] = (
    Registry(
        "geometry",
        {
            "squash": _squash,
            "resize_crop": _resize_crop,
            "short_side_crop": _short_side_crop,
        },
    )
)


class Backbone(nn.Module):
    """A contrastive image-text model as cdfsl methods use it.

    Subclasses adapt one model family; they implement the encoders, the tokenizer and
    :meth:`lora_root`. Features are returned unnormalised; methods normalise.
    """

    def __init__(self, name: str, preprocess: Preprocess, logit_scale: float) -> None:
        super().__init__()
        self.name = name
        self.preprocess = preprocess
        self.logit_scale = logit_scale
        self.register_buffer("_mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1), False)
        self.register_buffer("_std", torch.tensor(preprocess.std).view(1, 3, 1, 1), False)

    # The logit bias of sigmoid-trained families; None for softmax-trained CLIP.
    logit_bias: float | None = None

    def encode_image(self, images: Tensor) -> Tensor:
        """``images: (B, 3, H, W)`` normalised -> ``(B, D)`` unnormalised features."""
        raise NotImplementedError

    def encode_text(self, tokens: Tensor) -> Tensor:
        """``tokens: (C, L)`` from :meth:`tokenize` -> ``(C, D)`` unnormalised features."""
        raise NotImplementedError

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Texts -> ``(C, L)`` token ids on the backbone's device."""
        raise NotImplementedError

    def lora_root(self) -> nn.Module:
        """The module whose attention projections receive LoRA (the vision tower)."""
        raise NotImplementedError

    def normalize(self, images: Tensor) -> Tensor:
        """``images: (B, 3, H, W)`` in [0, 1] -> normalised with the model's mean and std."""
        return (images - self._mean.to(images.dtype)) / self._std.to(images.dtype)

    @property
    def device(self) -> torch.device:
        return self._mean.device

    @torch.no_grad()
    def text_features(self, texts: Sequence[str], batch_size: int = 256) -> Tensor:
        """``(C, D)`` L2-normalised text features in float32, computed without gradient."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenize(list(texts[start : start + batch_size]))
            chunks.append(self.encode_text(tokens).float())
        return nn.functional.normalize(torch.cat(chunks), dim=-1)
