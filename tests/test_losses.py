"""Mind's loss terms and schedule against hand-derived values (plain math, not the code)."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from torch import nn

from cdfsl.errors import CdfslError
from cdfsl.fewshot.losses import (
    DIVERGENCES,
    MindStep,
    class_prototypes,
    cross_modal_term,
    draw_random_prototypes,
    fusion_target,
    mind_schedule,
    relation_alignment,
    suppressed_visual_cross_entropy,
    text_relation,
    visual_relation,
    visual_term,
    vlm_cross_entropy,
    vlm_decomposition,
)

# Three unit vectors in 2-D: e1, e2 and (0.6, 0.8); all pairwise dot products are exact by hand.
FEATS = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _manual_ce(rows: list[list[float]], protos: list[list[float]], labels: list[int], s: float):
    """Mean over rows of logsumexp_c(s·f·p_c) - s·f·p_y, in plain Python."""
    total = 0.0
    for f, y in zip(rows, labels, strict=True):
        logits = [s * _dot(f, p) for p in protos]
        total += math.log(sum(math.exp(z) for z in logits)) - logits[y]
    return total / len(rows)


# ---------------------------------------------------------------------------------------------
# L_vlm


def test_vlm_cross_entropy_hand_case():
    feats = torch.tensor(FEATS)
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    # logits (s=2): [2, 0], [0, 2], [1.2, 1.6]; each CE is log(1 + exp(-margin)).
    expected = (2 * math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-0.4))) / 3
    loss = vlm_cross_entropy(feats, texts, labels, 2.0)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_vlm_cross_entropy_accepts_tensor_logit_scale():
    feats = torch.tensor(FEATS)
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([1, 0, 0])  # all wrong: margins -2, -2, -0.4
    expected = (2 * math.log1p(math.exp(2.0)) + math.log1p(math.exp(0.4))) / 3
    loss = vlm_cross_entropy(feats, texts, labels, torch.tensor(2.0))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# L_svl


def test_svl_equals_manual_ce_with_drawn_prototypes():
    labels = [0, 1, 1]
    for seed in range(5):
        index = draw_random_prototypes(3, 2, torch.Generator().manual_seed(seed)).tolist()
        expected = _manual_ce(FEATS, [FEATS[j] for j in index], labels, 3.0)
        loss = suppressed_visual_cross_entropy(
            torch.tensor(FEATS),
            torch.tensor(labels),
            2,
            3.0,
            generator=torch.Generator().manual_seed(seed),
        )
        assert loss.shape == ()
        assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_draw_is_uniform_with_replacement_over_all_images():
    index = draw_random_prototypes(6, 12_000, torch.Generator().manual_seed(0))
    assert index.dtype == torch.int64
    assert index.shape == (12_000,)
    counts = torch.bincount(index, minlength=6)
    assert counts.numel() == 6  # nothing outside [0, M)
    # Every image, including indices >= num_classes, is drawn about 1/6 of the time.
    assert torch.all((counts - 2000).abs() < 200), counts


def test_draw_crosses_classes_and_repeats():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])  # M = 6 images of N = 3 classes
    foreign_slot = repeated = False
    for seed in range(50):
        index = draw_random_prototypes(6, 3, torch.Generator().manual_seed(seed))
        foreign_slot |= bool((labels[index] != torch.arange(3)).any())
        repeated |= index.unique().numel() < 3
    assert foreign_slot
    assert repeated


def test_draw_is_reproducible_and_rejects_empty():
    a = draw_random_prototypes(10, 5, torch.Generator().manual_seed(3))
    b = draw_random_prototypes(10, 5, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(CdfslError, match="num_images"):
        draw_random_prototypes(0, 5)
    with pytest.raises(CdfslError, match="num_classes"):
        draw_random_prototypes(4, 0)


def test_draw_accepts_a_single_image_and_a_single_class():
    # The bounds are >= 1, not >= 2: one image fills every slot; one class gets one slot.
    assert draw_random_prototypes(1, 4, torch.Generator().manual_seed(0)).tolist() == [0] * 4
    one = draw_random_prototypes(5, 1, torch.Generator().manual_seed(0))
    assert one.shape == (1,)
    assert 0 <= one.item() < 5


def test_draw_without_generator_is_on_the_cpu():
    torch.manual_seed(0)
    index = draw_random_prototypes(5, 200)
    assert index.device == torch.device("cpu")
    assert index.dtype == torch.int64
    assert all(0 <= i < 5 for i in index.tolist())


def test_draw_ignores_a_non_cpu_default_device():
    # Documented: the draw lands on the generator's device (CPU without one), whatever torch's
    # default device is (torch.set_default_device("cuda") in a user's script).
    expected = draw_random_prototypes(6, 4, torch.Generator().manual_seed(2)).tolist()
    with torch.device("meta"):
        seeded = draw_random_prototypes(6, 4, torch.Generator().manual_seed(2))
        unseeded = draw_random_prototypes(6, 4)
    assert seeded.device == unseeded.device == torch.device("cpu")
    assert seeded.tolist() == expected


def test_draw_lands_on_the_generators_device():
    # A CUDA generator is the real case (test_svl_cuda_generator_with_cpu_features); a generator
    # that reports the meta device stands in for it on a CPU-only machine.
    class ElsewhereGenerator(torch.Generator):
        @property
        def device(self) -> torch.device:
            return torch.device("meta")

    index = draw_random_prototypes(6, 3, ElsewhereGenerator())
    assert index.device == torch.device("meta")
    assert index.shape == (3,)


def test_draw_error_names_both_counts_and_the_bound():
    message = (
        "draw_random_prototypes: num_images=0, num_classes=5; expected both >= 1 (pass a "
        "non-empty batch and the episode's class count)"
    )
    with pytest.raises(CdfslError, match=re.escape(message)):
        draw_random_prototypes(0, 5)


def test_svl_gradient_matches_finite_differences():
    feats = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    feats.requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 0, 1])

    def loss(x: torch.Tensor) -> torch.Tensor:
        # A fresh generator per call: every evaluation uses the same prototypes.
        return suppressed_visual_cross_entropy(
            x, labels, 3, 3.0, generator=torch.Generator().manual_seed(7)
        )

    assert torch.autograd.gradcheck(loss, (feats,))


def test_svl_gradient_flows_through_prototypes():
    feats = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    feats.requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 0, 1])
    index = draw_random_prototypes(5, 3, torch.Generator().manual_seed(4))
    (full,) = torch.autograd.grad(
        suppressed_visual_cross_entropy(
            feats, labels, 3, 3.0, generator=torch.Generator().manual_seed(4)
        ),
        feats,
    )
    logits = 3.0 * feats @ feats[index].detach().T
    (detached,) = torch.autograd.grad(nn.functional.cross_entropy(logits, labels), feats)
    assert not torch.allclose(full, detached)


def test_svl_cpu_generator_with_features_elsewhere():
    feats = torch.empty(4, 3, device="meta")
    labels = torch.zeros(4, dtype=torch.int64, device="meta")
    loss = suppressed_visual_cross_entropy(feats, labels, 2, 100.0, torch.Generator())
    assert loss.device.type == "meta"


@pytest.mark.cuda
def test_svl_cpu_generator_with_cuda_features():
    feats = torch.nn.functional.normalize(torch.randn(6, 4, device="cuda"), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2], device="cuda")
    index = draw_random_prototypes(6, 3, torch.Generator().manual_seed(5)).tolist()
    rows = feats.cpu().tolist()
    expected = _manual_ce(rows, [rows[j] for j in index], labels.cpu().tolist(), 10.0)
    loss = suppressed_visual_cross_entropy(
        feats, labels, 3, 10.0, generator=torch.Generator().manual_seed(5)
    )
    assert loss.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.cuda
def test_svl_cuda_generator_with_cpu_features():
    # The index is drawn on the generator's device and moved to the features' device.
    gen = torch.Generator(device="cuda")
    index = draw_random_prototypes(3, 2, gen.manual_seed(6))
    assert index.device.type == "cuda"
    expected = _manual_ce(FEATS, [FEATS[j] for j in index.tolist()], [0, 1, 1], 3.0)
    loss = suppressed_visual_cross_entropy(
        torch.tensor(FEATS), torch.tensor([0, 1, 1]), 2, 3.0, generator=gen.manual_seed(6)
    )
    assert loss.device.type == "cpu"
    assert loss.item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Relations and fusion target


def test_visual_relation_hand_case():
    feats = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    support = torch.tensor([[0.0, 1.0], [0.6, 0.8], [1.0, 0.0]])
    expected = torch.tensor([[0.0, 0.6, 1.0], [0.8, 1.0, 0.6]])
    assert torch.allclose(visual_relation(feats, support), expected)


def test_text_relation_hand_case():
    texts = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    rows = torch.tensor([0, 1, 1])
    cols = torch.tensor([1, 0])
    # t0·t1 = 0.6, t0·t0 = t1·t1 = 1.
    expected = torch.tensor([[0.6, 1.0], [1.0, 0.6], [1.0, 0.6]])
    assert torch.allclose(text_relation(texts, rows, cols), expected)


def test_fusion_target_hand_case():
    prev = torch.tensor([[0.2, 0.4]])
    text = torch.tensor([[1.0, 0.0]])
    expected = torch.tensor([[0.25 * 0.2 + 0.75 * 1.0, 0.25 * 0.4]])
    assert torch.allclose(fusion_target(prev, text, 0.25), expected)


def test_fusion_target_detaches_previous_relation():
    prev = torch.tensor([[0.2, 0.4]], requires_grad=True)
    text = torch.tensor([[1.0, 0.0]], requires_grad=True)
    fusion_target(prev, text, 0.25).sum().backward()
    assert prev.grad is None
    assert torch.allclose(text.grad, torch.full((1, 2), 0.75))
    assert not fusion_target(prev, text.detach(), 0.5).requires_grad


# ---------------------------------------------------------------------------------------------
# L_ra


A_V = [[0.2, -0.1], [0.5, 0.3]]
A_FUSE = [[0.5, 0.0], [0.1, 0.3]]


def test_log_target_kl_hand_case():
    terms = [
        math.exp(f) * (f - v)
        for v_row, f_row in zip(A_V, A_FUSE, strict=True)
        for v, f in zip(v_row, f_row, strict=True)
    ]
    expected = sum(terms) / 4
    loss = relation_alignment(torch.tensor(A_V), torch.tensor(A_FUSE))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # Today's torch semantics of reduction="mean" (element-wise mean); torch warns it may change.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        reference = nn.KLDivLoss(reduction="mean", log_target=True)(
            input=torch.tensor(A_V), target=torch.tensor(A_FUSE)
        )
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


def test_log_target_kl_gradient_by_hand():
    a_v = torch.tensor(A_V, requires_grad=True)
    relation_alignment(a_v, torch.tensor(A_FUSE)).backward()
    # d/dA_v of mean(exp(A_fuse)·(A_fuse - A_v)) = -exp(A_fuse) / numel.
    assert torch.allclose(a_v.grad, -torch.tensor(A_FUSE).exp() / 4)


def test_row_softmax_kl_hand_case_and_direction():
    a_v = torch.tensor([[0.0, math.log(2.0)], [0.3, 0.3]])
    a_fuse = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # Row 0: P = (1/3, 2/3), Q = (1/2, 1/2); row 1: both uniform, KL = 0. Mean over the two rows.
    kl_pq = (1 / 3) * math.log((1 / 3) / 0.5) + (2 / 3) * math.log((2 / 3) / 0.5)
    loss = relation_alignment(a_v, a_fuse, divergence="row_softmax_kl")
    assert loss.item() == pytest.approx(kl_pq / 2, rel=1e-6)
    kl_qp = 0.5 * math.log(0.5 / (1 / 3)) + 0.5 * math.log(0.5 / (2 / 3))
    assert kl_qp != pytest.approx(kl_pq, rel=1e-3)  # the direction is observable


def test_row_softmax_kl_names_its_softmax_dimension():
    # No "implicit dimension choice" deprecation warning from torch: the rows are dim 1.
    a_v = torch.tensor([[0.0, math.log(2.0)], [0.3, 0.3]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        relation_alignment(a_v, torch.zeros(2, 2), divergence="row_softmax_kl")


def test_divergence_registry_and_errors():
    assert set(DIVERGENCES) == {"log_target_kl", "row_softmax_kl"}
    with pytest.raises(CdfslError, match=r"'cosine'.*log_target_kl.*row_softmax_kl"):
        relation_alignment(torch.zeros(2, 2), torch.zeros(2, 2), divergence="cosine")
    message = (
        "relation_alignment: visual_relation (2, 2) and fusion_target (2, 3) differ; build both "
        "over the same (image, support) index pairs"
    )
    with pytest.raises(CdfslError, match=re.escape(message)):
        relation_alignment(torch.zeros(2, 2), torch.zeros(2, 3))


# ---------------------------------------------------------------------------------------------
# Schedule


def test_schedule_t250_boundaries():
    # 3·floor(250/5) = 150 = floor(0.6·250).
    assert mind_schedule(0, 250) == MindStep(svl=True, ra=False, fusion_weight=0.0)
    step1 = mind_schedule(1, 250)
    assert (step1.svl, step1.ra) == (True, True)
    assert step1.fusion_weight == pytest.approx(149 / 150)
    step149 = mind_schedule(149, 250)
    assert (step149.svl, step149.ra) == (True, True)
    assert step149.fusion_weight == pytest.approx(1 / 150)
    assert mind_schedule(150, 250) == MindStep(svl=False, ra=False, fusion_weight=0.0)
    assert mind_schedule(249, 250) == MindStep(svl=False, ra=False, fusion_weight=0.0)


def test_schedule_t1250_boundaries():
    # 3·floor(1250/5) = 750 = floor(0.6·1250).
    assert mind_schedule(0, 1250) == MindStep(True, False, 0.0)
    assert mind_schedule(1, 1250).fusion_weight == pytest.approx(749 / 750)
    last_ra = mind_schedule(749, 1250)
    assert last_ra.ra and last_ra.svl
    assert last_ra.fusion_weight == pytest.approx(1 / 750)
    assert mind_schedule(750, 1250) == MindStep(False, False, 0.0)
    assert mind_schedule(1249, 1250) == MindStep(False, False, 0.0)


def test_schedule_t7_uses_floor_of_point_six_t():
    # 3·floor(7/5) = 3 RA window end; floor(0.6·7) = 4 is the weight's denominator.
    assert mind_schedule(0, 7) == MindStep(True, False, 0.0)
    assert mind_schedule(1, 7) == MindStep(True, True, 0.75)
    assert mind_schedule(2, 7) == MindStep(True, True, 0.5)
    for k in range(3, 7):
        assert mind_schedule(k, 7) == MindStep(False, False, 0.0)


def test_schedule_short_runs_never_use_ra():
    assert mind_schedule(0, 3) == MindStep(True, False, 0.0)
    assert mind_schedule(1, 3) == MindStep(False, False, 0.0)
    assert mind_schedule(2, 3) == MindStep(False, False, 0.0)
    assert mind_schedule(0, 1) == MindStep(True, False, 0.0)


@pytest.mark.parametrize(("step", "total"), [(-1, 250), (250, 250), (300, 250), (0, 0), (1, 1)])
def test_schedule_rejects_bad_steps(step: int, total: int):
    with pytest.raises(CdfslError, match="mind_schedule"):
        mind_schedule(step, total)


def test_mind_step_is_frozen():
    with pytest.raises(AttributeError):
        mind_schedule(0, 250).svl = False  # type: ignore[misc]


def test_class_prototypes_are_normalised_class_means_by_hand():
    # class 0: e1 and e2 -> mean (0.5, 0.5) -> (1, 1)/√2; class 1: (0.6, 0.8) alone.
    protos = class_prototypes(torch.tensor(FEATS), torch.tensor([0, 0, 1]), 2)
    r = 1 / math.sqrt(2)
    assert torch.allclose(protos, torch.tensor([[r, r], [0.6, 0.8]]), atol=1e-6)
    with pytest.raises(CdfslError, match="every class"):
        class_prototypes(torch.tensor(FEATS), torch.tensor([0, 0, 0]), 2)


def test_class_prototypes_keep_float64():
    # Same hand case in float64, exact to rounding: the sums take the features' dtype.
    feats = torch.tensor(FEATS, dtype=torch.float64)
    protos = class_prototypes(feats, torch.tensor([0, 0, 1]), 2)
    assert protos.dtype == torch.float64
    r = 1 / math.sqrt(2)
    assert protos.flatten().tolist() == pytest.approx([r, r, 0.6, 0.8], abs=1e-15)


@pytest.mark.cuda
def test_class_prototypes_stay_on_the_features_device():
    # The sums start on torch's default device and move to the features' device.
    feats = torch.tensor(FEATS, device="cuda")
    protos = class_prototypes(feats, torch.tensor([0, 0, 1], device="cuda"), 2)
    assert protos.device.type == "cuda"
    r = 1 / math.sqrt(2)
    assert protos.flatten().tolist() == pytest.approx([r, r, 0.6, 0.8], abs=1e-6)
    with torch.device("cuda"):  # CPU features under a CUDA default device stay on the CPU
        protos = class_prototypes(feats.cpu(), torch.tensor([0, 0, 1], device="cpu"), 2)
    assert protos.device.type == "cpu"
    assert protos.flatten().tolist() == pytest.approx([r, r, 0.6, 0.8], abs=1e-6)


def test_visual_and_cross_modal_terms_sum_to_the_vlm_logits_by_hand():
    # f = e1, v_0 = e1, v_1 = e2, t_0 = (0.6, 0.8), t_1 = e2, s = 10:
    # visual s·f·v = (10, 0); cross s·f·(t - v) = (10·(0.6 - 1), 0) = (-4, 0); sum (6, 0) = s·f·t.
    f, v = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    assert torch.allclose(visual_term(f, v, 10.0), torch.tensor([[10.0, 0.0]]))
    assert torch.allclose(cross_modal_term(f, t, v, 10.0), torch.tensor([[-4.0, 0.0]]))
    assert torch.allclose(visual_term(f, v, 10.0) + cross_modal_term(f, t, v, 10.0), 10 * f @ t.T)


def test_vlm_decomposition_splits_the_loss_exactly_and_its_gradients_match_autograd():
    gen = torch.Generator().manual_seed(3)
    feats = nn.functional.normalize(torch.randn(12, 6, generator=gen), dim=1)
    text = nn.functional.normalize(torch.randn(4, 6, generator=gen), dim=1)
    labels = torch.arange(4).repeat(3)
    protos = class_prototypes(feats[:4], labels[:4], 4)
    parts = vlm_decomposition(feats, text, labels, protos, 7.0)
    # Hand case, s = 1: f = e1, V = [e1, 0], T = [e1, 2·e1] give visual logits a = (1, 0) and
    # cross-modal logits b = (0, 2); y = 0, p = softmax(1, 2).
    hand = vlm_decomposition(
        torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [2.0, 0.0]]), torch.tensor([0]),
        torch.tensor([[1.0, 0.0], [0.0, 0.0]]), 1.0,
    )  # fmt: skip
    p = [math.exp(1) / (math.exp(1) + math.exp(2)), math.exp(2) / (math.exp(1) + math.exp(2))]
    assert math.isclose(hand["vlm_visual"], p[0] * 1.0 - 1.0, rel_tol=1e-6)
    assert math.isclose(hand["vlm_cross_modal"], p[1] * 2.0 - 0.0, rel_tol=1e-6)
    assert math.isclose(hand["vlm_entropy"], -sum(q * math.log(q) for q in p), rel_tol=1e-6)
    # ∂CE/∂f through a: (p - y) V = (p0 - 1)·e1; through b: (p - y)(T - V) = p1·2·e1.
    assert math.isclose(hand["grad_visual"], 1 - p[0], rel_tol=1e-6)
    assert math.isclose(hand["grad_cross_modal"], 2 * p[1], rel_tol=1e-6)
    total = parts["vlm_visual"] + parts["vlm_cross_modal"] + parts["vlm_entropy"]
    assert torch.allclose(total, vlm_cross_entropy(feats, text, labels, 7.0), atol=1e-5)
    # The gradient through each part, V and G held fixed, from autograd.
    for key, term in (
        ("grad_visual", lambda f: visual_term(f, protos, 7.0)),
        ("grad_cross_modal", lambda f: cross_modal_term(f, text, protos, 7.0)),
    ):
        f = feats.clone().requires_grad_(True)
        other = (7.0 * feats @ text.T - term(feats)).detach()
        nn.functional.cross_entropy(term(f) + other, labels).backward()
        assert torch.allclose(parts[key], f.grad.norm(), rtol=1e-5), key


def test_vlm_decomposition_float64_scale_and_a_non_cpu_default_device():
    # M = 3 images, s = 0.1 (neither exact in float32): f = e1, e2, e1 with labels 0, 1, 1;
    # V = [e1, e2], T = [e1, e2] so G = 0. Visual logits a_i = s·(f_i·v_c), cross-modal b = 0.
    s, m = 0.1, 3
    f = [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    labels = [0, 1, 1]
    eye = [[1.0, 0.0], [0.0, 1.0]]
    visual, entropy, residual = 0.0, 0.0, []
    for row, y in zip(f, labels, strict=True):
        a = [s * _dot(row, v) for v in eye]
        z = sum(math.exp(x) for x in a)
        p = [math.exp(x) / z for x in a]
        visual += sum(pc * ac for pc, ac in zip(p, a, strict=True)) - a[y]
        entropy -= sum(pc * math.log(pc) for pc in p)
        residual.append([pc - (c == y) for c, pc in enumerate(p)])
    # ∂CE/∂F through a: s/M · (P - Y) V with V = I, so its norm is s/M · ‖P - Y‖.
    grad = s / m * math.sqrt(sum(x * x for r in residual for x in r))
    args = (torch.tensor(f, dtype=torch.float64), torch.tensor(eye, dtype=torch.float64))
    parts = vlm_decomposition(*args, torch.tensor(labels), args[1], s)
    assert parts["grad_visual"].dtype == torch.float64
    assert parts["grad_visual"].item() == pytest.approx(grad, rel=1e-13)
    assert parts["grad_cross_modal"].item() == 0.0
    assert parts["vlm_visual"].item() == pytest.approx(visual / m, rel=1e-13)
    assert parts["vlm_cross_modal"].item() == 0.0
    assert parts["vlm_entropy"].item() == pytest.approx(entropy / m, rel=1e-13)
    # CPU inputs under a non-CPU default device (torch.set_default_device) give the same parts.
    with torch.device("meta"):
        moved = vlm_decomposition(*args, torch.tensor(labels, device="cpu"), args[1], s)
    for key in parts:
        assert moved[key].device == torch.device("cpu"), key
        assert moved[key].item() == pytest.approx(parts[key].item(), rel=1e-13), key
