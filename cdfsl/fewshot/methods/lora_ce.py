"""LoRA fine-tuning with plain cross-entropy: the CLIP-LoRA (vision) baseline."""

from __future__ import annotations

from torch import Tensor

from cdfsl.fewshot.losses import vlm_cross_entropy
from cdfsl.fewshot.methods.base import EpisodeState, FewShotMethod


class LoRAFineTune(FewShotMethod):
    """Minimise L_vlm = CE(s·F·Tᵀ, y) over the support views with LoRA on the vision tower."""

    def loss_terms(
        self, feats: Tensor, labels: Tensor, view_ids: Tensor | None, episode: EpisodeState
    ) -> dict[str, Tensor]:
        vlm = vlm_cross_entropy(feats, episode.text_feats, labels, self.scale)
        return {"loss": vlm, "vlm": vlm}
