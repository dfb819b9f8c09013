"""The Backbone interface: what methods need from a vision-language model, and nothing more."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import v2

_INTERPOLATIONS = {
    "bicubic": v2.InterpolationMode.BICUBIC,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "nearest": v2.InterpolationMode.NEAREST,
}


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

    def to_tensor(self) -> Callable[[Image.Image], Tensor]:
        """PIL RGB image -> ``(3, H, W)`` float in [0, 1], resized (not cropped) to ``size``.

        Few-shot images are squashed, not centre-cropped, as in the paper's pipeline: a crop can
        cut away the one lesion or object that defines the class.
        """
        return v2.Compose(
            [
                v2.PILToTensor(),
                v2.Resize(self.size, interpolation=_INTERPOLATIONS[self.interpolation]),
                v2.ToDtype(torch.float32, scale=True),
            ]
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
