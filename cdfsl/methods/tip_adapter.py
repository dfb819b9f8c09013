"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022): a cache model of the support set.

Reference: ``gaopengcuhk/Tip-Adapter``, entry point ``main.py:main`` -> ``utils.py:
build_cache_model`` (keys: the mean of ``augment_epoch`` augmented passes of raw image features,
then L2-normalised; values: one-hot labels) -> ``main.py:run_tip_adapter`` /
``run_tip_adapter_F``. Defaults are ``configs/eurosat.yaml`` (the reference's one
cross-domain target): β = 1, α = 2, 10 augmented passes, Tip-Adapter-F 100 epochs of AdamW at
lr 1e-3, eps 1e-4. The reference's search of β and α on a validation split (``search_hp``) and
its choice of the Tip-Adapter-F epoch by test accuracy are not run: the few-shot protocol has no
validation set, so α and β stay at their configured values and the last epoch is scored.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from cdfsl.errors import CdfslError
from cdfsl.methods.base import EpisodeState
from cdfsl.methods.frozen import FrozenFeatureMethod, SupportSet, one_hot

#: The references' training crop: ``RandomResizedCrop(224, scale=(0.5, 1), bicubic)``.
TIP_CROP_SCALE = (0.5, 1.0)


def cache_logits(feats: Tensor, keys: Tensor, values: Tensor, beta: float) -> Tensor:
    """Tip-Adapter's cache model: ``exp(-β(1 - f·Kᵀ)) · V``.

    ``feats: (Q, D)`` normalised queries, ``keys: (S, D)``, ``values: (S, N)`` one-hot.
    """
    affinity = feats @ keys.t()
    return torch.exp(-(beta - beta * affinity)) @ values


def cache_keys(view_feats: Tensor) -> Tensor:
    """``(V, S, D)`` raw view features -> ``(S, D)`` keys: their mean over views, normalised."""
    return F.normalize(view_feats.mean(dim=0), dim=-1)


class TipAdapter(FrozenFeatureMethod):
    """Zero-shot logits plus α times the cache logits of the support set (training-free).

    Args (beyond :class:`FrozenFeatureMethod`, through ``kwargs``):
        alpha: α, the cache model's weight (``init_alpha``).
        beta: β, the affinity's sharpness (``init_beta``).
        augment_epochs: augmented passes averaged into the keys (``augment_epoch``); 0 keys the
            cache with the clean support features instead.
        crop_scale: area range of the random resized crop of each augmented pass.
    """

    def __init__(
        self,
        *,
        alpha: float = 2.0,
        beta: float = 1.0,
        augment_epochs: int = 10,
        crop_scale: tuple[float, float] = TIP_CROP_SCALE,
        **kwargs: Any,
    ) -> None:
        if augment_epochs < 0:
            raise CdfslError(
                f"augment_epochs={augment_epochs}: expected an integer >= 0 (0: the clean "
                "support features key the cache); fix augment_epochs"
            )
        super().__init__(**kwargs)
        self.alpha, self.beta = float(alpha), float(beta)
        self.augment_epochs = int(augment_epochs)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))

    def support_keys(self, episode: EpisodeState, support: SupportSet) -> Tensor:
        """``(S, D)`` cache keys of the support set (augmented passes, or the clean features)."""
        if self.augment_epochs == 0:
            return support.features
        views = self.view_features(
            episode, support.images(), range(self.augment_epochs), self.crop_scale, False
        )
        return cache_keys(views)

    def fit_support(self, episode: EpisodeState, support: SupportSet) -> int:
        episode.memory["keys"] = self.support_keys(episode, support)
        episode.memory["values"] = one_hot(support.labels, len(episode.class_names))
        return 0

    def predict_features(self, feats: Tensor, episode: EpisodeState) -> Tensor:
        memory = episode.memory
        cache = cache_logits(feats.float(), memory["keys"], memory["values"], self.beta)
        return self.logits(feats, episode) + self.alpha * cache


class TipAdapterF(TipAdapter):
    """Tip-Adapter with the cache keys fine-tuned by cross-entropy (``run_tip_adapter_F``).

    Each epoch encodes a fresh augmented pass of the support set (the reference's
    ``train_loader_F``) in shuffled batches of ``batch_size``; AdamW (``lr``, ``eps``, torch's
    default weight decay 0.01) with a cosine schedule over all steps updates the keys.

    Args (beyond :class:`TipAdapter`): epochs (``train_epoch``), lr, eps, weight_decay,
    batch_size. ``augment_epochs: 0`` also trains every epoch on the clean support features.
    """

    def __init__(
        self,
        *,
        epochs: int = 100,
        lr: float = 1e-3,
        eps: float = 1e-4,
        weight_decay: float = 1e-2,
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        if epochs < 1 or batch_size < 1:
            raise CdfslError(
                f"epochs={epochs}, batch_size={batch_size}: expected integers >= 1; fix them"
            )
        super().__init__(**kwargs)
        self.epochs, self.lr, self.eps = int(epochs), float(lr), float(eps)
        self.weight_decay, self.batch_size = float(weight_decay), int(batch_size)

    def fit_support(self, episode: EpisodeState, support: SupportSet) -> int:
        super().fit_support(episode, support)
        values = episode.memory["values"]
        keys = torch.nn.Parameter(episode.memory["keys"].clone())
        images = support.images()
        count = len(images)
        # build_data_loader drops the last partial batch only when a full one exists.
        per_epoch = count // self.batch_size if count >= self.batch_size else 1
        optimizer = torch.optim.AdamW(
            [keys], lr=self.lr, eps=self.eps, weight_decay=self.weight_decay
        )
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.epochs * per_epoch)
        generator = self.draw_generator(episode)
        # One fresh augmented pass per epoch, encoded together (views never depend on the keys).
        views = [self.augment_epochs + epoch for epoch in range(self.epochs)]
        if self.augment_epochs:
            passes = self.view_features(episode, images, views, self.crop_scale)
        else:  # no augmented views anywhere: every epoch trains on the clean features
            passes = support.features.expand(self.epochs, -1, -1)
        losses = []
        with torch.enable_grad():
            for feats in passes:
                order = torch.randperm(count, generator=generator).to(feats.device)
                for batch in range(per_epoch):
                    rows = order[batch * self.batch_size : (batch + 1) * self.batch_size]
                    f, y = feats[rows], support.labels[rows]
                    logits = self.logits(f, episode) + self.alpha * cache_logits(
                        f, keys, values, self.beta
                    )
                    loss = F.cross_entropy(logits, y)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    losses.append(loss.detach())
        episode.memory["keys"] = keys.detach()
        episode.terms = {"loss": losses[-1]}
        return self.epochs * per_epoch
