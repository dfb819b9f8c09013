"""Augmentation views of the support set, as configuration.

Each fine-tuning step sees every support image in V views (the Mind paper's five by default: clean,
rotate + jitter + flip, rotate, jitter, flip). A view is a ``ViewSpec`` of plain numbers, so a
recipe lists views in YAML and ``ViewSpec(**item)`` reads them; nothing assumes V = 5. For
jsonargparse a ``ViewSpec`` is a registered type that reads from and prints as that mapping, so
``--print_config`` writes the views a recipe can read back.

``ViewAugmenter`` works on a batch already at model resolution, on whatever device it lives, and
draws separate random parameters for every image. Normalisation is the backbone's job, not this.
How a rotation samples (:data:`ROTATION_INTERPOLATIONS`) and how jitter computes
(:data:`COLOR_JITTERS`) are named options; the defaults are the Mind reference's pipeline
(torchvision's ``RandomRotation`` on a PIL image: nearest; Facebook's ``ImageJitter``: PIL
``ImageEnhance`` on 8-bit images).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as functional
from jsonargparse import Namespace
from jsonargparse.typing import register_type
from torch import Tensor

from cdfsl.errors import DataError
from cdfsl.registry import Registry

__all__ = [
    "COLOR_JITTERS",
    "DEFAULT_VIEWS",
    "ROTATION_INTERPOLATIONS",
    "ViewAugmenter",
    "ViewSpec",
    "clean_view_index",
    "parse_views",
]

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale, so jitter matches ColorJitter.
_LUMA = (0.2989, 0.587, 0.114)
# PIL's RGB -> L conversion in 16-bit fixed point: (R·19595 + G·38470 + B·7471 + 2^15) >> 16.
_PIL_LUMA = (19595, 38470, 7471)


@dataclass(frozen=True)
class ViewSpec:
    """One augmentation view.

    rotation: maximum degrees of a random rotation, angle uniform in [-rotation, rotation],
    corners filled with black; jitter: strength of random brightness, contrast and saturation
    changes, each factor uniform in [max(0, 1 - jitter), 1 + jitter] as torchvision's
    ColorJitter; hflip: mirror left-right with probability 0.5. All zero/False: the clean view.
    """

    name: str
    rotation: float = 0.0
    jitter: float = 0.0
    hflip: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise DataError(f"view name {self.name!r}; expected a non-empty string; name the view")
        for field in ("rotation", "jitter"):
            value = getattr(self, field)
            # bool is an int subclass; "rotation: yes" in YAML is a mistake, not 1 degree.
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DataError(
                    f"view {self.name!r}: {field}={value!r}; expected a number; fix the view"
                )
            if not math.isfinite(value) or value < 0:
                raise DataError(
                    f"view {self.name!r}: {field}={value}; expected a finite number >= 0; fix "
                    "the view"
                )
            object.__setattr__(self, field, float(value))
        if self.rotation > 180:
            raise DataError(
                f"view {self.name!r}: rotation={self.rotation}; expected at most 180 degrees; "
                "lower it"
            )
        if not isinstance(self.hflip, bool):
            raise DataError(
                f"view {self.name!r}: hflip={self.hflip!r}; expected true or false; fix the view"
            )

    @property
    def is_clean(self) -> bool:
        """True when the view changes nothing (resize only)."""
        return self.rotation == 0 and self.jitter == 0 and not self.hflip


DEFAULT_VIEWS: tuple[ViewSpec, ...] = (
    ViewSpec("clean"),
    ViewSpec("rotate_jitter_flip", rotation=45.0, jitter=0.4, hflip=True),
    ViewSpec("rotate", rotation=45.0),
    ViewSpec("jitter", jitter=0.4),
    ViewSpec("flip", hflip=True),
)


def _view_from(item: object, position: int | None) -> ViewSpec:
    """One view from a spec or a mapping; ``position`` in the views list, if known, for errors."""
    if isinstance(item, ViewSpec):
        return item
    if isinstance(item, Namespace):
        item = vars(item)
    allowed = [f.name for f in fields(ViewSpec)]
    label = "view" if position is None else f"view {position}"
    if not isinstance(item, Mapping):
        raise DataError(
            f"{label} is {item!r}; expected a mapping with keys {allowed}; fix the views list"
        )
    unknown = sorted(set(item) - set(allowed))
    if unknown or "name" not in item:
        problem = f"unknown key(s) {unknown}" if unknown else "no 'name'"
        raise DataError(
            f"{label} {dict(item)!r} has {problem}; expected keys {allowed}; fix the views list"
        )
    return ViewSpec(**item)  # type: ignore[arg-type]


def parse_views(views: Sequence[ViewSpec | Mapping[str, object]]) -> tuple[ViewSpec, ...]:
    """Views from specs or plain dicts (as read from YAML); at least one, with distinct names."""
    parsed = [_view_from(item, position) for position, item in enumerate(views)]
    if not parsed:
        raise DataError("views list is empty; expected at least one view; add a clean view")
    names = [v.name for v in parsed]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(
            f"views repeat the name(s) {repeated}; expected distinct names; rename them"
        )
    return tuple(parsed)


def _serialize_view(view: ViewSpec | Namespace | Mapping[str, object]) -> dict[str, object]:
    """A view as the mapping a recipe writes: ``{name, rotation, jitter, hflip}``."""
    if isinstance(view, ViewSpec):
        return {f.name: getattr(view, f.name) for f in fields(ViewSpec)}
    return dict(vars(view) if isinstance(view, Namespace) else view)


# jsonargparse reads a recipe's view mapping into a ViewSpec (its DataError, not a ValueError, so
# that the CLI reports the view's own message) and prints a ViewSpec back as that mapping.
register_type(
    ViewSpec, serializer=_serialize_view, deserializer=lambda item: _view_from(item, None),
    deserializer_exceptions=(),
)  # fmt: skip


def clean_view_index(views: Sequence[ViewSpec | Mapping[str, object]]) -> int | None:
    """Position of the first view that changes nothing, or None if every view augments."""
    specs = [v if isinstance(v, ViewSpec) else ViewSpec(**v) for v in views]  # type: ignore[arg-type]
    return next((i for i, view in enumerate(specs) if view.is_clean), None)


def _uniform(
    n: int, low: float, high: float, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    # Parameters are drawn on the generator's device (CPU by default) and then moved, so a seeded
    # CPU generator gives the same parameters whether the images are on CPU or GPU.
    draw_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(n, generator=generator, device=draw_device)
    return (low + (high - low) * u).to(device)


def _grayscale(images: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    r, g, b = images.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(images: Tensor, other: Tensor | float, factor: Tensor) -> Tensor:
    """factor · images + (1 - factor) · other, clamped to [0, 1]; factor: (B,)."""
    factor = factor.to(images.dtype).view(-1, 1, 1, 1)
    return (factor * images + (1 - factor) * other).clamp(0, 1)


def _rotate(images: Tensor, degrees: Tensor, interpolation: str = "bilinear") -> Tensor:
    """Rotate each image about its centre by its own angle; degrees: (B,); black corners.

    A positive angle turns the image counter-clockwise on screen, as ``PIL.Image.rotate``;
    ``interpolation`` is a ``grid_sample`` mode (``nearest`` keeps 8-bit values on their grid).
    """
    batch, _, height, width = images.shape
    radians = torch.deg2rad(degrees.to(images.dtype))
    cos, sin = radians.cos(), radians.sin()
    # affine_grid works in [-1, 1] coordinates on both axes; scaling the off-diagonal terms by the
    # aspect ratio makes it a true rotation in pixels for non-square images.
    theta = torch.zeros(batch, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * height / width
    theta[:, 1, 0] = sin * width / height
    theta[:, 1, 1] = cos
    grid = functional.affine_grid(theta, list(images.shape), align_corners=False)
    rotated = functional.grid_sample(
        images, grid, mode=interpolation, padding_mode="zeros", align_corners=False
    )
    return rotated.clamp(0, 1)


def _jitter_float(images: Tensor, factors: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """torchvision ColorJitter's blends on floats: brightness, contrast, saturation."""
    brightness, contrast, saturation = factors
    out = _blend(images, 0.0, brightness)
    out = _blend(out, _grayscale(out).mean(dim=(1, 2, 3), keepdim=True), contrast)
    return _blend(out, _grayscale(out), saturation)


def _pil_luma(values: Tensor) -> Tensor:
    """(B, 3, H, W) 8-bit values (float) -> (B, 1, H, W) PIL "L" values, rounded as PIL does."""
    v = values.to(torch.int32)
    weighted = _PIL_LUMA[0] * v[:, 0] + _PIL_LUMA[1] * v[:, 1] + _PIL_LUMA[2] * v[:, 2]
    return ((weighted + 32768) >> 16).unsqueeze(1).to(values.dtype)


def _pil_blend(degenerate: Tensor | float, values: Tensor, factor: Tensor) -> Tensor:
    """``PIL.Image.blend(degenerate, image, factor)`` on 8-bit values held in float32.

    PIL computes ``in1 + factor·(in2 − in1)`` in C floats and truncates to an integer in
    [0, 255]; two float32 operations here, so the rounding is the same.
    """
    factor = factor.to(torch.float32).view(-1, 1, 1, 1)
    return (degenerate + factor * (values - degenerate)).trunc().clamp(0, 255)


def _jitter_pil_uint8(images: Tensor, factors: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """PIL ``ImageEnhance`` Brightness, Contrast, Color in turn, on 8-bit images.

    Each enhancement rounds to an 8-bit image, as the Mind reference's ``ImageJitter`` on PIL
    images: inputs are taken to the 8-bit grid first (exact for framed images, which are
    ``uint8 / 255``). Contrast blends with the rounded mean of the L image, Color with the L
    image itself.
    """
    brightness, contrast, saturation = factors
    values = (images.to(torch.float32) * 255).round()
    values = _pil_blend(0.0, values, brightness)
    luma = _pil_luma(values)
    mean = (luma.to(torch.float64).mean(dim=(1, 2, 3), keepdim=True) + 0.5).floor()
    values = _pil_blend(mean.to(torch.float32), values, contrast)
    values = _pil_blend(_pil_luma(values), values, saturation)
    return (values / 255).to(images.dtype)


#: How a rotated view samples the source: name -> ``grid_sample`` mode. ``nearest`` is
#: torchvision's ``RandomRotation`` default on PIL images (the Mind reference's); ``bilinear``
#: interpolates (cdfsl before engine 3).
ROTATION_INTERPOLATIONS: Registry[str, str] = Registry(
    "rotation interpolation", {"nearest": "nearest", "bilinear": "bilinear"}, error=DataError
)

#: How colour jitter computes, given its three factors: ``pil_uint8`` PIL ``ImageEnhance`` on
#: 8-bit images, rounded after each enhancement (the Mind reference's ``ImageJitter``);
#: ``float`` torchvision ``ColorJitter``'s blends on floats (cdfsl before engine 3).
COLOR_JITTERS: Registry[str, Callable[[Tensor, tuple[Tensor, Tensor, Tensor]], Tensor]] = Registry(
    "colour jitter",
    {
        "pil_uint8": _jitter_pil_uint8,
        "float": _jitter_float,
    },
    error=DataError,
)


class ViewAugmenter:
    """Applies every view to every image of a batch, each image with its own random parameters.

    ``augmenter(images, generator)``: images (B, 3, H, W) float in [0, 1] at model resolution, on
    any device -> (augmented (V·B, 3, H, W) in [0, 1], view_ids (V·B,) int64), where row v·B + b
    is view v of image b. A clean view returns its input bit for bit. Random parameters come from
    ``generator`` (the global CPU RNG when None) in a fixed order, so a seeded generator gives the
    same output on every run and on CPU or GPU (up to floating-point differences of the device).
    """

    def __init__(
        self,
        views: Sequence[ViewSpec | Mapping[str, object]] = DEFAULT_VIEWS,
        rotation_interpolation: str = "nearest",
        color_jitter: str = "pil_uint8",
    ) -> None:
        self.views: tuple[ViewSpec, ...] = parse_views(views)
        self.rotation_mode = ROTATION_INTERPOLATIONS.lookup(
            rotation_interpolation, "rotation_interpolation"
        )
        self.jitter = COLOR_JITTERS.lookup(color_jitter, "color_jitter")

    def __len__(self) -> int:
        return len(self.views)

    @property
    def clean_view(self) -> int | None:
        """Position of the first clean view, or None."""
        return clean_view_index(self.views)

    @torch.no_grad()
    def __call__(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"ViewAugmenter got images of shape {tuple(images.shape)} and dtype "
                f"{images.dtype}; expected (B, 3, H, W) float in [0, 1]; convert with to_tensor"
            )
        outputs = [self._apply(view, images, generator) for view in self.views]
        view_ids = torch.arange(len(self.views), device=images.device).repeat_interleave(
            images.shape[0]
        )
        return torch.cat(outputs), view_ids

    def _apply(self, view: ViewSpec, images: Tensor, generator: torch.Generator | None) -> Tensor:
        if view.is_clean:
            return images
        batch, device = images.shape[0], images.device
        # grid_sample and the blends are not implemented for half types on every device.
        out = images if images.dtype in (torch.float32, torch.float64) else images.float()
        if view.rotation > 0:
            angles = _uniform(batch, -view.rotation, view.rotation, generator, device)
            out = _rotate(out, angles, self.rotation_mode)
        if view.jitter > 0:
            # Fixed order brightness -> contrast -> saturation (as ImageJitter; ColorJitter
            # permutes them).
            low, high = max(0.0, 1.0 - view.jitter), 1.0 + view.jitter
            factors = tuple(_uniform(batch, low, high, generator, device) for _ in range(3))
            out = self.jitter(out, factors)
        if view.hflip:
            flip = _uniform(batch, 0.0, 1.0, generator, device) < 0.5
            out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
        return out.to(images.dtype)
