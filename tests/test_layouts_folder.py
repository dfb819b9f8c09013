"""``folder`` is a ``Layout``: the full ``cdfsl data check`` report, the shared class-folder reader,
the same sample ids and 16-bit reading as ``ImageFolder``, and no train / test splits."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from imagegen import make_image_folder
from PIL import Image

from cdfsl.cli import main
from cdfsl.data import FOLDER, DataConfig, ImageFolder, ImageList, Layout, build_dataset
from cdfsl.data.layout import list_class_folders
from cdfsl.data.sources import get_source, validate_source


def test_folder_source_is_the_layout_and_matches_image_folder(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, {"Forest": 2, "AnnualCrop": 3})
    assert get_source("folder") is FOLDER and isinstance(FOLDER, Layout)
    built = build_dataset(DataConfig("folder", str(root)))
    legacy = ImageFolder(root)

    assert isinstance(built, ImageList) and isinstance(legacy, ImageList)
    assert legacy.root == built.image_root == root
    ids = [built.sample_id(i) for i in range(len(built))]
    assert ids == [legacy.sample_id(i) for i in range(len(legacy))]
    assert ids[0] == "AnnualCrop/AnnualCrop_0.png"
    assert built.targets == legacy.targets == [0, 0, 0, 1, 1]
    assert built.class_names == legacy.class_names == ["annual crop", "forest"]
    assert built.class_location(1) == str(root / "Forest")
    assert repr(legacy) == f"ImageFolder({str(root)!r}, 2 classes, 5 images)"


def test_folder_source_rescales_sixteen_bit_images(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, {"a": 1, "b": 1}, size=8)
    Image.fromarray(np.full((4, 4), 128 * 257, dtype=np.uint16)).save(root / "a" / "x.png")
    ds = build_dataset(DataConfig("folder", str(root)))
    index = [ds.sample_id(i) for i in range(len(ds))].index("a/x.png")
    assert ds.load(index).getpixel((0, 0)) == (128, 128, 128)


def test_data_check_folder_prints_the_full_report(tmp_path: Path, capsys) -> None:
    root = make_image_folder(tmp_path, {"AnnualCrop": 2, "Forest": 1})
    (root / "Forest" / "notes.txt").write_text("x")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the note is printed, not warned again by the decoding
        code = main(["data", "check", "folder", str(root), "--progress", "false"])
    out = capsys.readouterr().out

    assert code == 0
    assert "source: folder" in out and "template: a photo of a {}." in out
    lines = out.splitlines()
    assert any(line.split() == ["AnnualCrop", "annual", "crop", "2"] for line in lines)
    assert any(line.split() == ["total", "3"] for line in lines)
    assert "note: skipped 1 file(s)" in out and str(root / "Forest" / "notes.txt") in out
    assert "ok: 2 classes, 3 images" in out


def test_data_check_folder_lists_every_problem(tmp_path: Path, capsys) -> None:
    root = make_image_folder(tmp_path / "data", {"AnnualCrop": 1, "Annual_Crop": 1})
    (root / "empty").mkdir()
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"AnnualCrop": "crop", "Annual_Crop": "crop"}))

    code = main(["data", "check", "folder", str(root), "--class_names", str(names)])
    out = capsys.readouterr().out

    assert code != 0
    assert f"{names}: has no entry for class(es) 'empty'" in out
    assert f"{root / 'empty'}: no images of class 'empty'" in out
    assert "share the readable name 'crop'" in out
    assert "3 problem(s):" in out


def test_folder_report_counts_and_options(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, {"a": 2, "b": 3})
    report = validate_source(DataConfig("folder", str(root)))
    assert report.ok and report.counts == {"all": [2, 3]} and report.classes == ["a", "b"]
    custom = build_dataset(DataConfig("folder", str(root), options={"template": "an {}."}))
    assert custom.template == "an {}."


def test_one_class_folder_reader(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, {"b": 1, "a": 2})
    (root / "a" / "deep").mkdir()
    Image.new("RGB", (2, 2)).save(root / "a" / "deep" / "z.png")
    (root / "a" / "read.me").write_text("x")
    (root / "a" / ".hidden").mkdir()
    Image.new("RGB", (2, 2)).save(root / "a" / ".hidden" / "h.png")

    entries, others = list_class_folders(root, ["a", "b", "absent"])

    assert entries == [
        ("a/a_0.png", 0),
        ("a/a_1.jpg", 0),
        ("a/deep/z.png", 0),
        ("b/b_0.png", 1),
    ]
    assert others == ["a/read.me"]


@pytest.mark.parametrize("source", ["folder", "eurosat"])
def test_layouts_without_train_test_have_no_splits(tmp_path: Path, source: str) -> None:
    from cdfsl.data import build_splits
    from cdfsl.errors import DataError

    with pytest.raises(DataError, match=rf"source '{source}' has no splits"):
        build_splits(DataConfig(source, str(tmp_path)))
