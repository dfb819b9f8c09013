"""`cdfsl demo` (cdfsl table on the micro-world recipe) on the shipped micro-clip."""

import csv
import json
from pathlib import Path

import pytest

from cdfsl.cli import main
from cdfsl.data.micro_world import MicroWorld
from cdfsl.engine import FitConfig
from cdfsl.fewshot.episodic import EpisodeProtocol, EpisodicEvaluator

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


BASELINES = ["LinearProbe", "ZeroShotLinearProbe", "TipAdapter", "TipAdapterF", "LPPlusPlus",
             "CLAP"]  # fmt: skip


@needs_micro_clip
def test_demo_command_prints_the_table_and_writes_files_and_plots(capsys, tmp_path, monkeypatch):
    """The demo is cdfsl table on the micro-world recipe: its table holds the three methods and
    the six baselines, each against LoRAFineTune paired; then the training curves."""
    monkeypatch.setenv("CDFSL_FEATURE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    code = main(
        ["demo", "--domains", "[isic-like]", "--shots", "[1]", "--episodes", "1", "--steps", "2",
         "--workers", "1", "--progress", "false", "--output", str(out)]
    )  # fmt: skip
    assert code == 0
    stdout = capsys.readouterr().out
    methods = ["ZeroShot", "LoRAFineTune", "Mind", *BASELINES]
    for method in methods:
        assert f"| 1 | {method} |" in stdout
        if method != "LoRAFineTune":
            assert f"| 1 | {method} - LoRAFineTune |" in stdout
    assert (out / "results.md").read_text().count("| 1 |") == 2 * len(methods) - 1
    assert "\\toprule" in (out / "results.tex").read_text()
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["method"] for r in rows if r["target"] == "isic-like"] == methods
    assert all(r["episodes"] == "1" for r in rows if r["target"] == "isic-like")
    assert {r["reference"] for r in rows if r["method"] != "LoRAFineTune"} == {"LoRAFineTune"}
    assert len(_rows(out / "results.jsonl")) == 2 * len(methods)  # isic-like and the average
    for png in ("accuracy.png", "curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = json.loads((out / "curves" / "history.json").read_text())
    assert set(curves) == {"LoRAFineTune", "Mind"}
    assert len(curves["Mind"]) == 2 and "svl" in curves["Mind"][0]


def test_demo_refuses_a_reference_the_recipe_lacks(capsys, tmp_path):
    code = main(["demo", "--reference", "Nope", "--output", str(tmp_path / "x")])
    assert code == 2
    err = capsys.readouterr().err
    assert "reference 'Nope' is not one of the methods" in err and "fix --reference" in err
    assert not (tmp_path / "x").exists()


def test_demo_refuses_curves_on_a_domain_it_does_not_run(capsys, tmp_path):
    flags = ["--domains", "[isic-like]", "--curves.domain", "crop-like"]
    assert main(["demo", *flags, "--output", str(tmp_path / "x")]) == 2
    assert "curves.domain 'crop-like' is not one of the targets" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
