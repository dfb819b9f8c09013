"""Sharded episodic evaluation: torchrun ranks, static --shard K/N with cdfsl merge, resume of
stopped shards with another shard count, and the demo on launched ranks. Every way must give
the rows of one process.

Every Python process here spends seconds of CPU importing torch and Lightning, so the file has
one torchrun run (in the background) and one launched demo; the rest runs in this process.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cdfsl.cli import main
from cdfsl.errors import CdfslError
from cdfsl.results.shards import Shard, describe, finished_rows

ROOT = Path(__file__).resolve().parents[1]
EPISODES = 8
# Every run here shares these settings, so each compares with the one reference run.
FLAGS = [
    "--config", str(ROOT / "recipes/tiny/mind.yaml"), "--episodes", str(EPISODES),
    "--steps", "2", "--precision", "32-true", "--progress", "false",
]  # fmt: skip
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--no-python"]
CDFSL = str(Path(sys.executable).parent / "cdfsl")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # One thread, as torchrun gives each rank: two threads on two shared cores slow every
    # in-process episode here several-fold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def eval_args(folder: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", *FLAGS, "--data.root", str(folder), "--output", str(out), *extra]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    """Equal rows, timings aside, and the loss terms to float32 rounding: episodes train several
    to a pass, and which episodes share a pass moves the terms' last bits (not the accuracy)."""

    def plain(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if k not in ("seconds", "terms")} for row in rows]

    assert plain(got) == plain(want)
    for g, w in zip(got, want, strict=True):
        assert g["terms"] == pytest.approx(w["terms"], rel=1e-5, abs=1e-6)


def summary(out: Path) -> dict:
    data = json.loads((out / "summary.json").read_text())
    data.pop("seconds_per_episode")
    return data


@pytest.fixture(scope="module")
def reference(four_class_folder, tmp_path_factory) -> Path:
    """One process, every episode in order: the rows every sharded run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(eval_args(four_class_folder, out)) == 0
    assert [r["episode"] for r in rows(out)] == list(range(EPISODES))
    return out


class Launched:
    """``cdfsl eval`` under torchrun with two ranks, in the background; output in a file."""

    def __init__(self, folder: Path, base: Path) -> None:
        self.out, self.log = base / "ranks", base / "ranks.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [*TORCHRUN, CDFSL, *eval_args(folder, self.out)], env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def wait(self) -> tuple[int, str]:
        """The exit status and the output (of every process)."""
        code = self.proc.wait(timeout=240)
        return code, self.log.read_text()


@pytest.fixture(scope="module", autouse=True)
def launched(four_class_folder, tmp_path_factory) -> Launched:
    """The torchrun run starts with the module and runs while the in-process tests do: its
    processes' imports take seconds of CPU that need not wait for them."""
    run = Launched(four_class_folder, tmp_path_factory.mktemp("launched"))
    yield run
    if run.proc.poll() is None:  # a failed test: torchrun and its ranks, all of them
        os.killpg(run.proc.pid, signal.SIGKILL)
        run.proc.wait()


def test_static_shards_then_merge_equal_one_process(capsys, four_class_folder, reference,
                                                    tmp_path):  # fmt: skip
    out = tmp_path / "static"
    assert main(eval_args(four_class_folder, out, "--shard", "0/2")) == 0
    printed = capsys.readouterr().out
    assert "shard 0/2: 4 of its 4 episodes done" in printed and f"cdfsl merge {out}" in printed
    assert not (out / "results.jsonl").exists() and not (out / "summary.json").exists()

    assert main(["merge", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "lacks 4 of 8 episodes: 1, 3, 5, 7 (shards 1/2)" in err and "--allow_partial" in err

    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    assert main(["merge", str(partial), "--allow_partial", "true"]) == 0
    assert [r["episode"] for r in rows(partial)] == [0, 2, 4, 6]
    assert json.loads((partial / "summary.json").read_text())["episodes_done"] == 4

    assert main(eval_args(four_class_folder, out, "--shard", "1/2")) == 0
    assert main(["merge", str(out)]) == 0
    assert "| Mind | tiny-clip |" in capsys.readouterr().out
    assert_same_rows(rows(out), rows(reference))
    assert summary(out) == summary(reference)
    assert not (out / "shards").exists()
    # Merged once, nothing is left to merge; the merged rows stay.
    assert main(["merge", str(out)]) == 2
    assert "found no shard files" in capsys.readouterr().err


def test_one_process_resume_merges_shards_sorted(capsys, four_class_folder, reference,
                                                 tmp_path):  # fmt: skip
    out = tmp_path / "mixed"
    assert main(eval_args(four_class_folder, out, "--shard", "1/4")) == 0  # episodes 1, 5
    assert main(eval_args(four_class_folder, out)) == 0  # the rest, then the merge
    capsys.readouterr()
    assert_same_rows(rows(out), rows(reference))
    assert not (out / "shards").exists()


def test_shard_flags_are_checked(capsys, four_class_folder, tmp_path, monkeypatch):
    for value, expected in (("2/2", "0 <= K < N"), ("half", "expected K/N")):
        assert main(eval_args(four_class_folder, tmp_path / "x", "--shard", value)) == 2
        assert expected in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(eval_args(four_class_folder, tmp_path / "x", "--shard", "0/2")) == 2
    assert "expected one of the two" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_shard_names_and_descriptions():
    assert Shard.parse(" 3/8 ") == Shard(3, 8)
    assert Shard.from_name("rank-1-of-2") == Shard(1, 2, ranked=True)
    assert Shard(1, 2, ranked=True).owns(3) and not Shard(0, 2).owns(3)
    assert describe([9, 1, 3, 4, 5, 7]) == "1, 3-5, 7, 9"
    with pytest.raises(CdfslError, match="expected rank-R-of-W"):
        Shard.from_name("notes")


def test_two_ranks_under_torchrun_merge_to_the_one_process_rows(launched, reference):
    code, output = launched.wait()
    assert code == 0, output[-3000:]
    assert_same_rows(rows(launched.out), rows(reference))
    assert summary(launched.out) == summary(reference)
    assert not (launched.out / "shards").exists()
    assert output.count("| Mind | tiny-clip |") == 1  # rank 0 alone reports


def test_stopped_shards_resume_with_another_shard_count(capsys, monkeypatch, four_class_folder,
                                                        reference, tmp_path):  # fmt: skip
    from cdfsl.fewshot.episodic import EpisodicEvaluator

    out = tmp_path / "stopped"
    assert main(eval_args(four_class_folder, out, "--shard", "0/2")) == 0
    # Shard 1/2 is stopped as Ctrl-C stops it, as its third episode starts.
    original, calls = EpisodicEvaluator.run_episodes, []

    def stop_at_third(self, indices, *args, **kwargs):
        calls.append(indices)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, indices, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(EpisodicEvaluator, "run_episodes", stop_at_third)
        flags = ("--shard", "1/2", "--episodes_per_step", "1")  # one episode per call
        assert main(eval_args(four_class_folder, out, *flags)) == 130
    before = finished_rows(out)
    assert sorted(before) == [0, 1, 2, 3, 4, 6]
    with open(out / "shards" / "shard-1-of-2.jsonl", "ab") as handle:
        handle.write(b'{"episode": 5, "accur')  # what a kill in the middle of a write leaves

    # Resumed as three shards (another split of the same episodes), then merged.
    for k in range(3):
        assert main(eval_args(four_class_folder, out, "--shard", f"{k}/3")) == 0
    assert "shard 2/3: 2 of its 2 episodes done" in capsys.readouterr().out
    assert main(["merge", str(out)]) == 0
    merged = rows(out)
    assert_same_rows(merged, rows(reference))
    # Episodes finished before the stop were kept, not run again (their timings are the old).
    assert all(merged[i] == row for i, row in before.items())
    assert not (out / "shards").exists()


SHIPPED = ROOT / "assets" / "micro-clip" / "open_clip_model.safetensors"
TWO_VIEWS = [{"name": "clean"}, {"name": "rj", "rotation": 45.0, "jitter": 0.4, "hflip": True}]


@pytest.mark.skipif(not SHIPPED.is_file(), reason="micro-clip not shipped")
def test_grid_on_two_launched_ranks_equals_one_process(tmp_path):
    """Every cell of a grid (cdfsl table, cdfsl demo) split over two elastic-launched ranks
    gives the one-process rows."""
    from dataclasses import replace

    from cdfsl.engine import FitConfig
    from cdfsl.fewshot.grid import Grid, Target, run_grid
    from cdfsl.fewshot.table import write_tables

    specs = (
        {"class_path": "cdfsl.methods.ZeroShot"},
        {"class_path": "cdfsl.methods.Mind", "init_args": {"views": TWO_VIEWS}},
    )
    world = {"domain": "chestx-like", "images_per_class": 20, "seed": 3}
    one = Grid(
        specs, (Target("chestx-like", "micro", options=world),), (1,), ("micro-clip",), {1: 3},
        FitConfig(steps=3, precision="32-true", accelerator="cpu"), tmp_path / "a", seed=3,
    )  # fmt: skip
    two = replace(one, output=tmp_path / "b")
    cells = run_grid(one, progress=False)
    launched = run_grid(two, progress=False, workers=2, threads=1)
    assert [(c.target, c.shot, c.method) for c in launched] == [
        ("chestx-like", 1, "ZeroShot"),
        ("chestx-like", 1, "Mind"),
    ]
    for a, b in zip(cells, launched, strict=True):
        assert_same_rows(rows(a.folder), rows(b.folder))
        assert not (b.folder / "shards").exists()
    tables = [write_tables(g.output, g.record(), c)[0] for g, c in ((one, cells), (two, launched))]
    assert tables[0] == tables[1]
