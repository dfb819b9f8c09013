"""Frozen-feature few-shot methods: a head fitted on the support set's features, backbone frozen.

These methods never train the backbone, so an episode needs only image features: the clean
features of its support and query images (read from a feature cache by the episodic evaluator,
:class:`cdfsl.features.EpisodeFeatures`) and, where the method's reference augments, features
of augmented support views drawn for that episode alone. Views come from random streams of the
episode's seed (:func:`cdfsl.fewshot.methods.base.stream_seed`), so a row stays a pure function
of seed, index and configuration.

A subclass implements :meth:`FrozenFeatureMethod.fit_support` (fit episode ``e``'s head from its
:class:`SupportSet`) and :meth:`FrozenFeatureMethod.predict_features` (query features ->
logits).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F
from torchvision.transforms import v2

from cdfsl.data.episodes import UniformDraws
from cdfsl.errors import CdfslError
from cdfsl.fewshot.methods.base import EpisodeState, FewShotMethod, stream_seed
from cdfsl.plumbing import PROMPT_TEMPLATE

#: Random stream (of the episode's seed) of the augmented support views; the method's own draws
#: (initial weights, shuffles) come from stream ``DRAW_STREAM``.
VIEW_STREAM = 2
DRAW_STREAM = 3


@dataclass
class SupportSet:
    """One episode's support set as a frozen-feature method sees it.

    ``features: (S, D)`` L2-normalised clean features, ``labels: (S,)`` in ``[0, N)``, and
    ``images()`` the support images as read (PIL, before framing), for augmented views.
    """

    features: Tensor
    labels: Tensor
    images: Callable[[], Sequence[Image.Image]]


class FrozenFeatureMethod(FewShotMethod):
    """A classifier head on frozen image features, fitted per episode; no LoRA, no Trainer.

    Args: as :class:`FewShotMethod` (backbone, pretrained, class_names, template, logit_scale,
    geometry, resize_interpolation, seed); the backbone is never trained.
    """

    trainable = False

    def __init__(
        self,
        backbone: str = "tiny-clip",
        pretrained: str | None = "default",
        class_names: Sequence[str] | None = None,
        template: str = PROMPT_TEMPLATE,
        logit_scale: float | None = None,
        geometry: str = "squash",
        resize_interpolation: str = "bilinear",
        seed: int = 0,
    ) -> None:
        super().__init__(
            backbone=backbone, pretrained=pretrained, class_names=class_names, template=template,
            logit_scale=logit_scale, lora=None, views=None, geometry=geometry,
            resize_interpolation=resize_interpolation, seed=seed,
        )  # fmt: skip

    # -- what a subclass implements ------------------------------------------------------------
    def fit_support(self, episode: EpisodeState, support: SupportSet) -> int:
        """Fit ``episode``'s head (kept in ``episode.memory``); returns its optimiser steps."""
        raise NotImplementedError

    def predict_features(self, feats: Tensor, episode: EpisodeState) -> Tensor:
        """``feats: (Q, D)`` L2-normalised -> ``(Q, N)`` logits of ``episode``'s fitted head."""
        raise NotImplementedError

    def fit_group(
        self, episodes: Sequence[EpisodeState], supports: Sequence[SupportSet]
    ) -> list[int] | None:
        """Fit every episode of a group at once (an iterative head's E runs side by side, one
        optimiser step for all); None: this method fits them one by one (:meth:`fit_support`).
        An override must give each episode what :meth:`fit_support` gives it alone."""
        return None

    # -- the episodic interface ----------------------------------------------------------------
    def fit_episodes(self, supports: Sequence[SupportSet]) -> list[int]:
        """Fit every started episode on its own support set; the steps each took."""
        self._require_classes()
        if len(supports) != len(self.episodes):
            raise CdfslError(
                f"{len(supports)} support sets for {len(self.episodes)} episodes: expected one "
                "per episode started with start_episodes"
            )
        device = self.backbone.device
        moved = [
            SupportSet(s.features.to(device).float(), s.labels.to(device), s.images)
            for s in supports
        ]
        for episode in self.episodes:
            episode.memory, episode.terms = {}, {}
        steps = self.fit_group(self.episodes, moved)
        if steps is None:
            steps = [
                int(self.fit_support(episode, support))
                for episode, support in zip(self.episodes, moved, strict=True)
            ]
        return [int(step) for step in steps]

    def forward(self, images: Tensor) -> Tensor:
        """``images: (E·B, 3, H, W)`` in [0, 1], E contiguous episode groups -> ``(E·B, N)``."""
        self._require_classes()
        groups = self.image_features(images).chunk(len(self.episodes))
        return torch.cat(
            [self.predict_features(f, ep) for f, ep in zip(groups, self.episodes, strict=True)]
        )

    def training_step(self, batch: object, batch_idx: int) -> Tensor:
        raise CdfslError(
            f"{type(self).__name__} fits on frozen features, not through a Trainer; evaluate it "
            "with cdfsl eval (fit_episodes)"
        )

    # -- helpers for subclasses ----------------------------------------------------------------
    @staticmethod
    def draw_generator(episode: EpisodeState) -> torch.Generator:
        """The CPU generator of ``episode``'s own draws (initial weights, shuffles)."""
        return torch.Generator().manual_seed(stream_seed(episode.seed, DRAW_STREAM))

    @torch.no_grad()
    def view_features(
        self,
        episode: EpisodeState,
        images: Sequence[Image.Image],
        views: Sequence[int],
        crop_scale: tuple[float, float],
        normalize: bool = True,
    ) -> Tensor:
        """``(len(views), S, D)`` features of augmented views ``views`` of the support images.

        View ``v`` of every image is torchvision's ``RandomResizedCrop(size, crop_scale,
        bicubic)`` then ``RandomHorizontalFlip(0.5)`` on the image as read (the references'
        training transform), drawn from the stream ``(stream_seed(seed, VIEW_STREAM), v)``:
        view ``v`` is the same whichever other views are drawn. ``normalize`` False keeps the
        encoder's raw output (Tip-Adapter averages raw view features).
        """
        from cdfsl.continual.xtail.framing import RandomResizedCropFraming

        crop = RandomResizedCropFraming(tuple(float(s) for s in crop_scale))
        size = list(self.backbone.preprocess.size)
        seed = stream_seed(episode.seed, VIEW_STREAM)
        batches = []
        for view in views:
            draws = UniformDraws(seed, int(view))
            tensors = []
            for image in images:
                top, left, h, w = crop.box(*image.size, draws)
                # On the PIL image, as the references' transforms run: PIL's bicubic resize.
                out = v2.functional.resized_crop(
                    image.convert("RGB"), top, left, h, w, size, v2.InterpolationMode.BICUBIC
                )
                if draws.below(2):
                    out = v2.functional.horizontal_flip(out)
                tensors.append(v2.functional.pil_to_tensor(out))
            batches.append(torch.stack(tensors))
        stacked = torch.cat(batches).to(self.backbone.device, torch.float32).div_(255)
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            feats = self.backbone.encode_image(self.backbone.normalize(stacked)).float()
        finally:
            self.backbone.train(was_training)
        feats = F.normalize(feats, dim=-1) if normalize else feats
        return feats.unflatten(0, (len(views), len(images)))


def one_hot(labels: Tensor, classes: int) -> Tensor:
    """``(S,)`` labels -> ``(S, classes)`` float32 one-hot rows."""
    return F.one_hot(labels.long(), classes).float()
