"""Datasets made of other datasets: a ``Subset`` of rows, several datasets ``ConcatImages``.

Both are ``LabelledImages`` and keep their parts' sample ids, so result rows name the original
images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from cdfsl.data.base import LabelledImages
from cdfsl.errors import DataError

__all__ = ["ConcatImages", "Subset"]


class Subset:
    """The rows ``indices`` of a ``LabelledImages``, in that order; a ``LabelledImages`` itself."""

    def __init__(self, dataset: LabelledImages, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    @property
    def targets(self) -> list[int]:
        full = self.dataset.targets
        return [full[i] for i in self.indices]

    @property
    def class_names(self) -> list[str]:
        return self.dataset.class_names

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> Image.Image:
        return self.dataset.load(self.indices[index])

    def sample_id(self, index: int) -> str:
        return self.dataset.sample_id(self.indices[index])

    def __repr__(self) -> str:
        return f"Subset({self.dataset!r}, {len(self)} of {len(self.dataset)})"


class ConcatImages:
    """Several ``LabelledImages`` with one class list, one after the other (``LabelledImages``)."""

    def __init__(self, parts: Sequence[LabelledImages]) -> None:
        if not parts:
            raise DataError("ConcatImages needs at least one dataset; pass one or more")
        names = list(parts[0].class_names)
        for part in parts[1:]:
            if list(part.class_names) != names:
                raise DataError(
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

    def __repr__(self) -> str:
        return f"ConcatImages({len(self.parts)} parts, {len(self)} images)"
