"""The feature cache: right features, computed once, never reused after an input changes."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from cdfsl.backbones import create_backbone
from cdfsl.features import (
    CACHE_ENV,
    FeatureCache,
    backbone_fingerprint,
    dataset_fingerprint,
    encode_images,
)


class Patches:
    """Six 20 px images of three classes; ``shift`` changes pixels but not ids; counts loads."""

    def __init__(self, shift: int = 0, ids: str = "img", n: int = 6) -> None:
        self.shift, self.ids, self.n, self.loads = shift, ids, n, 0

    @property
    def targets(self) -> list[int]:
        return [i % 3 for i in range(self.n)]

    @property
    def class_names(self) -> list[str]:
        return ["red square", "green square", "blue square"]

    def __len__(self) -> int:
        return self.n

    def load(self, index: int) -> Image.Image:
        self.loads += 1
        rng = np.random.default_rng([index, self.shift])
        return Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8), "RGB")

    def sample_id(self, index: int) -> str:
        return f"{self.ids}/{index}"


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return create_backbone("tiny-clip", None)


def test_features_are_the_normalised_image_embeddings(backbone, tmp_path):
    data = Patches()
    got = FeatureCache(tmp_path).image_features(backbone, data, progress=False)
    to_tensor = backbone.preprocess.to_tensor()
    images = torch.stack([to_tensor(data.load(i)) for i in range(len(data))])
    with torch.no_grad():
        expected = F.normalize(backbone.encode_image(backbone.normalize(images)).float(), dim=-1)
    assert torch.allclose(got.features, expected, atol=1e-5)
    assert torch.allclose(got.features.norm(dim=1), torch.ones(6))
    assert got.labels.tolist() == data.targets and got.sample_ids == [f"img/{i}" for i in range(6)]
    assert got.class_names == data.class_names


def test_second_call_reads_the_cache_without_loading_images(backbone, tmp_path):
    cache = FeatureCache(tmp_path)
    first = cache.image_features(backbone, Patches(), progress=False)
    again = Patches()
    second = cache.image_features(backbone, again, progress=False)
    # Only the fingerprint's probe images are loaded, never the whole dataset.
    assert again.loads <= 4 and (cache.hits, cache.misses) == (1, 1)
    assert torch.equal(first.features, second.features) and first.key == second.key
    assert not list(tmp_path.rglob("*.tmp"))  # written through a rename


def test_any_changed_input_is_a_cache_miss(backbone, tmp_path):
    cache = FeatureCache(tmp_path)
    base = cache.image_features(backbone, Patches(), progress=False)
    keys = {base.key}
    for data, identity in (
        (Patches(shift=1), None),  # same ids and count, other pixels
        (Patches(ids="other"), None),  # other sample ids
        (Patches(n=5), None),  # other count
        (Patches(), {"split": "test"}),  # other data config
    ):
        keys.add(cache.image_features(backbone, data, identity, progress=False).key)
    assert len(keys) == 5 and cache.hits == 0

    original = backbone.preprocess
    backbone.preprocess = replace(original, interpolation="bilinear")
    try:
        keys.add(cache.image_features(backbone, Patches(), progress=False).key)
    finally:
        backbone.preprocess = original
    with torch.no_grad():
        param = next(backbone.parameters())
        saved = param.clone()
        param.add_(1e-3)
        try:
            keys.add(cache.image_features(backbone, Patches(), progress=False).key)
        finally:
            param.copy_(saved)
    assert len(keys) == 7 and cache.hits == 0
    # Weights restored bit for bit: the first entry is found again.
    assert cache.image_features(backbone, Patches(), progress=False).key == base.key


def test_fingerprints_separate_random_inits_and_follow_content():
    a = create_backbone("tiny-clip", None, init_seed=1)
    b = create_backbone("tiny-clip", None, init_seed=1)
    c = create_backbone("tiny-clip", None, init_seed=2)
    assert backbone_fingerprint(a) == backbone_fingerprint(b) != backbone_fingerprint(c)
    assert dataset_fingerprint(Patches()) == dataset_fingerprint(Patches())
    assert dataset_fingerprint(Patches()) != dataset_fingerprint(Patches(shift=2))


def test_unreadable_entry_is_recomputed_and_root_follows_the_environment(
    backbone, tmp_path, monkeypatch
):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    cache = FeatureCache()
    assert cache.root == tmp_path / "env"
    first = cache.image_features(backbone, Patches(), progress=False)
    (entry,) = (tmp_path / "env").rglob("*.pt")
    entry.write_bytes(b"truncated")
    again = cache.image_features(backbone, Patches(), progress=False)
    assert cache.misses == 2 and torch.equal(first.features, again.features)


def test_text_features_cached_per_template_and_names(backbone, tmp_path):
    cache = FeatureCache(tmp_path)
    names = ["cat", "dog"]
    got = cache.text_features(backbone, names, "a photo of a {}.")
    assert torch.allclose(got, backbone.text_features(["a photo of a cat.", "a photo of a dog."]))
    cache.text_features(backbone, names, "a photo of a {}.")
    cache.text_features(backbone, names, "an image of a {}.")
    assert (cache.hits, cache.misses) == (1, 2)


def test_encode_images_restores_training_mode(backbone):
    backbone.train()
    feats = encode_images(backbone, Patches(n=3), batch_size=2, progress=False)
    assert feats.shape == (3, backbone.text_features(["x"]).shape[1]) and backbone.training
    backbone.eval()


def test_encode_images_frames_by_geometry(backbone):
    data = Patches(n=3)
    to_tensor = backbone.preprocess.to_tensor("resize_crop")
    with torch.no_grad():
        pixels = torch.stack([to_tensor(data.load(i)) for i in range(3)])
        want = F.normalize(backbone.eval().encode_image(backbone.normalize(pixels)).float(), dim=-1)
    got = encode_images(backbone, data, progress=False, geometry="resize_crop")
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, encode_images(backbone, data, progress=False), atol=1e-4)
