"""Mind (CVPR 2026): suppress the visual shortcut (SVL) and align visual to text relations (RA)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cdfsl.errors import CdfslError
from cdfsl.fewshot.losses import (
    fusion_target,
    mind_schedule,
    relation_alignment,
    suppressed_visual_cross_entropy,
    text_relation,
    visual_relation,
    vlm_cross_entropy,
)
from cdfsl.fewshot.methods.base import EpisodeState, FewShotMethod
from cdfsl.registry import Registry

#: Mind's sources of the clean support features S: name -> whether the support set is
#: forwarded separately (``FewShotMethod.forwards_support``).
SUPPORT_FEATURES: Registry[str, bool] = Registry(
    "Mind support", {"separate": True, "shared": False}
)


class Mind(FewShotMethod):
    """L_vlm + λ_svl·L_svl + λ_ra·L_ra on the schedule of ``cdfsl.fewshot.losses.mind_schedule``.

    The relation target fuses the previous step's visual relation matrix, so every training
    batch must hold the same images in the same order (the whole support set, as the episodic
    evaluator feeds it).

    Args (beyond :class:`FewShotMethod`, whose arguments pass through ``kwargs``):
        svl_weight: λ_svl (the reference code's ``beta``).
        ra_weight: λ_ra (the reference code's ``gamma``; the paper's β).
        divergence: the relation-alignment divergence, see
            ``cdfsl.fewshot.losses.relation_alignment``.
        support: where the clean support features S come from, a key of
            :data:`SUPPORT_FEATURES`: ``"separate"`` (the reference's: "S ... the normalised
            features of the clean (un-augmented) support images, forwarded with gradient in the
            same step", a second forward with its own LoRA-dropout mask) or ``"shared"`` (the
            clean view's rows of the views' forward, so A_v holds exact self-similarities of 1).
    """

    # Not mutation-tested: mutmut's trampoline would hide this frame from Lightning's
    # save_hyperparameters, which reads the constructors' arguments from the call stack.
    def __init__(
        self,
        *,
        svl_weight: float = 0.1,
        ra_weight: float = 3.0,
        divergence: str = "log_target_kl",
        support: str = "separate",
        **kwargs: Any,
    ) -> None:  # pragma: no mutate block
        if support not in SUPPORT_FEATURES:
            raise CdfslError(
                f"Mind support={support!r}: expected one of {sorted(SUPPORT_FEATURES)}"
            )
        super().__init__(**kwargs)
        self.support = support
        self.forwards_support = SUPPORT_FEATURES[support]
        self.svl_weight = svl_weight
        self.ra_weight = ra_weight
        self.divergence = divergence

    def support_needed(self, step: int) -> bool:
        """S enters the loss on the SVL and RA steps only (none from ``3·floor(T/5)`` on)."""
        plan = mind_schedule(step, self.total_steps())
        return plan.svl or plan.ra

    def loss_terms(
        self, feats: Tensor, labels: Tensor, view_ids: Tensor | None, episode: EpisodeState
    ) -> dict[str, Tensor]:
        step = mind_schedule(int(self.global_step), self.total_steps())
        text = episode.text_feats
        vlm = vlm_cross_entropy(feats, text, labels, self.scale)
        terms = {"vlm": vlm, "fusion_weight": torch.tensor(step.fusion_weight)}
        loss = vlm
        if step.svl:
            svl = suppressed_visual_cross_entropy(
                feats, labels, len(text), self.scale, episode.generator
            )
            terms["svl"] = svl
            loss = loss + self.svl_weight * svl
        if step.svl or step.ra:
            support, support_labels = self.support_features(feats, labels, view_ids, episode)
            relation = visual_relation(feats, support)
            if step.ra:
                previous = episode.memory.get("relation")
                if previous is None or previous.shape != relation.shape:
                    raise CdfslError(
                        "Mind needs every training batch to hold the same images in the same "
                        "order (the whole support set); the batch shape changed between steps"
                    )
                target = fusion_target(
                    previous,
                    text_relation(text, labels, support_labels),
                    step.fusion_weight,
                )
                ra = relation_alignment(relation, target, self.divergence)
                terms["ra"] = ra
                loss = loss + self.ra_weight * ra
            episode.memory["relation"] = relation.detach()
        terms["loss"] = loss
        return terms
