"""The eleven CoOp datasets from replicas of their split files and folders; malformed splits get
messages naming the file and the fix; the prompt-template rule."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
from layouts import make_fgvc_aircraft, make_imagenet, make_split_file_dataset

from cdfsl.data import (
    DataConfig,
    ImageFolder,
    build_dataset,
    build_splits,
    prompt_template,
    validate_source,
)
from cdfsl.data.fsl import SPLIT_FILE_DATASETS
from cdfsl.data.layout import GENERIC_TEMPLATE
from cdfsl.errors import DataError
from cdfsl.fewshot.methods.base import FewShotMethod

ROWS = {row.name: row for row in SPLIT_FILE_DATASETS}


def splits(source: str, root: Path, **options):
    return build_splits(DataConfig(source, str(root), options=options))


@pytest.mark.parametrize("row", SPLIT_FILE_DATASETS, ids=lambda row: row.name)
def test_split_file_datasets_read_train_val_test(tmp_path, row):
    root = make_split_file_dataset(
        tmp_path, row, classes=("Abyssinian", "great_pyrenees"), per_split=(3, 1, 2)
    )
    data = splits(row.name, root)

    assert {k: len(v) for k, v in data.items()} == {"train": 6, "val": 2, "test": 4}
    test = data["test"]
    assert test.classes == ["Abyssinian", "great_pyrenees"]
    assert test.class_names == ["Abyssinian", "great pyrenees"]  # CoOp's "_" -> " "
    assert test.targets == [0, 0, 1, 1]
    assert test.template == row.template
    assert test.path(0).is_file() and test.load(0).mode == "RGB"
    # The dataset folder itself is accepted as the root, and eval's default split is test.
    alone = build_dataset(DataConfig(row.name, str(root / row.directory)))
    assert [alone.sample_id(i) for i in range(4)] == [test.sample_id(i) for i in range(4)]


def test_coop_templates_are_the_protocols():
    assert ROWS["oxford-pets"].template == "a photo of a {}, a type of pet."
    assert ROWS["eurosat-fsl"].template == "a centered satellite photo of {}."
    assert ROWS["dtd"].template == "{} texture."
    assert ROWS["food101"].template == "a photo of {}, a type of food."
    assert ROWS["ucf101"].template == "a photo of a person doing {}."
    assert ROWS["caltech101"].template == GENERIC_TEMPLATE
    assert len(SPLIT_FILE_DATASETS) == 9  # + fgvc-aircraft and imagenet: the eleven


def test_eurosat_split_names_map_to_readable_ones(tmp_path):
    root = make_split_file_dataset(tmp_path, ROWS["eurosat-fsl"], classes=("AnnualCrop", "River"))
    assert splits("eurosat-fsl", root)["train"].class_names == ["annual crop land", "river"]


def test_fgvc_aircraft_reads_variant_lists(tmp_path):
    root = make_fgvc_aircraft(tmp_path, per_split=2)
    data = splits("fgvc-aircraft", root)

    assert data["train"].class_names == ["707-320", "Cessna 172", "F-16A/B"]
    assert data["val"].targets == [0, 0, 1, 1, 2, 2]
    assert data["test"].sample_id(0) == "1025807.jpg"
    assert data["test"].template == "a photo of a {}, a type of aircraft."
    # CoOp's own folder name works as well.
    shutil.move(root / "fgvc-aircraft-2013b" / "data", root / "fgvc_aircraft")
    assert len(splits("fgvc-aircraft", root)["train"]) == 6


def test_imagenet_reads_wnid_folders_and_has_no_val(tmp_path):
    root = make_imagenet(tmp_path, per_class=(3, 2))
    data = splits("imagenet", root)

    assert set(data) == {"train", "test"}
    assert data["train"].classes == ["n01440764", "n01443537", "n01484850"]
    assert data["train"].class_names == ["tench", "goldfish", "great white shark"]
    assert len(data["train"]) == 9 and len(data["test"]) == 6
    assert data["test"].sample_id(0) == "val/n01440764/ILSVRC2012_val_00000001.JPEG"


def _edit_split(root: Path, edit) -> None:
    path = root / "oxford_pets" / "split_zhou_OxfordPets.json"
    split = json.loads(path.read_text())
    edit(split)
    path.write_text(json.dumps(split))


PETS = ROWS["oxford-pets"]
SPLIT = "oxford_pets/split_zhou_OxfordPets.json"
BROKEN = {
    "missing split file": (
        "oxford-pets", lambda r: (r / SPLIT).unlink(),
        [f"{SPLIT}: does not exist", "download split_zhou_OxfordPets.json"],
    ),
    "split file not json": (
        "oxford-pets", lambda r: (r / SPLIT).write_text("{'train': "),
        [f"{SPLIT}: is not valid JSON", "replace it with the original"],
    ),
    "split without val": (
        "oxford-pets", lambda r: _edit_split(r, lambda s: s.pop("val")),
        ["holds keys ['test', 'train']", '"train", "val" and "test" lists'],
    ),
    "malformed item": (
        "oxford-pets", lambda r: _edit_split(r, lambda s: s["test"][1].pop()),
        ["has malformed item(s) test[1]", "[image path, integer label, class name]"],
    ),
    "label named twice": (
        "oxford-pets", lambda r: _edit_split(r, lambda s: s["val"][0].__setitem__(2, "Bengal")),
        ["names label(s) inconsistently (0: 'Abyssinian' and 'Bengal')"],
    ),
    "image listed but absent": (
        "oxford-pets", lambda r: (r / "oxford_pets/images/beagle/image_0004.jpg").unlink(),
        [f"{SPLIT}: lists 1 image(s) absent", "'beagle/image_0004.jpg'", "restore the missing"],
    ),
    "class missing from test": (
        "oxford-pets",
        lambda r: _edit_split(r, lambda s: s.__setitem__("test", s["test"][:4])),
        [f"{SPLIT}: no images of class 'Sphynx' in split 'test'", "add the class's images"],
    ),
    "images folder missing": (
        "oxford-pets", lambda r: shutil.rmtree(r / "oxford_pets/images"),
        ["oxford_pets/images: does not exist", "extract the dataset's image archive"],
    ),
    "fgvc unknown variant": (
        "fgvc-aircraft",
        lambda r: (r / "fgvc-aircraft-2013b/data/variants.txt").write_text("707-320\nF-16A/B\n"),
        ["images_variant_train.txt: has line(s) 3, 4 without a variant of variants.txt"],
    ),
    "fgvc missing variants": (
        "fgvc-aircraft", lambda r: (r / "fgvc-aircraft-2013b/data/variants.txt").unlink(),
        ["variants.txt: does not exist", "extract fgvc-aircraft-2013b.tar.gz"],
    ),
    "imagenet missing class folder": (
        "imagenet", lambda r: shutil.rmtree(r / "imagenet/images/val/n01443537"),
        ["images/val: has no folder for 1 class(es), e.g. 'n01443537'", "sort the images"],
    ),
    "imagenet classnames without names": (
        "imagenet", lambda r: (r / "imagenet/classnames.txt").write_text("n01440764\n"),
        ["classnames.txt: has line(s) 1 without a name", "CoOp's classnames.txt"],
    ),
}  # fmt: skip
MAKERS = {"oxford-pets": lambda r: make_split_file_dataset(r, PETS)}
MAKERS.update({"fgvc-aircraft": make_fgvc_aircraft, "imagenet": make_imagenet})


@pytest.mark.parametrize("case", BROKEN, ids=str)
def test_each_mistake_names_the_file_and_the_fix(tmp_path, case):
    source, breaks, expected = BROKEN[case]
    root = MAKERS[source](tmp_path)
    breaks(root)

    assert not validate_source(DataConfig(source, str(tmp_path))).ok
    with pytest.raises(DataError) as err:
        splits(source, tmp_path)
    for text in [str(tmp_path), *expected]:
        assert text in str(err.value)


def test_options_and_splits_are_checked(tmp_path):
    root = make_split_file_dataset(tmp_path, PETS)
    with pytest.raises(DataError, match=r"unknown option\(s\) shots .*split, template"):
        build_dataset(DataConfig("oxford-pets", str(root), options={"shots": 4}))
    with pytest.raises(DataError, match=r"no split 'dev'; expected one of train, val, test"):
        build_dataset(DataConfig("oxford-pets", str(root), options={"split": "dev"}))
    train = build_dataset(DataConfig("oxford-pets", str(root), options={"split": "train"}))
    assert len(train) == 9
    with pytest.raises(DataError, match=r"source 'folder' has no splits.*fix --data.source"):
        build_splits(DataConfig("folder", str(root)))
    with pytest.raises(DataError, match=r"unknown dataset source 'pets'.*oxford-pets"):
        build_dataset(DataConfig("pets", str(root)))


def test_prompt_template_prefers_a_recipes_own_and_else_the_datasets(tmp_path, four_class_folder):
    pets = build_dataset(DataConfig("oxford-pets", str(make_split_file_dataset(tmp_path, PETS))))
    default = inspect.signature(FewShotMethod.__init__).parameters["template"].default

    assert default == GENERIC_TEMPLATE
    assert prompt_template(GENERIC_TEMPLATE, pets) == "a photo of a {}, a type of pet."
    assert prompt_template("art of {}.", pets) == "art of {}."
    assert prompt_template(GENERIC_TEMPLATE, ImageFolder(four_class_folder)) == GENERIC_TEMPLATE
