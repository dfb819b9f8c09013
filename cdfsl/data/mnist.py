"""IDX datasets (MNIST's file format): MNIST itself, and any other with its own class names.

A split is two files: ``<prefix>-images-idx3-ubyte`` (N images, H x W grey) and
``<prefix>-labels-idx1-ubyte`` (N labels), each raw or ``.gz``, where the prefix is ``train`` or
``t10k`` (test). Fashion-MNIST and KMNIST ship in this format under the same names.

:class:`IdxImages` (the ``idx`` source) reads them from ``ROOT`` and names label ``i`` by entry
``i`` of a class-names file, a JSON list in label order (``["T-shirt/top", "trouser", ...]``) or
an object keyed by label (``{"0": "T-shirt/top", ...}``), which must name every label the labels
file holds. :class:`Mnist` (the X-TAIL Order-I domain ``mnist``) looks in ``ROOT``, ``ROOT/mnist``
and ``ROOT/MNIST/raw`` (torchvision's download folder) and names the classes "0".."9";
:data:`TORCHVISION_CLASSES` holds torchvision's names ("0 - zero" ...), which the RAIL reference
builds its prompts from (see ``cdfsl.continual.xtail.CLASS_NAME_STYLES``).
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cdfsl.errors import DataError

__all__ = [
    "SPLIT_PREFIX",
    "TORCHVISION_CLASSES",
    "IdxImages",
    "Mnist",
    "read_idx",
    "read_label_names",
]

SPLIT_PREFIX = {"train": "train", "test": "t10k"}
TORCHVISION_CLASSES = (
    "0 - zero", "1 - one", "2 - two", "3 - three", "4 - four",
    "5 - five", "6 - six", "7 - seven", "8 - eight", "9 - nine",
)  # fmt: skip
"""``torchvision.datasets.MNIST.classes``, in label order."""
_IMAGES_MAGIC, _LABELS_MAGIC = 0x00000803, 0x00000801
_NAMES_EXPECTED = (
    'a JSON list of class names in label order (["T-shirt/top", "trouser", ...]) or an object '
    'keyed by label ({"0": "T-shirt/top", ...})'
)


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


def read_label_names(path: str | Path) -> list[str]:
    """Class names in label order from a JSON file: a list, or an object keyed "0", "1", ..."""
    path = Path(path).expanduser()
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = str(err).replace("\n", " ")
        raise DataError(
            f"{path}: cannot be read ({reason}); expected {_NAMES_EXPECTED}; fix --data.class_names"
        ) from err
    if isinstance(names, dict):
        labels = [str(i) for i in range(len(names))]
        if sorted(names) != sorted(labels):
            raise DataError(
                f"{path}: keys {sorted(names)[:5]} are not the labels 0..{len(names) - 1}; "
                f"expected {_NAMES_EXPECTED}; fix the keys"
            )
        names = [names[label] for label in labels]
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise DataError(
            f"{path}: holds {str(names)[:60]}; expected {_NAMES_EXPECTED} with non-empty names; "
            "fix the file"
        )
    return [n.strip() for n in names]


class IdxImages:
    """One split of an IDX dataset as :class:`~cdfsl.data.base.LabelledImages` (grey, served
    as RGB), label ``i`` named ``class_names[i]``; see the module docstring.

    class_names: the names in label order, or a JSON file of them (``read_label_names``); their
    count must be the number of labels in the split's labels file (its largest label + 1).
    """

    #: Folders under ``root`` searched for the files, in order.
    folders: tuple[str, ...] = (".",)
    source = "idx"

    def __init__(
        self, root: str | Path | None, class_names: str | Path | Sequence[str], split: str = "test"
    ) -> None:
        if root is None:
            raise DataError(f"no dataset root given for {self.source}; pass --data.root DIR")
        if split not in SPLIT_PREFIX:
            raise DataError(
                f"{self.source} has splits {sorted(SPLIT_PREFIX)}, got split={split!r}; "
                "fix --data.options"
            )
        root = Path(root)
        prefix = SPLIT_PREFIX[split]
        paths = {}
        for kind, name in (("images", "images-idx3-ubyte"), ("labels", "labels-idx1-ubyte")):
            paths[kind] = self._find(root, f"{prefix}-{name}")
            if paths[kind] is None:
                where = ", ".join(str(root / f) for f in self.folders)
                raise DataError(
                    f"{self.source} {split} split: no {prefix}-{name}[.gz] in {where}; put the "
                    "four IDX files (train-/t10k-images-idx3-ubyte, train-/t10k-labels-idx1-ubyte, "
                    "as the dataset's site or torchvision's raw folder has them) there"
                )
        self.images = read_idx(paths["images"], _IMAGES_MAGIC, 3)
        labels = read_idx(paths["labels"], _LABELS_MAGIC, 1)
        if len(labels) != len(self.images):
            raise DataError(
                f"{paths['labels']}: {len(labels)} labels for {len(self.images)} images in "
                f"{paths['images']}; the two files are from different splits or downloads"
            )
        if isinstance(class_names, (str, Path)):
            names, named_by = read_label_names(class_names), str(class_names)
        else:
            names, named_by = list(class_names), "the class names given"
        self._check_names(
            names, named_by, paths["labels"], int(labels.max()) + 1 if labels.size else 0
        )
        self.split = split
        self._names = names
        self._targets = labels.astype(int).tolist()

    def _find(self, root: Path, name: str) -> Path | None:
        for folder in self.folders:
            for suffix in ("", ".gz"):
                path = root / folder / f"{name}{suffix}"
                if path.is_file():
                    return path
        return None

    def _check_names(self, names: list[str], named_by: str, labels: Path, count: int) -> None:
        """Raise ``DataError`` unless ``names`` name labels 0..count-1, one distinct name each."""
        if len(names) != count:
            raise DataError(
                f"{named_by}: {len(names)} class names, but {labels} holds labels 0..{count - 1}; "
                f"expected {count} names, one per label in label order; fix the names file "
                "(is it another dataset's?)"
            )
        repeated = [n for n, k in Counter(names).items() if k > 1]
        if repeated:
            raise DataError(
                f"{named_by}: the name {repeated[0]!r} is given to several labels; expected "
                "distinct names (identical prompts cannot be told apart); rename them"
            )

    @property
    def targets(self) -> list[int]:
        return self._targets

    @property
    def class_names(self) -> list[str]:
        return list(self._names)

    @property
    def classes(self) -> list[str]:
        """The class keys: the labels as text, "0", "1", ..."""
        return [str(label) for label in range(len(self._names))]

    def __len__(self) -> int:
        return len(self._targets)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")

    def sample_id(self, index: int) -> str:
        return f"{self.split}/{index}"


class Mnist(IdxImages):
    """One MNIST split (28x28 digits), classes "0".."9"; see the module docstring."""

    folders = (".", "mnist", "MNIST/raw")
    source = "mnist"

    def __init__(self, root: str | Path | None, split: str = "test") -> None:
        super().__init__(root, [str(d) for d in range(10)], split)

    def _check_names(self, names: list[str], named_by: str, labels: Path, count: int) -> None:
        # A file may hold only some of the digits (a subset of MNIST); none may exceed 9.
        if count > len(names):
            raise DataError(
                f"{labels}: label {count - 1} outside 0..9; for another IDX dataset use "
                "--data.source idx with --data.class_names"
            )
