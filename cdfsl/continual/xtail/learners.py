"""X-TAIL learners: one class per method, chosen by name from :data:`LEARNERS`.

A learner learns domain t of the sequence (:meth:`XTailLearner.learn`) and predicts union
indices for a domain's test split (:meth:`XTailLearner.predict`); its name, title and the
recipe settings it depends on are class attributes. Adding a method is one class::

    @LEARNERS.add
    class NearestMean(XTailLearner):
        name = "nearest-mean"            # what a recipe's ``methods`` list names
        title = "Nearest class mean"     # the reports' and heatmaps' name

        def learn(self, step): ...       # self.context.domains[step].train_feats
        def predict(self, domain): ...   # -> (N_test,) union indices

A run builds ``LEARNERS[name](context)`` for each method it runs, in registration order. A
recipe names a method by its registered name, or by the dotted class_path of a learner defined
outside cdfsl (registered when the run starts): ``methods: [zero-shot, mypackage.NearestMean]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from cdfsl.continual.rail import DualRegressor, PrimalRegressor, fuse
from cdfsl.engine import FitConfig, episode_seed, fit_episode, predict_logits
from cdfsl.errors import CdfslError
from cdfsl.lora import load_lora_state_dict, lora_state_dict
from cdfsl.registry import Registry

if TYPE_CHECKING:
    from cdfsl.continual.xtail.config import XTailConfig
    from cdfsl.continual.xtail.data import Domain
    from cdfsl.data.base import LabelledImages


@dataclass
class LearnerContext:
    """What a learner is built from: the run's config and the prepared sequence.

    ``text_feats: (C, D)`` L2-normalised prompt features of the union's C class names, in
    union order; ``logit_scale``: the backbone's CLIP temperature.
    """

    config: XTailConfig
    domains: list[Domain]
    union_names: list[str]
    text_feats: Tensor
    logit_scale: float
    device: torch.device


class XTailLearner:
    """One method in the sequence: learn domain t, predict union indices for a domain.

    ``name``: the recipe's name for it; ``title``: the name reports print; ``learns``: False
    for a method that learns nothing (no update time or memory in the summary).
    """

    name: ClassVar[str]
    title: ClassVar[str]
    learns: ClassVar[bool] = True

    def __init__(self, context: LearnerContext) -> None:
        self.context = context

    @classmethod
    def settings(cls, config: XTailConfig) -> dict[str, Any]:
        """The recipe settings this method's results depend on (its folder's ``run.json``)."""
        return {}

    def learn(self, step: int) -> None:
        """Learn domain ``step``."""

    def predict(self, domain: int) -> Tensor:
        """``(N_test,)`` predicted union indices for the test split of ``domain``."""
        raise NotImplementedError

    def state(self) -> dict[str, Any] | None:
        """What :meth:`load_state` needs to continue after the last learned step."""
        return None

    def load_state(self, state: dict[str, Any] | None) -> None:
        """Continue from :meth:`state`."""

    def state_bytes(self) -> int | None:
        return None


def _check_learner(cls: type[XTailLearner]) -> None:
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not isinstance(getattr(cls, "title", None), str):
        raise CdfslError(
            f"learner {cls.__qualname__} has no name or title: expected string class "
            "attributes `name` (the recipe's) and `title` (the reports'); add them"
        )
    if LEARNERS.get(name, cls) is not cls:
        raise CdfslError(
            f"learner name {name!r} is taken by {LEARNERS[name].__qualname__}: expected a new "
            "name; rename the class's `name`"
        )


LEARNERS: Registry[str, type[XTailLearner]] = Registry(
    "X-TAIL learner",
    fix="fix the recipe's methods (or give a learner's class_path)",
    key_of=lambda cls: cls.name,
    check=_check_learner,
)
"""Registered X-TAIL learners: recipe name -> class, in the order a run runs them
(``@LEARNERS.add`` on a class with string ``name`` and ``title`` attributes)."""


def learner_class(entry: str) -> type[XTailLearner] | None:
    """The learner a recipe's ``methods`` entry names, or None when it names none.

    ``entry``: a name in :data:`LEARNERS`, or the dotted class_path of an
    :class:`XTailLearner` subclass defined anywhere (``mypackage.NearestMean``), which is
    registered under its ``name`` on first use.
    """
    if entry not in LEARNERS and "." not in entry:
        return None
    cls = LEARNERS.resolve(entry, XTailLearner, "cdfsl.continual.xtail.ZeroShotLearner")
    return LEARNERS.add(cls)


def title_of(name: str) -> str:
    """The registered learner ``name``'s title, or ``name`` itself."""
    cls = LEARNERS.get(name)
    return cls.title if cls is not None else name


class _FeatureLearner(XTailLearner):
    """Shared zero-shot probabilities on cached features; RAIL adds a regressor and fusion."""

    def __init__(self, context: LearnerContext) -> None:
        super().__init__(context)
        self.domains, self.device = context.domains, context.device
        self.batch_size = context.config.batch_size
        self.text_feats = context.text_feats.to(context.device)
        self.scale = context.logit_scale

    def zero_shot_probs(self, feats: Tensor) -> Tensor:
        """``feats: (B, D)`` normalised -> ``(B, C)`` softmax(s · cos) over the union."""
        return torch.softmax(self.scale * feats.to(self.device) @ self.text_feats.T, dim=1)

    def predict_batch(self, feats: Tensor) -> Tensor:
        return self.zero_shot_probs(feats).argmax(dim=1)

    def predict(self, domain: int) -> Tensor:
        feats = self.domains[domain].test_feats.features
        out = [
            self.predict_batch(feats[i : i + self.batch_size]).cpu()
            for i in range(0, len(feats), self.batch_size)
        ]
        return torch.cat(out)


@LEARNERS.add
class ZeroShotLearner(_FeatureLearner):
    """The frozen model with ``template`` prompts; learns nothing."""

    name = "zero-shot"
    title = "Zero-shot"
    learns = False


@LEARNERS.add
class FineTuneLearner(XTailLearner):
    """LoRA-CE on each domain's training shots in turn (its own classes), adapters carried
    from domain to domain (the forgetting that RAIL avoids)."""

    name = "finetune"
    title = "LoRA fine-tune (sequential)"

    @classmethod
    def settings(cls, config: XTailConfig) -> dict[str, Any]:
        return {"finetune": config.finetune}

    def __init__(self, context: LearnerContext) -> None:
        from cdfsl.fewshot.methods.lora_ce import LoRAFineTune

        super().__init__(context)
        cfg = context.config
        ft = cfg.finetune
        # Seeded as the feature backbone was, so a random-init backbone is the same model.
        torch.manual_seed(cfg.seed)
        self.method = LoRAFineTune(
            backbone=cfg.backbone, pretrained=cfg.pretrained, template=cfg.template,
            lora=ft.lora, views=ft.views, lr=ft.lr, weight_decay=ft.weight_decay, seed=cfg.seed,
        )  # fmt: skip
        self.method.reset(cfg.seed)
        self.fit = FitConfig(
            steps=ft.steps, precision=ft.precision, accelerator=ft.accelerator,
            batch_size=ft.images_per_step,
        )  # fmt: skip
        self.cfg, self.domains, self.union_names = cfg, context.domains, context.union_names
        # Domain images are framed to the input size already (FramedImages): no second frame.
        self.to_tensor = self.method.backbone.preprocess.to_tensor("squash")
        self.method.set_classes(self.union_names)

    def _images(self, dataset: LabelledImages, start: int, stop: int) -> Tensor:
        return torch.stack([self.to_tensor(dataset.load(i)) for i in range(start, stop)])

    def learn(self, step: int) -> None:
        d = self.domains[step]
        images = self._images(d.train, 0, len(d.train))
        labels = torch.tensor(d.train.targets, dtype=torch.long)  # the domain's own classes
        self.method.set_classes(d.class_names)
        seed = episode_seed(self.cfg.seed, step)
        torch.manual_seed(seed)
        self.method.seed = seed
        fit_episode(self.method, images, labels, self.cfg.finetune.steps, self.fit)
        self.method.set_classes(self.union_names)

    def predict(self, domain: int) -> Tensor:
        test = self.domains[domain].test
        out = []
        for start in range(0, len(test), 1024):
            images = self._images(test, start, min(start + 1024, len(test)))
            logits = predict_logits(self.method, images, self.fit, self.cfg.batch_size)
            out.append(logits.argmax(dim=1))
        return torch.cat(out)

    def state(self) -> dict[str, Any]:
        return lora_state_dict(self.method.backbone.lora_root())

    def load_state(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            load_lora_state_dict(self.method.backbone.lora_root(), state)

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state().values())


class _RailLearner(_FeatureLearner):
    """RAIL: an analytic regressor on cached features, fused with zero-shot (RAIL-Fusion)."""

    def __init__(self, context: LearnerContext) -> None:
        super().__init__(context)
        self.regressor, self.beta = self.make_regressor(context), context.config.beta

    def make_regressor(self, context: LearnerContext) -> PrimalRegressor | DualRegressor:
        raise NotImplementedError

    def learn(self, step: int) -> None:
        d = self.domains[step]
        labels = d.train_feats.labels + d.offset  # union indices
        self.regressor.update(d.train_feats.features, labels, num_classes=d.end)

    def predict_batch(self, feats: Tensor) -> Tensor:
        probs = self.zero_shot_probs(feats)
        seen = self.regressor.num_classes
        scores = torch.zeros_like(probs)
        if seen:
            scores[:, :seen] = self.regressor.scores(feats).to(probs.device, probs.dtype)
        mask = torch.arange(probs.shape[1], device=probs.device) < seen
        return fuse(probs, scores, mask, self.beta).argmax(dim=1)

    def state(self) -> dict[str, Any]:
        return self.regressor.state_dict()

    def load_state(self, state: dict[str, Any] | None) -> None:
        if state is not None:  # the regressor kind this learner made
            self.regressor = type(self.regressor).from_state_dict(state, self.device)

    def state_bytes(self) -> int:
        return self.regressor.state_bytes()


@LEARNERS.add
class PrimalRailLearner(_RailLearner):
    """Primal-RAIL: ridge regression on a random ReLU layer (``primal``), with RAIL-Fusion."""

    name = "primal"
    title = "Primal-RAIL"

    @classmethod
    def settings(cls, config: XTailConfig) -> dict[str, Any]:
        return {"primal": config.primal, "beta": config.beta}

    def make_regressor(self, context: LearnerContext) -> PrimalRegressor:
        p = context.config.primal
        dim = context.domains[0].train_feats.features.shape[1]
        return PrimalRegressor(
            dim, p.hidden, p.reg, p.seed, random_init=p.random_init, dtype=p.dtype,
            block_size=p.block_size, device=context.device,
        )  # fmt: skip


@LEARNERS.add
class DualRailLearner(_RailLearner):
    """Dual-RAIL: kernel ridge regression with an RBF kernel (``dual``), with RAIL-Fusion."""

    name = "dual"
    title = "Dual-RAIL"

    @classmethod
    def settings(cls, config: XTailConfig) -> dict[str, Any]:
        return {"dual": config.dual, "beta": config.beta}

    def make_regressor(self, context: LearnerContext) -> DualRegressor:
        q = context.config.dual
        return DualRegressor(
            q.gamma, q.reg, dtype=q.dtype, block_size=q.block_size, device=context.device
        )


METHODS = tuple(LEARNERS)
"""The built-in method names, in the order they are run (a recipe's default ``methods``)."""
METHOD_TITLES = {name: cls.title for name, cls in LEARNERS.items()}
"""The built-in methods' titles (each learner's ``title``)."""
