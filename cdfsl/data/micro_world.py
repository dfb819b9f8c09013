"""A small, fully seeded procedural world: captioned source images and five labelled domains.

Real VLM weights and the CDFSL datasets cannot be downloaded offline, so cdfsl draws its own
world: groups of coloured shapes (shape, colour, count, size, position, texture) on a
background, described by captions built from templates over those attributes. A micro CLIP is
pretrained on the ``source`` stream (``cdfsl.pretrain_micro``) and evaluated on four target
domains that move away from it the way the BSCD-FSL targets move away from ImageNet:

==============  =========================================================  ===============
domain          look                                                       like
==============  =========================================================  ===============
source          flat shapes on light/dark/grass/sand/water/brick           pretraining
crop-like       cartoon: pale posterised fills, dark outlines, blotched leaf  CropDisease
eurosat-like    top-down grid of many small shapes on hazy field patches   EuroSAT
isic-like       one large centred shape, skin backdrop, warm cast, blur,   ISIC2018
                hairs and a dark circular vignette
chestx-like     grayscale, low contrast, noisy, ribs; classes differ by    ChestX
                shape / count / position only (colour carries no signal)
==============  =========================================================  ===============

Objects sit in the cells of a 5 x 5 lattice, one cell per patch of the micro CLIP's ViT (see
``GRID``). Some target classes are compositions the source never shows nor captions
(``HELD_OUT``), e.g. "orange triangle": the words are known, the pairing is new. Every image is
a pure function of ``(domain, seed, index)``: its random generator is
``numpy.random.default_rng([uid, seed, index])`` with a fixed integer ``uid`` per domain, so
images are identical across runs and machines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cdfsl.errors import CdfslError

IMAGE_SIZE = 60
"""Side of every generated image in pixels (the micro CLIP sees 5 x 5 patches of 12 px)."""

_SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-filtered down, for anti-aliased edges

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross", "heart")
PLURALS: Mapping[str, str] = MappingProxyType(
    {s: s + ("es" if s == "cross" else "s") for s in SHAPES}
)

COLOURS: Mapping[str, tuple[float, float, float]] = MappingProxyType(
    {
        "red": (0.86, 0.12, 0.12),
        "orange": (0.96, 0.52, 0.08),
        "yellow": (0.95, 0.88, 0.15),
        "green": (0.16, 0.66, 0.2),
        "blue": (0.14, 0.3, 0.88),
        "purple": (0.55, 0.2, 0.72),
        "pink": (0.98, 0.56, 0.74),
        "brown": (0.5, 0.3, 0.14),
        "white": (0.97, 0.97, 0.97),
        "black": (0.06, 0.06, 0.06),
    }
)
COUNTS: Mapping[str, tuple[int, int]] = MappingProxyType(
    {"one": (1, 1), "two": (2, 2), "three": (3, 3), "many": (5, 8)}
)
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: Mapping[str, str] = MappingProxyType(
    {
        "left": "on the left",
        "right": "on the right",
        "top": "at the top",
        "bottom": "at the bottom",
        "center": "in the center",
    }
)
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted")
BACKGROUNDS: Mapping[str, str] = MappingProxyType(
    {
        "light": "on a light background",
        "dark": "on a dark background",
        "grass": "on grass",
        "sand": "on sand",
        "water": "on water",
        "brick": "on bricks",
    }
)

HELD_OUT: frozenset[frozenset[tuple[str, str]]] = frozenset(
    frozenset(pair)
    for pair in (
        (("colour", "orange"), ("shape", "triangle")),
        (("colour", "white"), ("shape", "heart")),
        (("colour", "pink"), ("shape", "star")),
        (("colour", "brown"), ("shape", "square")),
        (("colour", "blue"), ("shape", "cross")),
        (("colour", "purple"), ("shape", "diamond")),
        (("count", "two"), ("shape", "cross")),
        (("count", "three"), ("shape", "heart")),
    )
)
"""Attribute pairs the source never draws nor captions; target classes use them."""

GRID = 5
"""Objects sit on a GRID x GRID lattice of cells, one cell per ViT patch of the micro CLIP.

A ViT trained from scratch for minutes learns colour and position fast but shape slowly when
shapes land at arbitrary offsets inside patches (a linear patch embedding must learn every
shape at every offset); centred in patch-sized cells, each shape is one consistent token
pattern (small) or one consistent block of tokens (large)."""

# Small objects of a group fill distinct cells of their region; a group is "on the left" only if
# it reaches column 0, and so on, so the five regions never describe the same group.
_REGION_CELLS: Mapping[str, tuple[tuple[int, int], ...]] = MappingProxyType(
    {
        "left": tuple((c, r) for c in (0, 1) for r in (1, 2, 3)),
        "right": tuple((c, r) for c in (3, 4) for r in (1, 2, 3)),
        "top": tuple((c, r) for r in (0, 1) for c in (1, 2, 3)),
        "bottom": tuple((c, r) for r in (3, 4) for c in (1, 2, 3)),
        "center": ((2, 2), (1, 2), (3, 2), (2, 1), (2, 3)),
    }
)
_REGION_ANCHORS: Mapping[str, Callable[[tuple[int, int]], bool]] = MappingProxyType(
    {
        "left": lambda cell: cell[0] == 0,
        "right": lambda cell: cell[0] == GRID - 1,
        "top": lambda cell: cell[1] == 0,
        "bottom": lambda cell: cell[1] == GRID - 1,
        "center": lambda cell: cell == (2, 2),
    }
)
# A large object is centred on one cell and spans about 2.3 cells.
_LARGE_CENTRES: Mapping[str, tuple[int, int]] = MappingProxyType(
    {"left": (1, 2), "right": (3, 2), "top": (2, 1), "bottom": (2, 3), "center": (2, 2)}
)


@dataclass(frozen=True)
class Scene:
    """Everything that decides an image besides its noise: one group of identical shapes."""

    shape: str
    colour: str
    count: str
    size: str
    position: str | None  # None: anywhere (always None for "many")
    texture: str
    background: str  # a BACKGROUNDS key, or the style's own backdrop for target domains

    def pairs(self) -> set[tuple[str, str]]:
        """``(attribute, value)`` pairs of this scene, to test against ``HELD_OUT``."""
        return {
            ("shape", self.shape),
            ("colour", self.colour),
            ("count", self.count),
            ("size", self.size),
            ("texture", self.texture),
        }


def is_held_out(scene: Scene) -> bool:
    """Whether ``scene`` shows one of the ``HELD_OUT`` compositions."""
    pairs = scene.pairs()
    return any(pair <= pairs for pair in HELD_OUT)


@dataclass(frozen=True)
class ClassSpec:
    """A target class: its prompt name and the scene attributes it fixes."""

    name: str
    fixed: Mapping[str, str | None]


@dataclass(frozen=True)
class DomainSpec:
    """Generator settings of one labelled domain (a registry row)."""

    name: str
    uid: int  # first integer of every image's seed; unique per domain and per caption stream
    style: str  # renderer: photo, cartoon, aerial, dermoscopy, xray
    like: str  # the CDFSL dataset this domain stands in for
    classes: tuple[ClassSpec, ...]
    defaults: Mapping[str, str | None] = field(default_factory=dict)  # fixed for the domain
    stream: tuple[int, ...] = ()  # integers between uid and seed in every image's seed

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]


def _cls(name: str, **fixed: str | None) -> ClassSpec:
    return ClassSpec(name, MappingProxyType(fixed))


def attribute_classes(attribute: str, values: Sequence[str]) -> tuple[ClassSpec, ...]:
    """One class per value of a scene ``attribute`` ("colour", "shape"), named by the value;
    every other attribute is drawn."""
    return tuple(ClassSpec(v, MappingProxyType({attribute: v})) for v in values)


_SOURCE_STREAM_UID = 1000

_DOMAINS: dict[str, DomainSpec] = {
    spec.name: spec
    for spec in (
        DomainSpec(
            "source",
            uid=1001,
            style="photo",
            like="pretraining domain (held-out seeds)",
            classes=tuple(
                _cls(f"{colour} {shape}", colour=colour, shape=shape)
                for colour, shape in (
                    ("red", "circle"),
                    ("orange", "diamond"),
                    ("yellow", "star"),
                    ("green", "triangle"),
                    ("blue", "square"),
                    ("purple", "heart"),
                    ("pink", "cross"),
                    ("brown", "circle"),
                    ("white", "square"),
                    ("black", "heart"),
                    ("yellow", "triangle"),
                    ("blue", "circle"),
                )
            ),
        ),
        DomainSpec(
            "crop-like",
            uid=1002,
            style="cartoon",
            like="CropDisease",
            classes=tuple(
                _cls(f"{colour} {shape}", colour=colour, shape=shape)
                for colour, shape in (
                    ("brown", "circle"),
                    ("yellow", "star"),
                    ("orange", "triangle"),  # held out
                    ("black", "cross"),
                    ("white", "heart"),  # held out
                    ("red", "diamond"),
                    ("purple", "square"),
                    ("pink", "star"),  # held out
                )
            ),
            defaults=MappingProxyType({"texture": "plain", "background": "leaf"}),
        ),
        DomainSpec(
            "eurosat-like",
            uid=1003,
            style="aerial",
            like="EuroSAT",
            classes=tuple(
                _cls(f"{colour} {PLURALS[shape]}", colour=colour, shape=shape)
                for colour, shape in (
                    ("green", "square"),
                    ("blue", "cross"),  # held out
                    ("red", "circle"),
                    ("yellow", "diamond"),
                    ("brown", "square"),  # held out
                    ("black", "star"),
                    ("orange", "heart"),
                    ("white", "triangle"),
                )
            ),
            defaults=MappingProxyType(
                {
                    "count": "many",
                    "size": "small",
                    "position": None,
                    "texture": "plain",
                    "background": "fields",
                }
            ),
        ),
        DomainSpec(
            "isic-like",
            uid=1004,
            style="dermoscopy",
            like="ISIC2018",
            classes=(
                _cls("large brown circle", colour="brown", shape="circle"),
                _cls("large black star", colour="black", shape="star"),
                _cls("large pink heart", colour="pink", shape="heart"),
                _cls("large red diamond", colour="red", shape="diamond"),
                _cls("large purple diamond", colour="purple", shape="diamond"),  # held out
                _cls(
                    "large striped brown square", colour="brown", shape="square", texture="striped"
                ),  # held out
                _cls(
                    "large dotted orange circle", colour="orange", shape="circle", texture="dotted"
                ),
            ),
            defaults=MappingProxyType(
                {
                    "count": "one",
                    "size": "large",
                    "position": "center",
                    "texture": "plain",
                    "background": "skin",
                }
            ),
        ),
        DomainSpec(
            "chestx-like",
            uid=1005,
            style="xray",
            like="ChestX",
            classes=(
                _cls("circle on the left", shape="circle", count="one", position="left"),
                _cls("circle on the right", shape="circle", count="one", position="right"),
                _cls("two circles at the top", shape="circle", count="two", position="top"),
                _cls("square at the bottom", shape="square", count="one", position="bottom"),
                _cls("three triangles", shape="triangle", count="three"),
                _cls("two crosses on the right", shape="cross", count="two", position="right"),
                _cls("three hearts", shape="heart", count="three"),  # held out
                _cls("many stars", shape="star", count="many", position=None),
            ),
            # Every object is drawn as bright "bone": colour is fixed so it carries no signal.
            defaults=MappingProxyType(
                {"colour": "white", "texture": "plain", "background": "ribs"}
            ),
        ),
    )
}


def list_domains() -> list[str]:
    """Names of the registered domains, source first, then targets from near to far."""
    return list(_DOMAINS)


def get_domain(name: str) -> DomainSpec:
    """The registry row of domain ``name``; raises ``CdfslError`` listing the known ones."""
    try:
        return _DOMAINS[name]
    except KeyError:
        raise CdfslError(
            f"micro-world domain {name!r} is unknown; expected one of {list_domains()}; "
            "pick one of those names"
        ) from None


# ---------------------------------------------------------------------------------------------
# Scene sampling and captions


def _choice(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _sample_free_scene(rng: np.random.Generator) -> Scene:
    """A source scene with every attribute drawn, before the held-out filter."""
    shape = _choice(rng, SHAPES)
    colour = _choice(rng, list(COLOURS))
    count = _choice(rng, ("one", "one", "two", "three", "many"))
    # Large groups do not fit a half-image region: only single objects may be large.
    size = _choice(rng, SIZES) if count == "one" else "small"
    position = None if count == "many" else _choice(rng, list(POSITIONS))
    # Textures are invisible on small shapes, so only large ones carry one.
    texture = _choice(rng, ("plain", "striped", "dotted")) if size == "large" else "plain"
    return Scene(shape, colour, count, size, position, texture, _choice(rng, list(BACKGROUNDS)))


def sample_source_scene(rng: np.random.Generator) -> Scene:
    """A random source scene that shows none of the ``HELD_OUT`` compositions."""
    while True:
        scene = _sample_free_scene(rng)
        if not is_held_out(scene):
            return scene


def sample_class_scene(spec: DomainSpec, class_index: int, rng: np.random.Generator) -> Scene:
    """A scene of class ``class_index`` of ``spec``: class and domain attributes fixed, rest drawn.

    Source classes also respect ``HELD_OUT`` (the source never shows those compositions).
    """
    fixed = {**spec.defaults, **spec.classes[class_index].fixed}
    while True:
        scene = _sample_free_scene(rng)
        # count first: size, position and texture constraints follow from it
        if "count" in fixed:
            scene = replace(scene, count=fixed["count"])
        if scene.count != "one":
            scene = replace(scene, size="small", texture="plain")
        if scene.count == "many":
            scene = replace(scene, position=None)
        elif scene.position is None:
            scene = replace(scene, position=_choice(rng, list(POSITIONS)))
        scene = replace(scene, **{k: v for k, v in fixed.items() if k != "count"})
        if spec.name != "source" or not is_held_out(scene):
            return scene


_PREFIXES = ("a photo of a ", "a photo of ", "a picture of ", "an image of ", "")


def caption_for(scene: Scene, rng: np.random.Generator) -> str:
    """A template caption naming the shape and a random subset of the other attributes.

    Partial captions (like "red circles", "a large dotted star at the top") teach the text
    tower that a class name is any subset of attributes; the random prefix includes the prompt
    form "a photo of a ...".
    """
    words: list[str] = []
    if rng.random() < 0.6:
        words.append(scene.count)
    if scene.count == "one" and rng.random() < 0.6:
        words.append(scene.size)
    if scene.texture != "plain" and rng.random() < 0.7:
        words.append(scene.texture)
    if rng.random() < 0.85:
        words.append(scene.colour)
    words.append(scene.shape if scene.count == "one" else PLURALS[scene.shape])
    tail: list[str] = []
    if scene.position is not None and rng.random() < 0.6:
        tail.append(POSITIONS[scene.position])
    if scene.background in BACKGROUNDS and rng.random() < 0.35:
        tail.append(BACKGROUNDS[scene.background])
    if len(tail) == 2 and rng.random() < 0.5:
        tail.reverse()
    return _choice(rng, _PREFIXES) + " ".join(words + tail) + "."


def source_vocabulary() -> set[str]:
    """Every word a source caption can contain."""
    phrases = [
        *_PREFIXES,
        *SHAPES,
        *PLURALS.values(),
        *COLOURS,
        *COUNTS,
        *SIZES,
        *TEXTURES,
        *POSITIONS.values(),
        *BACKGROUNDS.values(),
    ]
    return {w for p in phrases for w in p.split()}


# ---------------------------------------------------------------------------------------------
# Rendering (numpy float32 in [0, 1], (H, W, 3), plus PIL for anti-aliased polygons)


def _shape_outline(shape: str) -> list[tuple[float, float]]:
    """Polygon of ``shape`` centred at 0 with radius about 1 (y points down)."""
    if shape == "circle":
        t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        return list(zip(np.cos(t), np.sin(t), strict=True))
    if shape == "square":
        return [(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)]
    if shape == "triangle":
        return [(0.0, -1.0), (1.0, 0.75), (-1.0, 0.75)]
    if shape == "diamond":
        return [(0.0, -1.0), (0.78, 0.0), (0.0, 1.0), (-0.78, 0.0)]
    if shape == "star":
        t = np.arange(10) * math.pi / 5 - math.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return list(zip(r * np.cos(t), r * np.sin(t), strict=True))
    if shape == "cross":
        a, b = 0.3, 0.95
        return [
            (-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a),
            (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a),
        ]  # fmt: skip
    if shape == "heart":
        t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return list(zip(x / 16.5, (y + 2.5) / 15.0, strict=True))
    raise ValueError(shape)


_OUTLINES = {s: np.asarray(_shape_outline(s), dtype=np.float64) for s in SHAPES}


def _layout(scene: Scene, rng: np.random.Generator, grid: bool) -> list[tuple[float, float, float]]:
    """Object centres and radii ``(cx, cy, r)`` in unit image coordinates, on the cell lattice."""
    cell = 1.0 / GRID
    all_cells = [(c, r) for r in range(GRID) for c in range(GRID)]
    if grid:  # aerial: a regular sub-lattice of small objects, like tiled fields from above
        pattern = _choice(rng, ("full", "checker", "sparse"))
        cells = [
            (c, r)
            for c, r in all_cells
            if pattern == "full"
            or (pattern == "checker" and (c + r) % 2 == 0)
            or (pattern == "sparse" and c % 2 == 0 and r % 2 == 0)
        ]
        small = rng.uniform(0.34, 0.42, len(cells))
    elif scene.size == "large":
        cells = [_LARGE_CENTRES[scene.position or "center"]]
        small = np.asarray([rng.uniform(1.0, 1.2)])
    else:
        low, high = COUNTS[scene.count]
        n = int(rng.integers(low, high + 1))
        if scene.position is None:
            picks = rng.choice(len(all_cells), size=n, replace=False)
            cells = [all_cells[int(i)] for i in picks]
        else:
            region = _REGION_CELLS[scene.position]
            while True:  # a few draws at most: a third or more of each region is anchor cells
                picks = rng.choice(len(region), size=n, replace=False)
                cells = [region[int(i)] for i in picks]
                if any(_REGION_ANCHORS[scene.position](c) for c in cells):
                    break
        small = rng.uniform(0.34, 0.42, n)
    jitter = rng.normal(0.0, 0.01, (len(cells), 2))  # under one pixel: keep the patch alignment
    return [
        ((c + 0.5) * cell + float(jx), (r + 0.5) * cell + float(jy), float(k) * cell)
        for (c, r), k, (jx, jy) in zip(cells, small, jitter, strict=True)
    ]


def _mask(shape: str, objects: list[tuple[float, float, float]], size: int) -> np.ndarray:
    """Anti-aliased coverage (H, W) in [0, 1] of ``shape`` drawn at each object."""
    big = size * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    outline = _OUTLINES[shape]
    for cx, cy, r in objects:
        pts = (outline * r + (cx, cy)) * big
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Pattern weight (H, W) in [0, 1]: 1 where the texture's contrast colour shows."""
    if kind == "plain":
        return np.zeros((size, size), np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = size / 10.0
    phase = float(rng.uniform(0, period))
    if kind == "striped":
        return ((((xx + yy + phase) / period) % 1.0) < 0.5).astype(np.float32)
    # dotted: a grid of round dots
    u = ((xx + phase) / period) % 1.0 - 0.5
    v = ((yy + phase) / period) % 1.0 - 0.5
    return (u * u + v * v < 0.09).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise (H, W) in about [-1, 1]: a bilinearly upsampled random grid."""
    grid = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Backdrop (H, W, 3) in [0, 1] of the named kind."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    fine = rng.normal(0, 1, (size, size)).astype(np.float32)
    blotch = _smooth_noise(rng, size, 5)

    def base(rgb: tuple[float, float, float], jitter: float) -> np.ndarray:
        col = np.asarray(rgb, np.float32) + rng.uniform(-jitter, jitter, 3).astype(np.float32)
        return np.broadcast_to(col, (size, size, 3)).copy()

    if kind == "light":
        img = base((0.86, 0.86, 0.84), 0.08) + 0.02 * fine[..., None]
    elif kind == "dark":
        img = base((0.16, 0.16, 0.18), 0.08) + 0.02 * fine[..., None]
    elif kind == "grass":
        blades = np.sin(xx * 60 + 3 * blotch) * 0.05
        img = base((0.25, 0.5, 0.18), 0.05) + (0.06 * fine + blades + 0.05 * blotch)[..., None]
    elif kind == "sand":
        img = base((0.86, 0.76, 0.55), 0.04) + (0.05 * fine + 0.04 * blotch)[..., None]
    elif kind == "water":
        waves = 0.06 * np.sin(yy * 40 + 2 * blotch + float(rng.uniform(0, 6.3)))
        img = base((0.22, 0.45, 0.74), 0.05) + (waves + 0.02 * fine)[..., None]
    elif kind == "brick":
        rows = (yy * 8) % 1.0
        offset = np.floor(yy * 8) % 2 * 0.5
        cols = (xx * 4 + offset) % 1.0
        mortar = ((rows < 0.14) | (cols < 0.07)).astype(np.float32)[..., None]
        brick = base((0.66, 0.3, 0.22), 0.05) + 0.04 * fine[..., None]
        img = brick * (1 - mortar) + mortar * np.float32(0.78)
    elif kind == "leaf":  # crop-like: a mottled leaf with diagonal veins
        veins = (np.abs(((xx - yy) * 5 + 0.3 * blotch) % 1.0 - 0.5) < 0.04).astype(np.float32)
        img = base((0.3, 0.55, 0.2), 0.06) + (0.07 * blotch + 0.03 * fine + 0.15 * veins)[..., None]
    elif kind == "fields":  # eurosat-like: a patchwork of crop fields with plough rows
        palette = np.asarray(
            [(0.42, 0.5, 0.3), (0.55, 0.5, 0.36), (0.36, 0.42, 0.28), (0.62, 0.58, 0.45)],
            np.float32,
        )
        cx, cy = rng.uniform(0.25, 0.75, 2)
        patch = (xx > cx).astype(int) + 2 * (yy > cy).astype(int)
        order = rng.permutation(4)
        img = palette[order[patch]]
        rows = 0.04 * np.sin((xx if rng.random() < 0.5 else yy) * 90)
        img = img + (rows + 0.03 * fine)[..., None]
    elif kind == "skin":  # isic-like
        img = base((0.88, 0.68, 0.58), 0.05) + (0.05 * blotch + 0.02 * fine)[..., None]
    elif kind == "ribs":  # chestx-like: dark chest with bright curved rib bands
        ribs = 0.5 + 0.5 * np.cos((yy + 0.12 * np.abs(xx - 0.5) * 2) * 2 * math.pi * 5)
        gray = 0.18 + 0.1 * ribs + 0.04 * blotch
        img = np.repeat(gray[..., None], 3, axis=2)
    else:
        raise ValueError(kind)
    return img


def _blur(img: np.ndarray, radius: float) -> np.ndarray:
    pil = Image.fromarray(_to_uint8(img))
    return np.asarray(pil.filter(ImageFilter.GaussianBlur(radius)), np.float32) / 255.0


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render_scene(
    scene: Scene, style: str, rng: np.random.Generator, size: int = IMAGE_SIZE
) -> np.ndarray:
    """Draw ``scene`` in ``style``; returns uint8 (size, size, 3)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = _background(scene.background, size, rng)
    objects = _layout(scene, rng, grid=style == "aerial")
    cover = _mask(scene.shape, objects, size)[..., None]
    colour = np.asarray(COLOURS[scene.colour], np.float32)
    colour = np.clip(colour + rng.uniform(-0.06, 0.06, 3).astype(np.float32), 0, 1)
    if style == "xray":  # bone-like: brightness only, so colour carries no signal
        colour = np.full(3, rng.uniform(0.55, 0.8), np.float32)
    pattern = _texture(scene.texture, size, rng)[..., None]
    contrast = np.float32(0.95 if colour.mean() < 0.5 else 0.08)
    fill = colour * (1 - 0.65 * pattern) + contrast * 0.65 * pattern
    shading = 1.0 + 0.08 * _smooth_noise(rng, size, 3)[..., None]
    if style == "cartoon":  # near shift: pale posterised fills, thick outlines, leaf blotches
        for _ in range(int(rng.integers(2, 7))):  # disease-like blotches under the objects
            bx, by = rng.uniform(0, 1, 2)
            br = rng.uniform(0.03, 0.07)
            spot = np.clip((br - np.hypot(xx - bx, yy - by)) * size, 0, 1)[..., None]
            img = img * (1 - 0.7 * spot) + np.float32((0.62, 0.52, 0.16)) * 0.7 * spot
        dilated = Image.fromarray(_to_uint8(cover[..., 0])).filter(ImageFilter.MaxFilter(5))
        ring = np.clip(np.asarray(dilated, np.float32)[..., None] / 255.0 - cover, 0, 1)
        fill = fill + (np.float32(1.0) - fill) * rng.uniform(0.15, 0.35)  # watercolour paleness
        img = img * (1 - cover) + fill * cover
        img = img * (1 - ring) + np.float32(0.05) * ring
        img = np.round(np.clip(img, 0, 1) * 4) / 4  # posterise to 5 levels per channel
        img = _blur(img, 0.4)
    else:
        img = img * (1 - cover) + fill * shading * cover
    if style == "photo":
        img = img * rng.uniform(0.9, 1.1) + rng.normal(0, 0.015, img.shape).astype(np.float32)
    elif style == "aerial":  # atmospheric haze and a soft sensor blur
        haze = np.asarray((0.62, 0.66, 0.72), np.float32)
        a = rng.uniform(0.15, 0.3)
        img = _blur(img * (1 - a) + haze * a, 0.5)
    elif style == "dermoscopy":
        hair = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(hair)
        for _ in range(int(rng.integers(1, 5))):
            pts = rng.uniform(-0.1, 1.1, (3, 2)) * size
            draw.line([tuple(p) for p in pts.tolist()], fill=200, width=1)
        h = np.asarray(hair, np.float32)[..., None] / 255.0
        img = img * (1 - 0.8 * h) + np.float32(0.12) * 0.8 * h
        img = _blur(img, 1.0)
        img = img * np.asarray((1.06, 0.9, 0.82), np.float32) + np.float32(0.03)  # warm cast
        rad = np.sqrt((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
        vignette = np.clip(1.0 - ((rad - 0.38) / 0.14), 0, 1) ** 1.5
        img = img * (0.55 + 0.45 * vignette[..., None])
    elif style == "xray":
        gray = img.mean(axis=2)
        gray = 0.32 + 0.3 * gray  # low contrast
        gray = np.asarray(
            Image.fromarray(_to_uint8(gray)).filter(ImageFilter.GaussianBlur(0.8)), np.float32
        ) / np.float32(255.0)
        gray = gray + rng.normal(0, 0.08, gray.shape).astype(np.float32)
        return np.repeat(_to_uint8(gray)[..., None], 3, axis=2)
    return _to_uint8(img)


# ---------------------------------------------------------------------------------------------
# Datasets


class MicroWorld:
    """Labelled images of one micro-world domain; implements ``LabelledImages``.

    ``domain``: a registered name (``list_domains``) or a ``DomainSpec`` of one's own (its
    renderer style, classes and fixed attributes; the DomainBed-style domains of
    ``cdfsl.reasoning.micro_dg`` are such specs). Image ``i`` has class ``i % num_classes`` and
    is a pure function of ``(domain, seed, i)``: its generator is
    ``default_rng([uid, *stream, seed, i])``, so ``images_per_class`` only sets the length.
    ``load(i)`` renders on the fly (about a millisecond); nothing is stored.
    """

    def __init__(
        self,
        domain: str | DomainSpec,
        images_per_class: int = 60,
        seed: int = 0,
        image_size: int = IMAGE_SIZE,
    ) -> None:
        self.spec = domain if isinstance(domain, DomainSpec) else get_domain(domain)
        if images_per_class < 1:
            raise CdfslError(
                f"images_per_class={images_per_class} for micro-world {self.spec.name!r}; "
                "expected an integer >= 1; pass e.g. images_per_class=60"
            )
        self.domain = self.spec.name
        self.images_per_class = images_per_class
        self.seed = seed
        self.image_size = image_size

    @property
    def class_names(self) -> list[str]:
        return self.spec.class_names

    @property
    def targets(self) -> list[int]:
        n = len(self.spec.classes)
        return [i % n for i in range(len(self))]

    def __len__(self) -> int:
        return len(self.spec.classes) * self.images_per_class

    def _check(self, index: int) -> None:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.domain} of length {len(self)}")

    def scene(self, index: int) -> Scene:
        """The scene drawn as image ``index``."""
        self._check(index)
        return self._scene_and_rng(index)[0]

    def _scene_and_rng(self, index: int) -> tuple[Scene, np.random.Generator]:
        rng = np.random.default_rng([self.spec.uid, *self.spec.stream, self.seed, index])
        return sample_class_scene(self.spec, index % len(self.spec.classes), rng), rng

    def array(self, index: int) -> np.ndarray:
        """Image ``index`` as uint8 (H, W, 3)."""
        self._check(index)
        scene, rng = self._scene_and_rng(index)
        return render_scene(scene, self.spec.style, rng, self.image_size)

    def load(self, index: int) -> Image.Image:
        """Image ``index`` as an RGB PIL image."""
        return Image.fromarray(self.array(index), mode="RGB")

    def sample_id(self, index: int) -> str:
        self._check(index)
        name = self.class_names[index % len(self.spec.classes)]
        return f"{self.domain}/{name}/{index}"

    def __repr__(self) -> str:
        return (
            f"MicroWorld({self.domain!r}, images_per_class={self.images_per_class}, "
            f"seed={self.seed})"
        )


class SourceCaptions:
    """The captioned pretraining stream: ``(image, caption)`` pairs of the source domain.

    Item ``i`` is a pure function of ``(seed, i)`` and uses a different seed key from the
    labelled ``source`` domain, so zero-shot evaluation on ``MicroWorld("source")`` sees
    held-out images. ``length`` only bounds indexing; the stream is as long as you ask.
    """

    def __init__(
        self,
        seed: int = 0,
        length: int = 1 << 40,
        image_size: int = IMAGE_SIZE,
    ) -> None:
        self.seed = seed
        self.length = length
        self.image_size = image_size

    def __len__(self) -> int:
        return self.length

    def scene_and_caption(self, index: int) -> tuple[Scene, str, np.random.Generator]:
        """Scene, caption and the generator (positioned for rendering) of item ``index``."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a stream of length {self.length}")
        rng = np.random.default_rng([_SOURCE_STREAM_UID, self.seed, index])
        scene = sample_source_scene(rng)
        return scene, caption_for(scene, rng), rng

    def array(self, index: int) -> tuple[np.ndarray, str]:
        """Item ``index`` as (uint8 (H, W, 3), caption)."""
        scene, caption, rng = self.scene_and_caption(index)
        return render_scene(scene, "photo", rng, self.image_size), caption

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        arr, caption = self.array(index)
        return Image.fromarray(arr, mode="RGB"), caption
