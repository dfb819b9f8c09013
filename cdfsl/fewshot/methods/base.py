"""The shared LightningModule: a frozen VLM, text classifiers, LoRA adapters and the step loop.

Subclasses say only which loss terms a step minimises (:meth:`FewShotMethod.loss_terms`).
Batches are ``(images, labels)`` (or a dict with those keys) with ``images: (B, 3, H, W)`` in
[0, 1] at the backbone's input size — ``method.to_tensor()`` makes them from PIL;
the module augments (views) and normalises on the device.

One module trains ``E`` episodes at once (:meth:`FewShotMethod.start_episodes`): ``E`` LoRA
adapter sets over one frozen backbone, ``E`` text classifiers, ``E`` generators, and a batch of
``E`` equal-sized contiguous groups, group ``e`` episode ``e``'s. The step's loss is the sum of
the episodes' losses, so adapter set ``e`` gets exactly its own episode's gradient, and AdamW
(element-wise) updates it as if it trained alone. With one episode this is the plain
drop-in module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from cdfsl.backbones import Backbone, create_backbone
from cdfsl.backbones.base import GEOMETRIES, INTERPOLATIONS
from cdfsl.data.views import DEFAULT_VIEWS, ViewAugmenter, ViewSpec, clean_view_index
from cdfsl.errors import CdfslError
from cdfsl.fewshot import alignment, losses
from cdfsl.lora import (
    LoRAConfig,
    adapter_sets,
    inject_lora,
    mark_only_lora_trainable,
    reset_lora,
    set_lora_dropout_seeds,
    set_num_adapters,
)
from cdfsl.plumbing import PROMPT_TEMPLATE, plain_json

#: How views are drawn: ``per_episode`` draws them once when training starts and reuses them at
#: every step (the reference code: its data loader yields an episode's views once, and every
#: step trains on the same augmented images); ``per_step`` redraws every view at every step.
VIEW_SAMPLING = ("per_episode", "per_step")


#: Where an episode's initial LoRA A comes from: ``shared`` (one A for every episode, drawn from
#: the method's constructor seed: the reference builds its LoRA model once and deep-copies it per
#: episode) or ``per_episode`` (drawn from the episode's own seed).
LORA_INITS = ("shared", "per_episode")

#: ``resize_interpolation`` value that takes the backbone's own preprocessing filter.
BACKBONE_INTERPOLATION = "backbone"


def stream_seed(seed: int, stream: int) -> int:
    """A 63-bit seed for random stream ``stream`` of an episode seeded ``seed``.

    Views (and the method's own draws) and LoRA dropout use separate streams, so their
    generators never replay each other's numbers.
    """
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class EpisodeState:
    """What one episode of a (multi-episode) training run owns.

    ``text_feats: (N, D)`` its classifier; ``generator`` its views and method draws (SVL
    prototypes); ``memory`` the method's state across steps (Mind's previous A_v);
    ``terms`` the last step's loss terms (detached scalars); ``analysis`` that step's detached
    features, labels and clean support, from which :meth:`FewShotMethod.episode_terms` computes
    the alignment metrics when asked (the only consumer of most steps' metrics is the last
    step's row, and computing them syncs the device); ``support`` this step's separately
    forwarded clean support features ``(S, D)`` and labels, when the method asks for them
    (:attr:`FewShotMethod.forwards_support`).
    """

    seed: int
    class_names: list[str]
    text_feats: Tensor
    generator: torch.Generator | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    views: tuple[Tensor, Tensor] | None = None
    terms: dict[str, Tensor] = field(default_factory=dict)
    analysis: tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor] | None = None
    support: tuple[Tensor, Tensor] | None = None


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
        view_sampling: ``"per_episode"`` (the reference's: drawn once when training starts,
            reused every step) or ``"per_step"`` (new views every step); see
            :data:`VIEW_SAMPLING`.
        geometry: how images are framed to the input size, for support and queries, a row of
            ``cdfsl.backbones.base.GEOMETRIES``: ``"squash"`` (the reference's: its episodic
            loader resizes every view to 224×224) or ``"resize_crop"`` (resize to 1.15·224,
            centre-crop 224: the reference's unused ``fslcd_datasets`` loaders).
        resize_interpolation: the framing resize's filter, a key of
            ``cdfsl.backbones.base.INTERPOLATIONS`` (``"bilinear"``, torchvision ``Resize``'s
            default, the reference's) or ``"backbone"`` (the model's own config, e.g. open_clip's
            bicubic).
        rotation_interpolation: how rotated views sample, a key of
            ``cdfsl.data.views.ROTATION_INTERPOLATIONS`` (``"nearest"``, the reference's).
        color_jitter: how jittered views compute, a key of ``cdfsl.data.views.COLOR_JITTERS``
            (``"pil_uint8"``, the reference's PIL ``ImageEnhance`` on 8-bit images, or
            ``"float"``).
        lora_init: where each episode's initial LoRA A comes from, a key of :data:`LORA_INITS`:
            ``"shared"`` (the reference's: one A for every episode, drawn from ``seed``) or
            ``"per_episode"`` (drawn from each episode's own seed).
        lr, weight_decay: AdamW settings for the adapter weights.
        t_max_factor: cosine schedule period as a multiple of the run's total steps.
        eta_min: the cosine schedule's floor.
        seed: seeds a random-initialised backbone (``pretrained=None``), the adapters' initial
            values, view sampling, LoRA dropout and the method's own draws; an episode's own
            seed replaces it for everything but the backbone and, with ``lora_init: shared``,
            the initial A.
    """

    trainable: bool = True

    #: What a training step takes its image features through instead of
    #: :meth:`image_features` (a compiled twin, set for a fit's duration); None: that method.
    step_features: Callable[[Tensor], Tensor] | None = None

    #: True when :meth:`loss_terms` needs the clean support set forwarded a second time in each
    #: step (``episode.support``), beside its views.
    forwards_support: bool = False

    # Not mutation-tested: mutmut's trampoline would hide this frame from Lightning's
    # save_hyperparameters, which reads the constructors' arguments from the call stack.
    def __init__(
        self,
        backbone: str = "tiny-clip",
        pretrained: str | None = "default",
        class_names: Sequence[str] | None = None,
        template: str = PROMPT_TEMPLATE,
        logit_scale: float | None = None,
        lora: LoRAConfig | None = LoRAConfig(),  # noqa: B008  (frozen value, never mutated)
        views: Sequence[ViewSpec] | None = tuple(DEFAULT_VIEWS),
        view_sampling: str = "per_episode",
        geometry: str = "squash",
        resize_interpolation: str = "bilinear",
        rotation_interpolation: str = "nearest",
        color_jitter: str = "pil_uint8",
        lora_init: str = "shared",
        lr: float = 2e-4,
        weight_decay: float = 1e-2,
        t_max_factor: float = 8.0,
        eta_min: float = 1e-6,
        seed: int = 0,
    ) -> None:  # pragma: no mutate block
        super().__init__()
        self.save_hyperparameters()
        # Loggers write hparams through lightning_utilities, which cannot copy frozen
        # dataclasses (LoRAConfig, ViewSpec): keep them as plain mappings, which __init__
        # takes back (load_from_checkpoint).
        self.save_hyperparameters(plain_json(dict(self.hparams)))
        if isinstance(lora, Mapping):
            lora = LoRAConfig(**lora)
        if views is not None:
            views = [ViewSpec(**v) if isinstance(v, Mapping) else v for v in views]
        if "{}" not in template:
            raise CdfslError(f"template {template!r} has no '{{}}' for the class name")
        if view_sampling not in VIEW_SAMPLING:
            raise CdfslError(f"view_sampling={view_sampling!r}: expected one of {VIEW_SAMPLING}")
        GEOMETRIES.lookup(geometry, "geometry")
        self.geometry = geometry
        if resize_interpolation not in (*INTERPOLATIONS, BACKBONE_INTERPOLATION):
            raise CdfslError(
                f"resize_interpolation={resize_interpolation!r}: expected one of "
                f"{sorted(INTERPOLATIONS)} or {BACKBONE_INTERPOLATION!r} (the model's own)"
            )
        self.resize_interpolation = resize_interpolation
        if lora_init not in LORA_INITS:
            raise CdfslError(f"lora_init={lora_init!r}: expected one of {LORA_INITS}")
        self.lora_init = lora_init
        #: The constructor's seed: the shared initial LoRA A comes from it, whatever the episode.
        self.init_seed = seed
        self.backbone: Backbone = create_backbone(backbone, pretrained, init_seed=seed)
        self.backbone.requires_grad_(False)
        self.lora_config = lora if self.trainable else None
        if self.lora_config is not None:
            inject_lora(self.backbone.lora_root(), self.lora_config)
            mark_only_lora_trainable(self.backbone)
            self._reset_adapters([seed])
        self.views = list(views) if views is not None else None
        self.view_sampling = view_sampling
        self._augmenter = (
            ViewAugmenter(self.views, rotation_interpolation, color_jitter) if self.views else None
        )
        self._clean_view = clean_view_index(self.views) if self.views else None
        self.scale = logit_scale if logit_scale is not None else self.backbone.logit_scale
        self.template = template
        self.seed = seed
        self.episodes: list[EpisodeState] = []
        self._text_cache: dict[str, Tensor] = {}
        if class_names is not None:
            self.set_classes(class_names)

    # -- episode set-up -------------------------------------------------------------------------
    def start_episodes(self, seeds: Sequence[int], class_names: Sequence[Sequence[str]]) -> None:
        """Start ``E = len(seeds)`` episodes side by side, episode ``e`` seeded ``seeds[e]``.

        Adapter set ``e`` is re-initialised (B = 0, A by ``lora_init``: from the constructor's
        seed, or from ``seeds[e]`` alone), and episode ``e`` classifies ``class_names[e]``;
        every episode needs the same number of classes.
        """
        if len(seeds) != len(class_names) or not seeds:
            raise CdfslError(
                f"start_episodes with {len(seeds)} seeds and {len(class_names)} class lists: "
                "expected one class list per seed, at least one"
            )
        sizes = {len(names) for names in class_names}
        if len(sizes) != 1:
            raise CdfslError(
                f"start_episodes with class lists of sizes {sorted(sizes)}: expected one size "
                "(episodes trained together share the way of their protocol)"
            )
        episodes = [
            EpisodeState(int(seed), list(names), self._classifier(names))
            for seed, names in zip(seeds, class_names, strict=True)
        ]
        self._reset_adapters([episode.seed for episode in episodes])
        self.episodes = episodes
        self.seed = episodes[0].seed

    def set_classes(self, class_names: Sequence[str]) -> None:
        """Classify ``class_names`` (one episode); the adapters are left as they are."""
        seed = self.episodes[0].seed if len(self.episodes) == 1 else self.seed
        if len(self.episodes) > 1:
            self.reset(seed)
        self.episodes = [EpisodeState(seed, list(class_names), self._classifier(class_names))]

    def reset(self, seed: int) -> None:
        """Start a new single episode: adapters back to their initial state (B = 0)."""
        names = self.episodes[0].class_names if len(self.episodes) == 1 else None
        self.seed = seed
        self._reset_adapters([seed])
        self.episodes = (
            [EpisodeState(seed, names, self._classifier(names))] if names is not None else []
        )

    def _reset_adapters(self, seeds: Sequence[int]) -> None:
        """One adapter set per seed (B = 0); set ``e``'s A drawn from ``seeds[e]`` alone, or,
        with ``lora_init: shared``, from the constructor's seed for every set."""
        if self.lora_config is None:
            return
        root = self.backbone.lora_root()
        if adapter_sets(root) != len(seeds):
            set_num_adapters(root, len(seeds))
        if self.lora_init == "shared":
            reset_lora(root, self.init_seed)
            return
        for index, seed in enumerate(seeds):
            reset_lora(root, seed, adapter_index=index)

    def _classifier(self, class_names: Sequence[str]) -> Tensor:
        """``(N, D)`` normalised text features of the prompts; cached per prompt."""
        if len(class_names) < 2:
            raise CdfslError(f"need at least 2 class names, got {list(class_names)!r}")
        prompts = [self.template.format(name) for name in class_names]
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            was_training = self.backbone.training
            self.backbone.eval()
            feats = self.backbone.text_features(missing)
            self.backbone.train(was_training)
            self._text_cache.update(zip(missing, feats.float().cpu(), strict=True))
        return torch.stack([self._text_cache[p] for p in prompts]).to(self.backbone.device)

    @property
    def class_names(self) -> list[str]:
        """The classes of the single episode (empty before any are set)."""
        return self._single().class_names if self.episodes else []

    @property
    def text_feats(self) -> Tensor:
        """``(N, D)`` text classifier of the single episode."""
        return self._single().text_feats

    @property
    def last_terms(self) -> dict[str, float]:
        """The single episode's loss terms and metrics of the last training step."""
        return self.episode_terms(0) if len(self.episodes) == 1 else {}

    def episode_terms(
        self, index: int, snapshot: tuple[dict[str, Tensor], Any] | None = None
    ) -> dict[str, float]:
        """Episode ``index``'s loss terms and metrics of the last training step, or of the step
        whose :meth:`terms_snapshot` entry ``snapshot`` is."""
        episode = self.episodes[index]
        terms, analysis = snapshot or (episode.terms, episode.analysis)
        if analysis is not None:
            with torch.no_grad():
                terms = {**terms, **self._alignment_terms(*analysis, episode)}
            if snapshot is None:
                episode.terms, episode.analysis = terms, None
        return {key: float(value) for key, value in terms.items()}

    def terms_snapshot(self) -> list[tuple[dict[str, Tensor], Any]]:
        """Each episode's terms of this step, as :meth:`episode_terms` reads them later (a few
        references: nothing is computed or copied)."""
        return [(episode.terms, episode.analysis) for episode in self.episodes]

    def _require_classes(self) -> None:
        if not self.episodes:
            raise CdfslError("no classes set: pass class_names=... or call set_classes() first")

    def _single(self) -> EpisodeState:
        self._require_classes()
        if len(self.episodes) != 1:
            raise CdfslError(
                f"{len(self.episodes)} episodes are training together: expected one; use "
                "method.episodes[e] for episode e"
            )
        return self.episodes[0]

    # -- features and logits -------------------------------------------------------------------
    def image_features(self, images: Tensor) -> Tensor:
        """``images: (B, 3, H, W)`` in [0, 1] -> ``(B, D)`` L2-normalised float32 features."""
        feats = self.backbone.encode_image(self.backbone.normalize(images))
        return F.normalize(feats.float(), dim=-1)

    def logits(self, image_feats: Tensor, episode: EpisodeState | None = None) -> Tensor:
        """``image_feats: (B, D)`` normalised -> ``(B, N)`` logits s·cos (+ bias) of ``episode``
        (the single episode when None)."""
        return self.text_logits(image_feats, (episode or self._single()).text_feats)

    def text_logits(self, image_feats: Tensor, text: Tensor) -> Tensor:
        """``(..., B, D)`` normalised features against a text classifier ``(..., N, D)`` ->
        ``(..., B, N)`` logits s·cos (+ the backbone's bias); leading dims batch episodes."""
        # fp32 under any autocast: a bf16 head puts logits of 20-40 on steps of 0.125-0.25, and
        # ties then go to the lower class index.
        with torch.autocast(image_feats.device.type, enabled=False):
            out = self.scale * image_feats.float() @ text.float().mT
        if self.backbone.logit_bias is not None:
            out = out + self.backbone.logit_bias
        return out

    def forward(self, images: Tensor) -> Tensor:
        """``images: (E·B, 3, H, W)`` in [0, 1], E contiguous episode groups -> ``(E·B, N)``."""
        self._require_classes()
        self._check_groups(images.shape[0], "batch")
        groups = self.image_features(images).chunk(len(self.episodes))
        return torch.cat([self.logits(f, ep) for f, ep in zip(groups, self.episodes, strict=True)])

    def _check_groups(self, images: int, what: str) -> None:
        """Refuse a batch that does not split into one equal group per episode."""
        count = len(self.episodes)
        if images % count:
            raise CdfslError(
                f"{what} of {images} images for {count} episodes: expected equal contiguous "
                "groups, one per episode"
            )

    def to_tensor(self) -> Any:
        """PIL RGB image -> ``(3, H, W)`` in [0, 1] at the input size, framed by ``geometry``."""
        interpolation = self.resize_interpolation
        return self.backbone.preprocess.to_tensor(
            self.geometry, None if interpolation == BACKBONE_INTERPOLATION else interpolation
        )

    # -- training ------------------------------------------------------------------------------
    def loss_terms(
        self, feats: Tensor, labels: Tensor, view_ids: Tensor | None, episode: EpisodeState
    ) -> dict[str, Tensor]:
        """One episode's loss terms for one step; must contain ``"loss"``, what is minimised.

        ``feats: (M, D)`` normalised features of the episode's images this step, ``labels:
        (M,)``, ``view_ids: (M,)`` the view of each row, or None when the batch came
        un-augmented; ``episode`` its classifier, generator and memory.
        """
        raise NotImplementedError

    def on_train_start(self) -> None:
        self._require_classes()
        for episode in self.episodes:
            episode.generator = torch.Generator().manual_seed(stream_seed(episode.seed, 0))
            episode.memory, episode.views, episode.terms, episode.analysis = {}, None, {}, None
        if self.lora_config is not None:
            dropout = [stream_seed(episode.seed, 1) for episode in self.episodes]
            set_lora_dropout_seeds(self.backbone.lora_root(), dropout)

    def _episode_views(self, episode: EpisodeState, images: Tensor) -> tuple[Tensor, Tensor]:
        if self.view_sampling == "per_episode" and episode.views is not None:
            return episode.views
        views = self._augmenter(images, generator=episode.generator)
        if self.view_sampling == "per_episode":
            episode.views = views
        return views

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = _unpack(batch)
        count = len(self.episodes)
        self._check_groups(images.shape[0], "training batch")
        clean = list(zip(images.chunk(count), labels.chunk(count), strict=True))
        groups: list[tuple[Tensor, Tensor]] = clean
        view_ids: list[Tensor | None] = [None] * count
        if self._augmenter is not None:
            viewed = [
                self._episode_views(ep, im)
                for ep, (im, _) in zip(self.episodes, clean, strict=True)
            ]
            groups = [
                (v, y.repeat(len(self.views))) for (v, _), (_, y) in zip(viewed, clean, strict=True)
            ]
            view_ids = [ids for _, ids in viewed]
        # A logger reads every step's metrics; without one only the last step's row does.
        eager = self._trainer is not None and bool(self._trainer.loggers)
        # The separate clean support rows ride in the same forward: every row draws its own
        # LoRA-dropout mask, so this is a second forward of the support set in all but cost.
        # Steps whose loss and analysis do not read them skip them (a sixth of a 1-shot Mind
        # step's images on 40% of its steps); the other rows then draw other dropout masks.
        with_support = self.forwards_support and (
            eager or self._analysis_step() or self.support_needed(int(self.global_step))
        )
        inputs = [
            [im, sup] if with_support else [im]
            for (im, _), (sup, _) in zip(groups, clean, strict=True)
        ]
        flat = [part for parts in inputs for part in parts]
        encode = self.step_features or self.image_features
        feats = iter(encode(torch.cat(flat)).split([len(t) for t in flat]))
        total = 0.0
        for index, (episode, (_, y), (_, support_y), ids) in enumerate(
            zip(self.episodes, groups, clean, view_ids, strict=True)
        ):
            f = next(feats)
            if with_support:
                episode.support = (next(feats), support_y)
            terms = self.loss_terms(f, y, ids, episode)
            separate = None if episode.support is None else episode.support[0].detach()
            episode.analysis = (f.detach(), y, ids, separate, support_y)
            episode.terms = {key: value.detach() for key, value in terms.items()}
            episode.support = None
            if eager:
                self.episode_terms(index)
            total = total + terms["loss"]
        for key in self.episodes[0].terms:
            mean = torch.stack([ep.terms[key] for ep in self.episodes]).mean()
            self.log(f"train/{key}", mean, on_step=True, on_epoch=False)
        return total

    def support_features(
        self, feats: Tensor, labels: Tensor, view_ids: Tensor | None, episode: EpisodeState
    ) -> tuple[Tensor, Tensor]:
        """The clean support features S ``(S, D)`` and labels of this step.

        The separately forwarded support set when the method asks for one, else the rows of the
        clean view, else (no views, or none clean) every row.
        """
        if episode.support is not None:
            return episode.support
        if self.forwards_support:
            raise CdfslError(
                f"{type(self).__name__} read the separate clean support at step "
                f"{int(self.global_step)}, where support_needed said it would not: make "
                "support_needed return True for every step whose loss reads it"
            )
        return self._clean_support(feats, labels, view_ids)

    def support_needed(self, step: int) -> bool:
        """Whether step ``step``'s loss reads the separately forwarded support (all, here)."""
        return True

    def _analysis_step(self) -> bool:
        # The last step's analysis row is kept, and it uses the separate support.
        return int(self.global_step) == self.total_steps() - 1

    def _clean_support(
        self, feats: Tensor, labels: Tensor, view_ids: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        rows = self.clean_rows(view_ids)
        return (feats, labels) if rows is None else (feats[rows], labels[rows])

    def _alignment_terms(
        self, feats: Tensor, labels: Tensor, view_ids: Tensor | None, separate: Tensor | None,
        separate_labels: Tensor, episode: EpisodeState,
    ) -> dict[str, Tensor]:  # fmt: skip
        """The paper's analysis quantities for one episode's step (the Mind paper's analysis).

        ``feats``/``labels``/``view_ids``: the step's rows; ``separate``: the separately
        forwarded clean support features (labels ``separate_labels``), or None when the clean
        support is among the rows (:meth:`support_features`). The split of L_vlm needs every
        class's prototype v_c, so a mini-batch that misses a class (``FitConfig.batch_size``)
        has the alignment metrics without it.
        """
        text = episode.text_feats
        terms = {
            "modality_gap": alignment.modality_gap(feats, text),
            "intra_inter_gap": alignment.intra_inter_cosine_gap(feats, labels),
            "image_text_margin": alignment.image_text_margin(feats, text, labels),
        }
        if separate is not None:
            support, support_labels = separate, separate_labels
        else:
            support, support_labels = self._clean_support(feats, labels, view_ids)
        if len(torch.unique(support_labels)) == len(text):
            prototypes = losses.class_prototypes(support.detach(), support_labels, len(text))
            terms.update(losses.vlm_decomposition(feats, text, labels, prototypes, self.scale))
        return terms

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
