"""The prompts, shipped as package data in ``cdfsl/reasoning/prompts/``.

``label.txt`` is the paper's q_cls (target: the class name), ``reason.txt`` its q_reason
(target: a five-stage chain), ``teacher.txt`` the request an external teacher MLLM answers for
each training image (placeholder ``{classes}``; the image's class is not named) and
``teacher_told.txt`` the same request telling the teacher the class (``{class_name}`` too).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib import resources

from cdfsl.errors import CdfslError

PROMPT_NAMES: tuple[str, ...] = ("label", "reason", "teacher", "teacher_told")


@cache
def load_prompt(name: str) -> str:
    """The text of prompt file ``name`` (one of :data:`PROMPT_NAMES`), stripped."""
    if name not in PROMPT_NAMES:
        raise CdfslError(f"unknown prompt {name!r}; expected one of {', '.join(PROMPT_NAMES)}")
    return resources.files("cdfsl.reasoning").joinpath(f"prompts/{name}.txt").read_text().strip()


def label_prompt() -> str:
    """q_cls: asks for the class name."""
    return load_prompt("label")


def reason_prompt() -> str:
    """q_reason: asks for the five-stage reasoning."""
    return load_prompt("reason")


def teacher_prompt(class_names: Sequence[str], class_name: str | None = None) -> str:
    """The external teacher's request for one image, which it must classify among
    ``class_names``.

    By default (no ``class_name``) the teacher is not told the image's class. The spec keeps a
    teacher chain "only if its conclusion names the true class", a filter that removes wrong
    chains only when the teacher had to find the class itself; told the class, every chain
    concludes with it and becomes a rationalisation. ``class_name`` given: cdfsl's earlier
    request, which names the class and asks for it as the CONCLUSION (``teacher_told.txt``).
    """
    classes = ", ".join(class_names)
    if class_name is None:
        return load_prompt("teacher").format(classes=classes)
    return load_prompt("teacher_told").format(class_name=class_name, classes=classes)
