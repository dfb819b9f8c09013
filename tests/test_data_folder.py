"""ImageFolder: class discovery, readable names, errors that name the path, lazy load errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from imagegen import make_image_folder
from PIL import Image

from cdfsl.data import ImageFolder, LabelledImages, readable_class_name
from cdfsl.errors import DataError


def test_discovers_classes_sorted_by_folder_with_targets_and_ids(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"Forest": 2, "AnnualCrop": 3, "sea_lake": 1})
    ds = ImageFolder(tmp_path)

    assert isinstance(ds, LabelledImages)
    assert ds.classes == ["AnnualCrop", "Forest", "sea_lake"]
    assert ds.class_names == ["annual crop", "forest", "sea lake"]
    assert len(ds) == 6
    assert ds.targets == [0, 0, 0, 1, 1, 2]
    assert [ds.sample_id(i) for i in range(len(ds))] == [
        "AnnualCrop/AnnualCrop_0.png",
        "AnnualCrop/AnnualCrop_1.jpg",
        "AnnualCrop/AnnualCrop_2.png",
        "Forest/Forest_0.png",
        "Forest/Forest_1.jpg",
        "sea_lake/sea_lake_0.png",
    ]
    assert ds.counts_per_class() == {"AnnualCrop": 3, "Forest": 2, "sea_lake": 1}
    assert ds.path(3) == tmp_path / "Forest" / "Forest_0.png"


def test_load_returns_rgb_from_any_mode(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"a": 1, "b": 1}, size=8)
    Image.new("L", (5, 7), 128).save(tmp_path / "a" / "gray.png")
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "b" / "palette.gif", transparency=0)
    ds = ImageFolder(tmp_path)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the palette image must not warn
        images = [ds.load(i) for i in range(len(ds))]
    assert all(image.mode == "RGB" for image in images)
    gray = images[[ds.sample_id(i) for i in range(len(ds))].index("a/gray.png")]
    assert gray.size == (5, 7)
    assert gray.getpixel((0, 0)) == (128, 128, 128)


def test_sixteen_bit_grayscale_is_rescaled_not_clipped_to_white(tmp_path: Path) -> None:
    import numpy as np

    make_image_folder(tmp_path, {"a": 1, "b": 1}, size=8)
    # 16-bit level 32896 = 128·257 is 8-bit grey 128, as the named layouts read it.
    Image.fromarray(np.full((4, 4), 128 * 257, dtype=np.uint16)).save(tmp_path / "a" / "x.png")
    ds = ImageFolder(tmp_path)
    image = ds.load([ds.sample_id(i) for i in range(len(ds))].index("a/x.png"))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (128, 128, 128)


def test_recurses_into_nested_folders_and_ignores_hidden_ones(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"cat": 1, "dog": 1})
    nested = tmp_path / "cat" / "indoor" / "sofa"
    nested.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(nested / "x.JPEG")  # upper-case extension
    for hidden in (tmp_path / ".cache", tmp_path / "__MACOSX", tmp_path / "dog" / ".thumbs"):
        hidden.mkdir()
        Image.new("RGB", (4, 4)).save(hidden / "y.png")

    ds = ImageFolder(tmp_path)

    assert ds.classes == ["cat", "dog"]
    assert ds.sample_id(1) == "cat/indoor/sofa/x.JPEG"
    assert ds.targets == [0, 0, 1]


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("AnnualCrop", "annual crop"),
        ("Annual_Crop", "annual crop"),
        ("annual-crop", "annual crop"),
        ("HerbaceousVegetation", "herbaceous vegetation"),
        ("Tomato___Late_blight", "tomato late blight"),
        ("ISICNevus", "isic nevus"),
        ("Pneumonia", "pneumonia"),
        ("  spaced  name ", "spaced name"),
        ("___", "___"),  # nothing readable left: keep the folder name
    ],
)
def test_readable_class_name(folder: str, expected: str) -> None:
    assert readable_class_name(folder) == expected


def test_class_names_file_gives_readable_names(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", {"AnnualCrop": 1, "Forest": 1})
    names = tmp_path / "names.json"
    names.write_text(
        json.dumps({"AnnualCrop": "annual crop land", "Forest": "forest", "Unused": "x"})
    )

    ds = ImageFolder(root, class_names_file=names)

    assert ds.class_names == ["annual crop land", "forest"]
    assert ds.classes == ["AnnualCrop", "Forest"]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (json.dumps({"AnnualCrop": "annual crop land"}), "'Forest'"),
        ("{not json", "JSON"),
        (json.dumps(["annual crop", "forest"]), "JSON list"),
        (json.dumps({"AnnualCrop": "a", "Forest": ""}), "'Forest'"),
    ],
)
def test_bad_class_names_file_is_a_data_error(tmp_path: Path, content: str, fragment: str) -> None:
    root = make_image_folder(tmp_path / "data", {"AnnualCrop": 1, "Forest": 1})
    names = tmp_path / "names.json"
    names.write_text(content)

    with pytest.raises(DataError, match="class-names file") as err:
        ImageFolder(root, class_names_file=names)
    assert str(names) in str(err.value)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_class_names_file(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, {"a": 1, "b": 1})
    with pytest.raises(DataError, match="does not exist") as err:
        ImageFolder(root, class_names_file=tmp_path / "nope.json")
    assert str(tmp_path / "nope.json") in str(err.value)


def test_duplicate_readable_names_are_refused(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"AnnualCrop": 1, "Annual_Crop": 1})
    with pytest.raises(DataError, match="share the readable name 'annual crop'"):
        ImageFolder(tmp_path)


def _error(root: Path) -> str:
    with pytest.raises(DataError) as err:
        ImageFolder(root)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "missing"
    message = _error(root)
    assert str(root) in message
    assert "does not exist" in message


def test_root_is_a_file(tmp_path: Path) -> None:
    root = tmp_path / "file.txt"
    root.write_text("x")
    message = _error(root)
    assert str(root) in message
    assert "not a folder" in message


def test_root_without_class_folders(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "loose.png")
    message = _error(tmp_path)
    assert str(tmp_path) in message
    assert "no class sub-folders" in message


def test_class_folder_without_images(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"a": 1, "b": 1})
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    message = _error(tmp_path)
    assert str(tmp_path / "empty") in message
    assert "no images" in message


def test_single_class_folder(tmp_path: Path) -> None:
    # The usual cause: root points one level above the folder that holds the classes.
    make_image_folder(tmp_path / "eurosat", {"a": 2, "b": 2})
    message = _error(tmp_path)
    assert str(tmp_path) in message
    assert "at least 2 classes" in message


def test_stray_files_warn_once_and_are_skipped(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "b" / "notes.txt").write_text("x")
    (tmp_path / "b" / "._b_0.png").write_bytes(b"resource fork")
    (tmp_path / "README.md").write_text("not in a class folder: ignored silently")

    with pytest.warns(UserWarning) as record:
        ds = ImageFolder(tmp_path)

    assert len(record) == 1
    message = str(record[0].message)
    assert "skipped 3 file(s)" in message
    assert str(tmp_path / "a" / ".DS_Store") in message
    assert len(ds) == 4
    assert all(not ds.sample_id(i).endswith((".txt", ".DS_Store")) for i in range(len(ds)))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_raises_data_error_on_load(tmp_path: Path, damage: str) -> None:
    make_image_folder(tmp_path, {"a": 1, "b": 1}, size=64)
    bad = tmp_path / "b" / "bad.jpg"
    if damage == "garbage":
        bad.write_bytes(b"this is not a jpeg at all" * 10)
    else:
        good = tmp_path / "a" / "full.jpg"
        Image.effect_noise((64, 64), 50).convert("RGB").save(good)
        bad.write_bytes(good.read_bytes()[:400])
    ds = ImageFolder(tmp_path)  # files are not opened until load
    index = [ds.sample_id(i) for i in range(len(ds))].index("b/bad.jpg")

    with pytest.raises(DataError, match="remove or replace") as err:
        ds.load(index)
    assert str(bad) in str(err.value)
    assert "\n" not in str(err.value)
