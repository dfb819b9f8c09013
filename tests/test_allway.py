"""All-way K-shot protocol: seeded per-class draws, rows per (K, seed), resume, summary, CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from layouts import make_imagenet, make_split_file_dataset

from cdfsl.cli import main
from cdfsl.data import DataConfig, ImageList, build_splits
from cdfsl.data.fsl import SPLIT_FILE_DATASETS
from cdfsl.engine import FitConfig
from cdfsl.errors import CdfslError
from cdfsl.fewshot.allway import AllWayEvaluator, AllWayProtocol, allway_table, draw_per_class
from cdfsl.lora import LoRAConfig
from cdfsl.methods import Mind, ZeroShot
from cdfsl.results import ResultStore

TINY = str(Path(__file__).resolve().parents[1] / "recipes/tiny/mind.yaml")
PETS = next(row for row in SPLIT_FILE_DATASETS if row.name == "oxford-pets")
FIT = FitConfig(steps=2, precision="32-true", accelerator="cpu")
TARGETS = [0, 1, 2] * 6 + [3]  # classes 0-2 have 6 images each, class 3 one


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    root = make_split_file_dataset(tmp_path_factory.mktemp("coop"), PETS, per_split=(5, 3, 2))
    return root, build_splits(DataConfig("oxford-pets", str(root)))


def test_draws_are_k_per_class_seeded_and_disjoint_from_exclusions():
    first = draw_per_class(TARGETS, 4, seed=1)
    assert first == draw_per_class(TARGETS, 4, seed=1)
    assert first != draw_per_class(TARGETS, 4, seed=2)
    assert len(set(first)) == len(first)
    # K per class, class-major; a class with fewer than K gives all it has (as CoOp).
    assert Counter(TARGETS[i] for i in first) == {0: 4, 1: 4, 2: 4, 3: 1}
    assert [TARGETS[i] for i in first] == sorted(TARGETS[i] for i in first)
    rest = draw_per_class(TARGETS, 4, seed=1, stream=1, exclude=frozenset(first))
    assert not set(rest) & set(first)
    assert Counter(TARGETS[i] for i in rest) == {0: 2, 1: 2, 2: 2}


def test_protocol_rejects_bad_shots_and_seeds():
    with pytest.raises(CdfslError, match="fix --shots"):
        AllWayProtocol(shots=(0, 1))
    with pytest.raises(CdfslError, match="fix --seeds"):
        AllWayProtocol(seeds=())


def test_rows_per_shot_and_seed_summary_and_resume(pets, tmp_path):
    _, data = pets
    out = tmp_path / "run"

    def evaluator(seeds, max_val=4):
        method = ZeroShot("tiny-clip", None)
        protocol = AllWayProtocol(shots=(1, 2), seeds=seeds, max_val_shots=max_val)
        return AllWayEvaluator(method, data, protocol, out, FIT, progress=False)

    summary = evaluator((1, 2)).run()
    rows = ResultStore(out / "results.jsonl").rows()
    assert [(r["shots"], r["seed"]) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for row in rows:
        assert len(row["support_ids"]) == 3 * row["shots"] and row["short_classes"] == []
        assert row["val_images"] == 3 * min(row["shots"], 4) and row["test_images"] == 6
        assert 0 <= row["test_accuracy"] <= 1 and row["steps"] == 0
    # Another seed draws another support set.
    assert rows[0]["support_ids"] != rows[1]["support_ids"]
    one_shot = summary["results"][0]
    assert one_shot["shots"] == 1 and one_shot["seeds"] == [1, 2]
    mean = (rows[0]["test_accuracy"] + rows[1]["test_accuracy"]) / 2
    assert one_shot["accuracy"] == pytest.approx(mean)
    assert json.loads((out / "summary.json").read_text())["results"] == summary["results"]

    # Resuming with a third seed runs only the two new (K, seed) pairs.
    summary = evaluator((1, 2, 3)).run()
    again = ResultStore(out / "results.jsonl").rows()
    assert again[:4] == rows and [(r["shots"], r["seed"]) for r in again[4:]] == [(1, 3), (2, 3)]
    assert [r["seeds"] for r in summary["results"]] == [[1, 2, 3], [1, 2, 3]]
    assert "| ZeroShot | - | - | 2 | 3 |" in allway_table(summary)
    with pytest.raises(CdfslError, match=r"different configuration.*protocol"):
        evaluator((1,), max_val=2).run()


def test_training_runs_and_val_comes_from_train_without_a_val_split(tmp_path):
    data = build_splits(DataConfig("imagenet", str(make_imagenet(tmp_path, per_class=(3, 2)))))
    torch.manual_seed(0)
    method = Mind(backbone="tiny-clip", pretrained=None, lora=LoRAConfig(rank=4))
    protocol = AllWayProtocol(shots=(2, 4), seeds=(1,))
    evaluator = AllWayEvaluator(method, data, protocol, tmp_path / "out", FIT, progress=False)

    row = evaluator.run_one(2, 1)
    assert row["steps"] == 2 and "loss" in row["terms"]
    assert row["val_images"] == 3  # the one train image per class that was not drawn
    # 4 shots of 3 images per class: all of them, every class named short, no val left.
    row = evaluator.run_one(4, 1)
    assert len(row["support_ids"]) == 9 and len(row["short_classes"]) == 3
    assert row["val_images"] == 0 and row["val_accuracy"] is None


def test_train_and_test_splits_with_one_class_list_are_required(pets):
    _, data = pets
    method = ZeroShot("tiny-clip", None)
    with pytest.raises(CdfslError, match="needs train and test splits"):
        AllWayEvaluator(method, {"test": data["test"]}, AllWayProtocol(), ".")
    test = data["test"]
    renamed = ImageList(test.image_root, [], [], ["cat", "dog", "cow"])
    with pytest.raises(CdfslError, match="test split's classes differ from train's"):
        AllWayEvaluator(method, {"train": data["train"], "test": renamed}, AllWayProtocol(), ".")


def test_cli_allway_uses_the_datasets_template(pets, tmp_path, capsys):
    root, _ = pets
    out = tmp_path / "out"
    code = main([
        "allway", "--config", TINY, "--data.source", "oxford-pets",
        "--data.root", str(root), "--output", str(out), "--shots", "[1]", "--seeds", "[1]",
        "--steps", "2", "--progress", "false",
    ])  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == 0 and "| Mind | tiny-clip | oxford-pets | 1 | 1 |" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method_args"]["template"] == "a photo of a {}, a type of pet."

    code = main([
        "allway", "--config", TINY, "--data.root", str(root),
        "--output", str(tmp_path / "o2"),
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "source 'folder' has no splits" in err and err.count("\n") == 1
