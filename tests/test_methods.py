import re

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from cdfsl.errors import CdfslError
from cdfsl.fewshot.losses import vlm_cross_entropy
from cdfsl.lora import LoRAConfig
from cdfsl.methods import LoRAFineTune, Mind, ZeroShot

NAMES = ["red fox", "blue jay", "gray wolf"]
LORA = LoRAConfig(rank=4, alpha=8.0, dropout=0.0)


def support(n_per_class: int = 2, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(len(NAMES) * n_per_class, 3, size, size, generator=gen)
    labels = torch.arange(len(NAMES)).repeat_interleave(n_per_class)
    return images, labels


def trainer(steps: int, logger=False) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, accelerator="cpu", logger=logger, log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip


def test_logits_are_scaled_cosines_to_the_prompts():
    method = ZeroShot(backbone="tiny-clip", pretrained=None, class_names=NAMES)
    images, _ = support()
    with torch.no_grad():
        feats = method.image_features(images)
        text = method.backbone.text_features([f"a photo of a {n}." for n in NAMES])
        expected = method.backbone.logit_scale * feats @ text.t()
        assert torch.allclose(method(images), expected, atol=1e-5)


def test_the_classifier_head_is_fp32_under_autocast():
    """Under bf16 autocast the head still computes s·F·Tᵀ in fp32 (a bf16 head rounds logits
    of 20-40 to steps of 0.125-0.25)."""
    method = ZeroShot(backbone="tiny-clip", pretrained=None, class_names=NAMES)
    feats = torch.nn.functional.normalize(
        torch.randn(16, method.text_feats.shape[1], generator=torch.Generator().manual_seed(0)),
        dim=-1,
    )
    exact = method.scale * feats.double() @ method.text_feats.double().t()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = method.logits(feats)
    assert logits.dtype == torch.float32
    assert torch.allclose(logits.double(), exact, atol=1e-4, rtol=0)


def test_only_adapters_are_trainable_and_receive_gradients():
    method = LoRAFineTune(backbone="tiny-clip", pretrained=None, class_names=NAMES, lora=LORA)
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n.lower() for n in trainable)
    images, labels = support()
    method.on_train_start()
    # Start adapters away from B = 0 so every adapter weight gets a non-zero gradient.
    for p in method.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    feats = method.image_features(images)
    loss = vlm_cross_entropy(feats, method.text_feats, labels, method.scale)
    loss.backward()
    for name, p in method.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_drop_in_fit_with_a_users_own_loader_changes_the_adapters():
    images, labels = support()
    loader = DataLoader(TensorDataset(images, labels), batch_size=len(images))
    method = Mind(backbone="tiny-clip", pretrained=None, class_names=NAMES, lora=LORA)
    before = {n: p.detach().clone() for n, p in method.named_parameters() if p.requires_grad}
    trainer(4).fit(method, loader)
    after = dict(method.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert {"loss", "vlm", "modality_gap", "intra_inter_gap", "image_text_margin"} <= set(
        method.last_terms
    )


def test_mind_follows_its_schedule_and_sums_its_weighted_terms(monkeypatch):
    """T = 10: step 0 has SVL without RA, steps 1..5 both, from step 6 on only L_vlm."""
    images, labels = support()
    loader = DataLoader(TensorDataset(images, labels), batch_size=len(images))
    method = Mind(
        backbone="tiny-clip", pretrained=None, class_names=NAMES, lora=LORA,
        svl_weight=0.25, ra_weight=2.0,
    )  # fmt: skip
    seen: list[dict[str, torch.Tensor]] = []
    original = method.loss_terms

    def record(*args):
        terms = original(*args)
        seen.append({k: v.detach() for k, v in terms.items()})
        return terms

    monkeypatch.setattr(method, "loss_terms", record)
    trainer(10).fit(method, loader)
    assert len(seen) == 10
    assert "svl" in seen[0] and "ra" not in seen[0]
    assert all({"svl", "ra"} <= set(s) for s in seen[1:6])
    assert all(not ({"svl", "ra"} & set(s)) for s in seen[6:])
    for terms in seen:
        expected = terms["vlm"] + 0.25 * terms.get("svl", 0.0) + 2.0 * terms.get("ra", 0.0)
        assert torch.allclose(terms["loss"], expected)
    # w_k = 1 - k / floor(0.6 T) on the RA steps
    assert [round(float(s["fusion_weight"]), 6) for s in seen[1:6]] == [
        round(1 - k / 6, 6) for k in range(1, 6)
    ]


def test_zero_shot_refuses_to_train_and_classes_are_required():
    method = ZeroShot(backbone="tiny-clip", pretrained=None)
    assert not method.trainable
    with pytest.raises(CdfslError, match="no classes set"):
        method(torch.rand(1, 3, 32, 32))
    with pytest.raises(CdfslError, match="at least 2 class names"):
        method.set_classes(["only one"])


def test_reset_restores_the_initial_predictions():
    images, labels = support()
    loader = DataLoader(TensorDataset(images, labels), batch_size=len(images))
    method = LoRAFineTune(backbone="tiny-clip", pretrained=None, class_names=NAMES, lora=LORA)
    method.reset(3)
    method.eval()
    with torch.no_grad():
        initial = method(images)
    trainer(3).fit(method, loader)
    method.reset(3)
    method.eval()
    with torch.no_grad():
        assert torch.equal(method(images), initial)


def test_reference_defaults_are_the_reference_entry_points_pipeline():
    method = Mind(backbone="tiny-clip", pretrained=None, class_names=NAMES)
    hparams = method.hparams
    assert (method.view_sampling, method.support, method.geometry) == (
        "per_episode", "separate", "squash",
    )  # fmt: skip
    assert (
        hparams.resize_interpolation, hparams.rotation_interpolation, hparams.color_jitter,
        hparams.lora_init,
    ) == ("bilinear", "nearest", "pil_uint8", "shared")  # fmt: skip
    # The method frames images as the reference's episodic loader: Resize([s, s]) on the PIL
    # image (bilinear), no crop, so a 4-pixel border of 100 survives.
    from PIL import Image
    from torchvision import transforms

    image = Image.new("RGB", (100, 60), (255, 0, 0))
    image.paste((0, 0, 255), (4, 4, 96, 56))
    framed = method.to_tensor()(image)
    assert framed[0, 0, 0] == 1 and framed[2, 0, 0] == 0
    size = list(framed.shape[1:])
    reference = transforms.ToTensor()(transforms.Resize(size)(image))
    assert torch.equal((framed * 255).round(), (reference * 255).round())
    square = Image.new("RGB", (100, 100), (255, 0, 0))
    square.paste((0, 0, 255), (4, 4, 96, 96))
    crop = Mind(backbone="tiny-clip", pretrained=None, geometry="resize_crop")
    assert (crop.to_tensor()(square)[0] == 0).all()  # the 1.15 margin cuts the border off
    with pytest.raises(CdfslError, match="support='both'"):
        Mind(backbone="tiny-clip", pretrained=None, support="both")
    with pytest.raises(CdfslError, match="geometry='stretch'"):
        LoRAFineTune(backbone="tiny-clip", pretrained=None, geometry="stretch")
    with pytest.raises(CdfslError, match=r"resize_interpolation='area'.*'backbone'"):
        LoRAFineTune(backbone="tiny-clip", pretrained=None, resize_interpolation="area")
    with pytest.raises(CdfslError, match="lora_init='random'"):
        LoRAFineTune(backbone="tiny-clip", pretrained=None, lora_init="random")


def _first_relation(support_mode: str) -> tuple[torch.Tensor, dict[str, float]]:
    """Mind's A_v after step 0 of a two-view run with LoRA dropout on, and the step's terms."""
    images, labels = support()
    loader = DataLoader(TensorDataset(images, labels), batch_size=len(images))
    method = Mind(
        backbone="tiny-clip", pretrained=None, class_names=NAMES, support=support_mode,
        lora=LoRAConfig(rank=4, alpha=8.0, dropout=0.5),
        views=[{"name": "clean"}, {"name": "flip", "hflip": True}],
    )  # fmt: skip
    torch.manual_seed(0)
    for p in method.parameters():  # B = 0 would make every dropout mask give the same output
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)
    trainer(1).fit(method, loader)
    return method.episodes[0].memory["relation"], method.last_terms


def test_separate_support_is_a_second_forward_with_its_own_dropout_mask():
    # Rows 0..5 of A_v are the clean view of the six support images, columns the support set S.
    shared, _ = _first_relation("shared")
    separate, terms = _first_relation("separate")
    assert shared.shape == separate.shape == (12, 6)
    # Shared: S is the clean view's own rows, so their self-similarities are exactly 1.
    assert torch.allclose(shared[:6].diagonal(), torch.ones(6), atol=1e-6)
    # Separate: same images, another dropout mask, so the self-similarities fall below 1.
    assert (separate[:6].diagonal() < 1 - 1e-4).all()
    assert {"vlm_visual", "vlm_cross_modal", "vlm_entropy", "grad_visual"} <= set(terms)


def test_every_step_logs_the_two_parts_of_l_vlm_summing_to_it():
    images, labels = support()
    loader = DataLoader(TensorDataset(images, labels), batch_size=len(images))
    method = LoRAFineTune(backbone="tiny-clip", pretrained=None, class_names=NAMES, lora=LORA)
    trainer(2).fit(method, loader)
    t = method.last_terms
    assert t["grad_visual"] > 0 and t["grad_cross_modal"] > 0
    assert abs(t["vlm_visual"] + t["vlm_cross_modal"] + t["vlm_entropy"] - t["vlm"]) < 1e-4


def test_a_mini_batch_missing_a_class_trains_and_logs_no_split():
    images, labels = support()
    # Batches of two images: each holds one or two of the three classes, never all of them.
    loader = DataLoader(TensorDataset(images, labels), batch_size=2)
    method = LoRAFineTune(backbone="tiny-clip", pretrained=None, class_names=NAMES, lora=LORA)
    trainer(2).fit(method, loader)
    assert "modality_gap" in method.last_terms and "vlm_visual" not in method.last_terms


def test_default_views_are_drawn_once_and_reused_at_every_step(monkeypatch):
    """The reference's loader yields an episode's views once; every step sees the same images."""
    images, labels = support()
    loader = DataLoader(TensorDataset(images, labels), batch_size=len(images))
    seen = {}
    for sampling in ("per_episode", "per_step"):
        method = LoRAFineTune(
            backbone="tiny-clip", pretrained=None, class_names=NAMES, lora=LORA,
            **({} if sampling == "per_episode" else {"view_sampling": sampling}),
        )  # fmt: skip
        batches: list[torch.Tensor] = []
        original = method.image_features
        monkeypatch.setattr(
            method, "image_features", lambda x, f=original, b=batches: b.append(x) or f(x)
        )
        trainer(3).fit(method, loader)
        seen[sampling] = batches
    assert all(torch.equal(seen["per_episode"][0], b) for b in seen["per_episode"][1:])
    assert not torch.equal(seen["per_step"][0], seen["per_step"][1])
    # The clean view (rows 0..5) is the un-augmented support set either way.
    assert torch.equal(seen["per_step"][1][: len(images)], images)


def test_lora_init_shared_or_per_episode_draws_a_from_the_right_seed():
    """Episode e's initial A: Kaiming-uniform (a = √5) from Generator(seed), drawn per adapter in
    module order; ``shared`` uses the constructor's seed for every episode (the reference deep-
    copies one LoRA model), ``per_episode`` the episode's own seed. B starts at zero."""
    import math

    from cdfsl.lora import LoRAAdapter

    def expected_first_a(seed: int, adapter: LoRAAdapter) -> torch.Tensor:
        a = torch.empty(adapter.rank, adapter.in_features)
        return torch.nn.init.kaiming_uniform_(
            a, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed)
        )

    def first_adapter(method) -> LoRAAdapter:
        return next(m for m in method.backbone.lora_root().modules() if isinstance(m, LoRAAdapter))

    for lora_init, episode_seeds in (("shared", [11, 12, 13]), ("per_episode", [11, 12, 13])):
        method = LoRAFineTune(
            backbone="tiny-clip", pretrained=None, lora=LORA, seed=7, lora_init=lora_init
        )
        method.start_episodes(episode_seeds, [NAMES] * 3)
        adapter = first_adapter(method)
        for e, seed in enumerate(episode_seeds):
            want = expected_first_a(7 if lora_init == "shared" else seed, adapter)
            assert torch.equal(adapter.lora_A[e], want), (lora_init, e)
            assert not adapter.lora_B[e].any()


def test_cosine_schedule_has_period_eight_t_and_its_floor_at_every_step():
    """The reference: CosineAnnealingLR(T_max = 8·T, eta_min = 1e-6), stepped every iteration,
    so step k trains at eta_min + (lr − eta_min)·(1 + cos(π·k / 8T)) / 2."""
    import math

    steps, lr, eta_min = 6, 2e-4, 1e-6
    images, labels = support()
    loader = DataLoader(TensorDataset(images, labels), batch_size=len(images))
    method = LoRAFineTune(backbone="tiny-clip", pretrained=None, class_names=NAMES, lora=LORA)
    seen: list[float] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    fit = trainer(steps)
    fit.callbacks.append(Record())
    fit.fit(method, loader)
    expected = [
        eta_min + (lr - eta_min) * (1 + math.cos(math.pi * k / (8 * steps))) / 2
        for k in range(steps)
    ]
    assert seen == pytest.approx(expected, rel=1e-9, abs=0)
    optimizer = fit.optimizers[0]
    assert optimizer.param_groups[0]["weight_decay"] == 1e-2
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)


def test_mind_terms_rebuilt_from_recorded_features_over_the_schedule(monkeypatch):
    """L_vlm and L_ra recomputed by hand from each step's recorded features, S and labels:
    A_v = F Sᵀ, A_t[i, j] = t_{y_i}·t_{y_j}, target = w_k·A_v(k−1) + (1 − w_k)·A_t with
    w_k = 1 − k/⌊0.6·T⌋, L_ra = mean(exp(target)·(target − A_v)) (KLDivLoss(A_v, target),
    log_target), on steps 1 … 3⌊T/5⌋ − 1; no SVL or RA after."""
    import math

    steps = 10  # RA on steps 1..5, w_k = 1 - k/6; L_vlm alone from step 6
    images, labels = support()
    loader = DataLoader(TensorDataset(images, labels), batch_size=len(images))
    method = Mind(
        backbone="tiny-clip", pretrained=None, class_names=NAMES,
        lora=LoRAConfig(rank=4, alpha=8.0, dropout=0.25),
        views=[{"name": "clean"}, {"name": "flip", "hflip": True}],
    )  # fmt: skip
    records: list[tuple] = []
    original = method.loss_terms

    def spy(feats, labels, view_ids, episode):
        terms = original(feats, labels, view_ids, episode)
        support_feats, support_labels = episode.support or (feats[:0], labels[:0])
        records.append((
            feats.detach().clone(), labels.clone(), support_feats.detach().clone(),
            support_labels.clone(), {k: v.detach().clone() for k, v in terms.items()},
        ))  # fmt: skip
        return terms

    monkeypatch.setattr(method, "loss_terms", spy)
    trainer(steps).fit(method, loader)
    assert len(records) == steps
    # S is forwarded where the loss reads it (SVL and RA, steps 0-5) and on the last step,
    # whose analysis row uses it; steps 6-8 skip its forward.
    forwarded = [len(record[2]) > 0 for record in records]
    assert forwarded == [k < 6 or k == steps - 1 for k in range(steps)]
    text, scale = method.episodes[0].text_feats, method.scale
    for k, (feats, y, sup, y_sup, terms) in enumerate(records):
        vlm = torch.nn.functional.cross_entropy(scale * feats @ text.T, y)
        assert terms["vlm"].item() == pytest.approx(vlm.item(), rel=1e-5)
        if 1 <= k < 6:
            previous = records[k - 1][0] @ records[k - 1][2].T
            w = 1 - k / math.floor(0.6 * steps)
            target = w * previous + (1 - w) * (text[y] @ text[y_sup].T)
            ra = (target.exp() * (target - feats @ sup.T)).mean()
            assert terms["ra"].item() == pytest.approx(ra.item(), rel=1e-4, abs=1e-7), k
            expected = terms["vlm"] + 0.1 * terms["svl"] + 3.0 * terms["ra"]
            assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
        else:
            assert "ra" not in terms
            assert ("svl" in terms) == (k == 0)


def _forwarded_per_step(cls, fit: L.Trainer) -> tuple[list[int], int]:
    """Images each training step forwards for ``cls`` on the 3-class support, and the count
    with the separate support: (views + 1) · support images."""
    images, labels = support()
    method = cls(backbone="tiny-clip", pretrained=None, class_names=NAMES, lora=LORA)
    sizes: list[int] = []
    original = method.image_features
    method.image_features = lambda x: sizes.append(len(x)) or original(x)
    fit.fit(method, DataLoader(TensorDataset(images, labels), batch_size=len(images)))
    return sizes, (len(method.views) + 1) * len(images)


def test_a_logged_mind_forwards_the_separate_support_at_every_step(tmp_path):
    """Under a logger every step's analysis is read, so S rides along after the RA phase too."""
    from lightning.pytorch.loggers import CSVLogger

    sizes, with_support = _forwarded_per_step(Mind, trainer(5, CSVLogger(tmp_path)))
    # R = 3: steps 3 and 4 would skip S without a logger.
    assert sizes == [with_support] * 5


def test_a_method_without_its_own_schedule_forwards_the_separate_support_at_every_step():
    """FewShotMethod.support_needed's default: every step reads S, so every step forwards it."""
    from cdfsl.fewshot.methods.base import FewShotMethod

    class Unscheduled(Mind):
        support_needed = FewShotMethod.support_needed

    sizes, with_support = _forwarded_per_step(Unscheduled, trainer(5))
    assert sizes == [with_support] * 5


def test_a_loss_that_reads_a_skipped_support_is_refused():
    """A method whose support_needed says no on a step whose loss reads S gets an error, not
    the clean-view rows in S's place."""

    class Forgetful(Mind):
        def support_needed(self, step: int) -> bool:
            return False

    images, labels = support()
    method = Forgetful(backbone="tiny-clip", pretrained=None, class_names=NAMES, lora=LORA)
    loader = DataLoader(TensorDataset(images, labels), batch_size=len(images))
    message = (
        "Forgetful read the separate clean support at step 0, where support_needed said it "
        "would not: make support_needed return True for every step whose loss reads it"
    )
    with pytest.raises(CdfslError, match=re.escape(message)):
        trainer(5).fit(method, loader)


def test_views_dropout_and_draws_use_independent_streams_of_the_episode_seed():
    """Views and SVL draw from stream 0 of the episode's seed, LoRA dropout from stream 1: a
    generator and a counter-based dropout stream with different seeds, neither the other's, one
    dropout stream shared by every adapter."""
    from cdfsl.fewshot.methods.base import stream_seed
    from cdfsl.lora import LoRAAdapter

    method = Mind(backbone="tiny-clip", pretrained=None, lora=LoRAConfig(rank=4))
    method.start_episodes([5, 9], [NAMES, NAMES])
    method.on_train_start()
    adapters = [m for m in method.backbone.modules() if isinstance(m, LoRAAdapter)]
    assert len({id(adapter.streams) for adapter in adapters}) == 1
    for e, seed in enumerate((5, 9)):
        views, dropout = method.episodes[e].generator, adapters[0].streams.seeds[e]
        assert views.initial_seed() == stream_seed(seed, 0)
        assert dropout == stream_seed(seed, 1)
        assert views.initial_seed() != dropout
    assert len({stream_seed(s, k) for s in (5, 9) for k in (0, 1)}) == 4


# -- mutation follow-up (issue 23): a step's loss, its streams, its heads, its refusals ------------

OTHER = ["green frog", "white owl", "black cat"]


def _two_episodes(cls=LoRAFineTune, **kwargs):
    from cdfsl.data.views import ViewSpec

    views = (ViewSpec("clean"), ViewSpec("rotate_jitter_flip", rotation=30.0, jitter=0.2))
    method = cls(backbone="tiny-clip", pretrained=None, lora=LORA, views=views, **kwargs)
    method.start_episodes([3, 4], [NAMES, OTHER])
    images, labels = support()
    return method, (torch.cat([images, images.flip(0)]), torch.cat([labels, labels.flip(0)]))


def test_a_step_returns_the_sum_of_its_episodes_losses():
    method, batch = _two_episodes()
    method.on_train_start()
    loss = method.training_step(batch, 0)
    parts = [episode.terms["loss"] for episode in method.episodes]
    assert torch.allclose(loss.detach(), parts[0] + parts[1], rtol=1e-6)


def test_a_steps_draws_come_from_the_episode_streams_not_the_global_generator():
    """Views, SVL prototypes and dropout follow each episode's seed: the global torch seed
    changes no term."""
    terms = []
    for global_seed in (0, 1):
        method, batch = _two_episodes(Mind)
        torch.manual_seed(global_seed)
        trainer(2).fit(method, DataLoader(TensorDataset(*batch), batch_size=len(batch[0])))
        terms.append([dict(e.terms) for e in method.episodes])
    for first, second in zip(*terms, strict=True):
        assert first.keys() == second.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), key


def test_mind_aligns_relations_with_the_divergence_asked_for(monkeypatch):
    import cdfsl.fewshot.methods.mind as mind_module

    asked = []
    real = mind_module.relation_alignment

    def spy(relation, target, divergence="log_target_kl"):
        asked.append(divergence)
        return real(relation, target, divergence)

    monkeypatch.setattr(mind_module, "relation_alignment", spy)
    from cdfsl.fewshot.losses import DIVERGENCES

    other = next(name for name in DIVERGENCES if name != "log_target_kl")
    images, labels = support()
    loader = DataLoader(TensorDataset(images, labels), batch_size=len(images))
    method = Mind(backbone="tiny-clip", pretrained=None, class_names=NAMES, lora=LORA,
                  divergence=other)  # fmt: skip
    trainer(10).fit(method, loader)  # RA acts at steps 1-5 of 10
    assert len(asked) == 5 and set(asked) == {other}


def test_every_logged_step_carries_the_alignment_metrics(tmp_path):
    """With a logger, each step's metrics (the loss terms and the analysis quantities) are
    logged at that step; without one, only the loss terms are."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    images, labels = support()
    loader = DataLoader(TensorDataset(images, labels), batch_size=len(images))
    method = LoRAFineTune(backbone="tiny-clip", pretrained=None, class_names=NAMES, lora=LORA)
    trainer(2, CSVLogger(tmp_path)).fit(method, loader)
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    steps = [r for r in rows if r.get("train/modality_gap")]
    assert len(steps) == 2 and all(r["train/loss"] for r in steps)


def test_forward_scores_each_group_with_its_own_episodes_classes():
    method, (images, _) = _two_episodes()
    with torch.no_grad():
        out = method.eval()(images)
        feats = method.image_features(images)
        for e, names in enumerate((NAMES, OTHER)):
            text = method.episodes[e].text_feats
            expected = method.scale * feats[6 * e : 6 * (e + 1)] @ text.t()
            torch.testing.assert_close(out[6 * e : 6 * (e + 1)], expected)
            assert method.episodes[e].class_names == names


def test_siglip_logits_add_the_backbones_bias():
    method = ZeroShot(backbone="tiny-siglip", pretrained=None, class_names=NAMES)
    feats = torch.nn.functional.normalize(
        torch.randn(4, method.text_feats.shape[1], generator=torch.Generator().manual_seed(2)),
        dim=-1,
    )
    bias = method.backbone.logit_bias
    assert bias is not None and float(bias) != 0
    expected = method.scale * feats @ method.text_feats.t() + bias
    torch.testing.assert_close(method.logits(feats), expected)


def test_stream_seeds_are_the_first_seed_sequence_word_halved():
    """An episode stream's seed: numpy's SeedSequence([seed, stream]), first uint64 word,
    shifted right once (63 bits, a valid torch seed); rows depend on it staying so."""
    import numpy as np

    from cdfsl.fewshot.methods.base import stream_seed

    for seed, stream in ((0, 0), (5, 2), (2**40, 7)):
        word = int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0])
        assert stream_seed(seed, stream) == word // 2 < 2**63


def test_start_episodes_and_a_single_episode_refusals_in_full():
    method = LoRAFineTune(backbone="tiny-clip", pretrained=None, lora=LORA)
    for seeds, names, text in (
        ([1, 2], [NAMES], "start_episodes with 2 seeds and 1 class lists: expected one class "
         "list per seed, at least one"),
        ([], [], "start_episodes with 0 seeds and 0 class lists: expected one class list per "
         "seed, at least one"),
        ([1, 2], [NAMES, NAMES[:2]], "start_episodes with class lists of sizes [2, 3]: expected "
         "one size (episodes trained together share the way of their protocol)"),
    ):  # fmt: skip
        with pytest.raises(CdfslError) as err:
            method.start_episodes(seeds, names)
        assert str(err.value) == text
    method.start_episodes([7, 8], [NAMES, OTHER])
    assert method.seed == 7 and [e.seed for e in method.episodes] == [7, 8]
    with pytest.raises(CdfslError) as err:
        method.logits(torch.zeros(1, method.episodes[0].text_feats.shape[1]))
    assert str(err.value) == (
        "2 episodes are training together: expected one; use method.episodes[e] for episode e"
    )


def test_predict_step_reads_a_tensor_a_tuple_or_a_dict():
    method, (images, labels) = _two_episodes()
    method.eval()
    with torch.no_grad():
        expected = method(images)
        for batch in (images, (images, labels), [images], {"images": images, "labels": labels}):
            assert torch.equal(method.predict_step(batch, 0), expected)


def test_the_cosine_period_counts_the_steps_however_the_trainer_bounds_them():
    """T_max = 8·T with T the Trainer's max_steps (even 1), or its estimated steps when it
    bounds epochs instead (2 epochs of 3 batches: T = 6)."""
    images, labels = support()
    for kwargs, loader_batch, total in (
        ({"max_steps": 1}, 6, 1),
        ({"max_steps": -1, "max_epochs": 2}, 2, 6),
    ):
        loader = DataLoader(TensorDataset(images, labels), batch_size=loader_batch)
        method = LoRAFineTune(backbone="tiny-clip", pretrained=None, class_names=NAMES, lora=LORA)
        fit = L.Trainer(
            accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, **kwargs,
        )  # fmt: skip
        fit.fit(method, loader)
        assert fit.lr_scheduler_configs[0].scheduler.T_max == 8 * total, kwargs


def test_training_refusals_in_full():
    images, labels = support()
    with pytest.raises(CdfslError) as err:
        trainer(1).fit(
            ZeroShot(backbone="tiny-clip", pretrained=None, class_names=NAMES),
            DataLoader(TensorDataset(images, labels), batch_size=6),
        )
    assert str(err.value) == "ZeroShot has no trainable parameters (lora is None)"
    # A relation of another shape than this step's (as from a batch that changed) is refused.

    class Shrink(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:
                pl_module.episodes[0].memory["relation"] = torch.zeros(2, 2)

    mind = Mind(backbone="tiny-clip", pretrained=None, class_names=NAMES, lora=LORA)
    fit = L.Trainer(
        max_steps=10, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Shrink()],
    )  # fmt: skip
    with pytest.raises(CdfslError) as err:
        fit.fit(mind, DataLoader(TensorDataset(images, labels), batch_size=6))
    assert str(err.value) == (
        "Mind needs every training batch to hold the same images in the same order (the whole "
        "support set); the batch shape changed between steps"
    )
    method, (batch_images, batch_labels) = _two_episodes()
    with pytest.raises(CdfslError) as err:
        method.training_step((batch_images[:11], batch_labels[:11]), 0)
    assert str(err.value) == (
        "training batch of 11 images for 2 episodes: expected equal contiguous groups, one per "
        "episode"
    )


def test_a_dict_batch_trains_as_a_tuple_does():
    method, (images, labels) = _two_episodes()
    method.on_train_start()
    as_tuple = method.training_step((images, labels), 0).detach()
    method.on_train_start()
    as_dict = method.training_step({"images": images, "labels": labels}, 0).detach()
    assert torch.equal(as_tuple, as_dict)


def test_set_classes_and_reset_keep_or_restart_the_episode_seed():
    method = LoRAFineTune(backbone="tiny-clip", pretrained=None, lora=LORA, seed=5)
    method.set_classes(NAMES[:2])  # two classes are enough
    assert [(e.seed, e.class_names) for e in method.episodes] == [(5, NAMES[:2])]
    method.reset(9)
    assert method.seed == 9 and [(e.seed, e.class_names) for e in method.episodes] == [
        (9, NAMES[:2])
    ]
    from cdfsl.lora import adapter_sets, lora_parameters

    root = method.backbone.lora_root()
    with torch.no_grad():
        for p in lora_parameters(root):
            p.add_(0.5)
    trained = [p.detach().clone() for p in lora_parameters(root)]
    method.set_classes(OTHER)  # one episode: new classes, the adapters left as they are
    assert [(e.seed, e.class_names) for e in method.episodes] == [(9, OTHER)]
    assert all(torch.equal(a, b) for a, b in zip(trained, lora_parameters(root), strict=True))
    method.start_episodes([3, 4], [NAMES, OTHER])
    assert adapter_sets(root) == 2
    method.set_classes(OTHER)  # from several episodes back to one, seeded as the method
    assert method.seed == 3 and [(e.seed, e.class_names) for e in method.episodes] == [(3, OTHER)]
    assert adapter_sets(root) == 1
    fresh = LoRAFineTune(backbone="tiny-clip", pretrained=None, lora=LORA)
    fresh.reset(2)
    assert fresh.seed == 2 and fresh.episodes == []
    with pytest.raises(CdfslError) as err:
        fresh.set_classes(["only"])
    assert str(err.value) == "need at least 2 class names, got ['only']"
    with pytest.raises(CdfslError) as err:
        fresh(torch.zeros(1, 3, 32, 32))
    assert str(err.value) == "no classes set: pass class_names=... or call set_classes() first"


def test_the_optimiser_and_schedule_follow_the_hyper_parameters():
    images, labels = support()
    method = LoRAFineTune(
        backbone="tiny-clip", pretrained=None, class_names=NAMES, lora=LORA,
        lr=3e-4, weight_decay=0.05, t_max_factor=0.1,
    )  # fmt: skip
    fit = trainer(1)
    fit.fit(method, DataLoader(TensorDataset(images, labels), batch_size=6))
    group = fit.optimizers[0].param_groups[0]
    assert group["initial_lr"] == 3e-4 and group["weight_decay"] == 0.05
    config = fit.lr_scheduler_configs[0]
    assert config.interval == "step" and config.scheduler.T_max == 1  # max(1, int(0.1 * 1))


# -- mutation follow-up (issue 23), second round ---------------------------------------------------


def test_forward_refuses_a_batch_that_does_not_split_into_its_episodes():
    """4 images for 3 episodes would chunk into two groups and score episode 3 on nothing."""
    method = LoRAFineTune(backbone="tiny-clip", pretrained=None, lora=LORA)
    method.start_episodes([1, 2, 3], [NAMES, OTHER, NAMES])
    with pytest.raises(CdfslError) as err:
        method(torch.rand(4, 3, 32, 32))
    assert str(err.value) == (
        "batch of 4 images for 3 episodes: expected equal contiguous groups, one per episode"
    )


def test_resize_interpolation_backbone_takes_the_models_own():
    from PIL import Image

    image = Image.fromarray(
        (torch.rand(50, 70, 3, generator=torch.Generator().manual_seed(0)) * 255)
        .to(torch.uint8)
        .numpy()
    )
    method = ZeroShot(backbone="tiny-clip", pretrained=None, resize_interpolation="backbone")
    preprocess = method.backbone.preprocess
    expected = preprocess.to_tensor(method.geometry, preprocess.interpolation)(image)
    assert torch.equal(method.to_tensor()(image), expected)


def test_a_method_without_views_trains_on_the_plain_support_set(monkeypatch):
    """views=(): every step is the support set as given, and the clean support S is all of it."""
    images, labels = support()
    method = Mind(
        backbone="tiny-clip",
        pretrained=None,
        class_names=NAMES,
        lora=LORA,
        views=(),
        support="shared",
    )
    seen = []
    real = method.loss_terms

    def spy(feats, labels_, view_ids, episode):
        seen.append(
            (
                feats.shape[0],
                view_ids,
                method.support_features(feats, labels_, view_ids, episode)[0].shape,
            )
        )
        return real(feats, labels_, view_ids, episode)

    monkeypatch.setattr(method, "loss_terms", spy)
    trainer(2).fit(method, DataLoader(TensorDataset(images, labels), batch_size=len(images)))
    assert seen and all(rows == 6 and ids is None for rows, ids, _ in seen)
    assert all(tuple(shape) == (6, method.text_feats.shape[1]) for _, _, shape in seen)


def test_without_a_clean_view_every_row_is_clean_support():
    from cdfsl.data.views import ViewSpec

    flip, rotate = ViewSpec("flip", hflip=True), ViewSpec("rotate", rotation=30.0)
    method = LoRAFineTune(backbone="tiny-clip", pretrained=None, lora=LORA, views=(flip, rotate))
    assert method.clean_rows(torch.tensor([0, 0, 1, 1])) is None
    assert method.clean_rows(None) is None
    with_clean = LoRAFineTune(
        backbone="tiny-clip", pretrained=None, lora=LORA, views=(flip, ViewSpec("clean"))
    )
    assert with_clean.clean_rows(torch.tensor([0, 1, 1, 0])).tolist() == [False, True, True, False]


def test_the_split_of_l_vlm_takes_its_prototypes_from_the_clean_view_rows():
    """Rebuilt from the recorded step: prototypes from the clean rows only (all rows would move
    them toward the augmented views)."""
    from cdfsl.fewshot import losses

    images, labels = support()
    method = LoRAFineTune(backbone="tiny-clip", pretrained=None, class_names=NAMES, lora=LORA)
    assert len(method.views) > 1
    trainer(1).fit(method, DataLoader(TensorDataset(images, labels), batch_size=len(images)))
    episode = method.episodes[0]
    feats, y, ids, separate, _ = episode.analysis
    assert separate is None
    clean = ids == method._clean_view
    text = episode.text_feats
    prototypes = losses.class_prototypes(feats[clean], y[clean], len(text))
    expected = losses.vlm_decomposition(feats, text, y, prototypes, method.scale)
    terms = method.episode_terms(0)
    for key, value in expected.items():
        assert terms[key] == pytest.approx(float(value), rel=1e-5, abs=1e-6), key
    everything = losses.class_prototypes(feats, y, len(text))
    wrong = losses.vlm_decomposition(feats, text, y, everything, method.scale)
    assert any(abs(float(wrong[k]) - terms[k]) > 1e-4 for k in expected)


def test_separately_forwarded_support_is_what_the_analysis_keeps(monkeypatch):
    images, labels = support()
    method = Mind(
        backbone="tiny-clip", pretrained=None, class_names=NAMES, support="separate",
        lora=LoRAConfig(rank=4, alpha=8.0, dropout=0.5),
    )  # fmt: skip
    assert method.forwards_support
    used = []
    real = method.loss_terms
    monkeypatch.setattr(
        method, "loss_terms",
        lambda f, y, ids, ep: used.append(ep.support[0].detach().clone()) or real(f, y, ids, ep),
    )  # fmt: skip
    trainer(1).fit(method, DataLoader(TensorDataset(images, labels), batch_size=len(images)))
    separate = method.episodes[0].analysis[3]
    assert separate is not None and torch.equal(separate, used[-1])


def test_the_classifier_lives_on_the_backbones_device(monkeypatch):
    method = ZeroShot(backbone="tiny-clip", pretrained=None)
    monkeypatch.setattr(
        type(method.backbone), "device", property(lambda self: torch.device("meta"))
    )
    assert method._classifier(NAMES).device.type == "meta"
