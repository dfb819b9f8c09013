"""Augmentation views of the support set, as configuration.

Each fine-tuning step sees every support image in V views (the spec's five by default: clean,
rotate + jitter + flip, rotate, jitter, flip). A view is a ``ViewSpec`` of plain numbers, so a
recipe lists views in YAML and ``ViewSpec(**item)`` reads them; nothing assumes V = 5. For
jsonargparse a ``ViewSpec`` is a registered type that reads from and prints as that mapping, so
``--print_config`` writes the views a recipe can read back.

``ViewAugmenter`` works on a batch already at model resolution, on whatever device it lives, and
draws separate random parameters for every image. Normalisation is the backbone's job, not this.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as functional
from jsonargparse import Namespace
from jsonargparse.typing import register_type
from torch import Tensor

from cdfsl.errors import DataError

__all__ = ["DEFAULT_VIEWS", "ViewAugmenter", "ViewSpec", "clean_view_index", "parse_views"]

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale, so jitter matches ColorJitter.
_LUMA = (0.2989, 0.587, 0.114)


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


def _rotate(images: Tensor, degrees: Tensor) -> Tensor:
    """Rotate each image about its centre by its own angle; degrees: (B,); black corners."""
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
        images, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return rotated.clamp(0, 1)


class ViewAugmenter:
    """Applies every view to every image of a batch, each image with its own random parameters.

    ``augmenter(images, generator)``: images (B, 3, H, W) float in [0, 1] at model resolution, on
    any device -> (augmented (V·B, 3, H, W) in [0, 1], view_ids (V·B,) int64), where row v·B + b
    is view v of image b. A clean view returns its input bit for bit. Random parameters come from
    ``generator`` (the global CPU RNG when None) in a fixed order, so a seeded generator gives the
    same output on every run and on CPU or GPU (up to floating-point differences of the device).
    """

    def __init__(self, views: Sequence[ViewSpec | Mapping[str, object]] = DEFAULT_VIEWS) -> None:
        self.views: tuple[ViewSpec, ...] = parse_views(views)

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
            out = _rotate(out, _uniform(batch, -view.rotation, view.rotation, generator, device))
        if view.jitter > 0:
            # Fixed order brightness -> contrast -> saturation (ColorJitter permutes them).
            low, high = max(0.0, 1.0 - view.jitter), 1.0 + view.jitter
            out = _blend(out, 0.0, _uniform(batch, low, high, generator, device))
            mean = _grayscale(out).mean(dim=(1, 2, 3), keepdim=True)
            out = _blend(out, mean, _uniform(batch, low, high, generator, device))
            out = _blend(out, _grayscale(out), _uniform(batch, low, high, generator, device))
        if view.hflip:
            flip = _uniform(batch, 0.0, 1.0, generator, device) < 0.5
            out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
        return out.to(images.dtype)
