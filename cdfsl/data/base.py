"""The protocol every labelled image source implements: one sampler and evaluator serve all."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from PIL import Image


@runtime_checkable
class LabelledImages(Protocol):
    """A finite, indexable set of labelled images.

    ``targets[i]`` is the class index of image ``i``; ``class_names[c]`` is the readable name used
    in prompts ("annual crop land", not "AnnualCrop"); ``sample_id(i)`` is a stable string id
    (a relative path, or ``"domain/class/seed-index"`` for generated images) written to result rows.
    """

    @property
    def targets(self) -> list[int]: ...

    @property
    def class_names(self) -> list[str]: ...

    def __len__(self) -> int: ...

    def load(self, index: int) -> Image.Image:
        """Image ``index`` as RGB PIL image; raises ``DataError`` naming the file if unreadable."""
        ...

    def sample_id(self, index: int) -> str: ...
