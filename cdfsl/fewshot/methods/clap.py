"""CLAP and ZS-LP (Silva-Rodríguez et al., CVPR 2024): zero-shot-initialised linear probes.

Reference: ``jusiro/CLAP``, entry point ``scripts/adapt.sh`` -> ``train.py:main`` (trainer
``ADAPTER``, ``configs/trainers/SGD_lr1e-1_B256_ep300.yaml``) -> ``trainers/adapters.py:
ADAPTER.train``. The class prototypes W start at the zero-shot text embeddings (``INIT ZS``,
the text encoder's raw, unnormalised output); logits are ``s · cos(f, w_c)``; the support set is
20 augmented passes (``epochs_aumentation``) of dassl's ``random_resized_crop`` (area 0.08-1,
bicubic) + ``random_flip``. Each epoch draws one batch of 256 from the shuffled pass features
(``TrainerXCostume.run_epoch``) for an SGD step (lr 0.1, momentum 0.9, no weight decay), 300
epochs, dassl's cosine schedule after one constant warm-up epoch at 1e-5. CLAP (``CONSTRAINT
l2``) adds ``mean_c λ_c ‖w_c − t_c‖²`` with λ_c the zero-shot softmax probability of class c on
its own support passes (``init_lagrangian_multipliers``), fixed; ZS-LP (``CONSTRAINT none``)
drops it. The reference's augmented-Lagrangian ``outer_step`` runs only for constraint names
containing ``adaptative``, which ``adapt.sh`` never passes: here it is the option
``multipliers: augmented_lagrangian``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from cdfsl.errors import CdfslError
from cdfsl.fewshot.methods.base import EpisodeState
from cdfsl.fewshot.methods.frozen import FrozenFeatureMethod, SupportSet, one_hot
from cdfsl.registry import Registry

#: dassl's default ``INPUT.RRCROP_SCALE``, which the CLAP trainer config does not change.
CLAP_CROP_SCALE = (0.08, 1.0)

#: Whether the zero-shot constraint is added to the loss: ``l2`` (CLAP) or ``none`` (ZS-LP).
CONSTRAINTS: Registry[str, bool] = Registry("CLAP constraint", {"l2": True, "none": False})

#: How the multipliers λ evolve: ``zero_shot`` (fixed at the zero-shot class-wise confidence,
#: what ``adapt.sh ... l2`` runs) or ``augmented_lagrangian`` (``AdapterMethod.outer_step`` after
#: every epoch: the PHR update λ ← max(0, λ + ρ·h), ρ ← h, with h_c = ‖w_c − t_c‖²).
MULTIPLIERS: Registry[str, bool] = Registry(
    "CLAP multipliers", {"zero_shot": False, "augmented_lagrangian": True}
)


def dassl_cosine_lr(epoch: int, lr: float, epochs: int, warmup_lr: float = 1e-5) -> float:
    """The learning rate of ``epoch`` under dassl's cosine schedule with one constant warm-up
    epoch (``ConstantWarmupScheduler``): ``warmup_lr`` first, then ``lr·½(1 + cos(π(e−1)/T))``."""
    if epoch < 1:
        return warmup_lr
    return lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))


def zero_shot_multipliers(logits: Tensor, labels: Tensor) -> Tensor:
    """λ_c: the mean zero-shot softmax probability of class c over its support rows."""
    y = one_hot(labels, logits.shape[1])
    return (torch.softmax(logits, -1) * y).sum(0) / y.sum(0)


def constraint_penalty(prototypes: Tensor, text: Tensor, multipliers: Tensor) -> Tensor:
    """``mean_c λ_c ‖w_c − t_c‖²`` (``AdapterMethod.zero_shot_constraint``, l2)."""
    return torch.mean(multipliers * (prototypes - text).pow(2).sum(-1))


def phr_update(
    prototypes: Tensor, text: Tensor, multipliers: Tensor, penalty: Tensor
) -> tuple[Tensor, Tensor]:
    """One ``outer_step``: h_c = ‖w_c − t_c‖², λ ← λ + ρ·h where that is ≥ 0 (else 0), ρ ← h."""
    h = (prototypes - text).pow(2).sum(-1)
    x = multipliers + penalty * h
    return torch.where(x >= 0, x, torch.zeros_like(x)), h


@dataclass
class ClapState:
    """One episode's CLAP prototypes ``(N, D)``, text anchors ``(N, D)``, multipliers and
    penalties ``(N,)``."""

    prototypes: Tensor
    text: Tensor
    multipliers: Tensor
    penalty: Tensor


def clap_logits(feats: Tensor, prototypes: Tensor, scale: float) -> Tensor:
    """``s · cos(f, w_c)`` (``CustomCLIP.forward_lp``)."""
    return scale * F.normalize(feats, dim=-1) @ F.normalize(prototypes, dim=-1).t()


def clap_fit(
    states: Sequence[ClapState],
    feats: Tensor,
    labels: Tensor,
    scale: float,
    epochs: int,
    lr: float,
    momentum: float,
    batch_size: int,
    batches_per_epoch: int,
    constrained: bool,
    adaptive: bool,
    generators: Sequence[torch.Generator],
) -> Tensor:
    """Train E episodes' ``states[e].prototypes`` side by side as ``ADAPTER.train`` trains one;
    each episode's last-step loss, ``(E,)``.

    ``feats: (E, M, D)`` the pass features, ``labels: (E, M)``. Each epoch episode ``e``
    shuffles its rows with ``generators[e]`` and takes ``batches_per_epoch`` batches of
    ``batch_size`` from the front, one SGD step each. The episodes' losses are summed, so each
    episode's prototypes get its own gradient alone and SGD moves every element as it would
    alone; the arithmetic is the same batched kernels for any E, so an episode's result does not
    depend on how many train beside it.
    """
    prototypes = torch.nn.Parameter(torch.stack([s.prototypes for s in states]).clone())
    text = torch.stack([s.text for s in states])
    multipliers = torch.stack([s.multipliers for s in states])
    penalty = torch.stack([s.penalty for s in states])
    optimizer = torch.optim.SGD([prototypes], lr=lr, momentum=momentum)
    count, rows_per_episode, dim = feats.shape
    losses = torch.full((count,), float("nan"))
    with torch.enable_grad():
        for epoch in range(epochs):
            for group in optimizer.param_groups:
                group["lr"] = dassl_cosine_lr(epoch, lr, epochs)
            orders = torch.stack(
                [torch.randperm(rows_per_episode, generator=g) for g in generators]
            ).to(feats.device)
            for batch in range(batches_per_epoch):
                rows = orders[:, batch * batch_size : (batch + 1) * batch_size]
                picked = feats.gather(1, rows.unsqueeze(-1).expand(-1, -1, dim))
                logits = scale * F.normalize(picked, dim=-1) @ F.normalize(prototypes, dim=-1).mT
                losses = (
                    F.cross_entropy(
                        logits.flatten(0, 1), labels.gather(1, rows).flatten(), reduction="none"
                    )
                    .view(count, -1)
                    .mean(1)
                )
                if constrained:
                    losses = losses + torch.mean(
                        multipliers * (prototypes - text).pow(2).sum(-1), dim=1
                    )
                optimizer.zero_grad()
                losses.sum().backward()
                optimizer.step()
            if adaptive:
                with torch.no_grad():
                    multipliers, penalty = phr_update(prototypes, text, multipliers, penalty)
    for e, state in enumerate(states):
        state.prototypes = prototypes.detach()[e]
        state.multipliers, state.penalty = multipliers[e], penalty[e]
    return losses.detach()


class CLAP(FrozenFeatureMethod):
    """Class-adaptive linear probing: a zero-shot-initialised probe held near the text prototypes.

    Args (beyond :class:`FrozenFeatureMethod`, through ``kwargs``):
        constraint: a key of :data:`CONSTRAINTS` (``l2``: CLAP; ``none``: ZS-LP).
        multipliers: a key of :data:`MULTIPLIERS` (``zero_shot``, the reference entry point's).
        epochs, lr, momentum, batch_size: the SGD run (300, 0.1, 0.9, 256).
        augment_passes: augmented passes of the support set (20); 0 trains on the clean
            support features.
        crop_scale: area range of each pass's random resized crop (dassl's (0.08, 1)).
    """

    def __init__(
        self,
        *,
        constraint: str = "l2",
        multipliers: str = "zero_shot",
        epochs: int = 300,
        lr: float = 0.1,
        momentum: float = 0.9,
        batch_size: int = 256,
        augment_passes: int = 20,
        crop_scale: tuple[float, float] = CLAP_CROP_SCALE,
        **kwargs: Any,
    ) -> None:
        CONSTRAINTS.lookup(constraint, "constraint")
        MULTIPLIERS.lookup(multipliers, "multipliers")
        if epochs < 1 or batch_size < 1 or augment_passes < 0:
            raise CdfslError(
                f"epochs={epochs}, batch_size={batch_size}, augment_passes={augment_passes}: "
                "expected epochs and batch_size >= 1, augment_passes >= 0; fix them"
            )
        super().__init__(**kwargs)
        self.constraint, self.multipliers = constraint, multipliers
        self.epochs, self.lr, self.momentum = int(epochs), float(lr), float(momentum)
        self.batch_size, self.augment_passes = int(batch_size), int(augment_passes)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self._raw_text: dict[str, Tensor] = {}

    def raw_text(self, class_names: list[str]) -> Tensor:
        """``(N, D)`` unnormalised text embeddings of the prompts (CLAP's zero-shot prototypes)."""
        prompts = [self.template.format(name) for name in class_names]
        missing = [p for p in dict.fromkeys(prompts) if p not in self._raw_text]
        if missing:
            was_training = self.backbone.training
            self.backbone.eval()
            with torch.no_grad():
                raw = self.backbone.encode_text(self.backbone.tokenize(missing).to(self.device))
            self.backbone.train(was_training)
            self._raw_text.update(zip(missing, raw.float().cpu(), strict=True))
        return torch.stack([self._raw_text[p] for p in prompts]).to(self.backbone.device)

    def _start(
        self, episode: EpisodeState, support: SupportSet
    ) -> tuple[ClapState, Tensor, Tensor]:
        """Episode's initial state and the features and labels it trains on."""
        feats, labels = support.features, support.labels
        if self.augment_passes:
            views = self.view_features(
                episode, support.images(), range(self.augment_passes), self.crop_scale
            )
            feats, labels = views.flatten(0, 1), labels.repeat(self.augment_passes)
        text = self.raw_text(episode.class_names)
        multipliers = zero_shot_multipliers(clap_logits(feats, text, self.scale), labels)
        return (
            ClapState(text.clone(), text, multipliers, torch.zeros_like(multipliers)),
            feats,
            labels,
        )

    def _batches_per_epoch(self, support: SupportSet) -> int:
        # The reference's batches per epoch: those of its image loader over the support set
        # (drop_last only when a full batch exists), each taken from the pass features.
        count = len(support.labels)
        return count // self.batch_size if count >= self.batch_size else 1

    def fit_support(self, episode: EpisodeState, support: SupportSet) -> int:
        return self.fit_group([episode], [support])[0]

    def fit_group(
        self, episodes: Sequence[EpisodeState], supports: Sequence[SupportSet]
    ) -> list[int]:
        started = [self._start(e, s) for e, s in zip(episodes, supports, strict=True)]
        per_epoch = self._batches_per_epoch(supports[0])
        losses = clap_fit(
            [state for state, _, _ in started], torch.stack([f for _, f, _ in started]),
            torch.stack([y for _, _, y in started]), self.scale, self.epochs, self.lr,
            self.momentum, self.batch_size, per_epoch, CONSTRAINTS[self.constraint],
            MULTIPLIERS[self.multipliers], [self.draw_generator(e) for e in episodes],
        )  # fmt: skip
        for episode, (state, _, _), loss in zip(episodes, started, losses, strict=True):
            episode.memory["clap"] = state
            episode.terms = {"loss": loss}
        return [self.epochs * per_epoch] * len(episodes)

    def predict_features(self, feats: Tensor, episode: EpisodeState) -> Tensor:
        return clap_logits(feats.float(), episode.memory["clap"].prototypes, self.scale)


class ZeroShotLinearProbe(CLAP):
    """ZS-LP: CLAP's zero-shot-initialised linear probe without the constraint (``INIT ZS``,
    ``CONSTRAINT none``); every other setting is CLAP's."""

    def __init__(self, *, constraint: str = "none", **kwargs: Any) -> None:
        super().__init__(constraint=constraint, **kwargs)
