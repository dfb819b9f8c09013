"""Dataset wrappers in ``cdfsl.data``: ``Subset`` and ``ConcatImages``, ``MicroWorld`` over a
``DomainSpec`` of one's own, and ``MicroDGDomain`` as such a world with unchanged images."""

from __future__ import annotations

import hashlib

import pytest

from cdfsl.data import LabelledImages
from cdfsl.data.micro_world import DomainSpec, MicroWorld, attribute_classes
from cdfsl.data.wrappers import ConcatImages, Subset
from cdfsl.errors import CdfslError
from cdfsl.reasoning.micro_dg import ConcatImages as ReexportedConcat
from cdfsl.reasoning.micro_dg import MicroDGDomain

# sha256 prefixes of MicroDGDomain(domain, 2, seed, classes).array(i), computed before
# MicroDGDomain became a MicroWorld: (domain, classes, seed, i) -> (digest, sample id).
REFERENCE = {
    ("photo", "colour", 0, 0): ("4277598f06e3dea1", "photo/red/0-0"),
    ("cartoon", "colour", 0, 1): ("e2f99e7d8a886dce", "cartoon/orange/0-1"),
    ("dermoscopy", "colour", 3, 19): ("913517a509efa9e8", "dermoscopy/black/3-19"),
    ("aerial", "colour", 0, 19): ("6ff66d08ff489a21", "aerial/black/0-19"),
    ("photo", "shape", 3, 1): ("4eaf8e928121effb", "photo/square/3-1"),
    ("xray", "shape", 0, 0): ("44a322deb15de253", "xray/circle/0-0"),
    ("xray", "shape", 3, 13): ("b989d72c3a1bbd63", "xray/heart/3-13"),
    ("cartoon", "shape", 0, 13): ("1dca9f34e83ff605", "cartoon/heart/0-13"),
}


@pytest.mark.parametrize("key", REFERENCE)
def test_micro_dg_images_are_byte_identical_to_before(key) -> None:
    domain, classes, seed, index = key
    ds = MicroDGDomain(domain, 2, seed=seed, classes=classes)
    assert isinstance(ds, MicroWorld)
    digest = hashlib.sha256(ds.array(index).tobytes()).hexdigest()[:16]
    assert (digest, ds.sample_id(index)) == REFERENCE[key]


def test_micro_world_takes_a_domain_spec() -> None:
    spec = DomainSpec(
        "mine", 4242, "cartoon", "a test", attribute_classes("shape", ["circle", "star"]),
        {"background": "leaf"},
    )  # fmt: skip
    world = MicroWorld(spec, images_per_class=3, seed=1)
    assert world.domain == "mine" and world.class_names == ["circle", "star"]
    assert world.targets == [0, 1, 0, 1, 0, 1]
    assert world.scene(3).shape == "star" and world.scene(3).background == "leaf"
    assert world.sample_id(3) == "mine/star/3"
    assert (world.array(2) == MicroWorld(spec, 2, seed=1).array(2)).all()
    with pytest.raises(CdfslError, match="images_per_class=0 for micro-world 'mine'"):
        MicroWorld(spec, images_per_class=0)


def test_subset_and_concat_keep_sample_ids() -> None:
    a, b = MicroWorld("isic-like", 2), MicroWorld("isic-like", 2, seed=1)
    sub = Subset(a, [3, 0])
    assert isinstance(sub, LabelledImages)
    assert sub.targets == [a.targets[3], a.targets[0]] and sub.class_names == a.class_names
    assert [sub.sample_id(i) for i in range(2)] == [a.sample_id(3), a.sample_id(0)]
    assert (sub.load(0).tobytes() == a.load(3).tobytes()) and len(sub) == 2

    both = ConcatImages([a, sub])
    assert ReexportedConcat is ConcatImages and isinstance(both, LabelledImages)
    assert len(both) == len(a) + 2 and both.targets == a.targets + sub.targets
    assert both.locate(len(a) + 1) == (sub, 1)
    assert both.sample_id(len(a)) == a.sample_id(3)
    assert b.class_names == both.class_names
    with pytest.raises(IndexError):
        both.locate(len(both))
    with pytest.raises(CdfslError, match="share one class list"):
        ConcatImages([a, MicroWorld("chestx-like", 1)])
    with pytest.raises(CdfslError, match="at least one dataset"):
        ConcatImages([])
