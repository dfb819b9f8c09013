"""Mind's loss terms and schedule as pure functions of tensors.

Notation follows the Mind paper (CVPR 2026, arXiv 2603.13341; docs/fidelity.md): ``F`` (M, D)
the L2-normalised features of the augmented support images of one step, ``y`` (M,) their
labels, ``T`` (N, D) the normalised text features of the N classes, ``S`` (N·K, D) the
normalised clean support features.
The method weights and composes the terms; nothing here holds state or does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as functional
from torch import Tensor

from cdfsl.errors import CdfslError
from cdfsl.registry import Registry

__all__ = [
    "DIVERGENCES",
    "MindStep",
    "class_prototypes",
    "cross_modal_term",
    "draw_random_prototypes",
    "fusion_target",
    "mind_schedule",
    "relation_alignment",
    "suppressed_visual_cross_entropy",
    "text_relation",
    "visual_relation",
    "visual_term",
    "vlm_cross_entropy",
    "vlm_decomposition",
]


def vlm_cross_entropy(
    image_feats: Tensor, text_feats: Tensor, labels: Tensor, logit_scale: float | Tensor
) -> Tensor:
    """L_vlm = CE(s · F Tᵀ, y), mean over images.

    image_feats: (M, D) L2-normalised; text_feats: (N, D) L2-normalised; labels: (M,) int64 in
    [0, N); logit_scale: s, scalar. Returns a scalar.
    """
    logits = logit_scale * image_feats @ text_feats.T
    return functional.cross_entropy(logits, labels)


def class_prototypes(support_feats: Tensor, support_labels: Tensor, num_classes: int) -> Tensor:
    """v_c: the L2-normalised mean of class c's support features (the paper's t_c = v_c + g_c)

    support_feats: (S, D) L2-normalised; support_labels: (S,) int64 in [0, N); every class needs
    at least one support row. Returns (N, D).
    """
    counts = torch.bincount(support_labels, minlength=num_classes)
    if len(counts) != num_classes or bool((counts == 0).any()):
        raise CdfslError(
            f"class_prototypes: support labels cover classes {counts.nonzero().flatten().tolist()}"
            f" of {num_classes}; expected every class in [0, {num_classes}) at least once"
        )
    sums = torch.zeros(num_classes, support_feats.shape[1], dtype=support_feats.dtype)
    sums = sums.to(support_feats.device).index_add(0, support_labels, support_feats)
    return functional.normalize(sums, dim=1)


def visual_term(image_feats: Tensor, prototypes: Tensor, logit_scale: float | Tensor) -> Tensor:
    """The visual part of the VLM logits, s · F Vᵀ: image-to-prototype cosines.

    image_feats: (M, D) L2-normalised; prototypes: V (N, D) from :func:`class_prototypes`.
    Returns (M, N).
    """
    return logit_scale * image_feats @ prototypes.T


def cross_modal_term(
    image_feats: Tensor, text_feats: Tensor, prototypes: Tensor, logit_scale: float | Tensor
) -> Tensor:
    """The cross-modal part of the VLM logits, s · F Gᵀ with g_c = t_c - v_c (the modality gap).

    ``visual_term + cross_modal_term`` is the VLM logits s · F Tᵀ. image_feats: (M, D)
    L2-normalised; text_feats: T (N, D) L2-normalised; prototypes: V (N, D). Returns (M, N).
    """
    return logit_scale * image_feats @ (text_feats - prototypes).T


def vlm_decomposition(
    image_feats: Tensor,
    text_feats: Tensor,
    labels: Tensor,
    prototypes: Tensor,
    logit_scale: float | Tensor,
) -> dict[str, Tensor]:
    """L_vlm split into its visual and cross-modal parts, and the gradient each sends to F.

    With z = a + b (a the visual term, b the cross-modal term, per image) and p = softmax(z),
    CE = -z_y + logsumexp(z) = (E_p[a] - a_y) + (E_p[b] - b_y) + H(p) exactly, since
    logsumexp(z) = E_p[z] + H(p). Keys, each a mean over images (``vlm_visual +
    vlm_cross_modal + vlm_entropy`` equals :func:`vlm_cross_entropy`):

    - ``vlm_visual``: E_p[a] - a_y, the visual part's contribution;
    - ``vlm_cross_modal``: E_p[b] - b_y, the cross-modal part's;
    - ``vlm_entropy``: H(p);
    - ``grad_visual``, ``grad_cross_modal``: Frobenius norms of ∂L_vlm/∂F through each part,
      ``s/M · ‖(P - Y) V‖`` and ``s/M · ‖(P - Y) G‖``, with V and G held fixed.

    image_feats: (M, D) L2-normalised; text_feats: (N, D); labels: (M,) int64; prototypes:
    V (N, D) from :func:`class_prototypes`. Returns detached scalars.
    """
    with torch.no_grad():
        visual = visual_term(image_feats, prototypes, logit_scale)
        cross = cross_modal_term(image_feats, text_feats, prototypes, logit_scale)
        probs = torch.softmax(visual + cross, dim=1)
        rows = torch.arange(len(labels), device=labels.device)
        residual = probs.clone()
        residual[rows, labels] -= 1.0
        scale = torch.as_tensor(logit_scale, dtype=image_feats.dtype, device=image_feats.device)
        scale = scale / len(labels)
        return {
            "vlm_visual": ((probs * visual).sum(1) - visual[rows, labels]).mean(),
            "vlm_cross_modal": ((probs * cross).sum(1) - cross[rows, labels]).mean(),
            "vlm_entropy": torch.special.entr(probs).sum(1).mean(),
            "grad_visual": scale * torch.linalg.matrix_norm(residual @ prototypes),
            "grad_cross_modal": scale
            * torch.linalg.matrix_norm(residual @ (text_feats - prototypes)),
        }


def draw_random_prototypes(
    num_images: int, num_classes: int, generator: torch.Generator | None = None
) -> Tensor:
    """Indices of the images that serve as the prototypes of SVL's class slots.

    One index per class slot, drawn uniformly with replacement from [0, num_images) with
    ``torch.randint(..., generator=generator)``, so slots ignore class membership and may repeat.
    Returns (num_classes,) int64 on the generator's device (CPU when generator is None).
    """
    if num_images < 1 or num_classes < 1:
        raise CdfslError(
            f"draw_random_prototypes: num_images={num_images}, num_classes={num_classes}; "
            "expected both >= 1 (pass a non-empty batch and the episode's class count)"
        )
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(num_images, (num_classes,), generator=generator, device=device)


def suppressed_visual_cross_entropy(
    image_feats: Tensor,
    labels: Tensor,
    num_classes: int,
    logit_scale: float | Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """L_svl = CE(s · F Wᵀ, y) with random image prototypes W.

    W (N, D) row c = image_feats[draw_random_prototypes(M, N, generator)[c]]: drawn from all M rows,
    not from class c. W is not detached, so the gradient reaches image_feats through both factors.
    image_feats: (M, D) L2-normalised; labels: (M,) int64 in [0, N); num_classes: N;
    logit_scale: s, scalar. Returns a scalar.
    """
    index = draw_random_prototypes(image_feats.shape[0], num_classes, generator)
    # A CPU generator may drive features on an accelerator: draw there, index here.
    prototypes = image_feats[index.to(image_feats.device)]
    logits = logit_scale * image_feats @ prototypes.T
    return functional.cross_entropy(logits, labels)


def visual_relation(image_feats: Tensor, support_feats: Tensor) -> Tensor:
    """A_v = F Sᵀ, raw cosines.

    image_feats: (M, D) L2-normalised; support_feats: (S, D) L2-normalised. Returns (M, S).
    """
    return image_feats @ support_feats.T


def text_relation(text_feats: Tensor, row_labels: Tensor, col_labels: Tensor) -> Tensor:
    """A_t[i, j] = t_{row_labels[i]} · t_{col_labels[j]}, raw cosines.

    text_feats: (N, D) L2-normalised; row_labels: (M,) int64; col_labels: (S,) int64.
    Returns (M, S).
    """
    return text_feats[row_labels] @ text_feats[col_labels].T


def fusion_target(
    prev_visual_relation: Tensor, text_relation: Tensor, fusion_weight: float
) -> Tensor:
    """A_fuse = w · A_v_prev.detach() + (1 - w) · A_t.

    prev_visual_relation: (M, S), the previous step's A_v (detached here); text_relation: (M, S);
    fusion_weight: w. Returns (M, S).
    """
    return fusion_weight * prev_visual_relation.detach() + (1.0 - fusion_weight) * text_relation


def _log_target_kl(visual_relation: Tensor, fusion_target: Tensor) -> Tensor:
    # Written out, not nn.KLDivLoss: torch warns that reduction="mean" will change meaning in a
    # later release, and the reference code's numbers depend on today's element-wise mean.
    return (fusion_target.exp() * (fusion_target - visual_relation)).mean()


def _row_softmax_kl(visual_relation: Tensor, fusion_target: Tensor) -> Tensor:
    log_p = functional.log_softmax(visual_relation, dim=1)
    log_q = functional.log_softmax(fusion_target, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


DIVERGENCES: Registry[str, Callable[[Tensor, Tensor], Tensor]] = Registry(
    "divergence",
    {
        "log_target_kl": _log_target_kl,
        "row_softmax_kl": _row_softmax_kl,
    },
)
"""Divergences for ``relation_alignment``, name -> fn(A_v, A_fuse) -> scalar.

- ``"log_target_kl"`` (default, the reference code): ``nn.KLDivLoss(reduction="mean",
  log_target=True)(input=A_v, target=A_fuse)``, i.e. mean over all M·S elements of
  exp(A_fuse) · (A_fuse - A_v). It treats the raw cosines as log-probabilities without normalising
  them; read as probabilities it is the direction KL(A_fuse ‖ A_v).
- ``"row_softmax_kl"``: the paper's D_KL(A_v ‖ A_fuse) between row-wise softmax distributions,
  P_i = softmax(A_v[i]), Q_i = softmax(A_fuse[i]); sum_j P_ij log(P_ij / Q_ij), mean over rows.
  Expectation is under the visual distribution P.
"""


def relation_alignment(
    visual_relation: Tensor, fusion_target: Tensor, divergence: str = "log_target_kl"
) -> Tensor:
    """L_ra: divergence between A_v and A_fuse, chosen by name from ``DIVERGENCES``.

    visual_relation: A_v (M, S) raw cosines; fusion_target: A_fuse (M, S). The default
    ``"log_target_kl"`` treats the raw cosines as log-probabilities, as the reference code does:
    mean over all elements of exp(A_fuse) · (A_fuse - A_v). Returns a scalar.
    """
    fn = DIVERGENCES.get(divergence)
    if fn is None:
        raise CdfslError(
            f"relation_alignment: unknown divergence {divergence!r}; "
            f"expected one of {sorted(DIVERGENCES)}"
        )
    if visual_relation.shape != fusion_target.shape:
        raise CdfslError(
            f"relation_alignment: visual_relation {tuple(visual_relation.shape)} and "
            f"fusion_target {tuple(fusion_target.shape)} differ; build both over the same "
            "(image, support) index pairs"
        )
    return fn(visual_relation, fusion_target)


@dataclass(frozen=True)
class MindStep:
    """Which terms step k uses: SVL, RA, and RA's fusion weight w_k (0.0 when RA is off)."""

    svl: bool
    ra: bool
    fusion_weight: float


def mind_schedule(step: int, total_steps: int) -> MindStep:
    """The terms of step k of T (0-based), per the reference code's schedule.

    With R = 3·floor(T/5): step 0 uses SVL only (no previous A_v yet); steps 1 .. R-1 use SVL and
    RA with w_k = 1 - k / floor(0.6·T); steps >= R use L_vlm only. fusion_weight is 0.0 whenever RA
    is off. Edge cases: T < 5 gives R = 0, so step 0 keeps SVL and RA never runs; RA on implies
    1 <= k < R <= floor(0.6·T), so the denominator is >= 1 and w_k is in (0, 1) (floor(0.6·T) = 0,
    i.e. T = 1, never reaches the formula). Floors use integer arithmetic (T // 5, 3·T // 5).
    Raises CdfslError if T < 1 or step is outside [0, T).
    """
    if total_steps < 1:
        raise CdfslError(f"mind_schedule: total_steps={total_steps}; expected >= 1")
    if not 0 <= step < total_steps:
        raise CdfslError(
            f"mind_schedule: step={step} outside [0, {total_steps}); steps are 0-based and < T"
        )
    ra_end = 3 * (total_steps // 5)
    if step == 0:
        return MindStep(svl=True, ra=False, fusion_weight=0.0)
    if step < ra_end:
        return MindStep(svl=True, ra=True, fusion_weight=1.0 - step / ((3 * total_steps) // 5))
    return MindStep(svl=False, ra=False, fusion_weight=0.0)
