"""The generative VLM interface: score answers given image + prompt, and generate answers.

Contrastive backbones (:mod:`cdfsl.backbones`) embed images and texts; a generative VLM (an
MLLM) reads an image and a prompt and writes text. MTCT, SARR and DG evaluation need only:

- :meth:`GenerativeVLM.image_inputs`: what the model needs of each image, computed once
  (pixels, or a frozen tower's features) and safe to cache for a whole run;
- :meth:`GenerativeVLM.nll`: the negative log-likelihood of target texts given image and prompt,
  summed over the target's tokens or, length-normalised, their mean; differentiable;
- :meth:`GenerativeVLM.generate`: greedy answers to prompts.

Two implementations: :class:`cdfsl.reasoning.internvl.InternVLReasoner` (InternVL3 through
Hugging Face transformers, LoRA by PEFT; the ``reason`` extra) and
:class:`cdfsl.reasoning.micro_mllm.MicroMLLM` (offline, trained from scratch on CPU).
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor, nn

from cdfsl.data.base import LabelledImages
from cdfsl.errors import CdfslError

REASON_EXTRA_HINT = "pip install 'cdfsl[reason]'"


def require_reason_extra(what: str) -> None:
    """Raise a one-line :class:`CdfslError` when transformers or peft is not installed."""
    missing = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        raise CdfslError(
            f"{what} needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            f"not installed; install the reasoning extra: {REASON_EXTRA_HINT}"
        )


class GenerativeVLM(nn.Module, ABC):
    """An image + prompt -> text model with trainable adapters (see the module docstring).

    ``cache_image_inputs``: whether a run should compute every image's inputs once and keep them
    in memory (small frozen features) rather than per batch (full-resolution pixels).
    """

    cache_image_inputs: bool = False

    @abstractmethod
    def image_inputs(self, images: Sequence[Image.Image]) -> Tensor:
        """Model-ready inputs of ``images``, (B, ...); deterministic, without gradients."""

    @abstractmethod
    def nll(
        self,
        image_inputs: Tensor,
        prompts: Sequence[str],
        targets: Sequence[str],
        length_normalise: bool = False,
    ) -> Tensor:
        """(B,) NLL of ``targets[i]`` (plus the end-of-answer token) given image ``i`` and
        ``prompts[i]``: the sum over the target tokens, or their mean if ``length_normalise``."""

    @abstractmethod
    def generate(
        self, image_inputs: Tensor, prompts: Sequence[str], max_new_tokens: int = 128
    ) -> list[str]:
        """Greedy answers to ``prompts[i]`` about image ``i``, end-of-answer token removed."""

    def fits(self, prompt: str, target: str) -> bool:
        """Whether ``target`` after ``prompt`` fits the model's context (checked before
        training, so that no over-long chain stops a run in the middle)."""
        return True

    @abstractmethod
    def reset_trainable(self, seed: int) -> None:
        """Re-initialise every trainable weight (adapters, or a from-scratch model) from ``seed``,
        so that variants trained one after the other all start from the same model."""

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The weights that training changes (a copy, on CPU), by parameter name."""
        return {
            name: p.detach().cpu().clone() for name, p in self.named_parameters() if p.requires_grad
        }

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load weights saved by :meth:`trainable_state_dict`; every name must match."""
        params = dict(self.named_parameters())
        expected = {n for n, p in params.items() if p.requires_grad}
        if set(state) != expected:
            unknown = sorted(set(state) - expected)[:3]
            absent = sorted(expected - set(state))[:3]
            raise CdfslError(
                f"adapter state does not match the model (unknown {unknown}, missing {absent}); "
                "delete the run's state files to retrain, or use the recipe that wrote them"
            )
        for name, value in state.items():
            params[name].data.copy_(value.to(params[name].device, params[name].dtype))


class ImageInputs:
    """The model inputs of a dataset's images, by index: kept in memory or computed per batch.

    ``take(indices)`` returns ``(len(indices), ...)``. Built from a model and a dataset, or
    :meth:`from_tensor` from inputs already computed.
    """

    def __init__(
        self,
        model: GenerativeVLM | None = None,
        images: LabelledImages | None = None,
        cache: bool | None = None,
        batch_size: int = 256,
    ) -> None:
        self.model = model
        self.images = images
        self._tensor: Tensor | None = None
        wanted = model is not None and (model.cache_image_inputs if cache is None else cache)
        if wanted and images is not None:
            chunks = []
            for start in range(0, len(images), batch_size):
                stop = min(start + batch_size, len(images))
                chunks.append(model.image_inputs([images.load(i) for i in range(start, stop)]))
            self._tensor = torch.cat(chunks) if chunks else torch.empty(0)

    @classmethod
    def from_tensor(cls, inputs: Tensor) -> ImageInputs:
        """Inputs already computed, (N, ...)."""
        out = cls()
        out._tensor = inputs
        return out

    def __len__(self) -> int:
        if self._tensor is not None:
            return len(self._tensor)
        return len(self.images) if self.images is not None else 0

    def take(self, indices: Sequence[int]) -> Tensor:
        """Inputs of images ``indices``, (len(indices), ...)."""
        if self._tensor is not None:
            return self._tensor[list(indices)]
        assert self.model is not None and self.images is not None
        return self.model.image_inputs([self.images.load(i) for i in indices])

    def subset(self, indices: Sequence[int]) -> ImageInputs:
        """The inputs of images ``indices`` only, as their own :class:`ImageInputs`."""
        if self._tensor is not None:
            return ImageInputs.from_tensor(self._tensor[list(indices)])
        return ImageInputs(self.model, _Subset(self.images, list(indices)), cache=False)


class _Subset:
    """Images ``indices`` of a dataset, renumbered 0..n-1 (only ``load`` and ``len`` needed)."""

    def __init__(self, images: LabelledImages | None, indices: list[int]) -> None:
        assert images is not None
        self.images = images
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> Image.Image:
        return self.images.load(self.indices[index])
