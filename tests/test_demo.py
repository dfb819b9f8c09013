"""`cdfsl demo` and its grid on the shipped micro-clip."""

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from cdfsl import demo
from cdfsl.cli import main
from cdfsl.data.micro_world import MicroWorld
from cdfsl.engine import FitConfig
from cdfsl.evaluation import EpisodeProtocol, EpisodicEvaluator

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "micro-clip"
needs_micro_clip = pytest.mark.skipif(
    not (SHIPPED / "open_clip_model.safetensors").is_file(), reason="micro-clip not shipped"
)
TWO_VIEWS = [{"name": "clean"}, {"name": "rj", "rotation": 45.0, "jitter": 0.4, "hflip": True}]
MIND = {"class_path": "cdfsl.methods.Mind", "init_args": {"views": TWO_VIEWS}}
ZERO = {"class_path": "cdfsl.methods.ZeroShot"}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@needs_micro_clip
def test_short_mind_run_changes_query_accuracy(tmp_path):
    """Mind for 20 steps on the farthest target, against zero-shot on the same 3 episodes.

    The issue asks for a change, not a direction; the accuracies are in the failure message.
    """
    from cdfsl.data.views import parse_views
    from cdfsl.methods import Mind, ZeroShot

    data = MicroWorld("chestx-like", images_per_class=30, seed=0)
    protocol = EpisodeProtocol(5, 1, 15, 3, seed=0)
    fit = FitConfig(steps=20, precision="32-true", accelerator="cpu")
    accuracy = {}
    mind = Mind(backbone="micro-clip", views=parse_views(TWO_VIEWS))
    for method in (ZeroShot(backbone="micro-clip"), mind):
        name = type(method).__name__
        evaluator = EpisodicEvaluator(method, data, protocol, tmp_path / name, fit, progress=False)
        accuracy[type(method).__name__] = [evaluator.run_episode(i)["accuracy"] for i in range(3)]
    assert accuracy["Mind"] != accuracy["ZeroShot"], accuracy


def _cell(tmp_path: Path, method: str, accuracies: dict[int, float]) -> demo.DemoCell:
    out = tmp_path / method
    out.mkdir()
    (out / "results.jsonl").write_text(
        "".join(json.dumps({"episode": e, "accuracy": a}) + "\n" for e, a in accuracies.items())
    )
    return demo.DemoCell("d", 1, method, {}, out)


def test_paired_differences_match_a_hand_computation(tmp_path):
    base = _cell(tmp_path, "A", {0: 0.5, 1: 0.6, 2: 0.4, 3: 0.9})
    other = _cell(tmp_path, "B", {0: 0.6, 1: 0.4, 2: 0.7})  # episode 3 unfinished: left out
    (row,) = demo.paired_differences([base, other], "A", "B")
    # differences 0.1, -0.2, 0.3; CI95 = z_0.975 * sample std / sqrt(n)
    mean = 0.2 / 3
    var = ((0.1 - mean) ** 2 + (-0.2 - mean) ** 2 + (0.3 - mean) ** 2) / 2
    assert row["episodes"] == 3
    assert row["accuracy"] == pytest.approx(mean)
    z = statistics.NormalDist().inv_cdf(0.975)
    assert row["ci95"] == pytest.approx(z * math.sqrt(var) / math.sqrt(3))


@needs_micro_clip
def test_demo_command_prints_the_table_and_writes_files_and_plots(capsys, tmp_path):
    out = tmp_path / "demo"
    code = main(
        ["demo", "--domains", "[isic-like]", "--shots", "[1]", "--episodes", "1", "--steps", "2",
         "--workers", "1", "--progress", "false", "--output", str(out)]
    )  # fmt: skip
    assert code == 0
    stdout = capsys.readouterr().out
    for method in ("ZeroShot", "LoRAFineTune", "Mind", "Mind - LoRAFineTune"):
        assert f"| 1 | {method} |" in stdout
    assert (out / "results.md").read_text().count("| 1 |") == 4
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["method"] for r in rows} == {"ZeroShot", "LoRAFineTune", "Mind"}
    assert all(r["domain"] == "isic-like" and r["episodes"] == "1" for r in rows)
    assert len(_rows(out / "results.jsonl")) == 3
    for png in ("accuracy.png", "curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = json.loads((out / "curves" / "history.json").read_text())
    assert set(curves) == {"LoRAFineTune", "Mind"}
    assert len(curves["Mind"]) == 2 and "svl" in curves["Mind"][0]


def test_demo_refuses_a_paired_method_the_recipe_lacks(capsys, tmp_path):
    code = main(["demo", "--paired", "[LoRAFineTune, Nope]", "--output", str(tmp_path / "x")])
    assert code == 2
    assert "paired takes two of the recipe's methods" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
