"""MNIST from its original IDX files (the X-TAIL Order-I domain ``mnist``).

Looked up in ``ROOT``, ``ROOT/mnist`` and ``ROOT/MNIST/raw`` (torchvision's download folder):
``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` (60,000 digits),
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (10,000), each raw or ``.gz``.
Class names are the digits "0".."9"; :data:`TORCHVISION_CLASSES` holds torchvision's names
("0 - zero" ...), which the RAIL reference builds its prompts from (see
``cdfsl.evaluation.xtail.CLASS_NAME_STYLES``).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

from cdfsl.errors import DataError

SPLIT_PREFIX = {"train": "train", "test": "t10k"}
TORCHVISION_CLASSES = (
    "0 - zero", "1 - one", "2 - two", "3 - three", "4 - four",
    "5 - five", "6 - six", "7 - seven", "8 - eight", "9 - nine",
)  # fmt: skip
"""``torchvision.datasets.MNIST.classes``, in label order."""
_FOLDERS = (".", "mnist", "MNIST/raw")
_IMAGES_MAGIC, _LABELS_MAGIC = 0x00000803, 0x00000801


def _find(root: Path, name: str) -> Path | None:
    for folder in _FOLDERS:
        for suffix in ("", ".gz"):
            path = root / folder / f"{name}{suffix}"
            if path.is_file():
                return path
    return None


def read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """The uint8 array of one IDX file (big-endian header: magic, then ``ndim`` sizes)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read ({err}); download the file again") from err
    header = 4 + 4 * ndim
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise DataError(
            f"{path}: not an MNIST IDX file (expected magic 0x{magic:08x}); download it again"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) - header != int(np.prod(shape)):
        raise DataError(
            f"{path}: header says {shape} but holds {len(data) - header} bytes of data "
            "(truncated download?); download it again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


class Mnist:
    """One MNIST split as :class:`~cdfsl.data.base.LabelledImages` (28x28 grey, served as RGB)."""

    def __init__(self, root: str | Path | None, split: str = "test") -> None:
        if root is None:
            raise DataError("no dataset root given for mnist; pass --data.root DIR")
        if split not in SPLIT_PREFIX:
            raise DataError(f"mnist has splits {sorted(SPLIT_PREFIX)}, got split={split!r}")
        root = Path(root)
        prefix = SPLIT_PREFIX[split]
        paths = {}
        for kind, name in (("images", "images-idx3-ubyte"), ("labels", "labels-idx1-ubyte")):
            paths[kind] = _find(root, f"{prefix}-{name}")
            if paths[kind] is None:
                where = ", ".join(str(root / f) for f in _FOLDERS)
                raise DataError(
                    f"mnist {split} split: no {prefix}-{name}[.gz] in {where}; put the four "
                    "original IDX files (from the MNIST site or torchvision's MNIST/raw) there"
                )
        self.images = read_idx(paths["images"], _IMAGES_MAGIC, 3)
        labels = read_idx(paths["labels"], _LABELS_MAGIC, 1)
        if len(labels) != len(self.images):
            raise DataError(
                f"{paths['labels']}: {len(labels)} labels for {len(self.images)} images in "
                f"{paths['images']}; the two files are from different splits or downloads"
            )
        if labels.size and labels.max() > 9:
            raise DataError(f"{paths['labels']}: label {labels.max()} outside 0..9")
        self.split = split
        self._targets = labels.astype(int).tolist()

    @property
    def targets(self) -> list[int]:
        return self._targets

    @property
    def class_names(self) -> list[str]:
        return [str(d) for d in range(10)]

    def __len__(self) -> int:
        return len(self._targets)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")

    def sample_id(self, index: int) -> str:
        return f"{self.split}/{index}"
