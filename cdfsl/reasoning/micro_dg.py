"""The micro world as a DomainBed-style dataset, and a template teacher that writes its chains.

:mod:`cdfsl.data.micro_world` gives each target domain its own classes; domain generalization
needs the same classes in several styles. Here the classes are the seven shapes and each
domain draws them with one of the micro world's renderers (``render_scene``), with that
renderer's own backdrop and layout rules, like PACS's photo / art / cartoon / sketch:

============  =============================================================================
domain        look
============  =============================================================================
photo         flat shapes on light/dark/grass/sand/water/brick, any colour, count, position
cartoon       dark outlines, posterised colours, leaf backdrop
dermoscopy    one large centred shape on skin, warm cast, blur, hairs, dark vignette
xray          grayscale, low contrast, noisy, ribs: the shape alone carries the class
aerial        a hazy top-down grid of many small shapes on field patches (the hardest)
============  =============================================================================

Image ``i`` of a domain has class ``i % 7`` and is a pure function of ``(domain, seed, i)``.
:class:`TemplateTeacher` writes a five-stage chain for an image from its true scene attributes
(style, count, size, texture, colour, position, backdrop, shape evidence), with a few
paraphrases per stage drawn per image, so teacher chains vary in wording as an external
teacher's do.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from PIL import Image

from cdfsl.data.base import LabelledImages
from cdfsl.data.micro_world import (
    BACKGROUNDS,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    ClassSpec,
    DomainSpec,
    Scene,
    render_scene,
    sample_class_scene,
)
from cdfsl.errors import CdfslError
from cdfsl.reasoning.chains import Chain, chain_text


@dataclass(frozen=True)
class DGStyle:
    """One DG domain: its renderer and the scene attributes the renderer fixes."""

    name: str
    uid: int  # first integer of every image's seed; apart from the micro world's 1000-1005
    style: str
    fixed: Mapping[str, str | None]
    caption: str  # how a caption names the style: "a cartoon of ..."


DG_STYLES: Mapping[str, DGStyle] = MappingProxyType(
    {
        s.name: s
        for s in (
            DGStyle("photo", 3101, "photo", MappingProxyType({}), "a photo"),
            DGStyle(
                "cartoon", 3102, "cartoon",
                MappingProxyType({"texture": "plain", "background": "leaf"}), "a cartoon",
            ),
            DGStyle(
                "dermoscopy", 3103, "dermoscopy",
                MappingProxyType(
                    {"count": "one", "size": "large", "position": "center", "background": "skin"}
                ),
                "a skin scan",
            ),
            DGStyle(
                "xray", 3104, "xray",
                MappingProxyType({"colour": "white", "texture": "plain", "background": "ribs"}),
                "an x-ray",
            ),
            DGStyle(
                "aerial", 3105, "aerial",
                MappingProxyType(
                    {
                        "count": "many", "size": "small", "position": None, "texture": "plain",
                        "background": "fields",
                    }
                ),
                "an aerial view",
            ),
        )
    }
)  # fmt: skip
"""The DG domains by name; every one has the same seven shape classes."""

DG_CLASSES: tuple[str, ...] = SHAPES


def list_dg_domains() -> list[str]:
    return list(DG_STYLES)


def _style(name: str) -> DGStyle:
    if name not in DG_STYLES:
        raise CdfslError(
            f"micro DG domain {name!r} is unknown; expected one of {', '.join(DG_STYLES)}; "
            "fix data.domains in the recipe"
        )
    return DG_STYLES[name]


def _domain_spec(style: DGStyle) -> DomainSpec:
    classes = tuple(ClassSpec(shape, MappingProxyType({"shape": shape})) for shape in DG_CLASSES)
    return DomainSpec(
        f"dg-{style.name}", style.uid, style.style, "DomainBed-style DG", classes, style.fixed
    )


class MicroDGDomain:
    """The seven shape classes drawn in one DG style; implements ``LabelledImages``.

    ``sample_id(i)`` is ``"<domain>/<shape>/<seed>-<i>"``; ``scene(i)`` the scene drawn.
    """

    def __init__(
        self, domain: str, images_per_class: int = 30, seed: int = 0, image_size: int = IMAGE_SIZE
    ) -> None:
        if images_per_class < 1:
            raise CdfslError(
                f"images_per_class={images_per_class} for micro DG domain {domain!r}; expected "
                "an integer >= 1"
            )
        self.style = _style(domain)
        self.spec = _domain_spec(self.style)
        self.domain = domain
        self.images_per_class = images_per_class
        self.seed = seed
        self.image_size = image_size

    @property
    def class_names(self) -> list[str]:
        return list(DG_CLASSES)

    @property
    def targets(self) -> list[int]:
        return [i % len(DG_CLASSES) for i in range(len(self))]

    def __len__(self) -> int:
        return len(DG_CLASSES) * self.images_per_class

    def _scene_and_rng(self, index: int) -> tuple[Scene, np.random.Generator]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.domain} of length {len(self)}")
        rng = np.random.default_rng([self.style.uid, self.seed, index])
        return sample_class_scene(self.spec, index % len(DG_CLASSES), rng), rng

    def scene(self, index: int) -> Scene:
        """The scene drawn as image ``index``."""
        return self._scene_and_rng(index)[0]

    def domain_of(self, index: int) -> str:
        return self.domain

    def array(self, index: int) -> np.ndarray:
        """Image ``index`` as uint8 (H, W, 3)."""
        scene, rng = self._scene_and_rng(index)
        return render_scene(scene, self.style.style, rng, self.image_size)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.array(index), mode="RGB")

    def sample_id(self, index: int) -> str:
        return f"{self.domain}/{DG_CLASSES[index % len(DG_CLASSES)]}/{self.seed}-{index}"

    def __repr__(self) -> str:
        return (
            f"MicroDGDomain({self.domain!r}, images_per_class={self.images_per_class}, "
            f"seed={self.seed})"
        )


class ConcatImages:
    """Several ``LabelledImages`` with one class list, one after the other (``LabelledImages``).

    ``scene(i)`` and ``domain_of(i)`` are passed to the part holding image ``i`` when it has them.
    """

    def __init__(self, parts: Sequence[LabelledImages]) -> None:
        if not parts:
            raise CdfslError("ConcatImages needs at least one dataset; pass one or more")
        names = list(parts[0].class_names)
        for part in parts[1:]:
            if list(part.class_names) != names:
                raise CdfslError(
                    f"{part!r} has classes {part.class_names}, expected {names}; every domain "
                    "of a DG split must share one class list"
                )
        self.parts = list(parts)
        self._starts = np.cumsum([0, *(len(p) for p in self.parts)])

    @property
    def class_names(self) -> list[str]:
        return list(self.parts[0].class_names)

    @property
    def targets(self) -> list[int]:
        return [t for part in self.parts for t in part.targets]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[LabelledImages, int]:
        """The part holding image ``index`` and the index within it."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        k = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.parts[k], index - int(self._starts[k])

    def load(self, index: int) -> Image.Image:
        part, local = self.locate(index)
        return part.load(local)

    def sample_id(self, index: int) -> str:
        part, local = self.locate(index)
        return part.sample_id(local)

    def scene(self, index: int) -> Scene:
        part, local = self.locate(index)
        return part.scene(local)  # type: ignore[attr-defined]

    def domain_of(self, index: int) -> str:
        part, local = self.locate(index)
        return part.domain_of(local)  # type: ignore[attr-defined]


def micro_dg_split(
    domains: Sequence[str],
    target_domain: str,
    train_images_per_class: int,
    test_images_per_class: int,
    seed: int = 0,
) -> tuple[ConcatImages, MicroDGDomain]:
    """Leave ``target_domain`` out: (train = the other domains, seed ``seed``; test = it).

    The test images use seed ``seed + 1``, so no test image is also a training image of any run.
    """
    if target_domain not in domains:
        raise CdfslError(
            f"held-out domain {target_domain!r} is not one of the data domains {list(domains)}; "
            "fix held_out in the recipe"
        )
    if len(domains) < 2:
        raise CdfslError(f"micro DG needs at least two domains, got {list(domains)}")
    train = ConcatImages(
        [MicroDGDomain(d, train_images_per_class, seed) for d in domains if d != target_domain]
    )
    return train, MicroDGDomain(target_domain, test_images_per_class, seed + 1)


# ---------------------------------------------------------------------------------------------
# Template teacher

_SUMMARIES = (
    "Name the shape in the image.",
    "Which shape does the image show?",
    "Find the class of the shape.",
)
_BACKDROPS: Mapping[str, str] = MappingProxyType(
    {
        **BACKGROUNDS,
        "leaf": "on a leaf",
        "fields": "on fields",
        "skin": "on skin",
        "ribs": "over ribs",
    }
)
_EVIDENCE: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "circle": ("the outline is round with no corners", "the edge curves evenly all around"),
        "square": (
            "it has four equal sides and right corners",
            "its four sides are level and upright",
        ),
        "triangle": ("it has three straight sides", "it has three corners, one pointing up"),
        "diamond": ("its four corners point up, down, left and right", "it is a square on its tip"),
        "star": ("it has five sharp points", "five thin spikes point out from the middle"),
        "cross": ("two bars meet at a right angle", "it has four arms of equal length"),
        "heart": (
            "two round lobes on top end in one point",
            "it has a dip on top and a point below",
        ),
    }
)
# The most similar other shape, and the evidence that rules it out.
_CONFUSER: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "circle": ("square", "a square has corners"),
        "square": ("diamond", "a diamond stands on a corner"),
        "triangle": ("diamond", "a diamond has four corners"),
        "diamond": ("square", "a square has level sides"),
        "star": ("cross", "a cross has four arms, not five points"),
        "cross": ("star", "a star has five points, not four arms"),
        "heart": ("circle", "a circle has no point"),
    }
)
_REFLECTIONS = (
    "Colour and backdrop do not decide it; {rule}, so not a {other}.",
    "Could it be a {other}? No, {rule}.",
    "Checking: {rule}, so it is no {other}.",
)


def scene_caption(scene: Scene, style_caption: str) -> str:
    """What the image shows, from its scene, without naming the shape: the CAPTION stage."""
    noun = "object" if scene.count == "one" else "objects"
    words = [style_caption, "of", scene.count]
    if scene.count == "one":
        words.append(scene.size)
    if scene.texture != "plain":
        words.append(scene.texture)
    words += [scene.colour, noun]
    if scene.position is not None:
        words.append(POSITIONS[scene.position])
    words.append(_BACKDROPS.get(scene.background, f"on {scene.background}"))
    return " ".join(words) + "."


class TemplateTeacher:
    """Writes five-stage chains from each image's true scene; needs ``images.scene(i)``.

    Each stage picks one of a few paraphrases with a generator seeded by ``(seed, image id)``,
    so a chain is a pure function of the image and the seed.
    """

    source = "template"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def write(self, scene: Scene, style_caption: str, class_name: str, image_id: str) -> str:
        """The chain of one image whose scene is ``scene`` and class ``class_name``."""
        rng = np.random.default_rng([self.seed, zlib.crc32(image_id.encode())])

        def pick(options: Sequence[str]) -> str:
            return options[int(rng.integers(len(options)))]

        shape = scene.shape
        other, rule = _CONFUSER[shape]
        evidence = pick(_EVIDENCE[shape])
        many = scene.count != "one"
        reasoning = f"Each object: {evidence}." if many else f"The object: {evidence}."
        stages = {
            "SUMMARY": pick(_SUMMARIES),
            "CAPTION": scene_caption(scene, style_caption),
            "REASONING": reasoning,
            "REFLECTION": pick(_REFLECTIONS).format(rule=rule, other=other),
            "CONCLUSION": class_name,
        }
        return chain_text(stages)

    def chains(self, images: ConcatImages | MicroDGDomain) -> list[Chain]:
        """One chain per image of a micro DG dataset, in index order."""
        out = []
        for i in range(len(images)):
            part, local = images.locate(i) if isinstance(images, ConcatImages) else (images, i)
            assert isinstance(part, MicroDGDomain)
            image_id = part.sample_id(local)
            chain = self.write(
                part.scene(local), part.style.caption, part.class_names[part.targets[local]],
                image_id,
            )  # fmt: skip
            out.append(Chain(image_id, chain, self.source, 0))
        return out
