"""Views: configuration parsing, output layout, per-image randomness, reproducibility."""

from __future__ import annotations

import re

import pytest
import torch

from cdfsl.data import DEFAULT_VIEWS, ViewAugmenter, ViewSpec, clean_view_index, parse_views
from cdfsl.errors import DataError


def _images(batch: int = 4, size: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_default_views_are_the_spec_five() -> None:
    assert [(v.name, v.rotation, v.jitter, v.hflip) for v in DEFAULT_VIEWS] == [
        ("clean", 0.0, 0.0, False),
        ("rotate_jitter_flip", 45.0, 0.4, True),
        ("rotate", 45.0, 0.0, False),
        ("jitter", 0.0, 0.4, False),
        ("flip", 0.0, 0.0, True),
    ]
    assert clean_view_index(DEFAULT_VIEWS) == 0


def test_views_parse_from_plain_dicts() -> None:
    items = [{"name": "flip", "hflip": True}, {"name": "clean"}, {"name": "r", "rotation": 30}]
    views = parse_views(items)
    assert views == (ViewSpec("flip", hflip=True), ViewSpec("clean"), ViewSpec("r", rotation=30.0))
    assert isinstance(views[2].rotation, float)
    assert ViewSpec(**items[0]) == views[0]
    assert clean_view_index(views) == 1
    assert clean_view_index(views[:1]) is None
    assert clean_view_index(items) == 1
    assert ViewAugmenter(items).views == views


@pytest.mark.parametrize(
    ("items", "fragment"),
    [
        ([], "empty"),
        ([{"name": "a", "rotaton": 45}], "unknown key(s) ['rotaton']"),
        ([{"rotation": 45}], "no 'name'"),
        ([{"name": "a"}, {"name": "a", "hflip": True}], "repeat the name(s) ['a']"),
        ([{"name": "a", "rotation": -1}], "rotation=-1"),
        ([{"name": "a", "rotation": 270}], "at most 180"),
        ([{"name": "a", "jitter": "0.4"}], "jitter='0.4'"),
        ([{"name": "a", "hflip": "yes"}], "hflip='yes'"),
        (["clean"], "expected a mapping"),
    ],
)
def test_bad_views_are_data_errors(items: list, fragment: str) -> None:
    with pytest.raises(DataError) as err:
        parse_views(items)
    assert fragment in str(err.value)


def test_output_shape_order_and_view_ids() -> None:
    images = _images(batch=3)
    views = [ViewSpec("clean"), ViewSpec("flip", hflip=True), ViewSpec("clean2")]
    out, view_ids = ViewAugmenter(views)(images, torch.Generator().manual_seed(0))

    assert out.shape == (9, 3, 12, 12)
    assert out.dtype == images.dtype
    assert view_ids.dtype == torch.long
    assert view_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # Row v·B + b is view v of image b: both clean views reproduce the batch in order.
    assert torch.equal(out[0:3], images)
    assert torch.equal(out[6:9], images)


def test_clean_view_is_bit_identical_and_all_views_stay_in_range() -> None:
    images = _images(batch=6)
    images[0] = 1.0  # saturated pixels must not leave [0, 1] under brightness > 1
    out, _ = ViewAugmenter()(images, torch.Generator().manual_seed(1))

    assert torch.equal(out[:6], images)
    assert out.min() >= 0.0
    assert out.max() <= 1.0
    assert not torch.equal(out[6:12], images)  # rotate + jitter + flip changed something


@pytest.mark.parametrize("view", [ViewSpec("r", rotation=45), ViewSpec("j", jitter=0.4)])
def test_each_image_gets_its_own_parameters(view: ViewSpec) -> None:
    image = _images(batch=1, size=32)
    batch = image.expand(8, -1, -1, -1).contiguous()
    # Seed 3's eight angles are at least 2 degrees apart: nearest sampling maps angles within a
    # fraction of a degree to the same pixels (as PIL does), which is not the point here.
    out, _ = ViewAugmenter([view])(batch, torch.Generator().manual_seed(3))
    assert len({tuple(row.flatten().tolist()) for row in out}) == 8


def test_same_seed_same_output_different_seed_different_output() -> None:
    images = _images(batch=5)
    augment = ViewAugmenter()

    first, _ = augment(images, torch.Generator().manual_seed(7))
    again, _ = augment(images, torch.Generator().manual_seed(7))
    other, _ = augment(images, torch.Generator().manual_seed(8))

    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_global_rng_is_used_without_a_generator() -> None:
    images = _images(batch=2)
    augment = ViewAugmenter([ViewSpec("r", rotation=30)])
    torch.manual_seed(3)
    first, _ = augment(images)
    torch.manual_seed(3)
    again, _ = augment(images)
    assert torch.equal(first, again)


def test_flip_view_is_exactly_the_image_or_its_mirror() -> None:
    images = _images(batch=16)
    out, _ = ViewAugmenter([ViewSpec("flip", hflip=True)])(images, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images, strict=True)]
    kept = [torch.equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped)
    assert any(kept)


@pytest.mark.parametrize("shape", [(9, 9), (8, 14)])
def test_rotation_matches_torchvision_rotate_per_image(shape: tuple[int, int]) -> None:
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as tvf

    from cdfsl.data.views import _rotate

    images = torch.rand(3, 3, *shape, generator=torch.Generator().manual_seed(0))
    angles = torch.tensor([90.0, 30.0, -17.0])
    ours = _rotate(images, angles)
    for image, angle, rotated in zip(images, angles.tolist(), ours, strict=True):
        theirs = tvf.rotate(image, angle, interpolation=InterpolationMode.BILINEAR)
        torch.testing.assert_close(rotated, theirs, atol=1e-5, rtol=0)


def test_jitter_matches_torchvision_for_fixed_factors() -> None:
    from torchvision.transforms.v2 import functional as tvf

    from cdfsl.data.views import _blend, _grayscale

    image = _images(batch=1)
    factor = torch.tensor([1.3])
    ours = _blend(image, 0.0, factor)
    ours = _blend(ours, _grayscale(ours).mean(dim=(1, 2, 3), keepdim=True), factor)
    ours = _blend(ours, _grayscale(ours), factor)
    theirs = tvf.adjust_saturation(tvf.adjust_contrast(tvf.adjust_brightness(image, 1.3), 1.3), 1.3)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_half_precision_input_keeps_its_dtype() -> None:
    images = _images(batch=2).to(torch.bfloat16)
    out, _ = ViewAugmenter()(images, torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[:2], images)


def test_rejects_non_image_batches() -> None:
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\)"):
        ViewAugmenter()(torch.rand(3, 12, 12))


def test_augmenter_reports_its_views() -> None:
    augment = ViewAugmenter()
    assert len(augment) == 5
    assert augment.clean_view == 0
    assert ViewAugmenter([ViewSpec("flip", hflip=True)]).clean_view is None


@pytest.mark.cuda
def test_cuda_batch_gets_the_same_parameters_as_cpu() -> None:
    images = _images(batch=4)
    cpu, cpu_ids = ViewAugmenter()(images, torch.Generator().manual_seed(5))
    gpu, gpu_ids = ViewAugmenter()(images.cuda(), torch.Generator().manual_seed(5))
    assert gpu.device.type == gpu_ids.device.type == "cuda"
    assert torch.equal(gpu_ids.cpu(), cpu_ids)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


def _pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy())


def _from_pil(image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def _uint8_images(batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, 23, 19), generator=generator).float() / 255


def test_pil_uint8_jitter_is_pil_image_enhance_bit_for_bit() -> None:
    """The reference's ImageJitter: Brightness, Contrast, Color in turn on a PIL image."""
    from PIL import ImageEnhance

    from cdfsl.data.views import _jitter_pil_uint8

    images = _uint8_images(24)
    generator = torch.Generator().manual_seed(1)
    factors = tuple(0.6 + 0.8 * torch.rand(24, generator=generator) for _ in range(3))
    ours = _jitter_pil_uint8(images, factors)
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for index, image in enumerate(images):
        pil = _pil(image)
        for enhancer, factor in zip(enhancers, factors, strict=True):
            pil = enhancer(pil).enhance(float(factor[index]))
        assert torch.equal(ours[index], _from_pil(pil)), f"image {index}"
    # The float arithmetic of ColorJitter is another result (the option matters).
    from cdfsl.data.views import _jitter_float

    assert not torch.equal(_jitter_float(images, factors), ours)


def test_nearest_rotation_is_pil_rotate() -> None:
    """torchvision's RandomRotation on a PIL image: PIL rotate, nearest, black corners. Bit for
    bit on small images; PIL finds source pixels in 16.16 fixed point and cdfsl in float32, so
    at 224 px a pixel on a rounding boundary may take its neighbour (measured: 0.1%)."""
    from PIL import Image

    from cdfsl.data.views import _rotate

    images = _uint8_images(16, seed=2)
    angles = torch.linspace(-45, 45, 16)
    ours = _rotate(images, angles, "nearest")
    for image, angle, rotated in zip(images, angles.tolist(), ours, strict=True):
        theirs = _from_pil(_pil(image).rotate(angle, resample=Image.NEAREST))
        assert torch.equal(rotated, theirs), f"angle {angle}"
    large = torch.randint(0, 256, (4, 3, 224, 224), generator=torch.Generator().manual_seed(3))
    large = large.float() / 255
    angles = torch.tensor([-40.3, -7.7, 12.9, 44.1])
    ours = _rotate(large, angles, "nearest")
    same = 0
    for image, angle, rotated in zip(large, angles.tolist(), ours, strict=True):
        theirs = _from_pil(_pil(image).rotate(angle, resample=Image.NEAREST))
        same += int((rotated == theirs).all(dim=0).sum())
    assert same / (4 * 224 * 224) > 0.997
    assert not torch.equal(ours, _rotate(large, angles, "bilinear"))


def test_augmenter_defaults_are_the_reference_pipeline_and_options_are_checked() -> None:
    images = _uint8_images(6, seed=3)
    rotate = [ViewSpec("r", rotation=45)]
    reference, _ = ViewAugmenter(rotate)(images, torch.Generator().manual_seed(0))
    # Nearest sampling keeps every value on the 8-bit grid; bilinear leaves it.
    assert torch.equal((reference * 255).round() / 255, reference)
    smooth, _ = ViewAugmenter(rotate, rotation_interpolation="bilinear")(
        images, torch.Generator().manual_seed(0)
    )
    assert not torch.equal((smooth * 255).round() / 255, smooth)
    with pytest.raises(DataError, match="rotation_interpolation='bicubic'"):
        ViewAugmenter(rotate, rotation_interpolation="bicubic")
    with pytest.raises(DataError, match=r"color_jitter='hsv'.*\['float', 'pil_uint8'\]"):
        ViewAugmenter(rotate, color_jitter="hsv")


def _ks_uniform(values: torch.Tensor, low: float, high: float) -> float:
    """Kolmogorov-Smirnov distance between the sample and U(low, high)."""
    x = ((values.double().sort().values - low) / (high - low)).clamp(0, 1)
    n = len(x)
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - x
    below = x - torch.arange(0, n, dtype=torch.float64) / n
    return max(above.max().item(), below.max().item())


def test_rotation_angles_are_uniform_on_both_sides(monkeypatch):
    """Angles ~ U(−r, r) by a KS test (α = 0.001: D < 1.95/√n); U(0, r) would give D ≈ 0.5."""
    import cdfsl.data.views as views

    seen: list[torch.Tensor] = []
    original = views._rotate

    def record(images, degrees, interpolation="bilinear"):
        seen.append(degrees.clone())
        return original(images, degrees, interpolation)

    monkeypatch.setattr(views, "_rotate", record)
    augment = ViewAugmenter([ViewSpec("r", rotation=30)])
    augment(torch.rand(2000, 3, 2, 2), torch.Generator().manual_seed(0))
    angles = torch.cat(seen)
    assert len(angles) == 2000 and angles.abs().max() <= 30
    assert _ks_uniform(angles, -30, 30) < 1.95 / len(angles) ** 0.5


def test_jitter_factors_are_uniform_in_one_plus_minus_strength(monkeypatch):
    """Brightness, contrast and saturation factors each ~ U(1 − j, 1 + j), drawn per image."""
    augment = ViewAugmenter([ViewSpec("j", jitter=0.4)])
    seen: list[tuple[torch.Tensor, ...]] = []

    def record(images, factors):
        seen.append(factors)
        return images

    monkeypatch.setattr(augment, "jitter", record)
    augment(torch.rand(2000, 3, 2, 2), torch.Generator().manual_seed(0))
    brightness, contrast, saturation = seen[0]
    for factor in (brightness, contrast, saturation):
        assert len(factor) == 2000
        assert _ks_uniform(factor, 0.6, 1.4) < 1.95 / 2000**0.5
    assert not torch.equal(brightness, contrast)  # three draws, not one reused


def test_each_image_position_is_flipped_half_the_time():
    """Per image position over 400 draws: flipped at rate 0.5 within 5 SEs (± 0.125)."""
    images = _images(batch=10, size=4)
    augment = ViewAugmenter([ViewSpec("flip", hflip=True)])
    generator = torch.Generator().manual_seed(0)
    flips = torch.zeros(10)
    draws = 400
    for _ in range(draws):
        out, _ = augment(images, generator)
        pairs = zip(out, images, strict=True)
        flips += torch.tensor([torch.equal(o, i.flip(-1)) for o, i in pairs]).float()
    rate = flips / draws
    assert ((rate - 0.5).abs() < 5 * (0.25 / draws) ** 0.5).all(), rate.tolist()


# -- mutation follow-up (issue 23): boundaries, messages, dtypes, devices, exact draws -----------


def test_view_spec_names_must_be_non_empty_strings() -> None:
    for name in ("", 3):
        message = f"view name {name!r}; expected a non-empty string; name the view"
        with pytest.raises(DataError, match=re.escape(message)):
            ViewSpec(name)  # type: ignore[arg-type]


def test_view_spec_bounds_and_their_messages() -> None:
    assert ViewSpec("a", rotation=180).rotation == 180.0  # at most 180: 180 itself is fine
    message = "view 'a': rotation=180.5; expected at most 180 degrees; lower it"
    with pytest.raises(DataError, match=re.escape(message)):
        ViewSpec("a", rotation=180.5)
    message = "view 'a': jitter=-1; expected a finite number >= 0; fix the view"
    with pytest.raises(DataError, match=re.escape(message)):
        ViewSpec("a", jitter=-1)


def test_view_errors_name_the_views_position_or_none() -> None:
    from cdfsl.data.views import _view_from

    allowed = "['name', 'rotation', 'jitter', 'hflip']"
    with pytest.raises(
        DataError, match=re.escape(f"view 1 is 'clean'; expected a mapping with keys {allowed}")
    ):
        parse_views([{"name": "a"}, "clean"])
    with pytest.raises(
        DataError,
        match=re.escape(f"view 0 {{'rotation': 4}} has no 'name'; expected keys {allowed}"),
    ):
        parse_views([{"rotation": 4}])
    # Read one at a time (jsonargparse's deserializer), a view has no position.
    with pytest.raises(
        DataError, match=re.escape(f"view is 'clean'; expected a mapping with keys {allowed}")
    ):
        _view_from("clean", None)
    message = "views list is empty; expected at least one view; add a clean view"
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        parse_views([])


def test_views_parse_from_namespaces_and_print_as_mappings() -> None:
    from jsonargparse import ArgumentParser, Namespace

    from cdfsl.data.views import _serialize_view

    assert parse_views([Namespace(name="r", rotation=30)]) == (ViewSpec("r", rotation=30.0),)
    parser = ArgumentParser()
    parser.add_argument("--views", type=list[ViewSpec])
    config = parser.parse_args(['--views=[{"name": "r", "rotation": 30}, {"name": "c"}]'])
    assert config.views == [ViewSpec("r", rotation=30.0), ViewSpec("c")]
    dumped = parser.dump(config)
    assert "- name: r\n  rotation: 30.0\n  jitter: 0.0\n  hflip: false\n- name: c\n" in dumped
    assert _serialize_view(ViewSpec("f", hflip=True)) == {
        "name": "f", "rotation": 0.0, "jitter": 0.0, "hflip": True,
    }  # fmt: skip
    assert _serialize_view(Namespace(name="a", jitter=0.2)) == {"name": "a", "jitter": 0.2}
    assert _serialize_view({"name": "b", "hflip": True}) == {"name": "b", "hflip": True}


def _jitter_reference(image: torch.Tensor, b: float, c: float, s: float) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as tvf

    return tvf.adjust_saturation(tvf.adjust_contrast(tvf.adjust_brightness(image, b), c), s)


def test_float_jitter_is_torchvision_per_image_with_the_generators_draws() -> None:
    # Factors drawn from the generator in the fixed order brightness, contrast, saturation, each
    # U(1 - j, 1 + j) per image; float64 images stay float64 (compared at 1e-12).
    images = _images(batch=5).double()
    augment = ViewAugmenter([ViewSpec("j", jitter=0.4)], color_jitter="float")
    out, _ = augment(images, torch.Generator().manual_seed(4))
    generator = torch.Generator().manual_seed(4)
    factors = [(0.6 + 0.8 * torch.rand(5, generator=generator)).tolist() for _ in range(3)]
    assert out.dtype == torch.float64
    for image, b, c, s, ours in zip(images, *factors, out, strict=True):
        torch.testing.assert_close(ours, _jitter_reference(image, b, c, s), atol=1e-12, rtol=0)


def test_half_precision_images_are_jittered_in_float32() -> None:
    images = _images(batch=6).to(torch.bfloat16)
    augment = ViewAugmenter([ViewSpec("j", jitter=0.4)], color_jitter="float")
    out, _ = augment(images, torch.Generator().manual_seed(4))
    generator = torch.Generator().manual_seed(4)
    factors = [(0.6 + 0.8 * torch.rand(6, generator=generator)).tolist() for _ in range(3)]
    for image, b, c, s, ours in zip(images, *factors, out, strict=True):
        expected = _jitter_reference(image.float(), b, c, s).to(torch.bfloat16)
        # Within one bfloat16 step of the float32 answer (bfloat16 arithmetic is ~3 steps off).
        assert (ours.float() - expected.float()).abs().max() <= 2**-8


def test_small_rotations_rotate_by_the_generators_angles() -> None:
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as tvf

    images = _images(batch=4, size=16)
    augment = ViewAugmenter([ViewSpec("r", rotation=1.0)], rotation_interpolation="bilinear")
    out, _ = augment(images, torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(2)
    angles = (-1.0 + 2.0 * torch.rand(4, generator=generator)).tolist()
    for image, angle, ours in zip(images, angles, out, strict=True):
        theirs = tvf.rotate(image, angle, interpolation=InterpolationMode.BILINEAR)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_a_jitter_only_view_draws_no_angle() -> None:
    # rotation = 0: the first three draws are the jitter factors (no angle drawn before them).
    images = _images(batch=3)
    augment = ViewAugmenter([ViewSpec("j", jitter=0.4)], color_jitter="float")
    out, _ = augment(images, torch.Generator().manual_seed(9))
    generator = torch.Generator().manual_seed(9)
    factors = [(0.6 + 0.8 * torch.rand(3, generator=generator)).tolist() for _ in range(3)]
    for image, b, c, s, ours in zip(images, *factors, out, strict=True):
        torch.testing.assert_close(ours, _jitter_reference(image, b, c, s), atol=1e-5, rtol=0)


def test_rotation_by_90_degrees_in_float64_is_rot90_and_clamps_to_the_unit_range() -> None:
    from cdfsl.data.views import _rotate

    images = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    images[0, 0, 0, :3] = torch.tensor([-0.25, 1.25, 2.0], dtype=torch.float64)  # out of range
    expected = torch.rot90(images, 1, dims=(-2, -1)).clamp(0, 1)  # counter-clockwise
    for mode in ("bilinear", "nearest"):
        rotated = _rotate(images, torch.tensor([90.0, 90.0]), mode)
        assert rotated.dtype == torch.float64
        torch.testing.assert_close(rotated, expected, atol=1e-12, rtol=0)


def test_rotation_and_blend_raise_no_warnings() -> None:
    # align_corners is named (torch warns when it is left to its default).
    import warnings

    images = _images(batch=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ViewAugmenter([ViewSpec("r", rotation=30)])(images, torch.Generator().manual_seed(0))


def test_blend_keeps_the_images_dtype() -> None:
    from cdfsl.data.views import _blend

    images = torch.tensor([[[[0.25]], [[0.5]], [[1.0]]]])  # float32 (1, 3, 1, 1)
    factor = torch.tensor([1.5], dtype=torch.float64)
    out = _blend(images, 0.5, factor)
    assert out.dtype == torch.float32
    # 1.5·x - 0.5·0.5, clamped: 0.125, 0.5, 1.25 -> 1.
    assert out.flatten().tolist() == [0.125, 0.5, 1.0]


def test_pil_luma_is_pil_convert_l_including_the_rounding_tie() -> None:
    import numpy as np
    from PIL import Image

    from cdfsl.data.views import _pil_luma

    # A colour whose 16.16 weighted sum ends in 0x7FFF: PIL adds 2^15 and shifts, landing just
    # below the next integer; one more would round it up.
    r, g, b = 1, 63, 230
    rgb = np.array([[[r, g, b], [255, 0, 0], [0, 255, 0], [0, 0, 255], [12, 200, 77]]], np.uint8)
    assert (19595 * r + 38470 * g + 7471 * b) % 65536 == 32767
    expected = np.array(Image.fromarray(rgb).convert("L"), dtype=np.float32)
    values = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).float()
    luma = _pil_luma(values)
    assert luma.dtype == torch.float32
    assert luma[0, 0].tolist() == expected.tolist()


def test_pil_uint8_jitter_of_float64_images_and_factors_is_pil_bit_for_bit() -> None:
    """PIL blends in C floats with the factor as a C float; float64 inputs must not change that."""
    from PIL import ImageEnhance

    from cdfsl.data.views import _jitter_pil_uint8

    images = _uint8_images(24).double()
    steps = torch.tensor([0.7, 0.9, 1.1, 1.3, 0.6, 1.4], dtype=torch.float64)
    factors = tuple(steps.repeat(4).roll(k) for k in range(3))
    ours = _jitter_pil_uint8(images, factors)
    assert ours.dtype == torch.float64
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for index, image in enumerate(images):
        pil = _pil(image.float())
        for enhancer, factor in zip(enhancers, factors, strict=True):
            pil = enhancer(pil).enhance(float(factor[index]))
        assert torch.equal(ours[index].float(), _from_pil(pil)), f"image {index}"


def test_augmenter_of_cpu_images_ignores_a_non_cpu_default_device() -> None:
    # torch.set_default_device("cuda") in a user's script: CPU images still augment on the CPU,
    # with the same parameters.
    images = _uint8_images(3)
    expected, expected_ids = ViewAugmenter()(images, torch.Generator().manual_seed(5))
    with torch.device("meta"):
        seeded, ids = ViewAugmenter()(images, torch.Generator().manual_seed(5))
        unseeded, _ = ViewAugmenter()(images)
    assert seeded.device == ids.device == unseeded.device == torch.device("cpu")
    assert torch.equal(seeded, expected)
    assert torch.equal(ids, expected_ids)


def test_augmenter_moves_cpu_drawn_parameters_to_the_images_device() -> None:
    # A CPU generator drives images elsewhere (the meta device stands in for a GPU here; the CUDA
    # test compares values).
    images = torch.empty(4, 3, 8, 8, device="meta")
    out, view_ids = ViewAugmenter()(images, torch.Generator().manual_seed(0))
    assert out.device.type == view_ids.device.type == "meta"
    assert out.shape == (20, 3, 8, 8)


def test_flip_threshold_is_strict_at_one_half() -> None:
    # Seed 38's uniform draw number 654621 is exactly 0.5 (rand is on the 2^-24 grid): u < 0.5
    # flips, so that image is kept (P(flip) = 1/2 exactly, as RandomHorizontalFlip).
    position = 654_621
    draws = torch.rand(position + 1, generator=torch.Generator().manual_seed(38))
    assert draws[position].item() == 0.5
    generator = torch.Generator().manual_seed(38)
    torch.rand(position, generator=generator)
    images = _images(batch=1)
    out, _ = ViewAugmenter([ViewSpec("flip", hflip=True)])(images, generator)
    assert torch.equal(out, images)
    assert not torch.equal(images, images.flip(-1))


@pytest.mark.cuda
def test_cuda_generator_drives_cpu_images() -> None:
    # Parameters are drawn on the generator's device, then moved to the images'.
    images = _images(batch=4)
    on_cpu, _ = ViewAugmenter()(images, torch.Generator("cuda").manual_seed(5))
    on_gpu, _ = ViewAugmenter()(images.cuda(), torch.Generator("cuda").manual_seed(5))
    assert on_cpu.device.type == "cpu"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-4, rtol=0)


def test_pil_uint8_contrast_rounds_the_mean_of_a_large_image_as_pil() -> None:
    """PIL rounds the L image's mean in float64; a float32 mean of 160 801 pixels is off by
    more than the distance to the rounding tie here (mean 104.5 - 1/(2n))."""
    from PIL import ImageEnhance

    from cdfsl.data.views import _jitter_pil_uint8

    side = 401
    n = side * side
    total = (209 * n - 1) // 2  # 2·total = 209·n - 1: the mean sits just below 104.5
    grey = torch.full((n,), 104.0)
    grey[: total - 104 * n] += 1
    image = (grey / 255).view(1, 1, side, side).expand(1, 3, side, side).contiguous()
    ones, two = torch.ones(1), torch.full((1,), 2.0)
    ours = _jitter_pil_uint8(image, (ones, two, ones))
    pil = ImageEnhance.Contrast(_pil(image[0])).enhance(2.0)  # mean int(104.49.. + 0.5) = 104
    assert torch.equal(ours[0], _from_pil(pil))
    assert ours[0, 0, 0, 0].item() == pytest.approx(106 / 255)  # 104 + 2·(105 - 104)
