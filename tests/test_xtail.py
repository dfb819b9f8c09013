"""X-TAIL: metrics on hand-written matrices, the runner end to end, resume after a kill, CLI."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cdfsl.cli import build_parser, main
from cdfsl.commands.rail import config_from
from cdfsl.errors import CdfslError
from cdfsl.evaluation import xtail
from cdfsl.evaluation.xtail import (
    DomainConfig,
    FineTuneConfig,
    PrimalConfig,
    XTailConfig,
    XTailRun,
    few_shot_indices,
    xtail_metrics,
)
from cdfsl.lora import LoRAConfig
from cdfsl.methods.rail import PrimalAdapter

ROOT = Path(__file__).resolve().parents[1]

# a[t][k]: row t = after learning domain t, column k = domain tested.
HAND = [
    [0.50, 0.20, 0.10],
    [0.40, 0.80, 0.50],
    [0.30, 0.70, 0.90],
]


def test_metrics_on_a_hand_written_matrix():
    m = xtail_metrics(HAND)
    # Transfer: column 2 -> a[0][1] = 0.2; column 3 -> mean(a[0][2], a[1][2]) = 0.3
    assert m["transfer"] == pytest.approx((0.2 + 0.3) / 2)
    # Average: column means 0.4, 1.7/3, 0.5
    assert m["average"] == pytest.approx((0.4 + 1.7 / 3 + 0.5) / 3)
    assert m["last"] == pytest.approx((0.3 + 0.7 + 0.9) / 3)


def test_transfer_reads_only_entries_above_the_diagonal():
    base = xtail_metrics(HAND)["transfer"]
    for t, k in ((0, 0), (1, 1), (2, 2), (1, 0), (2, 0), (2, 1)):  # diagonal and below
        changed = np.array(HAND)
        changed[t, k] = 0.0
        assert xtail_metrics(changed)["transfer"] == pytest.approx(base)
    for t, k in ((0, 1), (0, 2), (1, 2)):  # above
        changed = np.array(HAND)
        changed[t, k] += 0.3
        assert xtail_metrics(changed)["transfer"] != pytest.approx(base)


def test_metrics_of_one_domain_and_bad_shapes():
    m = xtail_metrics([[0.7]])
    assert math.isnan(m["transfer"]) and m["average"] == m["last"] == pytest.approx(0.7)
    with pytest.raises(CdfslError, match=r"expected \(K, K\)"):
        xtail_metrics([[0.1, 0.2]])


def test_few_shot_indices_are_seeded_per_class_and_keep_small_classes_whole():
    targets = [0] * 10 + [1] * 3 + [2] * 8
    picked = few_shot_indices(targets, 4, seed=3)
    counts = np.bincount([targets[i] for i in picked])
    assert counts.tolist() == [4, 3, 4] and picked == sorted(picked)
    assert picked == few_shot_indices(targets, 4, seed=3) != few_shot_indices(targets, 4, seed=4)
    assert few_shot_indices(targets, None, 0) == list(range(21))


def _micro(domain: str, per_class: int, seed: int) -> dict:
    return {
        "class_path": "cdfsl.data.micro_world.MicroWorld",
        "init_args": {"domain": domain, "images_per_class": per_class, "seed": seed},
    }


def _config(tmp_path: Path, methods: list[str], **overrides) -> XTailConfig:
    domains = [
        DomainConfig(d, _micro(d, 3, 0), _micro(d, 2, 1))
        for d in ("crop-like", "isic-like", "chestx-like")
    ]
    fields = {
        "domains": domains, "backbone": "tiny-clip", "pretrained": None, "shots": 2,
        "methods": methods, "primal": PrimalConfig(hidden=96, block_size=5),
        "finetune": FineTuneConfig(steps=1, lora=LoRAConfig(rank=2), accelerator="cpu"),
        "output": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"),
        "device": "cpu", "progress": False, **overrides,
    }  # fmt: skip
    return XTailConfig(**fields)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xtail")
    runner = XTailRun(_config(tmp, list(xtail.METHODS)))
    return tmp, runner, runner.run()


def test_run_writes_every_method_matrix_metrics_and_heatmaps(full_run):
    tmp, _, results = full_run
    out = tmp / "out"
    assert list(results) == ["zero-shot", "finetune", "primal", "dual"]
    names = ["crop-like", "isic-like", "chestx-like"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["domains"] == names and summary["classes"] == {
        "crop-like": 8, "isic-like": 7, "chestx-like": 8,
    }  # fmt: skip
    assert summary["train_images"] == dict.fromkeys(names, 2 * 8) | {"isic-like": 14}
    for name, res in results.items():
        matrix = np.array(res["matrix"])
        assert matrix.shape == (3, 3) and ((matrix >= 0) & (matrix <= 1)).all()
        assert res["metrics"] == pytest.approx(xtail_metrics(matrix))
        saved = json.loads((out / name / "matrix.json").read_text())
        assert saved["matrix"] == res["matrix"]
        rows = [json.loads(x) for x in (out / name / "steps.jsonl").read_text().splitlines()]
        assert [r["learned"] for r in rows] == names
        assert (out / name / "matrix.png").stat().st_size > 0
    assert (out / "xtail.png").read_bytes()[:4] == b"\x89PNG"
    assert "Dual-RAIL" in (out / "summary.md").read_text()
    # The frozen model learns nothing: every row of zero-shot is the same.
    zs = np.array(results["zero-shot"]["matrix"])
    assert (zs == zs[0]).all()


def test_rail_on_unseen_domains_is_never_below_zero_shot(full_run):
    # Fusion keeps zero-shot's prediction whenever it names an unseen class, and a zero-shot
    # prediction of a seen class is wrong on an unseen domain: RAIL can only gain there.
    _, _, results = full_run
    zs = np.array(results["zero-shot"]["matrix"])
    for name in ("primal", "dual"):
        a = np.array(results[name]["matrix"])
        above = np.triu_indices(3, k=1)
        assert (a[above] >= zs[above] - 1e-12).all()


def test_primal_rail_after_the_sequence_is_the_joint_solution(full_run):
    _, runner, _ = full_run
    state = torch.load(runner.output / "primal" / "state.pt", weights_only=True)
    learned = PrimalAdapter.from_state_dict(state["state"])
    feats = torch.cat([d.train_feats.features for d in runner.domains])
    labels = torch.cat([d.train_feats.labels + d.offset for d in runner.domains])
    phi = torch.relu(feats.double() @ learned.projection)
    y = torch.nn.functional.one_hot(labels, 23).double()
    joint = torch.linalg.solve(phi.T @ phi + 0.1 * torch.eye(96, dtype=torch.float64), phi.T @ y)
    assert torch.allclose(learned.weights, joint, atol=1e-9)


class Killed(Exception):
    """Stands for a kill: it escapes the runner as SIGKILL would stop it."""


def test_resume_after_a_kill_loses_only_the_current_step(tmp_path, monkeypatch):
    reference = XTailRun(_config(tmp_path / "ref", ["primal", "dual"])).run()
    calls, killed = [], []
    real_learn = xtail._RailLearner.learn

    def dies_in_step_2(self, step):
        calls.append((self.name, step))
        if (self.name, step) == ("dual", 2) and not killed:
            killed.append(step)
            raise Killed
        real_learn(self, step)

    monkeypatch.setattr(xtail._RailLearner, "learn", dies_in_step_2)
    with pytest.raises(Killed):
        XTailRun(_config(tmp_path / "run", ["primal", "dual"])).run()
    # A kill between writing the state and appending its row: the row comes from the state.
    steps = tmp_path / "run" / "out" / "primal" / "steps.jsonl"
    steps.write_text("".join(steps.read_text().splitlines(keepends=True)[:2]))
    calls.clear()
    resumed = XTailRun(_config(tmp_path / "run", ["primal", "dual"])).run()
    assert calls == [("dual", 2)]  # primal untouched, dual redoes only the step it died in
    for name in ("primal", "dual"):
        assert resumed[name]["matrix"] == reference[name]["matrix"]


def test_a_changed_configuration_is_refused(tmp_path):
    XTailRun(_config(tmp_path, ["primal"])).run()
    with pytest.raises(CdfslError, match="changed: primal"):
        XTailRun(_config(tmp_path, ["primal"], primal=PrimalConfig(hidden=50))).run()
    with pytest.raises(CdfslError, match=r"changed: .*shots"):
        XTailRun(_config(tmp_path, ["zero-shot"], shots=1)).run()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"methods": ["magic"]}, "expected a non-empty subset"),
        ({"domains": []}, "no domains given"),
    ],
)
def test_bad_configs_name_the_input(tmp_path, overrides, message):
    with pytest.raises(CdfslError, match=message):
        XTailRun(_config(tmp_path, overrides.pop("methods", ["primal"]), **overrides))


def test_split_specs_are_checked():
    with pytest.raises(CdfslError, match=r"class_path 'cdfsl\.nowhere\.Thing'"):
        xtail.build_split({"class_path": "cdfsl.nowhere.Thing"})
    with pytest.raises(CdfslError, match=r"split keys \['rooot'\] unknown"):
        xtail.build_split({"source": "folder", "rooot": "x"})


def test_recipes_parse_with_the_papers_settings():
    parser = build_parser()[0]
    order = config_from(
        parser.parse_args(["rail", "--config", str(ROOT / "recipes/rail/order-i.yaml")]).rail
    )
    assert [d.name for d in order.domains] == [
        "fgvc_aircraft", "caltech101", "dtd", "eurosat", "oxford_flowers", "food101", "mnist",
        "oxford_pets", "stanford_cars", "sun397",
    ]  # fmt: skip
    assert (order.shots, order.backbone, order.beta) == (16, "clip-vit-b16", 0.8)
    assert (order.primal.hidden, order.primal.reg, order.dual.gamma, order.dual.reg) == (
        15000, 0.1, 0.1, 1e-3,
    )  # fmt: skip
    assert all(d.test["options"] == {"split": "test"} for d in order.domains)
    micro = config_from(
        parser.parse_args(["rail", "--config", str(ROOT / "recipes/rail/micro.yaml")]).rail
    )
    assert micro.backbone == "micro-clip" and len(micro.domains) == 5
    assert micro.methods == ["zero-shot", "finetune", "primal", "dual"]


def test_cli_prints_matrix_and_metrics(tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    domains = [
        {"name": d, "train": _micro(d, 3, 0), "test": _micro(d, 2, 1)}
        for d in ("crop-like", "isic-like")
    ]
    recipe.write_text(json.dumps({"domains": domains, "backbone": "tiny-clip"}))
    code = main(
        ["rail", "--config", str(recipe), "--pretrained", "null", "--methods", "[zero-shot,primal]",
         "--primal.hidden", "32", "--output", str(tmp_path / "out"), "--cache_dir",
         str(tmp_path / "cache"), "--progress", "false", "--device", "cpu"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "| after \\ on | crop-like | isic-like |" in out
    assert "| Primal-RAIL |" in out and "Transfer" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["methods"]) == {"zero-shot", "primal"}
