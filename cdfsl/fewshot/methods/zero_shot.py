"""Zero-shot classification: the frozen VLM with class prompts, no training."""

from __future__ import annotations

from torch import Tensor

from cdfsl.errors import CdfslError
from cdfsl.fewshot.methods.base import EpisodeState, FewShotMethod


class ZeroShot(FewShotMethod):
    """The pretrained model as it is; the support set is ignored."""

    trainable = False

    def loss_terms(
        self, feats: Tensor, labels: Tensor, view_ids: Tensor | None, episode: EpisodeState
    ) -> dict[str, Tensor]:
        raise CdfslError("ZeroShot does not train; evaluate it without fitting")
