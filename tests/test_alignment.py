"""Alignment metrics on hand-made unit vectors whose answers follow by construction."""

from __future__ import annotations

import math

import pytest
import torch

from cdfsl.alignment import image_text_margin, intra_inter_cosine_gap, modality_gap
from cdfsl.errors import CdfslError

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


def test_image_text_margin_needs_two_classes():
    with pytest.raises(CdfslError, match="2 classes"):
        image_text_margin(torch.tensor([E1]), torch.tensor([E1]), torch.tensor([0]))
