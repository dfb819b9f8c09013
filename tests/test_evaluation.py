import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cdfsl.data.folder import ImageFolder
from cdfsl.engine import FitConfig
from cdfsl.errors import CdfslError
from cdfsl.fewshot.episodic import EpisodeProtocol, EpisodicEvaluator
from cdfsl.lora import LoRAConfig
from cdfsl.methods import Mind, ZeroShot
from cdfsl.results import ResultStore, mean_ci95

ROOT = Path(__file__).resolve().parents[1]
FIT = FitConfig(steps=3, precision="32-true", accelerator="cpu")


def mind() -> Mind:
    return Mind(backbone="tiny-clip", pretrained=None, lora=LoRAConfig(rank=4))


def evaluate(folder, out, episodes=3, method=None, **kw) -> EpisodicEvaluator:
    protocol = EpisodeProtocol(
        n_way=3, k_shot=1, n_query=5, episodes=episodes, seed=kw.pop("seed", 0)
    )
    return EpisodicEvaluator(
        method or mind(), ImageFolder(folder), protocol, out, FIT, progress=False, **kw
    )


def test_rows_summary_and_determinism(four_class_folder, tmp_path):
    summary = evaluate(four_class_folder, tmp_path / "a").run()
    rows = ResultStore(tmp_path / "a" / "results.jsonl").rows()
    assert [r["episode"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert len(row["classes"]) == 3 and len(row["support_ids"]) == 3
        assert len(row["query_ids"]) == 15 and not set(row["support_ids"]) & set(row["query_ids"])
        assert row["steps"] == 3 and {"loss", "vlm"} <= set(row["terms"])
        assert 0.0 <= row["accuracy"] <= 1.0
    stats = mean_ci95([r["accuracy"] for r in rows])
    assert summary["accuracy"] == pytest.approx(stats["mean"])
    assert summary["ci95"] == pytest.approx(stats["ci95"])
    assert summary["episodes_done"] == 3
    # Same seed, same episodes and the same predictions, in a fresh output directory.
    evaluate(four_class_folder, tmp_path / "b").run()
    again = ResultStore(tmp_path / "b" / "results.jsonl").rows()
    for first, second in zip(rows, again, strict=True):
        for key in ("classes", "support_ids", "query_ids", "accuracy", "seed"):
            assert first[key] == second[key]


def test_other_seed_gives_other_episodes(four_class_folder, tmp_path):
    evaluate(four_class_folder, tmp_path / "a", method=ZeroShot("tiny-clip", None)).run()
    evaluate(four_class_folder, tmp_path / "b", method=ZeroShot("tiny-clip", None), seed=1).run()
    a = ResultStore(tmp_path / "a" / "results.jsonl").rows()
    b = ResultStore(tmp_path / "b" / "results.jsonl").rows()
    assert [r["support_ids"] for r in a] != [r["support_ids"] for r in b]


def test_resume_runs_only_missing_episodes(four_class_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    evaluate(four_class_folder, out, episodes=2).run()
    with open(out / "results.jsonl", "ab") as handle:
        handle.write(b'{"episode": 2, "accur')  # torn by a kill
    evaluator = evaluate(four_class_folder, out, episodes=4)
    calls: list[int] = []
    original = evaluator.run_episodes
    monkeypatch.setattr(
        evaluator,
        "run_episodes",
        lambda indices, **kw: calls.extend(indices) or original(indices, **kw),
    )
    summary = evaluator.run()
    assert calls == [2, 3]
    assert [r["episode"] for r in ResultStore(out / "results.jsonl").rows()] == [0, 1, 2, 3]
    assert summary["episodes_done"] == 4


def test_changed_configuration_refuses_to_mix_results(four_class_folder, tmp_path):
    out = tmp_path / "run"
    evaluate(four_class_folder, out, episodes=1).run()
    with pytest.raises(CdfslError, match=r"different configuration.*protocol"):
        evaluate(four_class_folder, out, episodes=1, seed=5).run()


def test_rows_of_an_older_engine_are_refused(four_class_folder, tmp_path):
    """Engine 4 forwarded Mind's separate support at every step, so its Mind rows drew other
    dropout masks after the RA phase (engine 3 drew them from the device's generator): rows
    of an older engine must not be mixed with engine 5's."""
    out = tmp_path / "run"
    evaluate(four_class_folder, out, episodes=1).run()
    config = json.loads((out / "run.json").read_text())
    assert config["engine"] == 5
    config["engine"] = 4
    (out / "run.json").write_text(json.dumps(config))
    with pytest.raises(CdfslError, match=r"different configuration.*engine"):
        evaluate(four_class_folder, out, episodes=1).run()


def test_a_resume_on_another_device_is_refused(four_class_folder, tmp_path):
    """Kernels and their rounding depend on the device (draws do not)."""
    out = tmp_path / "run"
    evaluate(four_class_folder, out, episodes=1).run()
    config = json.loads((out / "run.json").read_text())
    assert config["device"] == {"type": "cpu"}
    config["device"] = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3"}
    (out / "run.json").write_text(json.dumps(config))
    with pytest.raises(CdfslError, match=r"different configuration \(changed: device\)"):
        evaluate(four_class_folder, out, episodes=1).run()


def test_killed_run_resumes_with_every_episode_exactly_once(four_class_folder, tmp_path):
    out = tmp_path / "killed"
    cmd = [
        sys.executable, "-m", "cdfsl.cli", "eval", "--config", str(ROOT / "recipes/tiny/mind.yaml"),
        "--data.root", str(four_class_folder), "--output", str(out), "--episodes", "6",
        "--steps", "8", "--progress", "false", "--episodes_per_step", "1",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = ResultStore(results).completed()
    assert 2 <= len(finished) < 6
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    episodes = [r["episode"] for r in ResultStore(results).rows()]
    assert sorted(episodes) == list(range(6))


def test_support_batches_full_or_shuffled_passes():
    from cdfsl.engine.fit import _SupportBatches

    images = torch.arange(10).float().view(10, 1, 1, 1)
    labels = torch.arange(10)
    full = list(_SupportBatches(images, labels, 3, None, seed=0))
    assert len(full) == 3 and all(torch.equal(lab, labels) for _, lab in full)
    # batch 4 of 10: each shuffled pass serves two batches (8 distinct images), then reshuffles.
    batches = [lab.tolist() for _, lab in _SupportBatches(images, labels, 6, 4, seed=1)]
    assert all(len(b) == 4 for b in batches)
    for first, second in (batches[0:2], batches[2:4], batches[4:6]):
        assert len(set(first) | set(second)) == 8
    again = [lab.tolist() for _, lab in _SupportBatches(images, labels, 6, 4, seed=1)]
    assert again == batches


def test_support_batches_reach_every_image_at_the_shuffled_rate():
    """Batch 3 of 10: a pass serves three disjoint batches (9 images), one image left out at
    random, so over 150 passes each image is trained on in 90% of them (within 5 SEs), in
    every position of the batch."""
    from cdfsl.engine.fit import _SupportBatches

    n, size, passes = 10, 3, 150
    labels = torch.arange(n)
    batches = [lab for _, lab in _SupportBatches(labels.float(), labels, 3 * passes, size, seed=2)]
    counts = torch.zeros(n)
    first = torch.zeros(n)
    for k in range(passes):
        one_pass = torch.cat(batches[3 * k : 3 * k + 3])
        assert len(set(one_pass.tolist())) == 9
        counts[one_pass] += 1
        first[batches[3 * k][0]] += 1
    se = (passes * 0.9 * 0.1) ** 0.5
    assert ((counts - 0.9 * passes).abs() < 5 * se).all(), counts.tolist()
    # Which image leads a batch is uniform too (a fixed order would always start with image 0).
    se_first = (passes * 0.1 * 0.9) ** 0.5
    assert ((first - 0.1 * passes).abs() < 5 * se_first).all(), first.tolist()


def test_mini_batched_support_trains_each_image_with_its_own_views(monkeypatch):
    """With batch_size set, step k's batch holds other images than step 0's: per-episode views
    would pair step 0's images with step k's labels. They are drawn per step, with a warning."""
    from cdfsl.data.views import ViewSpec
    from cdfsl.engine import fit_episode
    from cdfsl.methods import LoRAFineTune

    views = [ViewSpec("clean"), ViewSpec("flip", hflip=True)]
    method = LoRAFineTune(
        backbone="tiny-clip", pretrained=None, class_names=["a", "b", "c"],
        lora=LoRAConfig(rank=4), views=views, view_sampling="per_episode",
    )  # fmt: skip
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = method._episode_views

    def spy(episode, batch):
        out, ids = original(episode, batch)
        seen.append((batch.clone(), out[ids == 0].clone()))
        return out, ids

    monkeypatch.setattr(method, "_episode_views", spy)
    fit = FitConfig(steps=4, precision="32-true", accelerator="cpu", batch_size=2)
    with pytest.warns(UserWarning, match="per_episode.*batch_size=2.*per_step"):
        fit_episode(method, images, labels, 4, fit)
    assert len(seen) == 4
    assert any(not torch.equal(seen[0][0], batch) for batch, _ in seen[1:])  # batches differ
    for batch, clean_rows in seen:
        assert torch.equal(clean_rows, batch)  # the views are of this step's images
    assert method.view_sampling == "per_episode"  # the method's own setting is left as it was


def test_row_accuracy_is_recomputed_from_logits_and_query_labels(four_class_folder, tmp_path):
    """Each row's accuracy equals the fraction of its queries (by id) whose argmax over the
    row's class prompts is their own class, recomputed here outside the evaluator."""
    method = ZeroShot("tiny-clip", None)
    evaluate(four_class_folder, tmp_path / "run", episodes=4, method=method).run()
    folder = ImageFolder(four_class_folder)
    index_of = {folder.sample_id(i): i for i in range(len(folder))}
    to_tensor = method.to_tensor()
    accuracies = []
    for row in ResultStore(tmp_path / "run" / "results.jsonl").rows():
        indices = [index_of[q] for q in row["query_ids"]]
        images = torch.stack([to_tensor(folder.load(i)) for i in indices])
        labels = torch.tensor(
            [row["classes"].index(folder.class_names[folder.targets[i]]) for i in indices]
        )
        scorer = ZeroShot("tiny-clip", None, class_names=row["classes"])
        with torch.no_grad():
            predicted = scorer(images).argmax(dim=1)
        assert row["accuracy"] == pytest.approx((predicted == labels).float().mean().item())
        accuracies.append(row["accuracy"])
    assert len(set(accuracies)) > 1  # the episodes differ: not a constant
