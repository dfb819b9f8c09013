"""The micro world as a DomainBed-style dataset, and a template teacher that writes its chains.

:mod:`cdfsl.data.micro_world` gives each target domain its own classes; domain generalization
needs the same classes in several styles. Here the classes are one scene attribute, the
``colour`` (ten classes, the default) or the ``shape`` (seven), every other attribute drawn at
random, and each domain draws them with one of the micro world's renderers
(``render_scene``), with that renderer's own backdrop and layout rules, like PACS's photo /
art / cartoon / sketch:

============  =============================================================================
domain        look
============  =============================================================================
photo         flat shapes on light/dark/grass/sand/water/brick, any count and position
cartoon       dark outlines, posterised colours, leaf backdrop
dermoscopy    one large centred shape on skin, warm colour cast, blur, hairs, dark vignette
aerial        a hazy top-down grid of many small shapes on field patches
xray          grayscale, low contrast, noisy, ribs (shape classes only: no colour survives)
============  =============================================================================

Why colour by default: micro-clip, pretrained on captions that name colours far more reliably
than its 8-px patches resolve small shapes, encodes colour well and shape weakly (a linear
probe on its features), so colour classes leave the domain shift, not the tower, as the
difficulty: the warm cast of dermoscopy and the haze of aerial views move colours.

Image ``i`` of a domain has class ``i % K`` and is a pure function of ``(domain, classes,
seed, i)``: a :class:`~cdfsl.data.micro_world.MicroWorld` of a ``DomainSpec`` built here.
``ConcatImages`` (the training domains of a split) lives in :mod:`cdfsl.data.wrappers`.
:class:`TemplateTeacher` writes a five-stage chain for an image from its true scene attributes
(style, count, size, texture, shape or colour, position, backdrop, evidence for the
class, a check against the nearest other class and the style's confounder), with a few
paraphrases per stage drawn per image, so teacher chains vary in wording as an external
teacher's do.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from cdfsl.data.micro_world import (
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    PLURALS,
    POSITIONS,
    SHAPES,
    DomainSpec,
    MicroWorld,
    Scene,
    attribute_classes,
)
from cdfsl.data.wrappers import ConcatImages
from cdfsl.errors import CdfslError
from cdfsl.reasoning.chains import Chain, chain_text

CLASS_ATTRIBUTES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"colour": tuple(COLOURS), "shape": SHAPES}
)
"""The scene attribute a micro DG dataset classifies by, and its class names."""


@dataclass(frozen=True)
class DGStyle:
    """One DG domain: its renderer, the scene attributes the renderer fixes, its confounder."""

    name: str
    uid: int  # first integer of every image's seed; apart from the micro world's 1000-1005
    style: str
    fixed: Mapping[str, str | None]
    caption: str  # how a caption names the style: "a cartoon of ..."
    caveat: str  # what the style does to colours, for the teacher's REFLECTION


DG_STYLES: Mapping[str, DGStyle] = MappingProxyType(
    {
        s.name: s
        for s in (
            DGStyle(
                "photo", 3101, "photo", MappingProxyType({}), "a photo",
                "the backdrop does not change the fill",
            ),
            DGStyle(
                "cartoon", 3102, "cartoon",
                MappingProxyType({"texture": "plain", "background": "leaf"}), "a cartoon",
                "cartoon colours are flat and strong",
            ),
            DGStyle(
                "dermoscopy", 3103, "dermoscopy",
                MappingProxyType(
                    {"count": "one", "size": "large", "position": "center", "background": "skin"}
                ),
                "a skin scan", "the warm cast of the scan makes colours redder",
            ),
            DGStyle(
                "aerial", 3104, "aerial",
                MappingProxyType(
                    {
                        "count": "many", "size": "small", "position": None, "texture": "plain",
                        "background": "fields",
                    }
                ),
                "an aerial view", "the haze makes colours paler",
            ),
            DGStyle(
                "xray", 3105, "xray",
                MappingProxyType({"colour": "white", "texture": "plain", "background": "ribs"}),
                "an x-ray", "an x-ray shows no colour",
            ),
        )
    }
)  # fmt: skip
"""The DG domains by name; within one dataset every domain has the same classes."""


def list_dg_domains() -> list[str]:
    return list(DG_STYLES)


def _style(name: str, classes: str) -> DGStyle:
    if classes not in CLASS_ATTRIBUTES:
        raise CdfslError(
            f"micro DG classes {classes!r} are unknown; expected one of "
            f"{', '.join(CLASS_ATTRIBUTES)}; fix data.classes in the recipe"
        )
    if name not in DG_STYLES:
        raise CdfslError(
            f"micro DG domain {name!r} is unknown; expected one of {', '.join(DG_STYLES)}; "
            "fix data.domains in the recipe"
        )
    style = DG_STYLES[name]
    if classes in style.fixed:
        raise CdfslError(
            f"micro DG domain {name!r} fixes the {classes} of every image, so it cannot have "
            f"{classes} classes; drop it from data.domains or use other classes"
        )
    return style


class MicroDGDomain(MicroWorld):
    """The classes of one scene attribute drawn in one DG style: a ``MicroWorld`` whose
    ``DomainSpec`` is built from the style and the attribute; implements ``LabelledImages``.

    ``classes``: "colour" or "shape" (:data:`CLASS_ATTRIBUTES`). ``sample_id(i)`` is
    ``"<domain>/<class>/<seed>-<i>"``; ``scene(i)`` the scene drawn; image ``i`` is seeded
    ``[style uid, attribute position, seed, i]``.
    """

    def __init__(
        self,
        domain: str,
        images_per_class: int = 30,
        seed: int = 0,
        classes: str = "colour",
        image_size: int = IMAGE_SIZE,
    ) -> None:
        if images_per_class < 1:
            raise CdfslError(
                f"images_per_class={images_per_class} for micro DG domain {domain!r}; expected "
                "an integer >= 1"
            )
        self.style = _style(domain, classes)
        self.classes = classes
        self.names = CLASS_ATTRIBUTES[classes]
        spec = DomainSpec(
            f"dg-{domain}", self.style.uid, self.style.style, "DomainBed-style DG",
            attribute_classes(classes, self.names), self.style.fixed,
            stream=(list(CLASS_ATTRIBUTES).index(classes),),
        )  # fmt: skip
        super().__init__(spec, images_per_class, seed, image_size)
        self.domain = domain

    def sample_id(self, index: int) -> str:
        self._check(index)
        return f"{self.domain}/{self.names[index % len(self.names)]}/{self.seed}-{index}"

    def __repr__(self) -> str:
        return (
            f"MicroDGDomain({self.domain!r}, images_per_class={self.images_per_class}, "
            f"seed={self.seed}, classes={self.classes!r})"
        )


def micro_dg_split(
    domains: Sequence[str],
    target_domain: str,
    train_images_per_class: int,
    test_images_per_class: int,
    seed: int = 0,
    classes: str = "colour",
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
        [
            MicroDGDomain(d, train_images_per_class, seed, classes)
            for d in domains
            if d != target_domain
        ]
    )
    return train, MicroDGDomain(target_domain, test_images_per_class, seed + 1, classes)


# ---------------------------------------------------------------------------------------------
# Template teacher

_SUMMARIES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "shape": (
            "Name the shape in the image.",
            "Which shape does the image show?",
            "Find the class of the shape.",
        ),
        "colour": (
            "Name the colour of the objects.",
            "Which colour does the image show?",
            "Find the class of the fill colour.",
        ),
    }
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
        "red": ("the fill is a strong, pure red", "the fill is deep red with no yellow in it"),
        "orange": ("the fill lies between red and yellow", "the fill is a bright, warm orange"),
        "yellow": ("the fill is a light, bright yellow", "the fill is yellow like a lemon"),
        "green": ("the fill is green like grass", "the fill is a fresh green"),
        "blue": ("the fill is a deep, cool blue", "the fill is blue like the sea"),
        "purple": ("the fill mixes red and blue into violet", "the fill is a dark purple"),
        "pink": ("the fill is a pale, light red", "the fill is a soft pink"),
        "brown": ("the fill is a dark, dull orange", "the fill is brown like wood"),
        "white": ("the fill is very light with no hue", "the fill is plain white"),
        "black": ("the fill is very dark with no hue", "the fill is nearly black"),
    }
)
# The most similar other class, and the evidence that rules it out.
_CONFUSER: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "circle": ("square", "a square has corners"),
        "square": ("diamond", "a diamond stands on a corner"),
        "triangle": ("diamond", "a diamond has four corners"),
        "diamond": ("square", "a square has level sides"),
        "star": ("cross", "a cross has four arms, not five points"),
        "cross": ("star", "a star has five points, not four arms"),
        "heart": ("circle", "a circle has no point"),
        "red": ("orange", "orange would be more yellow"),
        "orange": ("brown", "brown would be darker"),
        "yellow": ("white", "white would have no hue"),
        "green": ("blue", "blue would be cooler"),
        "blue": ("purple", "purple would be redder"),
        "purple": ("blue", "blue would have no red in it"),
        "pink": ("red", "red would be deeper"),
        "brown": ("orange", "orange would be brighter"),
        "white": ("yellow", "yellow would have a hue"),
        "black": ("brown", "brown would have a hue"),
    }
)
_REFLECTIONS = (
    "{caveat}; {rule}, so not {other}.",
    "Could it be {other}? No, {rule}, and {caveat}.",
    "Checking: {rule}, so it is no {other}; {caveat}.",
)


def scene_caption(scene: Scene, style_caption: str, hide: str) -> str:
    """What the image shows, from its scene, without naming its ``hide`` attribute (the class):
    the CAPTION stage."""
    many = scene.count != "one"
    words = [style_caption, "of", scene.count]
    if not many:
        words.append(scene.size)
    if scene.texture != "plain":
        words.append(scene.texture)
    if hide == "shape":
        words += [scene.colour, "objects" if many else "object"]
    else:
        words.append(PLURALS[scene.shape] if many else scene.shape)
    if scene.position is not None:
        words.append(POSITIONS[scene.position])
    words.append(_BACKDROPS.get(scene.background, f"on {scene.background}"))
    return " ".join(words) + "."


class TemplateTeacher:
    """Writes five-stage chains from each image's true scene (micro DG datasets only).

    Each stage picks one of a few paraphrases with a generator seeded by ``(seed, image id)``,
    so a chain is a pure function of the image and the seed.
    """

    source = "template"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def write(self, scene: Scene, style: DGStyle, classes: str, image_id: str) -> str:
        """The chain of one image whose scene is ``scene``, drawn in ``style``, classified by
        its ``classes`` attribute."""
        rng = np.random.default_rng([self.seed, zlib.crc32(image_id.encode())])

        def pick(options: Sequence[str]) -> str:
            return options[int(rng.integers(len(options)))]

        name = getattr(scene, classes)
        other, rule = _CONFUSER[name]
        evidence = pick(_EVIDENCE[name])
        many = scene.count != "one"
        reasoning = f"Each object: {evidence}." if many else f"The object: {evidence}."
        caveat = style.caveat if classes == "colour" else "colour and backdrop do not decide it"
        reflection = pick(_REFLECTIONS).format(caveat=caveat, rule=rule, other=other)
        stages = {
            "SUMMARY": pick(_SUMMARIES[classes]),
            "CAPTION": scene_caption(scene, style.caption, classes),
            "REASONING": reasoning,
            "REFLECTION": reflection[0].upper() + reflection[1:],
            "CONCLUSION": name,
        }
        return chain_text(stages)

    def chains(self, images: ConcatImages | MicroDGDomain) -> list[Chain]:
        """One chain per image of a micro DG dataset, in index order."""
        out = []
        for i in range(len(images)):
            part, local = images.locate(i) if isinstance(images, ConcatImages) else (images, i)
            if not isinstance(part, MicroDGDomain):
                raise CdfslError(
                    f"the template teacher writes chains for micro DG images only, not {part!r}"
                )
            image_id = part.sample_id(local)
            chain = self.write(part.scene(local), part.style, part.classes, image_id)
            out.append(Chain(image_id, chain, self.source, 0))
        return out
