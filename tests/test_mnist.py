"""The mnist source reads hand-written IDX files (the format, not a download)."""

import gzip
import struct

import numpy as np
import pytest

from cdfsl.data import DataConfig, build_dataset
from cdfsl.errors import DataError


def _idx(magic: int, array: np.ndarray) -> bytes:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write(folder, prefix, images, labels, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in (
        (f"{prefix}-images-idx3-ubyte", _idx(0x803, images)),
        (f"{prefix}-labels-idx1-ubyte", _idx(0x801, labels)),
    ):
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (folder / name).write_bytes(blob)


def _digits(n):
    images = np.arange(n * 28 * 28).reshape(n, 28, 28) % 251
    return images, np.arange(n) % 10


def test_reads_raw_and_gzip_idx_in_each_known_folder(tmp_path):
    images, labels = _digits(12)
    _write(tmp_path / "MNIST" / "raw", "t10k", images, labels, gz=True)
    _write(tmp_path / "mnist", "train", images[:5], labels[:5])
    test = build_dataset(DataConfig("mnist", str(tmp_path), options={"split": "test"}))
    train = build_dataset(DataConfig("mnist", str(tmp_path), options={"split": "train"}))
    assert (len(test), len(train)) == (12, 5)
    assert test.targets == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert test.class_names == [str(d) for d in range(10)]
    image = test.load(7)
    assert image.mode == "RGB" and image.size == (28, 28)
    pixel = (7 * 784 + 3 * 28 + 5) % 251  # row 3, column 5 of image 7
    assert image.getpixel((5, 3)) == (pixel, pixel, pixel)
    assert test.sample_id(7) == "test/7"


def test_missing_truncated_and_mismatched_files_are_named(tmp_path):
    with pytest.raises(DataError, match=r"no t10k-images-idx3-ubyte\[.gz\] in .*MNIST/raw"):
        build_dataset(DataConfig("mnist", str(tmp_path)))
    images, labels = _digits(4)
    _write(tmp_path, "t10k", images, labels[:3])
    with pytest.raises(DataError, match="3 labels for 4 images"):
        build_dataset(DataConfig("mnist", str(tmp_path)))
    blob = _idx(0x803, images)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(blob[:-10])
    with pytest.raises(DataError, match=r"header says \(4, 28, 28\) .*truncated"):
        build_dataset(DataConfig("mnist", str(tmp_path)))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(0x801, images))
    with pytest.raises(DataError, match="not an MNIST IDX file"):
        build_dataset(DataConfig("mnist", str(tmp_path)))
    with pytest.raises(DataError, match="splits"):
        build_dataset(DataConfig("mnist", str(tmp_path), options={"split": "val"}))
