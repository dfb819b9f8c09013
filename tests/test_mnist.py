"""The mnist source reads hand-written IDX files (the format, not a download)."""

import json

import numpy as np
import pytest
from idxgen import FASHION, idx_bytes, write_fashion_like
from idxgen import write_idx_split as _write

from cdfsl.data import DataConfig, build_dataset, validate_source
from cdfsl.errors import DataError


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
    blob = idx_bytes(0x803, images)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(blob[:-10])
    with pytest.raises(DataError, match=r"header says \(4, 28, 28\) .*truncated"):
        build_dataset(DataConfig("mnist", str(tmp_path)))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(0x801, images))
    with pytest.raises(DataError, match="not an MNIST IDX file"):
        build_dataset(DataConfig("mnist", str(tmp_path)))
    with pytest.raises(DataError, match="splits"):
        build_dataset(DataConfig("mnist", str(tmp_path), options={"split": "val"}))


def test_idx_source_names_each_label_from_a_list_or_an_object(tmp_path):
    names_file = write_fashion_like(tmp_path)
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
    names_file = write_fashion_like(tmp_path, names)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    with pytest.raises(DataError) as err:
        build_dataset(DataConfig("idx", str(tmp_path), str(names_file)))
    assert str(err.value) == (
        f"{names_file}: {len(names)} class names, but {labels} holds labels 0..2; expected 3 "
        "names, one per label in label order; fix the names file (is it another dataset's?)"
    )


def test_idx_refuses_missing_repeated_and_misnumbered_names(tmp_path):
    names_file = write_fashion_like(tmp_path, ["a", "b", "a"])
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
