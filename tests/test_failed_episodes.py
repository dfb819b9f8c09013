"""Failed episodes are rows: a non-finite loss or logit stops that episode alone, and says so."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
import torch
from imagegen import make_image_folder

from cdfsl.cli import main
from cdfsl.data.folder import ImageFolder
from cdfsl.data.views import ViewSpec
from cdfsl.engine import FitConfig, episode_seed
from cdfsl.fewshot.episodic import EpisodeProtocol, EpisodicEvaluator
from cdfsl.lora import LoRAConfig, lora_state_dict
from cdfsl.methods import LoRAFineTune, ZeroShot
from cdfsl.results import ResultStore, mean_ci95, summary_table

FIT = FitConfig(steps=5, precision="32-true", accelerator="cpu")
NAN_STEP = 2
VIEWS = (ViewSpec("clean"), ViewSpec("rotate_jitter_flip", rotation=45.0, jitter=0.4, hflip=True))
POISONED = 2  # the episode whose loss turns NaN


class NaNLoRAFineTune(LoRAFineTune):
    """LoRA-CE whose L_vlm turns NaN from step ``NAN_STEP`` on in the episodes seeded
    ``nan_seeds`` (``poisoned``, which a test may change without changing the configuration)."""

    def __init__(self, *args, nan_seeds: Sequence[int] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.poisoned = set(nan_seeds)

    def loss_terms(self, feats, labels, view_ids, episode):
        terms = super().loss_terms(feats, labels, view_ids, episode)
        if episode.seed in self.poisoned and self.trainer.global_step >= NAN_STEP:
            vlm = terms["vlm"] * float("nan")
            terms = {**terms, "vlm": vlm, "loss": vlm}
        return terms


class NaNZeroShot(ZeroShot):
    """Zero-shot whose logits are NaN for the episodes seeded ``poisoned``."""

    poisoned: frozenset[int] = frozenset()

    def logits(self, image_feats, episode=None):
        out = super().logits(image_feats, episode)
        return out * float("nan") if (episode or self.episodes[0]).seed in self.poisoned else out


def nan_method(**kwargs) -> NaNLoRAFineTune:
    seeds = [episode_seed(0, POISONED)]
    return NaNLoRAFineTune(
        backbone="tiny-clip", pretrained=None, views=VIEWS, lora=LoRAConfig(rank=4),
        nan_seeds=seeds, **kwargs,
    )  # fmt: skip


def evaluator(method, folder, out, episodes=5, fit=FIT, **kwargs) -> EpisodicEvaluator:
    protocol = EpisodeProtocol(n_way=3, k_shot=1, n_query=5, episodes=episodes, seed=0)
    return EpisodicEvaluator(
        method, ImageFolder(folder), protocol, out, fit, progress=False, **kwargs
    )


def same_row(row: dict, twin: dict) -> None:
    for key in sorted((set(row) | set(twin)) - {"seconds", "terms"}):
        assert twin.get(key) == row.get(key), key
    assert twin["terms"].keys() == row["terms"].keys()
    for term, value in row["terms"].items():
        if value is None:
            assert twin["terms"][term] is None, term
        else:
            assert twin["terms"][term] == pytest.approx(value, rel=1e-4, abs=1e-5), term


def test_a_nan_episode_fails_alone_and_leaves_its_group_unchanged(four_class_folder, tmp_path):
    run = evaluator(nan_method(), four_class_folder, tmp_path)
    alone = {i: run.run_episode(i) for i in range(5)}
    failed = alone[POISONED]
    assert failed["status"] == "failed" and "accuracy" not in failed
    assert failed["failure"] == {"step": NAN_STEP, "term": "vlm", "non_finite": ["loss", "vlm"]}
    assert failed["terms"]["loss"] is None and failed["terms"]["modality_gap"] is not None
    assert all(alone[i]["status"] == "ok" for i in alone if i != POISONED)
    # Grouped with healthy episodes, in two orders: every row as when it ran alone.
    for group in ([0, 1, 2, 3, 4], [4, 2, 0]):
        for row in run.run_episodes(group):
            same_row(alone[row["episode"]], row)
    # The guard stops the failed episode only: its partners' adapters trained (B left zero).
    root = run.method.backbone.lora_root()
    for position in (0, 2):  # episodes 4 and 0 of the last group
        trained = lora_state_dict(root, adapter_index=position)
        assert any(v.abs().sum() > 0 for k, v in trained.items() if k.endswith("lora_B")), position
    # Rows are valid JSON (no NaN literals).
    json.loads(json.dumps(failed, allow_nan=False))


def test_summary_counts_failed_and_rerun_retries_only_when_asked(four_class_folder, tmp_path):
    method = nan_method()
    fit = FitConfig(steps=5, precision="32-true", accelerator="cpu", episodes_per_step=2)
    summary = evaluator(method, four_class_folder, tmp_path, episodes=4, fit=fit).run()
    store = ResultStore(tmp_path / "results.jsonl")
    rows = store.rows()
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "ok"]
    ok = [r["accuracy"] for r in rows if r["status"] == "ok"]
    assert summary["episodes_done"] == 3 and summary["episodes_failed"] == 1
    assert summary["failed_episodes"] == [POISONED]
    assert summary["accuracy"] == pytest.approx(mean_ci95(ok)["mean"])
    assert summary["ci95"] == pytest.approx(mean_ci95(ok)["ci95"])
    table = summary_table([summary])
    assert "| 3 (+1 failed) |" in table and "over the successful episodes only" in table
    # A rerun keeps the failed row...
    ran: list[dict] = []
    evaluator(method, four_class_folder, tmp_path, episodes=4, fit=fit).run(ran.append)
    assert ran == [] and store.rows() == rows
    # ... unless asked: then only the failed episode runs again (here it succeeds).
    method.poisoned = set()
    retry = evaluator(method, four_class_folder, tmp_path, episodes=4, fit=fit, retry_failed=True)
    summary = retry.run(ran.append)
    assert [(r["episode"], r["status"]) for r in ran] == [(POISONED, "ok")]
    rows = store.rows()
    assert [r["episode"] for r in rows] == [0, 1, 2, 3] and {r["status"] for r in rows} == {"ok"}
    assert summary["episodes_failed"] == 0 and summary["episodes_done"] == 4


def test_non_finite_query_logits_fail_the_episode(four_class_folder, tmp_path):
    torch.manual_seed(0)
    method = NaNZeroShot(backbone="tiny-clip", pretrained=None)
    method.poisoned = {episode_seed(0, 1)}
    rows = evaluator(method, four_class_folder, tmp_path, episodes=3).run_episodes([0, 1, 2])
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert rows[1]["failure"] == {"step": 0, "term": "query_logits", "non_finite": ["query_logits"]}


def test_cli_reports_failed_episodes_and_retry_flag(capsys, tmp_path):
    folder = make_image_folder(tmp_path / "data", {"Cat": 7, "Dog": 7, "Bird": 7}, size=20)
    seed = episode_seed(0, 1)
    args = [
        "eval", "--data.root", str(folder), "--output", str(tmp_path / "out"),
        "--method", f"{__name__}.NaNLoRAFineTune", "--method.init_args.backbone", "tiny-clip",
        "--method.init_args.pretrained", "null", "--method.init_args.lora.rank", "2",
        "--method.init_args.nan_seeds", f"[{seed}]", "--way", "3", "--shot", "1", "--query", "5",
        "--episodes", "3", "--steps", "4", "--precision", "32-true", "--accelerator", "cpu",
        "--progress", "false",
    ]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| 2 (+1 failed) |" in out and "over the successful episodes only" in out
    assert "failed episodes: 1; a rerun keeps their rows unless --retry_failed" in out
    assert main([*args, "--retry_failed", "true"]) == 0  # fails again: the same row
    rows = ResultStore(tmp_path / "out" / "results.jsonl").rows()
    assert [(r["episode"], r["status"]) for r in rows] == [(0, "ok"), (1, "failed"), (2, "ok")]
