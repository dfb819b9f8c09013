import math

import torch

from cdfsl.results.stats import EpisodeAccuracy, mean_ci95


def test_mean_and_ci95_against_hand_computation():
    # mean 0.7; sample variance ((-.2)^2 + 0 + .2^2) / 2 = 0.04, s = 0.2
    out = mean_ci95([0.5, 0.7, 0.9])
    assert math.isclose(out["mean"], 0.7, abs_tol=1e-12)
    assert math.isclose(out["std"], 0.2, abs_tol=1e-12)
    assert math.isclose(out["ci95"], 1.959963984540054 * 0.2 / math.sqrt(3), abs_tol=1e-12)
    assert out["episodes"] == 3


def test_single_episode_has_zero_width_and_empty_is_nan():
    assert mean_ci95([0.4])["ci95"] == 0.0
    assert math.isnan(mean_ci95([])["mean"])


def test_states_merge_like_one_metric():
    # Two metrics merged (what DDP's sum-reduction does) equal one metric over all values.
    values = torch.tensor([0.2, 0.4, 0.9, 1.0, 0.55])
    a, b, whole = EpisodeAccuracy(), EpisodeAccuracy(), EpisodeAccuracy()
    a.update(values[:2])
    b.update(values[2:])
    whole.update(values)
    a.merge_state(b)
    merged, expected = a.compute(), whole.compute()
    assert merged["episodes"] == 5
    assert math.isclose(merged["mean"], expected["mean"], abs_tol=1e-12)
    assert math.isclose(merged["ci95"], expected["ci95"], abs_tol=1e-12)


def test_two_episodes_hand_case_and_the_empty_summary():
    # mean 0.6; sample variance (0.1^2 + 0.1^2) / 1 = 0.02, s = sqrt(0.02)
    out = mean_ci95([0.5, 0.7])
    s = math.sqrt(0.02)
    assert math.isclose(out["std"], s, abs_tol=1e-12)
    assert math.isclose(out["ci95"], 1.959963984540054 * s / math.sqrt(2), abs_tol=1e-12)
    empty = mean_ci95([])
    assert set(empty) == {"mean", "ci95", "std", "episodes"} and empty["episodes"] == 0
    assert all(math.isnan(empty[k]) for k in ("mean", "ci95", "std"))


def test_updates_accumulate_over_batches():
    """Three updates equal one update over all their values (each sum is added, not replaced)."""
    values = torch.tensor([0.2, 0.4, 0.9, 1.0, 0.55, 0.3])
    batched, whole = EpisodeAccuracy(), EpisodeAccuracy()
    for chunk in values.split([2, 3, 1]):
        batched.update(chunk)
    whole.update(values)
    got, expected = batched.compute(), whole.compute()
    assert got["episodes"] == 6
    for key in ("mean", "std", "ci95"):
        assert math.isclose(got[key], expected[key], abs_tol=1e-12), key
