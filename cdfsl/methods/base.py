"""The shared LightningModule: a frozen VLM, text classifiers, LoRA adapters and the step loop.

Subclasses say only which loss terms a step minimises (:meth:`FewShotMethod.loss_terms`).
Batches are ``(images, labels)`` (or a dict with those keys) with ``images: (B, 3, H, W)`` in
[0, 1] at the backbone's input size — ``backbone.preprocess.to_tensor()`` makes them from PIL;
the module augments (views) and normalises on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.nn import functional as F

from cdfsl import alignment
from cdfsl.backbones import Backbone, create_backbone
from cdfsl.data.views import DEFAULT_VIEWS, ViewAugmenter, ViewSpec, clean_view_index
from cdfsl.errors import CdfslError
from cdfsl.lora import LoRAConfig, inject_lora, mark_only_lora_trainable, reset_lora


class FewShotMethod(L.LightningModule):
    """Classify by scaled cosine between image features and frozen class-prompt text features.

    Args:
        backbone: registered short name or open_clip model name (see ``cdfsl backbones``).
        pretrained: "default", an open_clip tag, a local checkpoint file, or None (random init).
        class_names: readable class names; may be set later with :meth:`set_classes`.
        template: prompt with one ``{}`` for the class name.
        logit_scale: classifier temperature s; None takes the backbone's own (100 for CLIP).
        lora: adapter config for the vision tower; None trains nothing (zero-shot).
        views: augmentation views applied to each training batch; None uses batches as given.
        lr, weight_decay: AdamW settings for the adapter weights.
        t_max_factor: cosine schedule period as a multiple of the run's total steps.
        eta_min: the cosine schedule's floor.
        seed: seeds adapter init, view sampling and the method's own random draws.
    """

    trainable: bool = True

    def __init__(
        self,
        backbone: str = "tiny-clip",
        pretrained: str | None = "default",
        class_names: Sequence[str] | None = None,
        template: str = "a photo of a {}.",
        logit_scale: float | None = None,
        lora: LoRAConfig | None = LoRAConfig(),  # noqa: B008  (frozen value, never mutated)
        views: Sequence[ViewSpec] | None = tuple(DEFAULT_VIEWS),
        lr: float = 2e-4,
        weight_decay: float = 1e-2,
        t_max_factor: float = 8.0,
        eta_min: float = 1e-6,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if "{}" not in template:
            raise CdfslError(f"template {template!r} has no '{{}}' for the class name")
        self.backbone: Backbone = create_backbone(backbone, pretrained)
        self.backbone.requires_grad_(False)
        self.lora_config = lora if self.trainable else None
        if self.lora_config is not None:
            inject_lora(self.backbone.lora_root(), self.lora_config)
            mark_only_lora_trainable(self.backbone)
        self.views = list(views) if views is not None else None
        self._augmenter = ViewAugmenter(self.views) if self.views else None
        self._clean_view = clean_view_index(self.views) if self.views else None
        self.scale = logit_scale if logit_scale is not None else self.backbone.logit_scale
        self.template = template
        self.seed = seed
        self.class_names: list[str] = []
        self.register_buffer("text_feats", torch.empty(0), persistent=False)
        self.last_terms: dict[str, float] = {}
        if class_names is not None:
            self.set_classes(class_names)

    # -- episode set-up -------------------------------------------------------------------------
    def set_classes(self, class_names: Sequence[str]) -> None:
        """Compute the frozen text classifier ``text_feats: (N, D)`` for ``class_names``."""
        if len(class_names) < 2:
            raise CdfslError(f"need at least 2 class names, got {list(class_names)!r}")
        self.class_names = list(class_names)
        prompts = [self.template.format(name) for name in self.class_names]
        was_training = self.backbone.training
        self.backbone.eval()
        self.text_feats = self.backbone.text_features(prompts).to(self.backbone.device)
        self.backbone.train(was_training)

    def reset(self, seed: int) -> None:
        """Start a new episode: adapters back to their initial state (B = 0), RNGs re-seeded."""
        self.seed = seed
        # LoRA dropout draws from torch's global RNG; seeding it makes an episode repeatable.
        torch.manual_seed(seed)
        if self.lora_config is not None:
            reset_lora(self.backbone.lora_root(), seed)

    # -- features and logits -------------------------------------------------------------------
    def image_features(self, images: Tensor) -> Tensor:
        """``images: (B, 3, H, W)`` in [0, 1] -> ``(B, D)`` L2-normalised float32 features."""
        feats = self.backbone.encode_image(self.backbone.normalize(images))
        return F.normalize(feats.float(), dim=-1)

    def logits(self, image_feats: Tensor) -> Tensor:
        """``image_feats: (B, D)`` normalised -> ``(B, N)`` class logits s·cos (+ bias)."""
        if self.text_feats.numel() == 0:
            raise CdfslError("no classes set: pass class_names=... or call set_classes() first")
        out = self.scale * image_feats @ self.text_feats.t()
        if self.backbone.logit_bias is not None:
            out = out + self.backbone.logit_bias
        return out

    def forward(self, images: Tensor) -> Tensor:
        """``images: (B, 3, H, W)`` in [0, 1] -> ``(B, N)`` logits."""
        return self.logits(self.image_features(images))

    # -- training ------------------------------------------------------------------------------
    def loss_terms(
        self, feats: Tensor, labels: Tensor, view_ids: Tensor | None
    ) -> dict[str, Tensor]:
        """Loss terms for one step; must contain ``"loss"``, the sum that is minimised.

        ``feats: (M, D)`` normalised features of the step's images, ``labels: (M,)``,
        ``view_ids: (M,)`` the view of each row, or None when the batch came un-augmented.
        """
        raise NotImplementedError

    def on_train_start(self) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = _unpack(batch)
        view_ids = None
        if self._augmenter is not None:
            images, view_ids = self._augmenter(images, generator=self._generator)
            labels = labels.repeat(len(self.views))
        feats = self.image_features(images)
        terms = self.loss_terms(feats, labels, view_ids)
        with torch.no_grad():
            terms["modality_gap"] = alignment.modality_gap(feats, self.text_feats)
            terms["intra_inter_gap"] = alignment.intra_inter_cosine_gap(feats, labels)
            terms["image_text_margin"] = alignment.image_text_margin(feats, self.text_feats, labels)
        for key, value in terms.items():
            self.log(f"train/{key}", value.detach(), on_step=True, on_epoch=False)
        self.last_terms = {key: float(value.detach()) for key, value in terms.items()}
        return terms["loss"]

    def total_steps(self) -> int:
        """The run's number of optimiser steps, as the Trainer was configured."""
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return int(self.trainer.max_steps)
        return int(self.trainer.estimated_stepping_batches)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise CdfslError(f"{type(self).__name__} has no trainable parameters (lora is None)")
        optimizer = torch.optim.AdamW(
            params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer,
            T_max=max(1, int(self.hparams.t_max_factor * self.total_steps())),
            eta_min=self.hparams.eta_min,
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # -- prediction ----------------------------------------------------------------------------
    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        images = images["images"] if isinstance(images, dict) else images
        return self(images)

    def clean_rows(self, view_ids: Tensor | None) -> Tensor | None:
        """Boolean mask of the rows holding the clean (un-augmented) view, or None."""
        if view_ids is None or self._clean_view is None:
            return None
        return view_ids == self._clean_view


def _unpack(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, dict):
        return batch["images"], batch["labels"]
    images, labels = batch[0], batch[1]
    return images, labels
