"""Seeded N-way K-shot episodes: indices from ``EpisodeSampler``, images from ``load_episode``.

Episode ``i`` is a pure function of (seed, i, targets, n_way, k_shot, n_query): the same in every
run, process, machine and shard, and independent of ``num_episodes``, so raising the episode count
keeps the earlier episodes. Randomness comes from ``numpy.random.default_rng([seed, i])``: a
SeedSequence of the two integers (Python's ``hash()`` is salted per process, so it is never used).
Only the raw 64-bit stream of its PCG64 bit generator is consumed, because numpy guarantees that
stream across versions but not the output of ``Generator.choice`` and friends.

An episode manifest lists episodes as data (``manifest_lines``, one JSON object per episode) and
``EpisodeManifest`` serves them back from such lines, so that other toolkits' episodes (or
cdfsl's, in theirs) can be evaluated as they are.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cdfsl.data.base import LabelledImages
from cdfsl.errors import DataError

__all__ = [
    "Episode",
    "EpisodeIndices",
    "EpisodeManifest",
    "EpisodeSampler",
    "UniformDraws",
    "load_episode",
    "manifest_lines",
]


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


class UniformDraws:
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
        draws = UniformDraws(self.seed, i)
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
    to_tensor: Callable[[Image.Image], Tensor] | None,
    class_names: Sequence[str] | None = None,
) -> Episode:
    """Load an episode's images with ``to_tensor`` (PIL RGB -> (3, H, W)) and stack them.

    ``to_tensor`` None: no image is read and both image tensors are empty (a frozen-feature
    method reads cached features instead); labels, names and ids are as always.
    ``class_names``: the episode's names in label order (a manifest's); by default the
    dataset's names of ``indices.class_ids``.
    """
    names = dataset.class_names

    def images(ids: Sequence[int]) -> Tensor:
        return torch.empty(0) if to_tensor is None else _load_images(dataset, ids, to_tensor)

    return Episode(
        support_images=images(indices.support),
        support_labels=torch.tensor(indices.support_labels, dtype=torch.long),
        query_images=images(indices.query),
        query_labels=torch.tensor(indices.query_labels, dtype=torch.long),
        class_names=(
            list(class_names) if class_names is not None else [names[c] for c in indices.class_ids]
        ),
        support_ids=tuple(dataset.sample_id(i) for i in indices.support),
        query_ids=tuple(dataset.sample_id(i) for i in indices.query),
        index=indices.index,
    )


def manifest_lines(
    sampler: EpisodeSampler, dataset: LabelledImages, seed_of: Callable[[int], int]
) -> list[dict]:
    """The manifest of ``sampler``'s episodes over ``dataset``: one JSON-ready dict each.

    ``{"episode": i, "seed": seed_of(i), "classes": [N names], "support_ids": [N·K ids],
    "support_labels": [N·K], "query_ids": [N·Q ids], "query_labels": [N·Q]}``, ids the
    dataset's ``sample_id`` (paths relative to its root), labels indices into ``classes``;
    ``seed`` is the episode's training seed (adapters, views, dropout), as in its result row.
    """
    names = dataset.class_names
    lines = []
    for i in range(len(sampler)):
        e = sampler.episode(i)
        lines.append({
            "episode": i,
            "seed": int(seed_of(i)),
            "classes": [names[c] for c in e.class_ids],
            "support_ids": [dataset.sample_id(j) for j in e.support],
            "support_labels": list(e.support_labels),
            "query_ids": [dataset.sample_id(j) for j in e.query],
            "query_labels": list(e.query_labels),
        })  # fmt: skip
    return lines


_MANIFEST_KEYS = (
    "episode",
    "classes",
    "support_ids",
    "support_labels",
    "query_ids",
    "query_labels",
)


class EpisodeManifest:
    """The episodes of manifest ``lines`` (see :func:`manifest_lines`) over ``dataset``.

    Every line names its episode, classes, support and query ids and labels (``seed`` may be
    absent: the caller then derives one). Episodes are numbered 0..n-1, each once (any line
    order), and share one shape: N classes, K support and Q query images of each, so that
    they train side by side as a protocol's do (``n_way``, ``k_shot``, ``n_query``,
    ``episodes``). ``source`` names the manifest in errors. Every id must be a sample of
    ``dataset``: the missing ones are named in one ``DataError``, before anything trains.
    """

    def __init__(
        self, lines: Sequence[Mapping], dataset: LabelledImages, source: str = "manifest"
    ) -> None:
        self.source = source
        if not lines:
            raise DataError(f"{source} holds no episodes; expected one JSON line per episode")
        for number, line in enumerate(lines, start=1):
            absent = [key for key in _MANIFEST_KEYS if key not in line]
            if absent:
                raise DataError(
                    f"{source} line {number} lacks {', '.join(absent)}; expected the keys "
                    f"{', '.join(_MANIFEST_KEYS)} (and seed); fix that line or export the "
                    "manifest again (cdfsl eval --export_manifest FILE)"
                )
        by_episode = {int(line["episode"]): line for line in lines}
        if sorted(by_episode) != list(range(len(lines))):
            numbers = sorted(by_episode)
            shown = ", ".join(map(str, numbers[:8])) + (", ..." if numbers[8:] else "")
            raise DataError(
                f"{source} numbers its {len(lines)} lines as episodes {shown}; expected "
                f"0..{len(lines) - 1}, each once; fix: renumber the episode fields"
            )
        self._lines = [by_episode[i] for i in range(len(lines))]
        self.n_way, self.k_shot, self.n_query = self._shape(self._lines[0], 0)
        for i, line in enumerate(self._lines):
            n, k, q = self._shape(line, i)
            if (n, k, q) != (self.n_way, self.k_shot, self.n_query):
                raise DataError(
                    f"{source} episode {i} is {n}-way {k}-shot {q}-query, episode 0 "
                    f"{self.n_way}-way {self.k_shot}-shot {self.n_query}-query; expected one "
                    "shape for every episode; fix: split the manifest by shape"
                )
        index = {dataset.sample_id(j): j for j in range(len(dataset))}
        wanted = [i for line in self._lines for i in (*line["support_ids"], *line["query_ids"])]
        missing = list(dict.fromkeys(i for i in wanted if i not in index))
        if missing:
            shown = ", ".join(missing[:5]) + (
                f" and {len(missing) - 5} more" if missing[5:] else ""
            )
            raise DataError(
                f"{source} names {len(missing)} files the dataset lacks: {shown}; expected every "
                "support and query id relative to the dataset root; fix: pass the --data.root "
                "the manifest was exported from, or restore those files"
            )
        self._index = index
        self._targets = dataset.targets
        self.episodes = len(self._lines)

    def _shape(self, line: Mapping, i: int) -> tuple[int, int, int]:
        """(N, K, Q) of one line; refuses labels outside the classes or unequal per class."""
        n = len(line["classes"])
        shape = [n]
        for part in ("support", "query"):
            ids, labels = line[f"{part}_ids"], [int(y) for y in line[f"{part}_labels"]]
            counts = [labels.count(c) for c in range(n)]
            if (
                len(ids) != len(labels)
                or not labels
                or any(not 0 <= y < n for y in labels)
                or (len(set(counts)) != 1)
            ):
                raise DataError(
                    f"{self.source} episode {i}: {len(ids)} {part} ids, {len(labels)} labels over "
                    f"{n} classes; expected one label in [0, {n}) per id and the same count for "
                    "every class; fix that line"
                )
            shape.append(counts[0])
        return shape[0], shape[1], shape[2]

    def __len__(self) -> int:
        return self.episodes

    @property
    def lines(self) -> list[Mapping]:
        """The manifest's lines, in episode order."""
        return list(self._lines)

    def episode(self, i: int) -> EpisodeIndices:
        """Episode ``i``'s dataset indices and labels, in the manifest's order."""
        line = self._lines[operator.index(i)]
        support = tuple(self._index[j] for j in line["support_ids"])
        labels = tuple(int(y) for y in line["support_labels"])
        # The dataset class of each label (its first support image's): names come from the line.
        first = {y: j for j, y in reversed(list(zip(support, labels, strict=True)))}
        return EpisodeIndices(
            index=i,
            class_ids=tuple(int(self._targets[first[y]]) for y in range(self.n_way)),
            support=support,
            support_labels=labels,
            query=tuple(self._index[j] for j in line["query_ids"]),
            query_labels=tuple(int(y) for y in line["query_labels"]),
        )

    def seed(self, i: int) -> int | None:
        """Episode ``i``'s training seed, or None when the manifest gives none."""
        seed = self._lines[i].get("seed")
        return None if seed is None else int(seed)

    def class_names(self, i: int) -> list[str]:
        """Episode ``i``'s class names in label order, as the manifest spells them."""
        return [str(name) for name in self._lines[i]["classes"]]
