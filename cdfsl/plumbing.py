"""Plumbing shared by every part of cdfsl: atomic writes, JSON values, quiet Lightning, the
warm-up cosine schedule and the prompt template several modules name. (open_clip's own
``LOCAL_DIR_PREFIX`` names local model folders; import it from ``open_clip.factory``.)

One copy of each: a store, a feature cache and a chain file write the same way, and a run
fingerprint is normalised the same way whichever command records it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "PROMPT_TEMPLATE",
    "plain_json",
    "quiet_lightning",
    "quiet_loggers",
    "resolve_device",
    "save_torch_atomic",
    "warmup_cosine",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_jsonl_atomic",
]

#: CLIP's plain prompt, the Mind paper's classifier prompt and every dataset's fallback.
PROMPT_TEMPLATE = "a photo of a {}."


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Make ``data`` the whole of ``path`` at once: a temporary file, fsync'd, then a rename.

    A kill at any moment leaves ``path`` as it was or as ``data``, never part of it (at worst a
    stray temporary file beside it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON with :func:`write_bytes_atomic`."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_jsonl_atomic(path: str | Path, rows: Iterable[Any]) -> None:
    """Write one JSON value per line (UTF-8, not ASCII-escaped) with :func:`write_bytes_atomic`."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_bytes_atomic(path, text.encode("utf-8"))


def save_torch_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a temporary file and a rename: readers never see half a file."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (a write may take only part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def temporary_path(path: Path) -> Path:
    """A temporary name beside ``path``, its own per process: shards of one run may write the
    same file (run.json) at once, on one host or several sharing the folder."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def plain_json(value: Any) -> Any:
    """``value`` as JSON values, e.g. for a run fingerprint or a summary: dataclasses and
    jsonargparse namespaces as dicts, tuples as lists, NaN and ±inf as None (JSON has no
    non-finite numbers); any other leaf JSON cannot hold becomes its repr."""
    if is_dataclass(value) and not isinstance(value, type):
        return plain_json(asdict(value))
    if type(value).__name__ == "Namespace" and hasattr(value, "__dict__"):
        return plain_json(vars(value))
    if isinstance(value, Mapping):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def cuda_index() -> int:
    """The CUDA device of this process: LOCAL_RANK, modulo the devices it can see.

    One visible device (a scheduler that sets CUDA_VISIBLE_DEVICES per rank) gives 0; more
    ranks than devices share them round-robin.
    """
    import torch

    count = torch.cuda.device_count()
    return int(os.environ.get("LOCAL_RANK", "0")) % max(count, 1)


def resolve_device(name: str, cuda_index: int | None = None) -> Any:
    """The ``torch.device`` a setting names: ``"auto"`` is CUDA when present, else the CPU;
    ``"cuda"`` / ``"gpu"`` (device ``cuda_index`` when given) and ``"cuda:N"`` need CUDA; any
    other name is passed to ``torch.device``. Raises ``CdfslError`` when CUDA is asked for and
    absent."""
    import torch

    from cdfsl.errors import CdfslError

    wants_cuda = name in ("auto", "cuda", "gpu") or name.startswith("cuda:")
    if not wants_cuda:
        return torch.device(name)
    if not torch.cuda.is_available():
        if name == "auto":
            return torch.device("cpu")
        raise CdfslError(f"device {name!r} requested but CUDA is absent; pass cpu (or auto)")
    if name.startswith("cuda:"):
        return torch.device(name)
    return torch.device("cuda") if cuda_index is None else torch.device("cuda", cuda_index)


@contextmanager
def quiet_loggers(prefixes: tuple[str, ...], level: int) -> Iterator[None]:
    """Every logger named ``prefixes[i]`` or below it at ``level`` for the duration."""
    names = [n for n in logging.root.manager.loggerDict if n.startswith(prefixes)]
    loggers = [logging.getLogger(n) for n in dict.fromkeys((*prefixes, *names))]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, levels, strict=True):
            lg.setLevel(old)


def quiet_lightning() -> Any:
    """Lightning's start-up and stop messages at WARNING level for the duration."""
    return quiet_loggers(("lightning.pytorch", "lightning.fabric", "lightning"), logging.WARNING)


#: Warnings that say nothing about a cdfsl run: Lightning's data-loader advice (a support set is
#: one in-memory batch) and a deprecation inside Lightning itself on this torch.
NOISE_WARNINGS = (".*does not have many workers.*", ".*LeafSpec.*is deprecated.*")


def ignore_noise_warnings() -> None:
    """Filter :data:`NOISE_WARNINGS` in this process (the CLI, and each rank it launches)."""
    for message in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.0) -> float:
    """The learning-rate factor of step ``step`` (0-based) of ``total``.

    Linear warm-up ``(step + 1) / warmup`` for ``step < warmup``, then a cosine from 1 down to
    ``floor`` over the remaining steps, held at ``floor`` past ``total``:
    ``floor + (1 - floor) · (1 + cos(π · min(1, (step - warmup) / max(1, total - warmup)))) / 2``.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
