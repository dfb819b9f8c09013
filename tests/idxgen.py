"""IDX files (MNIST's format) written from arrays for tests: no downloads."""

from __future__ import annotations

import gzip
import json
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["FASHION", "idx_bytes", "write_fashion_like", "write_idx_split"]

FASHION = ["T-shirt/top", "trouser", "pullover"]
"""The first three Fashion-MNIST class names, in label order."""


def idx_bytes(magic: int, array: np.ndarray) -> bytes:
    """One IDX file: big-endian magic, the sizes of ``array``'s dimensions, then its uint8 data."""
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_split(
    folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool = False
) -> None:
    """``folder/<prefix>-images-idx3-ubyte`` and ``-labels-idx1-ubyte`` (``.gz`` if ``gz``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in (
        (f"{prefix}-images-idx3-ubyte", idx_bytes(0x803, images)),
        (f"{prefix}-labels-idx1-ubyte", idx_bytes(0x801, labels)),
    ):
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (folder / name).write_bytes(blob)


def write_fashion_like(root: Path, names: Sequence[str] = FASHION, n: int = 6) -> Path:
    """A test split in ``root`` (``n`` 8x8 images, pixels counting up modulo 199, labels 0, 1, 2,
    0, ...) and ``root/names.json`` holding ``names``, which is returned."""
    images = np.arange(n * 8 * 8).reshape(n, 8, 8) % 199
    write_idx_split(root, "t10k", images, np.arange(n) % 3)
    names_file = root / "names.json"
    names_file.write_text(json.dumps(list(names)))
    return names_file
