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


# -- mutation follow-up (issue 23): EpisodeManifest by hand, its refusals in full -----------------


def _lines(folder: Path) -> tuple[ImageFolder, list[dict]]:
    """Two hand-written 2-way 1-shot 2-query episodes over the folder's files (seed on one)."""
    data = ImageFolder(folder)
    ids = [data.sample_id(j) for j in range(len(data))]
    by_class = {c: [i for j, i in enumerate(ids) if int(data.targets[j]) == c] for c in range(4)}
    one = {
        "episode": 1, "classes": ["Fox", "Bird"], "seed": 77,
        "support_ids": [by_class[3][0], by_class[0][0]], "support_labels": [0, 1],
        "query_ids": [by_class[0][1], by_class[3][1], by_class[0][2], by_class[3][2]],
        "query_labels": [1, 0, 1, 0],
    }  # fmt: skip
    zero = {
        "episode": 0, "classes": ["cat", "dog"],
        "support_ids": [by_class[1][0], by_class[2][0]], "support_labels": [0, 1],
        "query_ids": [by_class[1][1], by_class[1][2], by_class[2][1], by_class[2][2]],
        "query_labels": [0, 0, 1, 1],
    }  # fmt: skip
    return data, [one, zero]


def test_a_hand_written_manifest_gives_its_episodes(folder):
    data, lines = _lines(folder)
    manifest = EpisodeManifest(lines, data)
    assert (manifest.n_way, manifest.k_shot, manifest.n_query, len(manifest)) == (2, 1, 2, 2)
    assert manifest.source == "manifest" and manifest.lines == [lines[1], lines[0]]
    assert manifest.seed(0) is None and manifest.seed(1) == 77
    assert manifest.class_names(1) == ["Fox", "Bird"]
    index = {data.sample_id(j): j for j in range(len(data))}
    episode = manifest.episode(1)
    assert episode.index == 1
    assert episode.support == tuple(index[i] for i in lines[0]["support_ids"])
    assert episode.query == tuple(index[i] for i in lines[0]["query_ids"])
    assert episode.support_labels == (0, 1) and episode.query_labels == (1, 0, 1, 0)
    # Label 0 is Fox's images' dataset class, label 1 Bird's: read from the support images.
    fox, bird = (int(data.targets[index[lines[0]["support_ids"][k]]]) for k in (0, 1))
    assert episode.class_ids == (fox, bird) and fox != bird
    one_way = {**lines[1], "classes": ["cat"], "support_ids": lines[1]["support_ids"][:1],
               "support_labels": [0], "query_ids": lines[1]["query_ids"][:2],
               "query_labels": [0, 0]}  # fmt: skip
    single = EpisodeManifest([one_way], data)
    assert (single.n_way, single.k_shot, single.n_query) == (1, 1, 2)


def test_manifest_refusals_in_full(folder):
    data, lines = _lines(folder)

    def message(lines, source="m.jsonl") -> str:
        with pytest.raises(DataError) as err:
            EpisodeManifest(lines, data, source)
        return str(err.value)

    keys = "episode, classes, support_ids, support_labels, query_ids, query_labels"
    broken = [lines[0], {k: v for k, v in lines[1].items() if k not in ("classes", "query_ids")}]
    assert message(broken) == (
        f"m.jsonl line 2 lacks classes, query_ids; expected the keys {keys} (and seed); fix that "
        "line or export the manifest again (cdfsl eval --export_manifest FILE)"
    )
    many = [{**lines[1], "episode": e} for e in (0, 2, 3, 4, 5, 6, 7, 8, 9, 10)]
    assert message(many) == (
        "m.jsonl numbers its 10 lines as episodes 0, 2, 3, 4, 5, 6, 7, 8, ...; expected 0..9, "
        "each once; fix: renumber the episode fields"
    )
    nine = [{**lines[1], "episode": e} for e in (0, 2, 3, 4, 5, 6, 7, 8, 9)]
    assert message(nine) == (
        "m.jsonl numbers its 9 lines as episodes 0, 2, 3, 4, 5, 6, 7, 8, ...; expected 0..8, "
        "each once; fix: renumber the episode fields"
    )
    eight = [{**lines[1], "episode": e} for e in (0, 2, 3, 4, 5, 6, 7, 8)]
    assert message(eight) == (
        "m.jsonl numbers its 8 lines as episodes 0, 2, 3, 4, 5, 6, 7, 8; expected 0..7, "
        "each once; fix: renumber the episode fields"
    )
    two_shot = {
        **lines[0],
        "support_ids": lines[0]["support_ids"] + lines[0]["query_ids"][:2],
        "support_labels": [0, 1, 1, 0],
    }
    assert message([two_shot, lines[1]]) == (
        "m.jsonl episode 1 is 2-way 2-shot 2-query, episode 0 2-way 1-shot 2-query; expected "
        "one shape for every episode; fix: split the manifest by shape"
    )
    for bad in (
        {**lines[0], "query_labels": [1, 0, 1, 1]},  # unequal counts per class
        {**lines[0], "query_labels": [1, 0]},  # fewer labels than ids, each class once
        {**lines[0], "query_labels": [1, 0, 2, 0]},  # a label outside the classes
    ):
        assert message([bad, lines[1]]) == (
            f"m.jsonl episode 1: 4 query ids, {len(bad['query_labels'])} labels over 2 classes; "
            "expected one label in [0, 2) per id and the same count for every class; fix that line"
        )
    empty = {**lines[0], "query_ids": [], "query_labels": []}
    assert message([empty, {**lines[1], "query_ids": [], "query_labels": []}]) == (
        "m.jsonl episode 0: 0 query ids, 0 labels over 2 classes; expected one label in [0, 2) "
        "per id and the same count for every class; fix that line"
    )
    fix = (
        "expected every support and query id relative to the dataset root; fix: pass the "
        "--data.root the manifest was exported from, or restore those files"
    )
    gone = [f"gone/{k}.png" for k in range(6)]
    real = lines[0]["query_ids"][3]
    for queries, shown in (
        ([*gone[2:5], real], "gone/0.png, gone/1.png, gone/2.png, gone/3.png, gone/4.png"),
        (gone[2:6], "gone/0.png, gone/1.png, gone/2.png, gone/3.png, gone/4.png and 1 more"),
    ):
        absent = {**lines[0], "support_ids": gone[:2], "query_ids": queries}
        count = 5 if real in queries else 6
        assert message([absent, lines[1]]) == (
            f"m.jsonl names {count} files the dataset lacks: {shown}; " + fix
        )
