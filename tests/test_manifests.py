"""Episode manifests: a protocol's episodes as JSONL, and evaluation from such a file."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from imagegen import make_image_folder

from cdfsl.cli import main
from cdfsl.data.episodes import EpisodeManifest
from cdfsl.data.folder import ImageFolder
from cdfsl.errors import DataError
from cdfsl.fewshot.episodic import EpisodeProtocol, protocol_manifest
from cdfsl.results import ResultStore

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes/tiny/mind.yaml")
FAST = ["--steps", "2", "--precision", "32-true", "--progress", "false", "--episodes", "3"]


def eval_args(folder: Path, *extra: str) -> list[str]:
    return ["eval", "--config", TINY, "--data.root", str(folder), *FAST, *extra]


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data", {"Cat": 7, "Dog": 7, "Bird": 7, "Fox": 7})


def test_manifest_run_gives_the_rows_of_the_protocol_run(capsys, folder, tmp_path):
    manifest = tmp_path / "episodes.jsonl"
    assert main(eval_args(folder, "--export_manifest", str(manifest))) == 0
    assert "manifest: " in capsys.readouterr().out
    lines = ResultStore(manifest).rows()
    assert [line["episode"] for line in lines] == [0, 1, 2]
    first = lines[0]
    assert len(first["classes"]) == 3 and len(first["support_ids"]) == 3
    assert len(first["query_ids"]) == 15 and first["query_labels"][:5] == [0] * 5
    assert all((folder / i).is_file() for i in first["support_ids"] + first["query_ids"])
    assert not (tmp_path / "runs").exists()  # exporting trains nothing

    assert main(eval_args(folder, "--output", str(tmp_path / "protocol"))) == 0
    assert (
        main(eval_args(folder, "--output", str(tmp_path / "m"), "--manifest", str(manifest))) == 0
    )
    protocol_rows = ResultStore(tmp_path / "protocol" / "results.jsonl").rows()
    manifest_rows = ResultStore(tmp_path / "m" / "results.jsonl").rows()
    for row, twin in zip(protocol_rows, manifest_rows, strict=True):
        row.pop("seconds"), twin.pop("seconds")
        assert row == twin
    for line, row in zip(lines, protocol_rows, strict=True):  # the manifest is the rows' episodes
        for key in ("episode", "seed", "support_ids", "query_ids"):
            assert line[key] == row[key]
        assert line["classes"] == row["classes"]
    # The fingerprint records the manifest: its sha256 (the exported file is canonical JSON).
    recorded = json.loads((tmp_path / "m" / "run.json").read_text())["manifest"]
    assert recorded == {"sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()}
    # Another manifest in the same output is another run.
    edited = tmp_path / "edited.jsonl"
    ResultStore(edited).replace([{**lines[0], "seed": 1}, *lines[1:]])
    code = main(eval_args(folder, "--output", str(tmp_path / "m"), "--manifest", str(edited)))
    assert code == 2 and "changed: manifest" in capsys.readouterr().err


def test_missing_files_are_named_before_anything_trains(capsys, folder, tmp_path):
    manifest = tmp_path / "episodes.jsonl"
    assert main(eval_args(folder, "--export_manifest", str(manifest))) == 0
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    gone = ResultStore(manifest).rows()[1]["query_ids"][:2]
    for name in gone:
        (copy / name).unlink()
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(eval_args(copy, "--output", str(out), "--manifest", str(manifest)))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("cdfsl: error:")
    assert "names 2 files the dataset lacks" in err and all(name in err for name in gone)
    assert not out.exists()


def test_a_foreign_manifest_in_any_order_without_seeds(folder, tmp_path):
    dataset = ImageFolder(folder)
    lines = protocol_manifest(dataset, EpisodeProtocol(3, 2, 4, episodes=4, seed=7))
    foreign = [{k: v for k, v in line.items() if k != "seed"} for line in reversed(lines)]
    foreign[0]["classes"] = ["a cat", "a dog", "a bird"]
    manifest = EpisodeManifest(foreign, dataset)
    assert (manifest.n_way, manifest.k_shot, manifest.n_query, len(manifest)) == (3, 2, 4, 4)
    assert manifest.seed(0) is None and manifest.class_names(3) == ["a cat", "a dog", "a bird"]
    episode = manifest.episode(2)
    assert [dataset.sample_id(i) for i in episode.support] == lines[2]["support_ids"]
    assert list(episode.query_labels) == lines[2]["query_labels"]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda ls: ls[:1] + ls[2:], "episodes 0, 2; expected 0..1, each once"),
        (lambda ls: [ls[0], ls[1], {**ls[2], "support_labels": [0, 0, 5]}], "one label in [0, 3)"),
        (lambda ls: [ls[0], {**ls[1], "classes": ["x", "y"]}, ls[2]], "expected one label"),
        (lambda ls: [{k: v for k, v in ls[0].items() if k != "query_ids"}], "lacks query_ids"),
        (lambda ls: [], "holds no episodes"),
    ],
)
def test_malformed_manifests_are_refused(folder, edit, expected):
    dataset = ImageFolder(folder)
    lines = protocol_manifest(dataset, EpisodeProtocol(3, 1, 5, episodes=3))
    with pytest.raises(DataError, match=re.escape(expected)):
        EpisodeManifest(edit(lines), dataset)


def test_manifest_and_protocol_must_agree(capsys, folder, tmp_path):
    manifest = tmp_path / "episodes.jsonl"
    assert main(eval_args(folder, "--export_manifest", str(manifest))) == 0
    out = tmp_path / "out"
    code = main(eval_args(folder, "--output", str(out), "--manifest", str(manifest), "--way", "2"))
    err = capsys.readouterr().err
    assert code == 2 and "fix: pass --way 3 --shot 1 --query 5" in err and not out.exists()
    code = main(eval_args(folder, "--output", str(out), "--manifest", str(tmp_path / "nope")))
    assert code == 2 and "is not a file" in capsys.readouterr().err
