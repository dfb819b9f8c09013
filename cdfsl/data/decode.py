"""Decoding every image of a dataset before hours are spent on it (``cdfsl data check``).

A layout's checks read metadata only, so a truncated JPEG or a text file named ``.png`` passes
them and stops ``cdfsl eval`` at the first episode that draws it. :func:`unreadable_images` loads
every image exactly as a run does (``load``: PIL open, full decode, RGB) on a pool of threads
(Pillow decodes with the GIL released, so threads use every core without copying the dataset
into processes) and returns one ``Problem`` per image that fails, in dataset order whatever the
number of workers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

from tqdm.auto import tqdm

from cdfsl.data.base import LabelledImages
from cdfsl.data.layout import Problem
from cdfsl.errors import DataError

__all__ = ["available_cores", "unreadable_images"]

_CHUNK = 32  # images per task: few enough futures for a million images, a smooth bar
_EXPECTED = "an image file that decodes to its end"
_FIX = "replace it with an intact copy (re-extract or re-download the dataset) or delete it"


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _where(dataset: LabelledImages, index: int) -> str:
    path = getattr(dataset, "path", None)
    return str(path(index)) if callable(path) else dataset.sample_id(index)


def _decode(items: Sequence[tuple[LabelledImages, int]]) -> list[Problem]:
    problems = []
    for dataset, index in items:
        try:
            dataset.load(index)
        # Any failure of load is a file the run would stop on, whatever its type.
        except Exception as err:
            # open_rgb wraps PIL's error in a sentence of its own; report PIL's words.
            cause = err.__cause__ if isinstance(err, DataError) and err.__cause__ else err
            reason = str(cause).replace("\n", " ") or type(cause).__name__
            found = f"cannot be decoded ({reason})"
            problems.append(Problem(_where(dataset, index), found, _EXPECTED, _FIX))
    return problems


def unreadable_images(
    datasets: Sequence[LabelledImages], workers: int | None = None, progress: bool = True
) -> list[Problem]:
    """One ``Problem`` per image of ``datasets`` that ``load`` cannot decode, in dataset order.

    An image listed by several datasets (overlapping splits) is decoded once. workers: threads
    decoding at once (default: ``available_cores()``; 1 decodes in this thread); progress: show
    a bar on stderr.
    """
    if workers is None:
        workers = available_cores()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise DataError(
            f"workers={workers!r}: expected an integer >= 1 (default: the {available_cores()} "
            "cores available); fix --workers"
        )
    todo: dict[str, tuple[LabelledImages, int]] = {}
    for dataset in datasets:
        for index in range(len(dataset)):
            todo.setdefault(_where(dataset, index), (dataset, index))
    items = list(todo.values())
    chunks = [items[start : start + _CHUNK] for start in range(0, len(items), _CHUNK)]
    found: list[list[Problem]] = [[] for _ in chunks]
    with tqdm(total=len(items), desc="decoding", unit="img", disable=not progress) as bar:
        if workers == 1:
            for c, chunk in enumerate(chunks):
                found[c] = _decode(chunk)
                bar.update(len(chunk))
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(_decode, chunk): c for c, chunk in enumerate(chunks)}
                for future in as_completed(futures):
                    c = futures[future]
                    found[c] = future.result()
                    bar.update(len(chunks[c]))
    return [problem for chunk in found for problem in chunk]
