"""The mnist source reads hand-written IDX files (the format, not a download)."""

import gzip
import json
import struct

import numpy as np
import pytest

from cdfsl.data import DataConfig, build_dataset, validate_source
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


FASHION = ["T-shirt/top", "trouser", "pullover"]


def _fashion(root, names=FASHION, n=6, size=8):
    """A tiny Fashion-MNIST-like test split in root: ``n`` size x size images, labels 0..2."""
    images = np.arange(n * size * size).reshape(n, size, size) % 199
    _write(root, "t10k", images, np.arange(n) % 3)
    names_file = root / "names.json"
    names_file.write_text(json.dumps(names))
    return names_file


def test_idx_source_names_each_label_from_a_list_or_an_object(tmp_path):
    names_file = _fashion(tmp_path)
    images = build_dataset(DataConfig("idx", str(tmp_path), str(names_file)))
    assert images.class_names == FASHION and images.classes == ["0", "1", "2"]
    assert images.targets == [0, 1, 2, 0, 1, 2]
    assert images.load(4).size == (8, 8) and images.sample_id(4) == "test/4"
    assert images.load(4).getpixel((1, 2)) == ((4 * 64 + 2 * 8 + 1) % 199,) * 3
    keyed = tmp_path / "keyed.json"
    keyed.write_text(json.dumps({"2": "pullover", "0": "T-shirt/top", "1": "trouser"}))
    assert build_dataset(DataConfig("idx", str(tmp_path), str(keyed))).class_names == FASHION
    report = validate_source(DataConfig("idx", str(tmp_path), str(names_file)))
    assert report.ok and report.classes == ["0", "1", "2"] and report.class_names == FASHION


@pytest.mark.parametrize("names", [FASHION[:2], [*FASHION, "dress"]])
def test_idx_names_of_another_count_name_both_files_and_the_count(tmp_path, names):
    names_file = _fashion(tmp_path, names)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    with pytest.raises(DataError) as err:
        build_dataset(DataConfig("idx", str(tmp_path), str(names_file)))
    assert str(err.value) == (
        f"{names_file}: {len(names)} class names, but {labels} holds labels 0..2; expected 3 "
        "names, one per label in label order; fix the names file (is it another dataset's?)"
    )


def test_idx_refuses_missing_repeated_and_misnumbered_names(tmp_path):
    names_file = _fashion(tmp_path, ["a", "b", "a"])
    with pytest.raises(DataError, match=r"expected --data.class_names FILE"):
        build_dataset(DataConfig("idx", str(tmp_path)))
    with pytest.raises(DataError, match="the name 'a' is given to several labels"):
        build_dataset(DataConfig("idx", str(tmp_path), str(names_file)))
    names_file.write_text(json.dumps({"0": "a", "1": "b", "3": "c"}))
    with pytest.raises(DataError, match=r"keys \['0', '1', '3'\] are not the labels 0..2"):
        build_dataset(DataConfig("idx", str(tmp_path), str(names_file)))
    names_file.write_text(json.dumps(["a", "", "c"]))
    with pytest.raises(DataError, match="with non-empty names"):
        build_dataset(DataConfig("idx", str(tmp_path), str(names_file)))
    names_file.write_text("[oops")
    with pytest.raises(DataError, match=r"names.json: cannot be read"):
        build_dataset(DataConfig("idx", str(tmp_path), str(names_file)))


def test_mnist_keeps_its_digits_and_points_other_idx_data_to_idx(tmp_path):
    images, labels = _digits(3)
    _write(tmp_path, "t10k", images, labels)  # only the digits 0..2: a subset is fine
    assert build_dataset(DataConfig("mnist", str(tmp_path))).class_names == list("0123456789")
    with pytest.raises(
        DataError, match=r"drop it, or read another IDX dataset .* --data.source idx"
    ):
        build_dataset(DataConfig("mnist", str(tmp_path), "names.json"))
    _write(tmp_path, "t10k", images, np.array([0, 10, 1]))
    with pytest.raises(DataError, match=r"label 10 outside 0..9; .* --data.source idx"):
        build_dataset(DataConfig("mnist", str(tmp_path)))
