"""Seeded N-way K-shot episodes: indices from ``EpisodeSampler``, images from ``load_episode``.

Episode ``i`` is a pure function of (seed, i, targets, n_way, k_shot, n_query): the same in every
run, process, machine and shard, and independent of ``num_episodes``, so raising the episode count
keeps the earlier episodes. Randomness comes from ``numpy.random.default_rng([seed, i])``: a
SeedSequence of the two integers (Python's ``hash()`` is salted per process, so it is never used).
Only the raw 64-bit stream of its PCG64 bit generator is consumed, because numpy guarantees that
stream across versions but not the output of ``Generator.choice`` and friends.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cdfsl.data.base import LabelledImages
from cdfsl.errors import DataError

__all__ = ["Episode", "EpisodeIndices", "EpisodeSampler", "load_episode"]


@dataclass(frozen=True)
class EpisodeIndices:
    """Dataset indices of one episode, class-major: the K support (Q query) images of class 0 first.

    class_ids: (N,) dataset class indices, in label order; support: (N·K,) dataset indices with
    support_labels (N·K,) in [0, N); query: (N·Q,) with query_labels (N·Q,). Label l means
    dataset class class_ids[l].
    """

    index: int
    class_ids: tuple[int, ...]
    support: tuple[int, ...]
    support_labels: tuple[int, ...]
    query: tuple[int, ...]
    query_labels: tuple[int, ...]


class _UniformDraws:
    """Unbiased uniform integers from the version-stable raw stream of a seeded PCG64."""

    def __init__(self, seed: int, index: int) -> None:
        self._bits = np.random.default_rng([seed, index]).bit_generator

    def below(self, n: int) -> int:
        """One integer uniform in [0, n)."""
        # Rejecting the top partial block of 2**64 removes the modulo bias; it almost never loops.
        limit = (1 << 64) - (1 << 64) % n
        while True:
            value = int(self._bits.random_raw())
            if value < limit:
                return value % n

    def sample(self, population: Sequence[int], k: int) -> list[int]:
        """k distinct items of population, in draw order (partial Fisher-Yates)."""
        # Only the swapped positions are stored, so a draw costs O(k), not O(len(population)).
        swapped: dict[int, int] = {}
        picked: list[int] = []
        for j in range(k):
            r = j + self.below(len(population) - j)
            picked.append(swapped.get(r, r))
            swapped[r] = swapped.get(j, j)
        return [int(population[p]) for p in picked]


# The `cdfsl eval` flag that sets each sampler argument, for the fix in error messages.
_FLAGS = {"n_way": "--way", "k_shot": "--shot", "n_query": "--query", "num_episodes": "--episodes"}


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool):
        raise DataError(f"{name}={value}; expected a positive integer; fix {_FLAGS[name]}")
    try:
        value = operator.index(value)
    except TypeError:
        raise DataError(
            f"{name}={value!r}; expected a positive integer; fix {_FLAGS[name]}"
        ) from None
    if value < 1:
        raise DataError(f"{name}={value}; expected a positive integer; fix {_FLAGS[name]}")
    return value


class EpisodeSampler:
    """Seeded N-way K-shot episodes over a dataset's ``targets``.

    Eligible classes have at least k_shot + n_query images; an episode draws n_way of them, then
    k_shot + n_query distinct images of each, the first k_shot as support and the rest as query.
    Iterating yields each episode's dataset indices, support then query, as one flat list, so the
    sampler serves as a DataLoader ``batch_sampler``; ``episode(i)`` gives the labelled split.
    ``class_names`` (optional, in class-index order) only makes error messages readable.
    """

    def __init__(
        self,
        targets: Sequence[int],
        n_way: int,
        k_shot: int,
        n_query: int,
        num_episodes: int,
        seed: int = 0,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.n_way = _positive("n_way", n_way)
        self.k_shot = _positive("k_shot", k_shot)
        self.n_query = _positive("n_query", n_query)
        self.num_episodes = _positive("num_episodes", num_episodes)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DataError(f"seed={seed!r}; expected an integer >= 0; fix --seed")
        self.seed = int(seed)

        labels = np.asarray(targets)
        if labels.size and (labels.ndim != 1 or labels.dtype.kind not in "iu" or labels.min() < 0):
            raise DataError(
                f"targets of shape {labels.shape} and dtype {labels.dtype}; expected a flat "
                "sequence of class indices >= 0; pass dataset.targets"
            )
        labels = labels.reshape(-1).astype(np.int64)
        classes, counts = np.unique(labels, return_counts=True)
        # A stable sort keeps each class's images in dataset order, so episodes do not depend
        # on how the sort breaks ties.
        order = np.argsort(labels, kind="stable")
        per_class = np.split(order, np.cumsum(counts)[:-1]) if labels.size else []
        self._images_of: dict[int, tuple[int, ...]] = {
            int(c): tuple(int(i) for i in members)
            for c, members in zip(classes, per_class, strict=True)
        }

        if self.n_way > len(classes):
            raise DataError(
                f"way {self.n_way} but the dataset has {len(classes)} classes; lower --way "
                f"to at most {len(classes)}"
            )
        needed = self.k_shot + self.n_query
        self.eligible_classes: tuple[int, ...] = tuple(
            int(c) for c, n in zip(classes, counts, strict=True) if n >= needed
        )
        if len(self.eligible_classes) < self.n_way:
            short = [(int(c), int(n)) for c, n in zip(classes, counts, strict=True) if n < needed]

            def describe(c: int, n: int) -> str:
                name = repr(class_names[c]) if class_names is not None else f"class {c}"
                return f"{name} ({n})"

            shown = ", ".join(describe(c, n) for c, n in short[:8])
            more = f" and {len(short) - 8} more" if len(short) > 8 else ""
            raise DataError(
                f"{self.n_way}-way {self.k_shot}-shot episodes with {self.n_query} queries need "
                f"{needed} images in each of {self.n_way} classes, but only "
                f"{len(self.eligible_classes)} of {len(classes)} classes have that many; short: "
                f"{shown}{more}; lower --shot, --query or --way, or add images"
            )

    def __len__(self) -> int:
        return self.num_episodes

    def episode(self, i: int) -> EpisodeIndices:
        """The indices of episode ``i``, 0 <= i < num_episodes; see the module docstring."""
        i = operator.index(i)
        if not 0 <= i < self.num_episodes:
            raise IndexError(f"episode {i} out of range; the sampler has {self.num_episodes}")
        draws = _UniformDraws(self.seed, i)
        class_ids = draws.sample(self.eligible_classes, self.n_way)
        support: list[int] = []
        query: list[int] = []
        for class_id in class_ids:
            chosen = draws.sample(self._images_of[class_id], self.k_shot + self.n_query)
            support.extend(chosen[: self.k_shot])
            query.extend(chosen[self.k_shot :])
        return EpisodeIndices(
            index=i,
            class_ids=tuple(class_ids),
            support=tuple(support),
            support_labels=tuple(np.repeat(np.arange(self.n_way), self.k_shot).tolist()),
            query=tuple(query),
            query_labels=tuple(np.repeat(np.arange(self.n_way), self.n_query).tolist()),
        )

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(self.num_episodes):
            indices = self.episode(i)
            yield [*indices.support, *indices.query]

    def __repr__(self) -> str:
        return (
            f"EpisodeSampler({self.n_way}-way {self.k_shot}-shot, {self.n_query} queries, "
            f"{self.num_episodes} episodes, seed {self.seed})"
        )


@dataclass
class Episode:
    """One episode's images and labels, ready for a method.

    support_images: (N·K, 3, H, W) and support_labels: (N·K,) int64 in [0, N); query_images:
    (N·Q, 3, H, W) and query_labels: (N·Q,) int64; class_names: N readable names, label order;
    support_ids / query_ids: the dataset's ``sample_id`` of each image; index: the episode number.
    """

    support_images: Tensor
    support_labels: Tensor
    query_images: Tensor
    query_labels: Tensor
    class_names: list[str]
    support_ids: tuple[str, ...]
    query_ids: tuple[str, ...]
    index: int


def _load_images(
    dataset: LabelledImages, indices: Sequence[int], to_tensor: Callable[[Image.Image], Tensor]
) -> Tensor:
    tensors = [to_tensor(dataset.load(i)) for i in indices]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        first = tensors[0].shape
        odd, odd_shape = next(
            (i, t.shape) for i, t in zip(indices, tensors, strict=True) if t.shape != first
        )
        raise DataError(
            f"to_tensor gave shape {tuple(first)} for {dataset.sample_id(indices[0])} but "
            f"{tuple(odd_shape)} for {dataset.sample_id(odd)}; expected one (3, H, W) shape "
            "for every image; make to_tensor resize to a fixed size"
        )
    return torch.stack(tensors)


def load_episode(
    dataset: LabelledImages,
    indices: EpisodeIndices,
    to_tensor: Callable[[Image.Image], Tensor],
) -> Episode:
    """Load an episode's images with ``to_tensor`` (PIL RGB -> (3, H, W)) and stack them."""
    names = dataset.class_names
    return Episode(
        support_images=_load_images(dataset, indices.support, to_tensor),
        support_labels=torch.tensor(indices.support_labels, dtype=torch.long),
        query_images=_load_images(dataset, indices.query, to_tensor),
        query_labels=torch.tensor(indices.query_labels, dtype=torch.long),
        class_names=[names[c] for c in indices.class_ids],
        support_ids=tuple(dataset.sample_id(i) for i in indices.support),
        query_ids=tuple(dataset.sample_id(i) for i in indices.query),
        index=indices.index,
    )
