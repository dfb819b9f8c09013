"""The four BSCD-FSL targets read from replicas of their real layouts; each common mistake gets
a message naming the file and the fix."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from layouts import (
    make_chestx,
    make_crop_disease,
    make_eurosat,
    make_isic2018,
    write_image,
)

from cdfsl.data import DataConfig, ImageList, LabelledImages, build_dataset, validate_source
from cdfsl.data.cdfsl_targets import ISIC_CSV, ISIC_IMAGES
from cdfsl.errors import DataError

EUROSAT_NAMES = [
    "annual crop land", "forest", "herbaceous vegetation land", "highway or road",
    "industrial buildings", "pasture land", "permanent crop land", "residential buildings",
    "river", "sea or lake",
]  # fmt: skip


def build(source: str, root: Path, **options) -> ImageList:
    return build_dataset(DataConfig(source, str(root), options=options))


def test_eurosat_reads_the_2750_folders_with_readable_names(tmp_path):
    root = make_eurosat(tmp_path / "EuroSAT", per_class=2)
    (root / "2750" / "Forest" / "Thumbs.db").write_bytes(b"x")

    with pytest.warns(UserWarning, match="skipped 1 non-image file"):
        ds = build("eurosat", root)

    assert isinstance(ds, LabelledImages)
    assert ds.class_names == EUROSAT_NAMES
    assert ds.classes[0] == "AnnualCrop" and len(ds) == 20
    assert ds.targets == [c for c in range(10) for _ in range(2)]
    assert ds.sample_id(2) == "Forest/Forest_1.jpg"
    assert ds.template == "a photo of a {}."
    assert ds.load(0).mode == "RGB"
    # The 2750 folder itself is accepted as the root too.
    with pytest.warns(UserWarning):
        assert build("eurosat", root / "2750").class_names == EUROSAT_NAMES


def test_crop_disease_has_38_plantvillage_classes_named_for_prompts(tmp_path):
    root = make_crop_disease(tmp_path / "CropDiseases", per_class=1)
    ds = build("crop-disease", root)

    # The reference's prompts: the folder name with "_" as spaces (option names: folder).
    names = dict(zip(ds.classes, ds.class_names, strict=True))
    assert len(names) == 38 and len(set(ds.class_names)) == 38
    assert names["Apple___Apple_scab"] == "Apple   Apple scab"
    assert names["Corn_(maize)___Common_rust_"] == "Corn (maize)   Common rust "
    assert ds.sample_id(0).startswith("Apple___Apple_scab/")
    curated = build("crop-disease", root, names="curated")
    names = dict(zip(curated.classes, curated.class_names, strict=True))
    assert names["Apple___Apple_scab"] == "apple scab"
    assert names["Tomato___healthy"] == "healthy tomato leaf"
    with pytest.raises(DataError, match=r"names='raw': expected one of \('curated', 'folder'\)"):
        build("crop-disease", root, names="raw")
    # The Kaggle archive's dataset/train/ and a bare train/ are both found.
    shutil.move(root / "dataset" / "train", root / "train")
    assert build("crop-disease", root).classes == ds.classes


def test_isic_labels_come_from_the_one_hot_csv(tmp_path):
    root = make_isic2018(tmp_path / "ISIC", per_class=2, one_hot="{:.0f}")
    ds = build("isic2018", root)

    assert ds.classes == ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    assert ds.class_names[:3] == ["melanoma", "melanocytic nevus", "basal cell carcinoma"]
    assert ds.targets == [i % 7 for i in range(14)]
    assert ds.sample_id(0) == "ISIC_0024306.jpg"
    assert ds.path(0) == root / ISIC_IMAGES / "ISIC_0024306.jpg"


@pytest.mark.parametrize("spread", [True, False], ids=["images_0NN", "images"])
def test_chestx_keeps_single_label_images_of_seven_findings(tmp_path, spread):
    root = make_chestx(tmp_path / "chestX", per_class=2, spread=spread)
    ds = build("chestx", root)

    assert ds.class_names == [
        "atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
        "pneumothorax",
    ]  # fmt: skip
    assert Counter(ds.targets) == {c: 2 for c in range(7)}
    prefix = "images_002/images/" if spread else "images/"
    assert ds.sample_id(1) == prefix + "00000002_000.png"
    # The 16-bit grayscale PNG is scaled, not clipped to white, and comes back as RGB.
    image = ds.load(1)
    assert image.mode == "RGB" and image.getextrema()[0][1] < 255
    assert image.getpixel((0, 0))[0] == image.getpixel((0, 0))[1] == image.getpixel((0, 0))[2]


def test_chestx_is_read_at_256_as_the_reference_reads_it(tmp_path):
    """The reference: ``Image.open(p).resize((256, 256)).convert('RGB')`` (PIL's default filter,
    in the file's own mode); ``pre_resize: null`` keeps the file's size."""
    from PIL import Image

    root = make_chestx(tmp_path / "chestX", per_class=1)
    ds = build("chestx", root)
    assert ds.read_size == (256, 256)
    with Image.open(ds.path(0)) as original:
        assert original.mode == "L" and original.size != (256, 256)
        reference = original.resize((256, 256)).convert("RGB")
    image = ds.load(0)
    assert image.size == (256, 256) and image.tobytes() == reference.tobytes()
    # Resized before the RGB conversion with PIL's default filter: not a nearest resize.
    with Image.open(ds.path(0)) as original:
        nearest = original.resize((256, 256), Image.Resampling.NEAREST).convert("RGB")
    assert image.tobytes() != nearest.tobytes()
    assert build("chestx", root, pre_resize=64).load(1).size == (64, 64)  # 16-bit file too
    native = build("chestx", root, pre_resize=None)
    assert native.read_size is None and native.load(0).size == original.size
    with pytest.raises(DataError, match=r"pre_resize=0: expected a positive integer"):
        build("chestx", root, pre_resize=0)


def test_class_names_file_overrides_built_in_names(tmp_path):
    root = make_isic2018(tmp_path / "ISIC", per_class=1)
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"MEL": "malignant melanoma"}))
    ds = build_dataset(DataConfig("isic2018", str(root), class_names=str(names)))
    assert ds.class_names[:2] == ["malignant melanoma", "melanocytic nevus"]


def test_template_option_overrides_the_datasets(tmp_path):
    root = make_isic2018(tmp_path / "ISIC", per_class=1)
    assert build("isic2018", root, template="a dermoscopy image of {}.").template == (
        "a dermoscopy image of {}."
    )


def _rewrite_isic_csv(root: Path, edit) -> Path:
    path = root / ISIC_CSV
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")
    return path


def _second_one_in_first_row(lines: list[str]) -> list[str]:
    return [lines[0], lines[1].replace("0.0", "1.0", 1), *lines[2:]]


def _without_last_class(lines: list[str]) -> list[str]:
    return [lines[0], *(line for line in lines[1:] if not line.endswith(",1.0"))]


def _drop_finding(root: Path, finding: str) -> None:
    path = root / "Data_Entry_2017.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(line for line in lines if f",{finding}," not in line) + "\n")


# (source, make, break the folder, text the message must contain: the file and the fix)
BROKEN = {
    "eurosat missing class": (
        "eurosat", make_eurosat, lambda r: shutil.rmtree(r / "2750" / "Forest"),
        ["2750: has no folder for class(es) 'Forest'", "restore the missing folders"],
    ),
    "eurosat empty class": (
        "eurosat", make_eurosat,
        lambda r: [p.unlink() for p in (r / "2750" / "River").iterdir()],
        ["2750/River: no images of class 'River'", "add the class's images"],
    ),
    "eurosat wrong root": (
        "eurosat", make_eurosat, lambda r: shutil.move(r / "2750", r / "elsewhere"),
        ["has no eurosat class folder", "pass the folder that holds the class folders"],
    ),
    "isic missing csv": (
        "isic2018", make_isic2018, lambda r: (r / ISIC_CSV).unlink(),
        [f"{ISIC_CSV}: does not exist", "columns image,MEL,NV,BCC,AKIEC,BKL,DF,VASC",
         "extract ISIC2018_Task3_Training_GroundTruth.zip"],
    ),
    "isic csv in the wrong folder": (
        "isic2018", make_isic2018,
        lambda r: shutil.move(r / ISIC_CSV, r / "ISIC2018_Task3_Training_GroundTruth.csv"),
        [f"{ISIC_CSV}: does not exist", "a copy is at", "move it to"],
    ),
    "isic wrong column": (
        "isic2018", make_isic2018,
        lambda r: _rewrite_isic_csv(r, lambda ls: [ls[0].replace("MEL", "mel"), *ls[1:]]),
        ["has no column(s) 'MEL'", "case-sensitive: found 'mel'", "fix the header"],
    ),
    "isic row not one-hot": (
        "isic2018", make_isic2018,
        lambda r: _rewrite_isic_csv(r, _second_one_in_first_row),
        ["malformed row(s) at line(s) 2", "exactly one 1.0"],
    ),
    "isic image listed but absent": (
        "isic2018", make_isic2018, lambda r: (r / ISIC_IMAGES / "ISIC_0024307.jpg").unlink(),
        ["lists 1 image(s) absent from", "'ISIC_0024307.jpg'", "restore the missing files"],
    ),
    "isic images folder missing": (
        "isic2018", make_isic2018, lambda r: shutil.rmtree(r / ISIC_IMAGES),
        [f"{ISIC_IMAGES}: does not exist", f"extract {ISIC_IMAGES}.zip"],
    ),
    "isic class without rows": (
        "isic2018", make_isic2018,
        lambda r: _rewrite_isic_csv(r, _without_last_class),
        ["no images of class 'VASC'", "at least one image per class"],
    ),
    "chestx missing csv": (
        "chestx", make_chestx, lambda r: (r / "Data_Entry_2017.csv").unlink(),
        ["Data_Entry_2017.csv: does not exist", "download Data_Entry_2017.csv"],
    ),
    "chestx wrong column": (
        "chestx", make_chestx,
        lambda r: (r / "Data_Entry_2017.csv").write_text(
            (r / "Data_Entry_2017.csv").read_text().replace("Finding Labels", "Findings", 1)
        ),
        ["has no column(s) 'Finding Labels'", "fix the header or use the original file"],
    ),
    "chestx no image folder": (
        "chestx", make_chestx,
        lambda r: [shutil.rmtree(p) for p in r.glob("images_*")],
        ["has no image folder", "extract the images_0NN.tar.gz archives"],
    ),
    "chestx image absent": (
        "chestx", make_chestx,
        lambda r: (r / "images_001" / "images" / "00000003_000.png").unlink(),
        ["Data_Entry_2017.csv: lists 1 image(s) absent", "'00000003_000.png'"],
    ),
    "chestx finding without images": (
        "chestx", make_chestx, lambda r: _drop_finding(r, "Nodule"),
        ["Data_Entry_2017.csv: no images of class 'Nodule'"],
    ),
    "chestx csv not text": (
        "chestx", make_chestx,
        lambda r: (r / "Data_Entry_2017.csv").write_bytes(b"\xff\xfe\x00binary"),
        ["Data_Entry_2017.csv: cannot be read as CSV", "replace the file"],
    ),
    "root missing": (
        "eurosat", make_eurosat, lambda r: shutil.rmtree(r),
        ["does not exist", "pass the dataset folder as --data.root"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", BROKEN, ids=str)
def test_each_mistake_names_the_file_and_the_fix(tmp_path, case):
    source, make, breaks, expected = BROKEN[case]
    root = make(tmp_path / "data")
    breaks(root)

    report = validate_source(DataConfig(source, str(root)))
    with pytest.raises(DataError) as err:
        build(source, root)

    message = str(err.value)
    assert not report.ok and str(report.problems[0]) in message
    assert str(root) in message
    for text in expected:
        assert text in message
    assert "\n" not in message


def test_report_lists_every_problem_and_the_error_points_to_it(tmp_path):
    root = make_isic2018(tmp_path / "ISIC", per_class=2)
    (root / ISIC_IMAGES / "ISIC_0024306.jpg").unlink()
    _rewrite_isic_csv(root, lambda ls: [*ls, "ISIC_9999999,1.0,1.0,0.0,0.0,0.0,0.0,0.0"])

    report = validate_source(DataConfig("isic2018", str(root)))

    assert len(report.problems) == 2
    text = report.format()
    assert "2 problem(s):" in text and "malformed row(s) at line(s) 16" in text
    with pytest.raises(DataError, match=r"\(1 more problem\(s\): cdfsl data check isic2018 "):
        build("isic2018", root)


def test_an_unreadable_image_is_named_when_loaded(tmp_path):
    root = make_chestx(tmp_path / "chestX", per_class=1)
    (root / "images_001" / "images" / "00000001_000.png").write_bytes(b"not a png")
    ds = build("chestx", root)
    with pytest.raises(DataError, match=r"cannot read image .*00000001_000\.png.*remove or"):
        ds.load(0)


def test_extra_folders_and_unlisted_images_are_notes_not_problems(tmp_path):
    root = make_eurosat(tmp_path / "EuroSAT", per_class=1)
    write_image(root / "2750" / "Clouds" / "c.jpg", 1, 1)
    isic = make_isic2018(tmp_path / "ISIC", per_class=1)
    write_image(isic / ISIC_IMAGES / "ISIC_0099999.jpg", 1, 1)

    eurosat = validate_source(DataConfig("eurosat", str(root)))
    assert eurosat.ok and "ignored folder(s) 'Clouds'" in eurosat.notes[0]
    report = validate_source(DataConfig("isic2018", str(isic)))
    assert report.ok and "1 image(s)" in report.notes[0]
