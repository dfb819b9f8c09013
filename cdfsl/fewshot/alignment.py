"""Image-text alignment metrics worth logging during fine-tuning (pure functions).

All inputs are L2-normalised, so dot products are cosines. The functions are differentiable;
detach the inputs (or wrap in ``torch.no_grad()``) when only logging.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cdfsl.errors import CdfslError

__all__ = ["image_text_margin", "intra_inter_cosine_gap", "modality_gap"]


def modality_gap(image_feats: Tensor, text_feats: Tensor) -> Tensor:
    """‖mean_i f_i - mean_c t_c‖₂, between the unnormalised centroids.

    image_feats: (M, D) L2-normalised; text_feats: (N, D) L2-normalised. Returns a scalar.
    """
    return torch.linalg.vector_norm(image_feats.mean(dim=0) - text_feats.mean(dim=0))


def intra_inter_cosine_gap(image_feats: Tensor, labels: Tensor) -> Tensor:
    """Mean same-class image cosine minus mean different-class image cosine.

    Both means pool over ordered pairs (i, j), i != j (self-pairs excluded). A class with a single
    image adds no same-class pair but still adds its different-class pairs. If either set of pairs
    is empty (every class has one image, or only one class is present, or M < 2) the gap is
    undefined and 0.0 is returned instead of NaN. image_feats: (M, D) L2-normalised;
    labels: (M,) int64. Returns a scalar.
    """
    cosines = image_feats @ image_feats.T
    same = labels[:, None] == labels[None, :]
    not_self = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    intra = same & not_self
    inter = ~same
    if not intra.any() or not inter.any():
        return cosines.new_zeros(())
    return cosines[intra].mean() - cosines[inter].mean()


def image_text_margin(image_feats: Tensor, text_feats: Tensor, labels: Tensor) -> Tensor:
    """Mean over images of cos(f_i, t_{y_i}) - max_{c != y_i} cos(f_i, t_c).

    image_feats: (M, D) L2-normalised; text_feats: (N, D) L2-normalised, N >= 2; labels: (M,)
    int64 in [0, N). Returns a scalar; positive when every image is closest to its own text.
    """
    if text_feats.shape[0] < 2:
        raise CdfslError(
            f"image_text_margin: {text_feats.shape[0]} text feature(s); expected >= 2 classes "
            "(the margin compares each image's own class to the others)"
        )
    cosines = image_feats @ text_feats.T
    rows = torch.arange(len(labels), device=labels.device)
    own = cosines[rows, labels]
    own_mask = torch.zeros_like(cosines, dtype=torch.bool)
    own_mask[rows, labels] = True
    best_other = cosines.masked_fill(own_mask, float("-inf")).amax(dim=1)
    return (own - best_other).mean()
