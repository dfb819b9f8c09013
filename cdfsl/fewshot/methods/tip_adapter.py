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

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from cdfsl.errors import CdfslError
from cdfsl.fewshot.methods.base import EpisodeState
from cdfsl.fewshot.methods.frozen import FrozenFeatureMethod, SupportSet, one_hot

#: The references' training crop: ``RandomResizedCrop(224, scale=(0.5, 1), bicubic)``.
TIP_CROP_SCALE = (0.5, 1.0)


def cache_logits(feats: Tensor, keys: Tensor, values: Tensor, beta: float) -> Tensor:
    """Tip-Adapter's cache model: ``exp(-β(1 - f·Kᵀ)) · V``.

    ``feats: (Q, D)`` normalised queries, ``keys: (S, D)``, ``values: (S, N)`` one-hot; or each
    with a leading episode dimension ``E``.
    """
    affinity = feats @ keys.mT
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
        return self.fit_group([episode], [support])[0]

    def fit_group(
        self, episodes: Sequence[EpisodeState], supports: Sequence[SupportSet]
    ) -> list[int]:
        """The E episodes' keys train side by side: one AdamW step for all on the sum of their
        losses (each set of keys gets its own gradient alone; AdamW is element-wise), through
        the same batched kernels for any E."""
        for episode, support in zip(episodes, supports, strict=True):
            TipAdapter.fit_support(self, episode, support)
        keys = torch.nn.Parameter(torch.stack([e.memory["keys"] for e in episodes]).clone())
        values = torch.stack([e.memory["values"] for e in episodes])
        text = torch.stack([e.text_feats for e in episodes])
        labels = torch.stack([s.labels for s in supports])
        count, dim = labels.shape[1], keys.shape[-1]
        # build_data_loader drops the last partial batch only when a full one exists.
        per_epoch = count // self.batch_size if count >= self.batch_size else 1
        optimizer = torch.optim.AdamW(
            [keys], lr=self.lr, eps=self.eps, weight_decay=self.weight_decay
        )
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.epochs * per_epoch)
        generators = [self.draw_generator(e) for e in episodes]
        # One fresh augmented pass per epoch, encoded together (views never depend on the keys):
        # (epochs, E, S, D).
        views = [self.augment_epochs + epoch for epoch in range(self.epochs)]
        if self.augment_epochs:
            passes = torch.stack([
                self.view_features(e, s.images(), views, self.crop_scale)
                for e, s in zip(episodes, supports, strict=True)
            ]).transpose(0, 1)  # fmt: skip
        else:  # no augmented views anywhere: every epoch trains on the clean features
            clean = torch.stack([s.features for s in supports])
            passes = clean.expand(self.epochs, -1, -1, -1)
        losses = torch.full((len(episodes),), float("nan"))
        with torch.enable_grad():
            for feats in passes:
                orders = torch.stack([torch.randperm(count, generator=g) for g in generators]).to(
                    feats.device
                )
                for batch in range(per_epoch):
                    rows = orders[:, batch * self.batch_size : (batch + 1) * self.batch_size]
                    f = feats.gather(1, rows.unsqueeze(-1).expand(-1, -1, dim))
                    logits = self.text_logits(f, text) + self.alpha * cache_logits(
                        f, keys, values, self.beta
                    )
                    losses = (
                        F.cross_entropy(
                            logits.flatten(0, 1), labels.gather(1, rows).flatten(), reduction="none"
                        )
                        .view(len(episodes), -1)
                        .mean(1)
                    )
                    optimizer.zero_grad()
                    losses.sum().backward()
                    optimizer.step()
                    schedule.step()
        for e, episode in enumerate(episodes):
            episode.memory["keys"] = keys.detach()[e]
            episode.terms = {"loss": losses.detach()[e]}
        return [self.epochs * per_epoch] * len(episodes)
