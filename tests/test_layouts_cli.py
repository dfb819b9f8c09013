"""Every layout through the CLI: ``cdfsl data check`` on a replica, then ``cdfsl eval`` with the
tiny backbone; broken folders exit non-zero with the problems listed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from layouts import (
    make_chestx,
    make_crop_disease,
    make_domainbed,
    make_eurosat,
    make_fgvc_aircraft,
    make_imagenet,
    make_isic2018,
    make_split_file_dataset,
)

from cdfsl.cli import main
from cdfsl.data import list_sources
from cdfsl.data.cdfsl_targets import ISIC_CSV
from cdfsl.data.domainbed import DOMAINBED_DATASETS
from cdfsl.data.fsl import SPLIT_FILE_DATASETS

TINY = str(Path(__file__).resolve().parents[1] / "recipes/tiny/mind.yaml")
PACS = next(d for d in DOMAINBED_DATASETS if d.name == "pacs")
DTD = next(row for row in SPLIT_FILE_DATASETS if row.name == "dtd")

# source -> (replica builder, options, split checked: classes, images)
REPLICAS = {
    "eurosat": (make_eurosat, {}, ("all", 10, 30)),
    "crop-disease": (make_crop_disease, {}, ("all", 38, 76)),
    "isic2018": (make_isic2018, {}, ("all", 7, 21)),
    "chestx": (make_chestx, {}, ("all", 7, 21)),
    "dtd": (lambda r: make_split_file_dataset(r, DTD), {}, ("test", 3, 6)),
    "fgvc-aircraft": (make_fgvc_aircraft, {}, ("test", 3, 6)),
    "imagenet": (make_imagenet, {}, ("test", 3, 6)),
    "pacs": (lambda r: make_domainbed(r, PACS), {"target_domain": "photo"}, ("photo", 7, 14)),
}


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_data_list_names_every_source(capsys):
    code, out, _ = run(capsys, "data", "list")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == list_sources()
    # folder, CDFSL, FSL, DomainBed, mnist, idx, micro
    assert len(list_sources()) == 1 + 4 + 11 + 5 + 3


@pytest.mark.parametrize("source", REPLICAS)
def test_each_layout_checks_and_runs_through_eval(tmp_path, capsys, source):
    make, options, (split, classes, images) = REPLICAS[source]
    root = make(tmp_path / "data")

    code, out, _ = run(capsys, "data", "check", source, str(root), "--options", json.dumps(options))
    assert code == 0, out
    lines = out.splitlines()
    splits = next(line for line in lines if line.startswith("class ")).split()[2:]
    totals = next(line for line in lines if line.startswith("total")).split()[1:]
    assert dict(zip(splits, map(int, totals), strict=True))[split] == images
    assert f"ok: {classes} classes" in out

    out_dir = tmp_path / "out"
    code, out, err = run(
        capsys, "eval", "--config", TINY, "--data.source", source, "--data.root", str(root),
        "--data.options", json.dumps(options), "--output", str(out_dir), "--query", "1",
        "--episodes", "1", "--steps", "2", "--progress", "false",
    )  # fmt: skip
    assert code == 0, err
    assert f"| Mind | tiny-clip | {source} | 3 | 1 | 1 | 1 |" in out
    row = json.loads((out_dir / "results.jsonl").read_text())
    assert len(row["support_ids"]) == 3 and len(row["query_ids"]) == 3


def test_check_lists_every_problem_and_exits_non_zero(tmp_path, capsys):
    root = make_isic2018(tmp_path / "isic")
    (root / ISIC_CSV).write_text((root / ISIC_CSV).read_text().replace("VASC", "vasc"))
    shutil.rmtree(root / "ISIC2018_Task3_Training_Input")

    code, out, err = run(capsys, "data", "check", "isic2018", str(root))

    assert code == 2 and "2 problem(s):" in out
    assert "has no column(s) 'VASC'" in out and "Training_Input: does not exist" in out
    assert err == f"cdfsl: error: 2 problem(s) in {root} as 'isic2018'; fix them as listed above\n"


def test_check_decode_names_a_corrupt_image(tmp_path, capsys):
    root = make_eurosat(tmp_path / "eurosat", per_class=1)
    (root / "2750" / "River" / "River_1.jpg").write_bytes(b"not a jpeg")
    assert run(capsys, "data", "check", "eurosat", str(root), "--decode", "false")[0] == 0
    code, out, _ = run(capsys, "data", "check", "eurosat", str(root))
    assert code == 2 and f"{root / '2750' / 'River' / 'River_1.jpg'}: cannot be decoded" in out


def test_check_needs_a_name_and_a_root(capsys):
    code, _, err = run(capsys, "data", "check", "eurosat")
    assert code == 2 and "needs a source NAME and a ROOT folder" in err


def test_eval_names_the_folders_of_classes_too_small_for_the_episodes(tmp_path, capsys):
    root = make_eurosat(tmp_path / "eurosat", per_class=3)
    code, _, err = run(
        capsys, "eval", "--config", TINY, "--data.source", "eurosat", "--data.root", str(root),
        "--output", str(tmp_path / "out"), "--query", "5",
    )  # fmt: skip
    assert code == 2 and err.count("\n") == 1
    assert f"'annual crop land' (3) in {root / '2750' / 'AnnualCrop'}" in err
    assert "lower --shot, --query or --way, or add images there" in err
    assert not (tmp_path / "out").exists()


def test_eval_stops_on_a_malformed_folder_before_training(tmp_path, capsys):
    root = make_chestx(tmp_path / "chestx")
    (root / "Data_Entry_2017.csv").unlink()
    code, _, err = run(
        capsys, "eval", "--config", TINY, "--data.source", "chestx", "--data.root", str(root),
        "--output", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 2 and f"{root / 'Data_Entry_2017.csv'}: does not exist" in err
    assert not (tmp_path / "out").exists()
