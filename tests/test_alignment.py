"""Alignment metrics on hand-made unit vectors whose answers follow by construction."""

from __future__ import annotations

import math
import re

import pytest
import torch

from cdfsl.errors import CdfslError
from cdfsl.fewshot.alignment import image_text_margin, intra_inter_cosine_gap, modality_gap

E1, E2, E3 = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]


def test_modality_gap_zero_when_centroids_coincide():
    feats = torch.tensor([E1, E2])
    texts = torch.tensor([E2, E1])
    assert modality_gap(feats, texts).item() == pytest.approx(0.0)


def test_modality_gap_between_orthogonal_clusters():
    feats = torch.tensor([E1, E1, E1])
    texts = torch.tensor([E2, E2])
    assert modality_gap(feats, texts).item() == pytest.approx(math.sqrt(2.0))


def test_modality_gap_uses_unnormalised_centroids():
    feats = torch.tensor([E1, E2])  # centroid (0.5, 0.5, 0)
    texts = torch.tensor([E3])
    assert modality_gap(feats, texts).item() == pytest.approx(math.sqrt(0.25 + 0.25 + 1.0))


def test_intra_inter_gap_separated_classes():
    feats = torch.tensor([E1, E1, E2, E2])
    labels = torch.tensor([0, 0, 1, 1])
    # Same-class pairs are identical (cos 1); cross-class pairs are orthogonal (cos 0).
    assert intra_inter_cosine_gap(feats, labels).item() == pytest.approx(1.0)


def test_intra_inter_gap_excludes_self_pairs_and_pools_pairs():
    feats = torch.tensor([E1, E2, E1])
    labels = torch.tensor([0, 0, 1])
    # Same-class pairs: (0,1) -> 0. Different-class pairs: (0,2) -> 1, (1,2) -> 0; mean 0.5.
    # Counting self-pairs would make the same-class mean 2/3 instead of 0.
    assert intra_inter_cosine_gap(feats, labels).item() == pytest.approx(-0.5)


def test_intra_inter_gap_singleton_class_adds_only_inter_pairs():
    feats = torch.tensor([E1, E1, E3])
    labels = torch.tensor([0, 0, 1])
    # Same-class: (0,1) -> 1. Different-class: (0,2), (1,2) -> 0.
    assert intra_inter_cosine_gap(feats, labels).item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("feats", "labels"),
    [
        ([E1, E2, E3], [0, 1, 2]),  # every class has one image: no same-class pair
        ([E1, E2, E3], [0, 0, 0]),  # one class: no different-class pair
        ([E1], [0]),  # no pairs at all
    ],
)
def test_intra_inter_gap_is_zero_not_nan_when_undefined(feats, labels):
    gap = intra_inter_cosine_gap(torch.tensor(feats), torch.tensor(labels))
    assert gap.shape == ()
    assert gap.item() == 0.0


def test_image_text_margin_by_construction():
    feats = torch.tensor([E1, E2])
    texts = torch.tensor([E1, E2, E3])
    assert image_text_margin(feats, texts, torch.tensor([0, 1])).item() == pytest.approx(1.0)
    assert image_text_margin(feats, texts, torch.tensor([1, 0])).item() == pytest.approx(-1.0)


def test_image_text_margin_takes_max_over_other_classes():
    feats = torch.tensor([[0.6, 0.8, 0.0], E3])
    texts = torch.tensor([E1, E2, E3])
    # Image 0 (class 0): 0.6 - max(0.8, 0) = -0.2. Image 1 (class 2): 1 - max(0, 0) = 1.
    margin = image_text_margin(feats, texts, torch.tensor([0, 2]))
    assert margin.item() == pytest.approx((-0.2 + 1.0) / 2)


def test_image_text_margin_with_exactly_two_classes():
    feats = torch.tensor([[0.6, 0.8, 0.0], [0.6, 0.8, 0.0]])
    texts = torch.tensor([E1, E2])
    # Image 0 (class 0): 0.6 - 0.8 = -0.2. Image 1 (class 1): 0.8 - 0.6 = 0.2.
    assert image_text_margin(feats, texts, torch.tensor([0, 0])).item() == pytest.approx(-0.2)
    assert image_text_margin(feats, texts, torch.tensor([0, 1])).item() == pytest.approx(0.0)


def test_image_text_margin_needs_two_classes():
    message = (
        "image_text_margin: 1 text feature(s); expected >= 2 classes (the margin compares each "
        "image's own class to the others)"
    )
    with pytest.raises(CdfslError, match=re.escape(message)):
        image_text_margin(torch.tensor([E1]), torch.tensor([E1]), torch.tensor([0]))


def test_metrics_of_cpu_tensors_under_a_non_cpu_default_device():
    # torch.set_default_device("cuda") in a user's script must not move the metrics' own
    # tensors (masks, row indices) away from the inputs' device; the answers are the CPU ones.
    feats = torch.tensor([E1, E2, E1])
    labels = torch.tensor([0, 0, 1])
    texts = torch.tensor([E1, E2, E3])
    with torch.device("meta"):
        gap = intra_inter_cosine_gap(feats, labels)
        margin = image_text_margin(feats, texts, labels)
    assert gap.device == margin.device == torch.device("cpu")
    # Same-class pair (0,1): 0; different-class (0,2): 1, (1,2): 0 -> gap 0 - 0.5.
    assert gap.item() == pytest.approx(-0.5)
    # Own cosines 1, 0, 0; best others 0, 1, 1 -> margins 1, -1, -1.
    assert margin.item() == pytest.approx(-1 / 3)
