import open_clip
import pytest
import torch

from cdfsl.backbones import Backbone, create_backbone, list_backbones, weights_available
from cdfsl.backbones.registry import resolve_entry
from cdfsl.errors import CdfslError, WeightsError


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    return create_backbone("tiny-clip", pretrained=None)


def test_tiny_clip_takes_geometry_from_its_open_clip_config(tiny):
    cfg = open_clip.get_model_config("cdfsl-tiny-clip")
    assert tiny.preprocess.size == (cfg["vision_cfg"]["image_size"],) * 2
    assert tiny.preprocess.mean == open_clip.OPENAI_DATASET_MEAN
    images = torch.rand(3, 3, *tiny.preprocess.size)
    feats = tiny.encode_image(tiny.normalize(images))
    assert feats.shape == (3, cfg["embed_dim"])
    text = tiny.text_features(["a photo of a cat.", "a photo of a dog."])
    assert text.shape == (2, cfg["embed_dim"])
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_normalize_matches_the_definition(tiny):
    images = torch.rand(2, 3, 4, 4)
    mean = torch.tensor(tiny.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(tiny.preprocess.std).view(1, 3, 1, 1)
    assert torch.allclose(tiny.normalize(images), (images - mean) / std)


def test_to_tensor_squashes_to_input_size_in_unit_range(tiny):
    from PIL import Image

    image = Image.new("RGB", (50, 20), (255, 0, 128))
    tensor = tiny.preprocess.to_tensor()(image)
    assert tensor.shape == (3, *tiny.preprocess.size)
    assert tensor.dtype == torch.float32
    assert torch.allclose(tensor[:, 5, 5], torch.tensor([1.0, 0.0, 128 / 255]), atol=1e-2)


def test_geometries_frame_the_image_as_their_reference_pipelines():
    from PIL import Image

    from cdfsl.backbones.base import Preprocess

    pre = Preprocess((20, 20), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "nearest")
    # 200x200 blue with a 6 px red border (3% a side).
    framed = Image.new("RGB", (200, 200), (255, 0, 0))
    framed.paste((0, 0, 255), (6, 6, 194, 194))
    red = torch.tensor([1.0, 0.0, 0.0])
    # squash keeps the border; resize_crop resizes to int(20·1.15) = 23 and crops the central
    # 20, dropping 1.5 of 23 px a side (6.5% > 3%), so no red remains.
    assert torch.equal(pre.to_tensor("squash")(framed)[:, 0, 0], red)
    cropped = pre.to_tensor("resize_crop")(framed)
    assert cropped.shape == (3, 20, 20) and (cropped[0] == 0).all()
    # 300x100: red left and right thirds, blue centre square. short_side_crop keeps the centre
    # square only; squash keeps the red thirds.
    wide = Image.new("RGB", (300, 100), (255, 0, 0))
    wide.paste((0, 0, 255), (100, 0, 200, 100))
    assert (pre.to_tensor("short_side_crop")(wide)[0] == 0).all()
    assert torch.equal(pre.to_tensor("squash")(wide)[:, 10, 0], red)
    with pytest.raises(CdfslError, match="geometry='stretch'"):
        pre.to_tensor("stretch")


def test_local_checkpoint_file_reproduces_the_saved_model(tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    loaded = create_backbone("tiny-clip", pretrained=str(path))
    images = torch.rand(2, 3, *tiny.preprocess.size)
    with torch.no_grad():
        assert torch.equal(tiny.encode_image(images), loaded.encode_image(images))


def test_missing_weights_offline_fail_without_touching_the_network(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.delenv("CDFSL_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setattr(open_clip, "download_pretrained", no_network)
    with pytest.raises(WeightsError, match=r"tag 'openai'.*pretrained=/path/to/checkpoint"):
        create_backbone("clip-vit-b16", cache_dir=str(tmp_path))


def test_bad_tag_and_missing_file_are_named():
    with pytest.raises(WeightsError, match=r"no tag 'nope'.*known: openai"):
        create_backbone("clip-vit-b16", pretrained="nope")
    with pytest.raises(WeightsError, match=r"missing\.pt.*does not exist"):
        create_backbone("tiny-clip", pretrained="/no/such/missing.pt")
    with pytest.raises(WeightsError, match="unknown backbone 'not-a-model'"):
        create_backbone("not-a-model")


def test_registry_lists_rows_and_any_open_clip_name_resolves():
    names = {e.name for e in list_backbones()}
    assert {"clip-vit-b16", "tiny-clip"} <= names
    assert resolve_entry("ViT-B-32").model == "ViT-B-32"
    tiny_entry = resolve_entry("tiny-clip")
    assert weights_available(tiny_entry)  # random init needs no file


def test_local_dir_backbone_without_files_says_how_to_get_them(tmp_path):
    from cdfsl.backbones import BackboneEntry
    from cdfsl.backbones.registry import resolve_weights

    entry = BackboneEntry("mine", f"local-dir:{tmp_path}", None, how_to_get="run make-weights")
    assert not weights_available(entry)
    with pytest.raises(WeightsError, match=r"open_clip_config.json.*run make-weights"):
        resolve_weights(entry, "default")


def test_random_init_is_drawn_from_its_seed_and_leaves_the_global_generator():
    state = torch.random.get_rng_state()
    a, b = create_backbone("tiny-clip", None), create_backbone("tiny-clip", None)
    other = create_backbone("tiny-clip", None, init_seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    pa, pb, po = (dict(m.model.named_parameters()) for m in (a, b, other))
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert any(not torch.equal(pa[n], po[n]) for n in pa)
