"""LP++ (Huang et al., CVPR 2024): a linear probe blended with the text classifier.

Reference: ``FereshteShakeri/FewShot-CLIP-Strong-Baseline``, entry point ``main.py:main``
(``configs/base.yaml``: ``method: LinearProbe_P2``, ``train_epoch: 300``) ->
``methods/linear_probe_p2.py:LinearProbe_P2.forward``. Logits ``W f + b + α ⊙ (f·T)``; W starts at
the class sums of the support features (``compute_centroids``), α at 250 times the mean
class-wise image-text cosine (``calculate_init_alpha``), b as ``nn.Linear``'s bias. W and b take
full-batch SGD steps (momentum 0.9) of size ``4n / λ_max(FᵀF)`` (``calculate_lr_w``); every 10th
step α takes a gradient step of size ``n / (4·max_c Σ_i (f_i·t_c)²)`` (``calculate_lr_alpha``)
with its gradient summed since the first step (the reference never zeroes it). Support features
are one augmented pass of ``RandomResizedCrop(224, (0.5, 1))`` + flip. The reference scores the
test set at the epoch of best accuracy on a few-shot validation split; the protocol has none, so
the last epoch is scored.
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
from cdfsl.fewshot.methods.tip_adapter import TIP_CROP_SCALE
from cdfsl.registry import Registry

#: Whether α's gradient is zeroed after each step: ``accumulated`` (the reference: never, so an
#: α step follows the sum of every gradient since step 0) or ``current`` (the step's own).
ALPHA_GRADIENTS: Registry[str, bool] = Registry(
    "LP++ alpha gradient", {"accumulated": False, "current": True}
)


def _uniform_fan_in(classes: int, dim: int, generator: torch.Generator) -> Tensor:
    bound = 1.0 / math.sqrt(dim)
    return (torch.rand(classes, generator=generator) * 2 - 1) * bound


#: How b starts: ``uniform_fan_in`` (``nn.Linear``'s U(±1/√D), the reference's) or ``zero``.
BIAS_INITS: Registry[str, Any] = Registry(
    "LP++ bias init",
    {"uniform_fan_in": _uniform_fan_in, "zero": lambda c, d, g: torch.zeros(c)},
)


@dataclass
class LPPHead:
    """LP++'s parameters and step sizes for one episode: ``weight (N, D)``, ``bias (N,)``,
    ``alpha (N,)``, ``lr_w``, ``lr_alpha``."""

    weight: Tensor
    bias: Tensor
    alpha: Tensor
    lr_w: float
    lr_alpha: float

    def logits(self, feats: Tensor, text: Tensor) -> Tensor:
        """``W f + b + α ⊙ (f·T)`` of ``feats: (M, D)`` with the text classifier ``(N, D)``."""
        return feats @ self.weight.t() + self.bias + self.alpha * (feats @ text.t())


def lpp_init(feats: Tensor, labels: Tensor, text: Tensor, bias: Tensor) -> LPPHead:
    """LP++'s initial head and step sizes from ``feats: (n, D)``, ``labels``, ``text: (N, D)``."""
    classes = text.shape[0]
    y = one_hot(labels, classes).to(feats.dtype)
    weight = y.t() @ feats  # class sums (the reference's compute_centroids, no division)
    cosines = feats @ text.t()
    class_mean = (y * cosines).sum(0) / y.sum(0)
    alpha = torch.full((classes,), float(250 * class_mean.mean()), dtype=feats.dtype)
    n = feats.shape[0]
    lr_w = 4 * n / float(torch.linalg.eigvalsh((feats.t() @ feats).double()).max())
    lr_alpha = n / (4 * float(cosines.pow(2).sum(0).max()))
    return LPPHead(weight, bias.to(feats), alpha.to(feats.device), lr_w, lr_alpha)


def lpp_fit(
    heads: Sequence[LPPHead],
    feats: Tensor,
    labels: Tensor,
    text: Tensor,
    epochs: int,
    alpha_every: int = 10,
    momentum: float = 0.9,
    zero_alpha_grad: bool = False,
) -> Tensor:
    """Train E episodes' ``heads`` in place side by side, ``epochs`` full-batch steps each as the
    reference trains one; each episode's last-step loss, ``(E,)``.

    ``feats: (E, n, D)``, ``labels: (E, n)``, ``text: (E, N, D)``. The episodes' losses are
    summed, so each head gets its own gradient alone; W and b take SGD steps with momentum
    (torch's rule: the buffer starts at the first gradient) of their episode's ``lr_w``, α its
    episode's ``lr_alpha``. The same batched kernels run for any E, so an episode's head does
    not depend on how many train beside it.
    """
    count = len(heads)
    weight = torch.stack([h.weight for h in heads]).clone().requires_grad_(True)
    bias = torch.stack([h.bias for h in heads]).clone().requires_grad_(True)
    alpha = torch.stack([h.alpha for h in heads]).clone().requires_grad_(True)
    lr_w = torch.tensor([h.lr_w for h in heads], dtype=feats.dtype, device=feats.device)
    lr_alpha = torch.tensor([h.lr_alpha for h in heads], dtype=feats.dtype, device=feats.device)
    text_logits = feats @ text.mT
    buffers: list[Tensor] = []
    losses = torch.full((count,), float("nan"))
    with torch.enable_grad():
        for epoch in range(epochs):
            logits = feats @ weight.mT + bias.unsqueeze(1) + alpha.unsqueeze(1) * text_logits
            losses = (
                F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
                .view(count, -1)
                .mean(1)
            )
            weight.grad = bias.grad = None
            losses.sum().backward()
            with torch.no_grad():
                grads = [weight.grad, bias.grad]
                if not buffers:
                    buffers = [g.clone() for g in grads]
                else:
                    for buffer, grad in zip(buffers, grads, strict=True):
                        buffer.mul_(momentum).add_(grad)
                weight.sub_(lr_w.view(-1, 1, 1) * buffers[0])
                bias.sub_(lr_w.view(-1, 1) * buffers[1])
                if (epoch + 1) % alpha_every == 0:
                    alpha.sub_(lr_alpha.view(-1, 1) * alpha.grad)
            if zero_alpha_grad:
                alpha.grad = None
    for e, head in enumerate(heads):
        head.weight, head.bias = weight.detach()[e], bias.detach()[e]
        head.alpha = alpha.detach()[e]
    return losses.detach()


class LPPlusPlus(FrozenFeatureMethod):
    """LP++: a linear probe on the support features blended with the text classifier by α.

    Args (beyond :class:`FrozenFeatureMethod`, through ``kwargs``):
        epochs: full-batch steps (``train_epoch: 300``).
        alpha_every: steps between α updates (10).
        momentum: SGD momentum of W and b (0.9).
        augment_passes: augmented passes of the support set to train on (1, the reference's
            ``train_loader``); 0 trains on the clean support features.
        crop_scale: area range of each pass's random resized crop.
        alpha_gradient: a key of :data:`ALPHA_GRADIENTS` (``accumulated``, the reference's).
        bias_init: a key of :data:`BIAS_INITS` (``uniform_fan_in``, the reference's).
    """

    def __init__(
        self,
        *,
        epochs: int = 300,
        alpha_every: int = 10,
        momentum: float = 0.9,
        augment_passes: int = 1,
        crop_scale: tuple[float, float] = TIP_CROP_SCALE,
        alpha_gradient: str = "accumulated",
        bias_init: str = "uniform_fan_in",
        **kwargs: Any,
    ) -> None:
        ALPHA_GRADIENTS.lookup(alpha_gradient, "alpha_gradient")
        BIAS_INITS.lookup(bias_init, "bias_init")
        if epochs < 1 or alpha_every < 1 or augment_passes < 0:
            raise CdfslError(
                f"epochs={epochs}, alpha_every={alpha_every}, augment_passes={augment_passes}: "
                "expected epochs and alpha_every >= 1, augment_passes >= 0; fix them"
            )
        super().__init__(**kwargs)
        self.epochs, self.alpha_every, self.momentum = int(epochs), int(alpha_every), momentum
        self.augment_passes = int(augment_passes)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.alpha_gradient, self.bias_init = alpha_gradient, bias_init

    def fit_support(self, episode: EpisodeState, support: SupportSet) -> int:
        return self.fit_group([episode], [support])[0]

    def fit_group(
        self, episodes: Sequence[EpisodeState], supports: Sequence[SupportSet]
    ) -> list[int]:
        started = []
        for episode, support in zip(episodes, supports, strict=True):
            feats, labels = support.features, support.labels
            if self.augment_passes:
                views = self.view_features(
                    episode, support.images(), range(self.augment_passes), self.crop_scale
                )
                feats, labels = views.flatten(0, 1), labels.repeat(self.augment_passes)
            text = episode.text_feats.float()
            classes, dim = text.shape
            bias = BIAS_INITS[self.bias_init](classes, dim, self.draw_generator(episode))
            started.append((lpp_init(feats, labels, text, bias), feats, labels, text))
        losses = lpp_fit(
            [head for head, *_ in started], torch.stack([f for _, f, _, _ in started]),
            torch.stack([y for _, _, y, _ in started]), torch.stack([t for *_, t in started]),
            self.epochs, self.alpha_every, self.momentum, ALPHA_GRADIENTS[self.alpha_gradient],
        )  # fmt: skip
        for episode, (head, *_), loss in zip(episodes, started, losses, strict=True):
            episode.memory["head"] = head
            episode.terms = {"loss": loss}
        return [self.epochs] * len(episodes)

    def predict_features(self, feats: Tensor, episode: EpisodeState) -> Tensor:
        return episode.memory["head"].logits(feats.float(), episode.text_feats.float())
