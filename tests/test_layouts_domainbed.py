"""DomainBed folders: leave-one-domain-out splits over one class list; folder mistakes named."""

from __future__ import annotations

import shutil

import pytest
from layouts import make_domainbed, write_image

from cdfsl.data import DataConfig, build_dataset, leave_one_domain_out, validate_source
from cdfsl.data.domainbed import DOMAINBED_DATASETS
from cdfsl.errors import DataError

SETS = {d.name: d for d in DOMAINBED_DATASETS}
PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")


def test_leave_one_domain_out_trains_on_the_others_with_one_class_list(tmp_path):
    make_domainbed(tmp_path, SETS["pacs"], PACS_CLASSES, per_class=2)
    split = leave_one_domain_out(tmp_path, "sketch", "pacs")

    assert split.target_domain == "sketch"
    assert split.train.class_names == split.test.class_names == list(PACS_CLASSES)
    assert len(split.train) == 3 * 7 * 2 and len(split.test) == 7 * 2
    assert {split.train.sample_id(i).split("/")[0] for i in range(len(split.train))} == {
        "art_painting", "cartoon", "photo",
    }  # fmt: skip
    assert {split.test.sample_id(i).split("/")[0] for i in range(len(split.test))} == {"sketch"}
    assert split.test.sample_id(0) == "sketch/dog/pic_3000.jpg"
    assert set(split.domains) == {"art_painting", "cartoon", "photo", "sketch"}
    assert split.train.load(0).mode == "RGB"


def test_office_home_domain_names_with_spaces_and_readable_classes(tmp_path):
    office = SETS["office-home"]
    classes = ["Alarm_Clock", *(f"Class{c}" for c in range(64))]
    make_domainbed(tmp_path, office, classes, per_class=1)
    options = {"target_domain": "Real World"}
    test = build_dataset(DataConfig("office-home", str(tmp_path / "office_home"), options=options))
    assert test.class_names[0] == "alarm clock" and len(test) == 65
    assert test.sample_id(0).startswith("Real World/Alarm_Clock/")


def test_any_domain_folders_load_as_the_generic_source(tmp_path):
    for domain in ("day", "night"):
        for c, name in enumerate(("cat", "dog")):
            write_image(tmp_path / domain / name / "a.jpg", c, 0)
    split = leave_one_domain_out(tmp_path, "night")
    assert (len(split.train), len(split.test)) == (2, 2)
    report = validate_source(DataConfig("domainbed", str(tmp_path)))
    assert report.ok and report.counts == {"day": [1, 1], "night": [1, 1]}


BROKEN = {
    "missing domain": (
        lambda r: shutil.rmtree(r / "PACS" / "cartoon"), {"target_domain": "photo"},
        ["PACS: has no folder for domain(s) 'cartoon'", "extract the missing domains"],
    ),
    "domain lacks a class": (
        lambda r: shutil.rmtree(r / "PACS" / "photo" / "horse"), {"target_domain": "photo"},
        ["PACS/photo: has no folder for class(es) 'horse'", "same class folders in every"],
    ),
    "empty class folder": (
        lambda r: [p.unlink() for p in (r / "PACS" / "sketch" / "dog").iterdir()],
        {"target_domain": "photo"},
        ["PACS/sketch/dog: has no images", "add the class's images"],
    ),
    "unknown target domain": (
        lambda r: None, {"target_domain": "Sketch"},
        ["has no domain 'Sketch' (the target_domain option)", "one of art_painting, cartoon"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", BROKEN, ids=str)
def test_each_mistake_names_the_folder_and_the_fix(tmp_path, case):
    breaks, options, expected = BROKEN[case]
    make_domainbed(tmp_path, SETS["pacs"], PACS_CLASSES, per_class=1)
    breaks(tmp_path)

    assert not validate_source(DataConfig("pacs", str(tmp_path), options=options)).ok
    with pytest.raises(DataError) as err:
        build_dataset(DataConfig("pacs", str(tmp_path), options=options))
    for text in [str(tmp_path), *expected]:
        assert text in str(err.value)


def test_a_held_out_domain_is_required_to_build_but_not_to_check(tmp_path):
    make_domainbed(tmp_path, SETS["vlcs"], per_class=1)
    assert validate_source(DataConfig("vlcs", str(tmp_path))).ok
    expected = """needs a held-out domain.*--data.options '{"target_domain": "Caltech101"}'"""
    with pytest.raises(DataError, match=expected):
        build_dataset(DataConfig("vlcs", str(tmp_path)))
