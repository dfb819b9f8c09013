"""The prompts, shipped as package data in ``cdfsl/reasoning/prompts/``.

``label.txt`` is the paper's q_cls (target: the class name), ``reason.txt`` its q_reason
(target: a five-stage chain), ``teacher.txt`` the request an external teacher MLLM answers for
each training image (placeholders ``{class_name}`` and ``{classes}``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib import resources

from cdfsl.errors import CdfslError

PROMPT_NAMES: tuple[str, ...] = ("label", "reason", "teacher")


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


def teacher_prompt(class_name: str, class_names: Sequence[str]) -> str:
    """The external teacher's request for one image of class ``class_name``."""
    return load_prompt("teacher").format(class_name=class_name, classes=", ".join(class_names))
