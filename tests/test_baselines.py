"""Frozen-feature baselines: each update rule against a hand re-derivation, and each method end to
end through ``cdfsl eval`` on the micro world."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cdfsl.cli import main
from cdfsl.fewshot.methods.clap import (
    ClapState,
    clap_fit,
    clap_logits,
    dassl_cosine_lr,
    phr_update,
    zero_shot_multipliers,
)
from cdfsl.fewshot.methods.linear_probe import fit_logistic_regression
from cdfsl.fewshot.methods.lp_plus_plus import lpp_fit, lpp_init
from cdfsl.fewshot.methods.tip_adapter import cache_keys, cache_logits

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "assets" / "micro-clip" / "open_clip_model.safetensors"


def _unit(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(rows, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# -- Tip-Adapter ---------------------------------------------------------------------------------
def test_tip_adapter_cache_logits_by_hand():
    """exp(-β(1 - f·k_j)) summed over the cache entries of each class, written out per entry."""
    feats = [[1.0, 0.0], [0.6, 0.8]]
    keys = [[1.0, 0.0], [0.0, 1.0], [0.8, -0.6]]
    labels = [0, 1, 1]
    beta = 5.5
    expected = [
        [
            sum(
                math.exp(-beta * (1 - (q[0] * k[0] + q[1] * k[1])))
                for k, y in zip(keys, labels, strict=True)
                if y == c
            )
            for c in range(2)
        ]
        for q in feats
    ]
    values = torch.nn.functional.one_hot(torch.tensor(labels), 2).double()
    got = cache_logits(torch.tensor(feats).double(), torch.tensor(keys).double(), values, beta)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_tip_adapter_keys_average_raw_views_then_normalise():
    views = torch.tensor([[[3.0, 0.0]], [[0.0, 1.0]]])  # two passes of one image, raw
    # mean (1.5, 0.5), norm sqrt(2.5)
    expected = torch.tensor([[1.5 / math.sqrt(2.5), 0.5 / math.sqrt(2.5)]])
    assert torch.allclose(cache_keys(views), expected)


# -- LP++ ----------------------------------------------------------------------------------------
def _lpp_by_hand(f, y, t, bias, epochs, accumulate=True):
    """The reference's LinearProbe_P2.forward in numpy float64, one line per rule."""
    n, classes = len(f), len(t)
    onehot = np.eye(classes)[y]
    w = onehot.T @ f  # compute_centroids: class sums
    cos = f @ t.T
    alpha = np.full(classes, 250 * np.mean((onehot * cos).sum(0) / onehot.sum(0)))
    lr_w = 4 * n / np.linalg.eigvalsh(f.T @ f).max()
    lr_alpha = n / (4 * (cos**2).sum(0).max())
    b = bias.copy()
    buf_w = buf_b = None
    alpha_grad = np.zeros(classes)
    for epoch in range(epochs):
        p = _softmax(f @ w.T + b + alpha * cos)
        g = (p - onehot) / n
        gw, gb = g.T @ f, g.sum(0)
        alpha_grad = (alpha_grad if accumulate else 0) + (g * cos).sum(0)
        buf_w = gw if buf_w is None else 0.9 * buf_w + gw
        buf_b = gb if buf_b is None else 0.9 * buf_b + gb
        w, b = w - lr_w * buf_w, b - lr_w * buf_b
        if (epoch + 1) % 10 == 0:
            alpha = alpha - lr_alpha * alpha_grad
    return w, b, alpha, lr_w, lr_alpha


@pytest.mark.parametrize("accumulate", [True, False], ids=["accumulated", "current"])
def test_lpp_initialisation_and_steps_follow_the_reference_rule(accumulate):
    rng = np.random.default_rng(0)
    f, t = _unit(rng, 6, 4), _unit(rng, 3, 4)
    y = np.array([0, 0, 1, 1, 2, 2])
    bias = rng.uniform(-0.5, 0.5, size=3)
    # 12 steps: one alpha update (step 10) and two more steps after it.
    w, b, alpha, lr_w, lr_alpha = _lpp_by_hand(f, y, t, bias, 12, accumulate)
    ft, tt, yt = torch.tensor(f), torch.tensor(t), torch.tensor(y)
    head = lpp_init(ft, yt, tt, torch.tensor(bias))
    assert head.lr_w == pytest.approx(lr_w, rel=1e-12)
    assert head.lr_alpha == pytest.approx(lr_alpha, rel=1e-12)
    # Beside a second episode with other features, text and step sizes: each as by hand alone.
    f2, t2 = _unit(rng, 6, 4), _unit(rng, 3, 4)
    bias2 = rng.uniform(-0.5, 0.5, size=3)
    w2, b2, alpha2, _, _ = _lpp_by_hand(f2, y, t2, bias2, 12, accumulate)
    other = lpp_init(torch.tensor(f2), yt, torch.tensor(t2), torch.tensor(bias2))
    assert other.lr_w != pytest.approx(head.lr_w)
    lpp_fit(
        [head, other], torch.stack([ft, torch.tensor(f2)]), torch.stack([yt, yt]),
        torch.stack([tt, torch.tensor(t2)]), 12, zero_alpha_grad=not accumulate,
    )  # fmt: skip
    for fitted, (ww, bb, aa) in ((head, (w, b, alpha)), (other, (w2, b2, alpha2))):
        assert np.allclose(fitted.weight.numpy(), ww, atol=1e-10)
        assert np.allclose(fitted.bias.numpy(), bb, atol=1e-10)
        assert np.allclose(fitted.alpha.numpy(), aa, atol=1e-8)


# -- CLAP ----------------------------------------------------------------------------------------
def _clap_grad(w, t, lam, f, onehot, scale, constrained):
    """d/dW of CE(s·cos(f, w_c)) + mean_c λ_c‖w_c − t_c‖², through the normalisation by hand."""
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    w_hat = w / norms
    p = _softmax(scale * f @ w_hat.T)
    g_hat = scale * ((p - onehot) / len(f)).T @ f  # dL/dŵ_c
    grad = (g_hat - (g_hat * w_hat).sum(1, keepdims=True) * w_hat) / norms
    if constrained:
        grad = grad + 2 * lam[:, None] * (w - t) / len(w)
    return grad


def test_clap_multipliers_and_sgd_epochs_follow_the_reference_rule():
    rng = np.random.default_rng(1)
    f = _unit(rng, 6, 4)
    y = np.array([0, 1, 2, 0, 1, 2])
    t = rng.normal(size=(3, 4)) * 3  # raw text embeddings, not unit length
    scale, onehot = 10.0, np.eye(3)[y]
    p0 = _softmax(scale * f @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T)
    lam = (p0 * onehot).sum(0) / onehot.sum(0)
    # dassl's schedule over T = 3 epochs: constant warm-up 1e-5, then 0.1·½(1 + cos(π(e−1)/T)).
    lrs = [1e-5, 0.1, 0.05 * (1 + math.cos(math.pi / 3))]
    w, buf = t.copy(), None
    for lr in lrs:
        g = _clap_grad(w, t, lam, f, onehot, scale, True)
        buf = g if buf is None else 0.9 * buf + g
        w = w - lr * buf

    ft, yt, tt = torch.tensor(f), torch.tensor(y), torch.tensor(t)
    multipliers = zero_shot_multipliers(clap_logits(ft, tt, scale), yt)
    assert np.allclose(multipliers.numpy(), lam, atol=1e-12)
    state = ClapState(tt.clone(), tt, multipliers, torch.zeros(3, dtype=torch.float64))
    # Beside a second episode (other text, shuffled otherwise): each ends where it would alone.
    t2 = torch.tensor(rng.normal(size=(3, 4)) * 3)
    m2 = zero_shot_multipliers(clap_logits(ft, t2, scale), yt)
    other = ClapState(t2.clone(), t2, m2, torch.zeros(3, dtype=torch.float64))
    generators = [torch.Generator(), torch.Generator().manual_seed(9)]
    clap_fit([state, other], torch.stack([ft, ft]), torch.stack([yt, yt]), scale, 3, 0.1, 0.9,
             256, 1, True, False, generators)  # fmt: skip
    assert np.allclose(state.prototypes.numpy(), w, atol=1e-10)
    w2, buf = t2.numpy().copy(), None
    for lr in lrs:
        g = _clap_grad(w2, t2.numpy(), m2.numpy(), f, onehot, scale, True)
        buf = g if buf is None else 0.9 * buf + g
        w2 = w2 - lr * buf
    assert np.allclose(other.prototypes.numpy(), w2, atol=1e-10)
    assert [dassl_cosine_lr(e, 0.1, 3) for e in range(3)] == pytest.approx(lrs)


def test_clap_augmented_lagrangian_outer_step_is_the_phr_update():
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    lam = torch.tensor([0.3, 0.7], dtype=torch.float64)
    rho = torch.tensor([2.0, 0.5], dtype=torch.float64)
    new_lam, new_rho = phr_update(w, t, lam, rho)
    h = [1.0, 1.0]  # ‖w_c − t_c‖²
    assert new_lam.tolist() == pytest.approx([0.3 + 2.0 * h[0], 0.7 + 0.5 * h[1]])
    assert new_rho.tolist() == pytest.approx(h)


# -- linear probe --------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "dim"), [(6, 8), (12, 4)], ids=["wide", "tall"])
def test_logistic_regression_meets_the_optimality_conditions_in_float64(n, dim):
    """The minimiser of ½‖W‖² + C·Σ CE(W x + b): the primal gradient, written out, vanishes."""
    rng = np.random.default_rng(2)
    x = _unit(rng, n, dim)
    y = np.arange(n) % 3
    c = 0.316
    head = fit_logistic_regression(torch.tensor(x), torch.tensor(y), 3, c)
    w, b = head.weight.numpy(), head.bias.numpy()
    residual = _softmax(x @ w.T + b) - np.eye(3)[y]
    assert np.abs(c * residual.T @ x + w).max() < 1e-9  # dW
    assert np.abs(c * residual.sum(0)).max() < 1e-9  # db
    assert abs(b.sum()) < 1e-9  # the intercept's free shift pinned at zero


# -- views ---------------------------------------------------------------------------------------
def test_a_view_is_the_same_whichever_other_views_are_drawn():
    from PIL import Image

    from cdfsl.fewshot.methods.base import EpisodeState
    from cdfsl.methods import TipAdapter

    method = TipAdapter(backbone="tiny-clip", pretrained=None, class_names=["a", "b"])
    episode = EpisodeState(7, ["a", "b"], method.text_feats)
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)) for _ in range(3)]
    both = method.view_features(episode, images, [0, 1], (0.5, 1.0))
    alone = method.view_features(episode, images, [1], (0.5, 1.0))
    # Equal to rounding: a batch of two may round the backbone's GEMMs otherwise than one image
    # (seen on an AMD EPYC); the draws themselves are the same, other views' far from it.
    torch.testing.assert_close(both[1], alone[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(both[0], both[1], rtol=1e-2, atol=1e-3)
    other = EpisodeState(8, ["a", "b"], method.text_feats)
    drawn = method.view_features(other, images, [1], (0.5, 1.0))[0]
    assert not torch.allclose(drawn, alone[0], rtol=1e-2, atol=1e-3)


# -- end to end ----------------------------------------------------------------------------------
SHORT = {  # a few epochs and passes: the path, not the accuracy
    "linear-probe": [],
    "tip-adapter": ["--method.init_args.augment_epochs", "2"],
    "tip-adapter-f": ["--method.init_args.augment_epochs", "2", "--method.init_args.epochs", "3"],
    "lp-plus-plus": ["--method.init_args.epochs", "12"],
    "clap": ["--method.init_args.epochs", "4", "--method.init_args.augment_passes", "2"],
    "zs-linear-probe": ["--method.init_args.epochs", "4", "--method.init_args.augment_passes", "2"],
}


def _eval(tmp_path: Path, recipe: str, out: Path, *extra: str) -> list[dict]:
    code = main([
        "eval", "--config", f"micro/{recipe}", "--episodes", "3", "--way", "3", "--query", "4",
        "--data.options", '{"domain": "isic-like", "images_per_class": 8}', "--accelerator",
        "cpu", "--progress", "false", "--output", str(out), *extra,
    ])  # fmt: skip
    assert code == 0
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not SHIPPED.is_file(), reason="micro-clip not shipped")
@pytest.mark.parametrize("recipe", sorted(SHORT))
def test_each_baseline_runs_through_cdfsl_eval_on_the_episodes_mind_gets(
    recipe, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("CDFSL_FEATURE_CACHE", str(tmp_path / "cache"))
    rows = _eval(tmp_path, recipe, tmp_path / "out", *SHORT[recipe])
    assert [r["episode"] for r in rows] == [0, 1, 2]
    assert all(r["status"] == "ok" and 0 <= r["accuracy"] <= 1 for r in rows)
    # The same seeded episodes as any other method's: the protocol's manifest.
    manifest = tmp_path / "manifest.jsonl"
    main([
        "eval", "--config", "tiny/mind", "--data.source",
        "micro", "--data.options", '{"domain": "isic-like", "images_per_class": 8}',
        "--episodes", "3", "--way", "3", "--query", "4", "--export_manifest", str(manifest),
    ])  # fmt: skip
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    for row, line in zip(rows, lines, strict=True):
        assert (row["seed"], row["support_ids"], row["query_ids"]) == (
            line["seed"], line["support_ids"], line["query_ids"],
        )  # fmt: skip
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["episodes_done"] == 3
    # A second run (another output, one episode per group) reads the cached features and
    # writes the same rows.
    again = _eval(tmp_path, recipe, tmp_path / "again", *SHORT[recipe], "--episodes_per_step", "1")
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in rows]
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 1
    capsys.readouterr()


@pytest.mark.skipif(not SHIPPED.is_file(), reason="micro-clip not shipped")
def test_linear_probe_rows_are_the_probe_on_the_episode_images(tmp_path, monkeypatch, capsys):
    """The cached-feature path against the images: encode each episode as the LoRA methods
    load it, fit the probe, score the queries; the rows' accuracies must be these."""
    from cdfsl.data.episodes import EpisodeSampler, load_episode
    from cdfsl.data.sources import DataConfig, build_dataset
    from cdfsl.engine import episode_seed
    from cdfsl.methods import LinearProbe

    monkeypatch.setenv("CDFSL_FEATURE_CACHE", str(tmp_path / "cache"))
    rows = _eval(tmp_path, "linear-probe", tmp_path / "out")
    capsys.readouterr()
    options = {"domain": "isic-like", "images_per_class": 8}
    dataset = build_dataset(DataConfig(source="micro", options=options))
    method = LinearProbe(backbone="micro-clip")
    sampler = EpisodeSampler(dataset.targets, 3, 1, 4, 3, 0)
    for row in rows:
        episode = load_episode(dataset, sampler.episode(row["episode"]), method.to_tensor())
        assert row["seed"] == episode_seed(0, row["episode"])
        with torch.no_grad():
            support = method.image_features(episode.support_images)
            query = method.image_features(episode.query_images)
        head = fit_logistic_regression(support, episode.support_labels, 3, 0.316)
        hits = head.logits(query).argmax(1) == episode.query_labels
        assert row["accuracy"] == pytest.approx(float(hits.float().mean()))
