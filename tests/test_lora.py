"""LoRA on q/k/v of open_clip's vision tower: injection, exactness, maths, training, persistence."""

from __future__ import annotations

import copy
import math

import open_clip
import pytest
import torch
from torch import nn

from cdfsl.errors import CdfslError
from cdfsl.lora import (
    LAYOUT_HANDLERS,
    LORA_CONFIG_KEY,
    DropoutStreams,
    LoRAAdapter,
    LoRAConfig,
    LoRADropout,
    LoRALinear,
    LoRAMultiheadAttention,
    adapter_sets,
    dropout_words,
    inject_lora,
    load_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    qkv_slices,
    reset_lora,
    save_lora,
    set_lora_dropout_seeds,
    set_num_adapters,
    splitmix64,
    unmerge_lora,
    zero_set_gradients,
)

LAYERS, WIDTH, HEADS = 2, 64, 4


@pytest.fixture(scope="module")
def base_clip() -> nn.Module:
    torch.manual_seed(0)
    return open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg={
            "image_size": 32,
            "patch_size": 8,
            "width": WIDTH,
            "layers": LAYERS,
            "head_width": WIDTH // HEADS,
        },
        text_cfg={"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
    )


@pytest.fixture
def clip(base_clip: nn.Module) -> nn.Module:
    return copy.deepcopy(base_clip)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def randomise(root: nn.Module, seed: int = 2, std: float = 0.1) -> None:
    """Non-zero A and B, so that the adapters change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(root):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def adapters(root: nn.Module) -> list[LoRAAdapter]:
    return [m for m in root.modules() if isinstance(m, LoRAAdapter)]


def test_config_scale_and_validation() -> None:
    assert LoRAConfig().scale == 2.0  # 8 / sqrt(16)
    assert LoRAConfig(scaling="standard").scale == 0.5  # 8 / 16
    assert LoRAConfig(targets=["v", "q"]).targets == ("v", "q")
    for bad in (
        {"rank": 0},
        {"alpha": 0.0},
        {"dropout": 1.0},
        {"targets": ()},
        {"targets": ("q", "o")},
        {"targets": ("q", "q")},
        {"scaling": "sqrt"},
        {"num_adapters": 0},
    ):
        with pytest.raises(CdfslError, match=next(iter(bad))):
            LoRAConfig(**bad)


@pytest.mark.parametrize("targets", [("q", "k", "v"), ("q", "v")])
def test_injects_only_vision_qkv(clip: nn.Module, targets: tuple[str, ...]) -> None:
    keys_before = set(clip.visual.state_dict())
    attn0 = clip.visual.transformer.resblocks[0].attn
    originals = (attn0.in_proj_weight, attn0.in_proj_bias, attn0.out_proj)

    clip.eval()
    names = inject_lora(clip.visual, LoRAConfig(targets=targets))
    assert not any(m.training for m in clip.visual.modules())  # replacements keep the mode

    expected = [f"transformer.resblocks.{i}.attn.{t}" for i in range(LAYERS) for t in targets]
    assert names == expected
    assert len(adapters(clip.visual)) == LAYERS * len(targets)
    assert not adapters(clip.transformer)  # text tower untouched
    assert all(type(b.attn) is nn.MultiheadAttention for b in clip.transformer.resblocks)
    for block in clip.visual.transformer.resblocks:
        assert isinstance(block.attn, LoRAMultiheadAttention)
        assert type(block.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
        assert not adapters(block.attn.out_proj)
    new = clip.visual.transformer.resblocks[0].attn
    assert (new.in_proj_weight, new.in_proj_bias, new.out_proj) == originals  # same objects
    added = set(clip.visual.state_dict()) - keys_before
    assert keys_before <= set(clip.visual.state_dict())  # base checkpoints still load
    assert added == {f"{n}.lora_{m}" for n in names for m in "AB"}
    a = clip.visual.transformer.resblocks[0].attn.q
    assert a.lora_A.shape == (1, 16, WIDTH) and a.lora_B.shape == (1, WIDTH, 16)
    assert torch.count_nonzero(a.lora_A) > 0 and torch.count_nonzero(a.lora_B) == 0

    with pytest.raises(CdfslError, match="already holds LoRA"):
        inject_lora(clip.visual, LoRAConfig())
    with pytest.raises(CdfslError, match="no attention module"):
        inject_lora(nn.Sequential(nn.Linear(4, 4)), LoRAConfig())
    mixed = nn.Sequential(nn.MultiheadAttention(8, 2), nn.MultiheadAttention(8, 2, kdim=4, vdim=4))
    with pytest.raises(CdfslError, match="kdim"):
        inject_lora(mixed, LoRAConfig())
    assert type(mixed[0]) is nn.MultiheadAttention  # a failed injection changes nothing


def test_zero_b_is_bit_exact(base_clip: nn.Module, clip: nn.Module, images) -> None:
    # With grad enabled torch's MHA takes its Python path, whose op sequence LoRAMultiheadAttention
    # reproduces; adding B = 0 deltas then changes no bit, even with LoRA dropout active.
    inject_lora(clip.visual, LoRAConfig())
    for train in (True, False):
        base_clip.train(train)
        clip.train(train)
        assert torch.equal(clip.visual(images), base_clip.visual(images))
    # The text tower passes a float causal attn_mask; it must be handled like torch does.
    inject_lora(clip.transformer, LoRAConfig())
    tokens = torch.randint(0, 1000, (3, 16), generator=torch.Generator().manual_seed(3))
    assert torch.equal(clip.encode_text(tokens), base_clip.encode_text(tokens))
    base_clip.train()


@pytest.mark.parametrize("batch_first", [True, False])
def test_masks_and_layouts_match_torch(batch_first: bool) -> None:
    torch.manual_seed(5)
    torch_attn = nn.ModuleDict({"attn": nn.MultiheadAttention(16, 4, batch_first=batch_first)})
    ours = copy.deepcopy(torch_attn)
    inject_lora(ours, LoRAConfig(rank=4))
    x, y = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    if not batch_first:
        x, y = x.transpose(0, 1), y.transpose(0, 1)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, 5:] = True
    causal = torch.ones(5, 7, dtype=torch.bool).triu(3)
    for q, kv, kwargs in (
        (x, x, {"attn_mask": causal[:, :5]}),
        (x, y, {"attn_mask": causal, "key_padding_mask": padding}),
        (x, y, {"attn_mask": torch.randn(3 * 4, 5, 7)}),
        (x[:, 0] if batch_first else x[0], x[:, 0] if batch_first else x[0], {}),  # unbatched
    ):
        expected = torch_attn.attn(q, kv, kv, need_weights=False, **kwargs)[0]
        torch.testing.assert_close(ours.attn(q, kv, kv, **kwargs)[0], expected, atol=0, rtol=0)


@pytest.mark.parametrize("batch_first", [True, False])
def test_matches_direct_formula(batch_first: bool) -> None:
    torch.manual_seed(4)
    d, h, n, length = 16, 2, 3, 5
    holder = nn.ModuleDict({"attn": nn.MultiheadAttention(d, h, batch_first=batch_first)})
    nn.init.normal_(holder.attn.in_proj_bias)
    inject_lora(holder, LoRAConfig(rank=4, alpha=3.0))
    randomise(holder)
    attn = holder.attn.eval()
    w, b, s = attn.in_proj_weight, attn.in_proj_bias, 3.0 / math.sqrt(4)

    def proj(x: torch.Tensor, i: int, part: str) -> torch.Tensor:
        a, bb = getattr(attn, part).lora_A[0], getattr(attn, part).lora_B[0]
        rows = slice(i * d, (i + 1) * d)
        return x @ w[rows].T + b[rows] + s * (x @ a.T) @ bb.T

    x, y = torch.randn(n, length, d), torch.randn(n, length + 2, d)
    with torch.no_grad():
        full = attn.project(x)
        for i, part in enumerate("qkv"):
            torch.testing.assert_close(full[..., i * d : (i + 1) * d], proj(x, i, part))

        for key in (x, y):  # self-attention (fused projection) and cross-attention
            q, k, v = proj(x, 0, "q"), proj(key, 1, "k"), proj(key, 2, "v")
            heads = [t.unflatten(-1, (h, d // h)).transpose(1, 2) for t in (q, k, v)]
            weights = torch.softmax(heads[0] @ heads[1].mT / math.sqrt(d // h), dim=-1)
            expected = (weights @ heads[2]).transpose(1, 2).flatten(2) @ attn.out_proj.weight.T
            expected = expected + attn.out_proj.bias
            if batch_first:
                out, none = attn(x, key, key, need_weights=False)
            else:
                xt = x.transpose(0, 1)
                kt = xt if key is x else key.transpose(0, 1)  # keep "query is key" for self-attn
                out, none = attn(xt, kt, kt)
                out = out.transpose(0, 1)
            assert none is None
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_lora_linear_wraps_fused_qkv() -> None:
    linear = nn.Linear(8, 24)
    wrapped = LoRALinear(linear, qkv_slices(8), LoRAConfig(rank=2, alpha=2.0, targets=("k",)))
    assert wrapped.weight is linear.weight and set(wrapped.state_dict()) >= {"weight", "bias"}
    randomise(wrapped)
    wrapped.eval()
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        delta = wrapped(x) - linear(x)
        expected_k = 2 / math.sqrt(2) * x @ wrapped.k.lora_A[0].T @ wrapped.k.lora_B[0].T
    torch.testing.assert_close(delta[..., 8:16], expected_k, atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(delta[..., :8]) == 0 and torch.count_nonzero(delta[..., 16:]) == 0


def test_only_lora_parameters_get_gradients(clip: nn.Module, images) -> None:
    inject_lora(clip.visual, LoRAConfig())
    randomise(clip.visual)  # B != 0 so A receives a non-zero gradient too
    mark_only_lora_trainable(clip)
    lora_ids = {id(p) for p in lora_parameters(clip)}
    assert len(lora_ids) == 2 * LAYERS * 3
    clip.train()
    clip.visual(images).square().sum().backward()
    for name, p in clip.named_parameters():
        if id(p) in lora_ids:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_merge_then_unmerge(clip: nn.Module, images) -> None:
    inject_lora(clip.visual, LoRAConfig())
    randomise(clip.visual)
    clip.eval()
    attn = clip.visual.transformer.resblocks[1].attn
    base = attn.in_proj_weight.detach().clone()
    with torch.no_grad():
        unmerged = clip.visual(images)
        merge_lora(clip.visual)
        assert not torch.equal(attn.in_proj_weight, base)
        merged = clip.visual(images)
        merge_lora(clip.visual)  # idempotent
        torch.testing.assert_close(clip.visual(images), merged, atol=0, rtol=0)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    with pytest.raises(CdfslError, match="unmerge_lora"):
        reset_lora(clip.visual, seed=0)
    unmerge_lora(clip.visual)
    assert torch.equal(attn.in_proj_weight, base)
    with torch.no_grad():
        assert torch.equal(clip.visual(images), unmerged)


def test_merge_refuses_several_adapter_sets(clip: nn.Module) -> None:
    inject_lora(clip.visual, LoRAConfig(num_adapters=2))
    with pytest.raises(CdfslError, match="num_adapters=2"):
        merge_lora(clip.visual)


def test_reset_is_deterministic(base_clip: nn.Module, clip: nn.Module, images) -> None:
    inject_lora(clip.visual, LoRAConfig())
    randomise(clip.visual)
    reset_lora(clip.visual, seed=7)
    first = [p.detach().clone() for p in lora_parameters(clip.visual)]
    randomise(clip.visual, seed=8)
    reset_lora(clip.visual, seed=7)
    again = lora_parameters(clip.visual)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    a_q = adapters(clip.visual)[0].lora_A
    bound = 1 / math.sqrt(WIDTH)  # kaiming_uniform(a=sqrt(5)) bound
    assert 0.8 * bound < a_q.abs().max() <= bound
    assert not torch.equal(adapters(clip.visual)[0].lora_A, adapters(clip.visual)[1].lora_A)
    assert all(torch.count_nonzero(a.lora_B) == 0 for a in adapters(clip.visual))
    reset_lora(clip.visual, seed=9)
    assert not torch.equal(adapters(clip.visual)[0].lora_A, first[0])
    base_clip.eval()
    clip.eval()
    assert torch.equal(clip.visual(images), base_clip.visual(images))
    base_clip.train()


def test_save_load_roundtrip_and_strictness(
    base_clip: nn.Module, clip: nn.Module, images, tmp_path
):
    config = LoRAConfig()
    inject_lora(clip.visual, config)
    randomise(clip.visual)
    clip.eval()
    path = tmp_path / "adapters.safetensors"
    save_lora(clip.visual, path)

    fresh = copy.deepcopy(base_clip).eval()
    inject_lora(fresh.visual, config)
    load_lora(fresh.visual, path)
    with torch.no_grad():
        assert torch.equal(fresh.visual(images), clip.visual(images))

    state = lora_state_dict(clip.visual)
    assert LORA_CONFIG_KEY in state and len(state) == 2 * LAYERS * 3 + 1
    some_key = "transformer.resblocks.0.attn.q.lora_A"
    missing = {k: v for k, v in state.items() if k != some_key}
    extra = {**state, "transformer.resblocks.0.attn.o.lora_A": state[some_key]}
    wrong_shape = {**state, some_key: state[some_key][:, :8]}
    with pytest.raises(CdfslError, match="missing keys"):
        load_lora_state_dict(fresh.visual, missing)
    with pytest.raises(CdfslError, match="unexpected keys"):
        load_lora_state_dict(fresh.visual, extra)
    with pytest.raises(CdfslError, match="shape"):
        load_lora_state_dict(fresh.visual, wrong_shape)
    other = copy.deepcopy(base_clip)
    inject_lora(other.visual, LoRAConfig(alpha=16.0))
    with pytest.raises(CdfslError, match=r"alpha=8\.0"):
        load_lora_state_dict(other.visual, state)
    with pytest.raises(CdfslError, match="does not exist"):
        load_lora(fresh.visual, tmp_path / "nope.safetensors")
    with pytest.raises(CdfslError, match="no LoRA adapters"):
        lora_state_dict(base_clip.visual)
    inject_lora(clip.transformer, LoRAConfig(rank=4))
    with pytest.raises(CdfslError, match="different configs"):
        lora_state_dict(clip)


def test_adapter_sets_serve_their_batch_groups(base_clip: nn.Module, clip: nn.Module, images):
    inject_lora(clip.visual, LoRAConfig(num_adapters=2))
    assert torch.equal(clip.eval().visual(images), base_clip.eval().visual(images))
    randomise(clip.visual)
    a = adapters(clip.visual)[0]
    assert a.lora_A.shape == (2, 16, WIDTH) and a.lora_B.shape == (2, WIDTH, 16)
    with torch.no_grad():
        together = clip.visual(images)  # samples 0-1 use set 0, samples 2-3 set 1
        for e in range(2):
            single = copy.deepcopy(base_clip).eval()
            inject_lora(single.visual, LoRAConfig())
            load_lora_state_dict(single.visual, lora_state_dict(clip.visual, adapter_index=e))
            alone = single.visual(images[2 * e : 2 * e + 2])
            torch.testing.assert_close(together[2 * e : 2 * e + 2], alone, atol=1e-5, rtol=1e-5)
        with pytest.raises(CdfslError, match="multiple of num_adapters=2"):
            clip.visual(images[:3])
    # A set's initial values depend only on the seed, as for a single-adapter model.
    reset_lora(clip.visual, seed=5, adapter_index=1)
    reset_lora(single.visual, seed=5)
    assert torch.equal(adapters(clip.visual)[0].lora_A[1], adapters(single.visual)[0].lora_A[0])
    assert not torch.equal(adapters(clip.visual)[0].lora_A[0], adapters(clip.visual)[0].lora_A[1])
    base_clip.train()


def test_dropout_only_in_training(clip: nn.Module, images) -> None:
    inject_lora(clip.visual, LoRAConfig())
    randomise(clip.visual)
    attn = clip.visual.transformer.resblocks[0].attn
    assert attn.q.dropout is not attn.k.dropout and attn.q.dropout.p == 0.25
    seen: dict[str, torch.Tensor] = {}
    for part in "qk":
        getattr(attn, part).dropout.register_forward_hook(
            lambda _m, _i, out, part=part: seen.__setitem__(part, out)
        )
    with torch.no_grad():
        clip.train()
        first, second = clip.visual(images), clip.visual(images)
        assert not torch.equal(seen["q"], seen["k"])  # independent masks per projection
        assert (seen["q"] == 0).float().mean().item() == pytest.approx(0.25, abs=0.1)
        clip.eval()
        evaluated = clip.visual(images)
        assert torch.equal(seen["q"], seen["k"])  # identity: both are the block's input
    assert not torch.equal(first, second)
    assert not torch.allclose(first, evaluated)
    with torch.no_grad():
        assert torch.equal(clip.visual(images), evaluated)


def test_low_precision_keeps_lora_fp32(base_clip: nn.Module, clip: nn.Module, images) -> None:
    inject_lora(clip.visual, LoRAConfig())
    randomise(clip.visual)
    mark_only_lora_trainable(clip)
    clip.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = clip.visual(images)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    for p in lora_parameters(clip.visual):
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
        assert p.grad.abs().sum() > 0

    # Base weights cast to bf16 before injection: adapters are still fp32, outputs bf16.
    half = copy.deepcopy(base_clip).to(torch.bfloat16)
    inject_lora(half.visual, LoRAConfig())
    load_lora_state_dict(half.visual, lora_state_dict(clip.visual))
    mark_only_lora_trainable(half)
    out = half.visual(images.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    for p in lora_parameters(half.visual):
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
    with torch.no_grad():
        reference = clip.eval().visual(images)
        lowp = half.eval().visual(images.bfloat16()).float()
        torch.testing.assert_close(lowp, reference, atol=0.1, rtol=0.1)


@pytest.mark.parametrize(
    ("shape", "p", "groups"),
    [((5, 7), 0.25, 1), ((3, 8), 0.25, 3), ((2, 9), 0.5, 2), ((11,), 0.1, 4), ((4, 4), 0.75, 1)],
)
def test_dropout_drops_every_element_at_rate_p(shape, p, groups) -> None:
    """Every element position, of every group, is dropped at rate p within 5 binomial SEs.

    The mask of 16-bit draws once never dropped positions ≡ 3 (mod 4): its overall rate still
    looked like p (0.19 for 0.25), so only a per-position count catches it.
    """
    draws = 3000
    dropout = LoRADropout(p).train()
    streams = DropoutStreams([100 + g for g in range(groups)])
    ones = torch.ones(groups, *shape)
    dropped = torch.zeros(groups, *shape)
    for _ in range(draws):
        dropped += dropout(ones, streams) == 0
    rate = dropped / draws
    se = math.sqrt(p * (1 - p) / draws)
    worst = (rate - p).abs().max().item()
    assert worst < 5 * se, f"a position's drop rate is {worst:.3f} from p={p} (5 SE = {5 * se:.3f})"
    # Kept elements pass unchanged: the 1/(1-p) keep-scale is the adapter's, applied once.
    out = dropout(torch.full((groups, *shape), 3.0), streams)
    assert set(out.unique().tolist()) <= {0.0, 3.0}


@pytest.mark.parametrize("p", [0.25, 0.5])
def test_adapter_update_is_unbiased_per_channel(p: float) -> None:
    """With A = B = I, the update is scale·dropout(x)/(1-p): 0 or scale·x/(1-p) per element,
    and its mean over draws is scale·x on every input channel (inverted dropout, unbiased)."""
    width, samples, draws = 6, 5, 4000
    config = LoRAConfig(rank=width, alpha=2.0, dropout=p, scaling="standard")
    adapter = LoRAAdapter(width, 0, width, config).train()
    with torch.no_grad():
        adapter.lora_A[0].copy_(torch.eye(width))
        adapter.lora_B[0].copy_(torch.eye(width))
    adapter.streams = DropoutStreams([3])
    x = torch.arange(1, samples * width + 1, dtype=torch.float32).view(samples, width)
    kept_value = config.scale * x / (1 - p)
    total = torch.zeros_like(x)
    with torch.no_grad():
        for _ in range(draws):
            d = adapter(x)
            assert torch.all((d == 0) | torch.isclose(d, kept_value))
            total += d
    mean = total / draws
    se = config.scale * x * math.sqrt(p / (1 - p) / draws)  # sd of scale·x·Bernoulli(1-p)/(1-p)
    assert torch.all((mean - config.scale * x).abs() < 5 * se)


def test_splitmix64_matches_the_published_sequence() -> None:
    """SplitMix64 seeded 1234567 (Vigna's reference ``next()``: state += gamma, then mix)."""
    gamma, state = 0x9E3779B97F4A7C15, 1234567
    outputs = [splitmix64(state + k * gamma) for k in range(1, 6)]
    assert outputs == [
        6457827717110365317,
        3203168211198807973,
        9817491932198370423,
        4593380528125082431,
        16408922859458223821,
    ]


def _python_word(seed: int, call: int, index: int) -> int:
    """Word ``index`` of call ``call`` of the stream seeded ``seed``, in Python ints mod 2**64."""
    gamma, mask = 0x9E3779B97F4A7C15, (1 << 64) - 1
    z = (splitmix64(seed) + ((call << 40) + index) * gamma) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def _words_on(device: str, seeds: list[int], calls: int, words: int) -> list[torch.Tensor]:
    streams = DropoutStreams(seeds)
    return [dropout_words(streams, words, torch.device(device)).cpu() for _ in range(calls)]


def test_dropout_words_are_splitmix64_at_the_streams_positions() -> None:
    """The tensor words (int64 ops that wrap) equal the Python-int SplitMix64 of each position:
    stream seed, call and word index alone decide them."""
    seeds = [7, 2**62 + 3, 0]
    calls = _words_on("cpu", seeds, 3, 300)
    for c, words in enumerate(calls):
        for e, seed in enumerate(seeds):
            for i in (0, 1, 2, 151, 299):
                assert int(words[e, i]) & ((1 << 64) - 1) == _python_word(seed, c, i), (c, e, i)


def test_a_streams_masks_do_not_depend_on_its_partners() -> None:
    """Set e's words are the same alone, first or last among other sets (any E, any position)."""
    alone = _words_on("cpu", [11], 4, 64)
    for seeds, e in (([11, 12, 13], 0), ([12, 11], 1), ([5, 6, 7, 11], 3)):
        side_by_side = _words_on("cpu", seeds, 4, 64)
        for c in range(4):
            assert torch.equal(side_by_side[c][e], alone[c][0]), (seeds, c)


def test_dropout_masks_are_pairwise_independent_across_calls_streams_and_elements() -> None:
    """Joint drop rates of two calls, two streams and two neighbouring elements are p**2
    within 5 SE per position (a Weyl offset that repeated across calls or streams would give p)."""
    p, draws, width = 0.25, 2000, 16
    dropout = LoRADropout(p).train()
    ones = torch.ones(2, width)
    pairs = {"calls": torch.zeros(width), "streams": torch.zeros(width), "neighbours": 0.0}
    streams = DropoutStreams([1, 2])
    for _ in range(draws):
        first, second = dropout(ones, streams) == 0, dropout(ones, streams) == 0
        pairs["calls"] += (first[0] & second[0]).float()
        pairs["streams"] += (first[0] & first[1]).float()
        pairs["neighbours"] += (first[0, :-1] & first[0, 1:]).float().mean().item()
    se = math.sqrt(p * p * (1 - p * p) / draws)
    for name in ("calls", "streams"):
        worst = (pairs[name] / draws - p * p).abs().max().item()
        assert worst < 5 * se, f"{name}: joint drop rate {worst:.3f} from p^2 (5 SE {5 * se:.3f})"
    assert abs(pairs["neighbours"] / draws - p * p) < 5 * se


@pytest.mark.cuda
def test_dropout_words_are_the_same_on_cuda_and_cpu() -> None:
    """Counter-based draws in plain integer ops: a CUDA device gives the CPU's words bit for bit."""
    seeds = [3, 99, 2**40]
    for cpu, cuda in zip(
        _words_on("cpu", seeds, 3, 4099), _words_on("cuda", seeds, 3, 4099), strict=True
    ):
        assert torch.equal(cpu, cuda)


# -- mutation follow-up (issue 23): every attention layout, messages, devices, files -------------


def _merged_reference(mha: nn.MultiheadAttention, ours: LoRAMultiheadAttention) -> nn.Module:
    """torch's MHA whose in-projection holds ``W + scale · B A`` per adapted slice, by hand."""
    reference = copy.deepcopy(mha)
    scale = ours.config.alpha / math.sqrt(ours.config.rank)
    d = mha.embed_dim
    with torch.no_grad():
        for i, part in enumerate("qkv"):
            adapter = getattr(ours, part, None)
            if adapter is not None:
                delta = adapter.lora_B[0] @ adapter.lora_A[0]
                reference.in_proj_weight[i * d : (i + 1) * d] += scale * delta
    return reference


_MASK_CASES = {
    "none": {},
    "bool_2d": {"attn_mask": "causal_bool"},
    "float_3d": {"attn_mask": "float_3d"},
    "bool_padding": {"key_padding_mask": "padding_bool"},
    "float_padding_and_float_mask": {"key_padding_mask": "padding_float", "attn_mask": "float_2d"},
    "causal_hint": {"attn_mask": "causal_bool", "is_causal": True},
    "causal_hint_and_padding": {
        "attn_mask": "causal_bool",
        "key_padding_mask": "padding_bool",
        "is_causal": True,
    },
}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tying", ["self", "key_is_value", "distinct"])
@pytest.mark.parametrize("masks", list(_MASK_CASES))
def test_attention_equals_torch_with_the_update_merged_by_hand(batch_first, bias, tying, masks):
    """Every input tying (fused, k/v-fused and separate projections), mask kind and layout gives
    torch's MHA output with ``W + scale·BA`` in its in-projection (B ≠ 0; base float64)."""
    torch.manual_seed(11)
    n, length, d, heads = 3, 5, 12, 3
    source = length if tying == "self" or "causal" in masks else length + 2
    mha = nn.MultiheadAttention(d, heads, bias=bias, batch_first=batch_first, dropout=0.3)
    mha = mha.double()
    if bias:
        nn.init.normal_(mha.out_proj.bias)  # torch starts it at zero
    holder = nn.ModuleDict({"attn": copy.deepcopy(mha)})
    inject_lora(holder, LoRAConfig(rank=3, alpha=5.0, dropout=0.0))
    randomise(holder, std=0.3)
    ours = holder.attn.eval()
    reference = _merged_reference(mha, ours).eval()

    def batch(rows: int) -> torch.Tensor:
        x = torch.randn(n, rows, d, dtype=torch.float64)
        return x if batch_first else x.transpose(0, 1)

    query = batch(length)
    key = query if tying == "self" else batch(source)
    value = key if tying in ("self", "key_is_value") else batch(source)
    padding = torch.zeros(n, source, dtype=torch.bool)
    padding[0, -2:] = padding[2, -1] = True
    tensors = {
        "causal_bool": torch.ones(length, source, dtype=torch.bool).triu(1),
        "float_3d": torch.randn(n * heads, length, source, dtype=torch.float64),
        "float_2d": torch.randn(length, source, dtype=torch.float64),
        "padding_bool": padding,
        "padding_float": torch.zeros(n, source, dtype=torch.float64).masked_fill(padding, -1e4),
    }
    kwargs = {k: tensors.get(v, v) for k, v in _MASK_CASES[masks].items()}
    expected_kwargs = {k: v for k, v in kwargs.items() if k != "is_causal"}
    expected = reference(query, key, value, need_weights=False, **expected_kwargs)[0]
    out, weights = ours(query, key, value, **kwargs)
    assert weights is None  # need_weights defaults to True, as torch's; no weights are computed
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)  # adapters are fp32


@pytest.mark.parametrize("batch_first", [True, False])
def test_unbatched_attention_with_a_padding_mask_equals_torch(batch_first: bool) -> None:
    torch.manual_seed(12)
    d, heads = 8, 2
    mha = nn.MultiheadAttention(d, heads, batch_first=batch_first).double()
    holder = nn.ModuleDict({"attn": copy.deepcopy(mha)})
    inject_lora(holder, LoRAConfig(rank=2, dropout=0.0))
    randomise(holder, std=0.3)
    ours = holder.attn.eval()
    reference = _merged_reference(mha, ours).eval()
    x, y = torch.randn(4, d, dtype=torch.float64), torch.randn(6, d, dtype=torch.float64)
    padding = torch.tensor([False, False, True, False, True, False])
    for key, mask in ((x, None), (y, padding), (y, None)):
        expected = reference(x, key, key, key_padding_mask=mask, need_weights=False)[0]
        out, _ = ours(x, key, key, key_padding_mask=mask)
        assert out.shape == (4, d)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)  # adapters are fp32
    # A batch of one keeps its batch dimension, in either layout (L = N = 1 too).
    for length in (4, 1):
        one = x[:length].unsqueeze(0 if batch_first else 1)
        expected = reference(one, one, one, need_weights=False)[0]
        out, _ = ours(one, one, one)
        assert out.shape == one.shape
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_self_attention_projects_once_through_the_fused_weight(monkeypatch) -> None:
    """``query is key is value`` survives the layout transpose, so q, k and v come from one
    (3E, E) product, as in torch's packed path; a k/v pair from one (2E, E) product."""
    for batch_first in (True, False):
        holder = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2, batch_first=batch_first)})
        inject_lora(holder, LoRAConfig(rank=2))
        calls: list[tuple[int, int | None]] = []
        original = LoRAMultiheadAttention.project

        def spy(self, x, start=0, stop=None, batch_dim=0, calls=calls, original=original):
            calls.append((start, stop))
            return original(self, x, start, stop, batch_dim)

        monkeypatch.setattr(LoRAMultiheadAttention, "project", spy)
        x, y = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
        if not batch_first:
            x, y = x.transpose(0, 1), y.transpose(0, 1)
        holder.attn(x, x, x)
        assert calls == [(0, None)]
        calls.clear()
        holder.attn(x, y, y)
        assert calls == [(0, 8), (8, None)]
        monkeypatch.undo()


def test_injected_attention_keeps_the_attributes_callers_read() -> None:
    mha = nn.MultiheadAttention(12, 3, batch_first=True, dropout=0.1)
    holder = nn.ModuleDict({"attn": mha})
    inject_lora(holder, LoRAConfig(rank=2))
    for name in ("embed_dim", "num_heads", "head_dim", "kdim", "vdim", "batch_first", "dropout"):
        assert getattr(holder.attn, name) == getattr(mha, name), name
    assert holder.attn._qkv_same_embed_dim is True
    assert holder.attn.in_proj_weight is mha.in_proj_weight
    assert holder.attn.out_proj is mha.out_proj


def test_adapters_are_created_on_the_base_weights_device() -> None:
    """The meta device stands in for an accelerator: adapters follow the weight they adapt."""
    holder = nn.ModuleDict(
        {
            "attn": nn.MultiheadAttention(8, 2, device="meta"),
            "linear": nn.Sequential(nn.Linear(8, 24, device="meta")),
        }
    )
    inject_lora(holder, LoRAConfig(rank=2))
    linear = LoRALinear(holder.linear[0], qkv_slices(8), LoRAConfig(rank=2))
    for module in (holder.attn, linear):
        for adapter in module.adapters():
            assert adapter.lora_A.device.type == "meta" and adapter.lora_B.device.type == "meta"


def test_bad_attention_inputs_and_modules_are_refused_in_full() -> None:
    holder = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2)})
    inject_lora(holder, LoRAConfig(rank=2))
    x = torch.randn(3, 2, 8)
    with pytest.raises(CdfslError) as err:
        holder.attn(x, x, x, is_causal=True)
    assert str(err.value) == "is_causal=True without attn_mask: pass the causal mask as attn_mask"
    with pytest.raises(CdfslError) as err:
        holder.attn(x, x, x, attn_mask=torch.zeros(3, 4))
    assert str(err.value) == "attn_mask of shape (3, 4): expected (3, 3) or (4, 3, 3)"
    for name in ("attn_mask", "key_padding_mask"):
        shape = (3, 3) if name == "attn_mask" else (2, 3)
        with pytest.raises(CdfslError) as err:
            holder.attn(x, x, x, **{name: torch.zeros(shape, dtype=torch.int64)})
        assert str(err.value) == f"{name} of dtype torch.int64: expected bool or floating point"

    tail = (
        ": expected packed self-attention as in open_clip's ResidualAttentionBlock; pass "
        "inject_lora a root (e.g. visual.transformer) that holds only supported attention modules"
    )
    only_bias_k = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    only_bias_k.bias_v = None
    for mha, what in (
        (
            nn.MultiheadAttention(8, 2, kdim=4, vdim=4),
            "separate q/k/v weights (kdim or vdim != embed_dim)",
        ),
        (nn.MultiheadAttention(8, 2, add_bias_kv=True), "add_bias_kv=True"),
        (only_bias_k, "add_bias_kv=True"),
        (nn.MultiheadAttention(8, 2, add_zero_attn=True), "add_zero_attn=True"),
    ):
        with pytest.raises(CdfslError) as err:
            LoRAMultiheadAttention(mha, LoRAConfig(rank=2))
        assert str(err.value) == f"nn.MultiheadAttention with {what}{tail}"


def _linear_root(config: LoRAConfig, seed: int = 0) -> nn.Module:
    """One fused q/k/v ``LoRALinear`` (8 -> 24) under a root: the smallest injected model."""
    torch.manual_seed(seed)
    return nn.ModuleDict({"proj": LoRALinear(nn.Linear(8, 24), qkv_slices(8), config)})


def test_seeded_dropout_streams_reach_every_adapter() -> None:
    """Two copies with the same seeds drop the same elements; other seeds drop others."""
    config = LoRAConfig(rank=2, dropout=0.5, num_adapters=2)
    roots = [_linear_root(config) for _ in range(3)]
    for root in roots:
        randomise(root)
        root.train()
    for root, seeds in zip(roots, ([3, 4], [3, 4], [3, 5]), strict=True):
        set_lora_dropout_seeds(root, seeds)
    x = torch.randn(4, 8)
    with torch.no_grad():
        out = [root.proj(x) for root in roots]
        plain = roots[0].proj.eval()(x)
    assert torch.equal(out[0], out[1])
    assert torch.equal(out[0][:2], out[2][:2]) and not torch.equal(out[0][2:], out[2][2:])
    assert not torch.equal(out[0], plain)


def test_project_splits_samples_on_dim_0_by_default() -> None:
    """``project(x)`` with E = 2 sets: rows 0-1 of x use set 0, rows 2-3 set 1 (by hand)."""
    root = _linear_root(LoRAConfig(rank=2, alpha=4.0, dropout=0.0, num_adapters=2))
    randomise(root)
    proj = root.proj.eval()
    x = torch.randn(4, 3, 8)
    with torch.no_grad():
        out = proj.project(x)
        for e in range(2):
            rows = x[2 * e : 2 * e + 2]
            expected = rows @ proj.weight.T + proj.bias
            for i, part in enumerate("qkv"):
                a, b = getattr(proj, part).lora_A[e], getattr(proj, part).lora_B[e]
                expected[..., 8 * i : 8 * (i + 1)] += 4.0 / math.sqrt(2) * rows @ a.T @ b.T
            torch.testing.assert_close(out[2 * e : 2 * e + 2], expected, atol=1e-6, rtol=1e-5)


def test_a_root_with_one_projection_saves_loads_and_counts_its_sets(tmp_path) -> None:
    root = _linear_root(LoRAConfig(rank=2, num_adapters=3))
    assert adapter_sets(root) == 3
    randomise(root)
    state = lora_state_dict(root, adapter_index=2)
    assert state["proj.q.lora_A"].shape == (1, 2, 8)
    torch.testing.assert_close(state["proj.q.lora_A"][0], root.proj.q.lora_A[2])
    save_lora(root, tmp_path / "a.safetensors")
    other = _linear_root(LoRAConfig(rank=2, num_adapters=3), seed=1)
    load_lora(other, tmp_path / "a.safetensors")
    for p, q in zip(lora_parameters(root), lora_parameters(other), strict=True):
        assert torch.equal(p, q)


def test_the_config_entry_is_sorted_json_in_uint8_bytes() -> None:
    """The saved config is readable by anything that reads JSON: UTF-8 bytes, keys sorted."""
    config = LoRAConfig(rank=2, alpha=3.0, targets=("q", "v"))
    entry = lora_state_dict(_linear_root(config))[LORA_CONFIG_KEY]
    assert entry.dtype == torch.uint8 and entry.dim() == 1
    text = bytes(entry.tolist()).decode("utf-8")
    assert text == (
        '{"alpha": 3.0, "dropout": 0.25, "num_adapters": 1, "rank": 2, "scaling": "rslora", '
        '"targets": ["q", "v"]}'
    )


def test_lora_messages_in_full(tmp_path) -> None:
    def message(call, *args, **kwargs) -> str:
        with pytest.raises(CdfslError) as err:
            call(*args, **kwargs)
        return str(err.value)

    two = _linear_root(LoRAConfig(rank=2, num_adapters=2))
    index_tail = "adapter_index=2: expected 0 <= adapter_index < num_adapters=2"
    assert message(lora_state_dict, two, adapter_index=2) == f"lora_state_dict {index_tail}"
    assert message(reset_lora, two, 0, adapter_index=2) == f"reset_lora {index_tail}"
    assert message(two.proj, torch.randn(3, 8)) == (
        "LoRA batch of 3 samples: expected a multiple of num_adapters=2 (one contiguous group "
        "per adapter set); pad or trim the batch to fit"
    )
    assert message(merge_lora, two) == (
        "merge_lora with num_adapters=2: expected 1, since one base weight can hold only one "
        "adapter set; export one set with lora_state_dict(root, adapter_index=e) into a "
        "single-adapter model and merge that"
    )
    one = _linear_root(LoRAConfig(rank=2))
    merge_lora(one)
    merged_tail = "on merged LoRA weights: expected unmerged; call unmerge_lora"
    assert message(reset_lora, one, 0) == f"reset_lora {merged_tail}"
    state = lora_state_dict(_linear_root(LoRAConfig(rank=2)))
    assert message(load_lora_state_dict, one, state) == f"load_lora_state_dict {merged_tail}"
    assert message(set_num_adapters, one, 2) == f"set_num_adapters {merged_tail}"
    unmerge_lora(one)

    assert message(lora_state_dict, nn.Sequential(nn.Linear(2, 2))) == (
        "Sequential has no LoRA adapters: expected a module passed to inject_lora; call "
        "inject_lora(root, config) first"
    )
    mixed = nn.ModuleDict({"a": one, "b": _linear_root(LoRAConfig(rank=4))})
    assert message(adapter_sets, mixed) == (
        "ModuleDict holds adapters injected with different configs: expected one config per "
        "root; save and load each injected subtree separately"
    )
    assert message(inject_lora, one, LoRAConfig()) == (
        "ModuleDict already holds LoRA adapters: expected a model without them; inject once, "
        "and use reset_lora to re-initialise"
    )

    garbled = {**state, LORA_CONFIG_KEY: torch.tensor(list(b"{not json"), dtype=torch.uint8)}
    assert message(load_lora_state_dict, one, garbled).startswith(
        f"LoRA state {LORA_CONFIG_KEY!r}: unreadable config ("
    )
    other = lora_state_dict(_linear_root(LoRAConfig(rank=2, alpha=4.0, scaling="standard")))
    assert message(load_lora_state_dict, one, other) == (
        "LoRA state saved with alpha=4.0 (model has 8.0), scaling='standard' (model has "
        "'rslora'): expected the injected config; inject_lora with the config the adapters "
        "were trained with"
    )
    # Dropout is a training setting, not part of what the weights mean: it may differ.
    load_lora_state_dict(one, lora_state_dict(_linear_root(LoRAConfig(rank=2, dropout=0.5))))

    keys = sorted(k for k in state if k != LORA_CONFIG_KEY)
    fix = "expected exactly the adapters of this model; inject_lora with the same targets and root"
    three_missing = {k: v for k, v in state.items() if k not in keys[:3]}
    assert message(load_lora_state_dict, one, three_missing) == (
        f"LoRA state with missing keys {keys[:3]} and unexpected keys []: {fix}"
    )
    four_missing = {k: v for k, v in state.items() if k not in keys[:4]}
    extra = {f"x{i}.lora_A": state[keys[0]] for i in range(4)}
    assert message(load_lora_state_dict, one, {**four_missing, **extra}) == (
        f"LoRA state with missing keys {keys[:3]}... and unexpected keys "
        f"{sorted(extra)[:3]}...: {fix}"
    )
    three_extra = {f"x{i}.lora_A": state[keys[0]] for i in range(3)}
    assert message(load_lora_state_dict, one, {**state, **three_extra}) == (
        f"LoRA state with missing keys [] and unexpected keys {sorted(three_extra)}: {fix}"
    )
    wrong = {**state, keys[0]: state[keys[0]][:, :1]}
    assert message(load_lora_state_dict, one, wrong) == (
        f"LoRA state {keys[0]!r} of shape {tuple(wrong[keys[0]].shape)}: expected "
        f"{tuple(state[keys[0]].shape)}; inject_lora with the rank and num_adapters of the save"
    )
    missing_file = tmp_path / "none.safetensors"
    assert message(load_lora, one, missing_file) == (
        f"LoRA file {str(missing_file)!r} does not exist: expected a file from save_lora"
    )
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    text = message(load_lora, one, junk)
    assert text.startswith(f"LoRA file {str(junk)!r} is not a readable safetensors file (")
    assert text.endswith("); expected a file written by save_lora")


def test_set_num_adapters_gives_every_adapter_fresh_sets() -> None:
    root = _linear_root(LoRAConfig(rank=2))
    mark_only_lora_trainable(root)
    set_lora_dropout_seeds(root, [1])
    old = lora_parameters(root)
    set_num_adapters(root, 3)
    assert adapter_sets(root) == 3 and root.proj.config.num_adapters == 3
    for adapter in root.proj.adapters():
        assert adapter.num_adapters == 3 and adapter.streams is None
        assert adapter.lora_A.shape == (3, 2, 8) and adapter.lora_B.shape == (3, 8, 2)
        assert torch.count_nonzero(adapter.lora_B) == 0 and adapter.lora_A.abs().sum() > 0
        assert adapter.lora_A.requires_grad and adapter.lora_B.requires_grad
    assert not {id(p) for p in old} & {id(p) for p in lora_parameters(root)}
    assert root.proj.weight.requires_grad is False


def test_dropout_seeds_are_one_shared_stream_per_set() -> None:
    root = _linear_root(LoRAConfig(rank=2, num_adapters=2))
    set_lora_dropout_seeds(root, [5, 6])
    streams = {id(a.streams) for a in root.proj.adapters()}
    assert len(streams) == 1 and root.proj.q.streams.seeds == [5, 6]
    set_lora_dropout_seeds(root, None)
    assert all(a.streams is None for a in root.proj.adapters())
    with pytest.raises(CdfslError) as err:
        set_lora_dropout_seeds(root, [5])
    assert str(err.value) == "set_lora_dropout_seeds with 1 seeds: expected num_adapters=2"


@pytest.mark.parametrize("as_tensor", [False, True])
def test_zero_set_gradients_zeroes_exactly_the_sets_named(as_tensor: bool) -> None:
    root = _linear_root(LoRAConfig(rank=2, num_adapters=3, targets=("q", "v")))
    grads = {}
    for p in lora_parameters(root):
        p.grad = torch.randn(p.shape)
        grads[id(p)] = p.grad.clone()
    root.proj.v.lora_B.grad = None  # a parameter without a gradient is skipped
    sets = torch.tensor([True, False, True]) if as_tensor else [0, 2]
    zero_set_gradients(root, sets)
    for p in lora_parameters(root):
        if p.grad is None:
            continue
        assert torch.count_nonzero(p.grad[0]) == 0 and torch.count_nonzero(p.grad[2]) == 0
        assert torch.equal(p.grad[1], grads[id(p)][1])


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("tying", ["self", "key_is_value", "distinct"])
def test_attention_with_two_sets_gives_each_sample_group_its_own_update(batch_first, tying):
    """E = 2: samples 0-1 see set 0 merged by hand, samples 2-3 set 1, in either layout."""
    torch.manual_seed(13)
    n, length, d, heads = 4, 3, 8, 2
    mha = nn.MultiheadAttention(d, heads, batch_first=batch_first).double()
    holder = nn.ModuleDict({"attn": copy.deepcopy(mha)})
    inject_lora(holder, LoRAConfig(rank=2, alpha=3.0, dropout=0.0, num_adapters=2))
    randomise(holder, std=0.3)
    ours = holder.attn.eval()
    dim = 0 if batch_first else 1

    def batch(rows: int) -> torch.Tensor:
        x = torch.randn(n, rows, d, dtype=torch.float64)
        return x if batch_first else x.transpose(0, 1)

    query = batch(length)
    key = query if tying == "self" else batch(length + 1)
    value = key if tying in ("self", "key_is_value") else batch(length + 1)
    out, _ = ours(query, key, value)
    for e in range(2):
        single = nn.ModuleDict({"attn": copy.deepcopy(mha)})
        inject_lora(single, LoRAConfig(rank=2, alpha=3.0, dropout=0.0))
        load_lora_state_dict(single, lora_state_dict(holder, adapter_index=e))
        reference = _merged_reference(mha, single.attn).eval()
        rows = slice(2 * e, 2 * e + 2)
        q, k, v = (t.narrow(dim, 2 * e, 2) for t in (query, key, value))
        expected = reference(q, k, v, need_weights=False)[0]
        got = out[rows] if batch_first else out[:, rows]
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_attention_dropout_acts_in_training_as_torchs() -> None:
    """With B = 0, a training step draws the same attention dropout as torch's MHA."""
    mha = nn.MultiheadAttention(8, 2, dropout=0.5)
    holder = nn.ModuleDict({"attn": copy.deepcopy(mha)})
    inject_lora(holder, LoRAConfig(rank=2, dropout=0.0))
    x = torch.randn(5, 3, 8)
    for module in (mha, holder.attn):
        module.train()
    torch.manual_seed(3)
    expected = mha(x, x, x, need_weights=False)[0]
    torch.manual_seed(3)
    trained = holder.attn(x, x, x)[0]
    assert torch.equal(trained, expected)
    assert not torch.allclose(trained, holder.attn.eval()(x, x, x)[0])


def test_an_adapter_groups_samples_on_the_dimension_asked_for() -> None:
    """``adapter(x, batch_dim)`` and ``LoRALinear(batch_dim=1)`` with E = 2, by hand; the
    defaults group on dim 0, and ``delta_weight()`` is set 0's."""
    config = LoRAConfig(rank=2, alpha=2.0, dropout=0.0, num_adapters=2)
    adapter = LoRAAdapter(6, 0, 6, config).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        adapter.lora_A.copy_(torch.randn(adapter.lora_A.shape, generator=g))
        adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g))

    def by_hand(x: torch.Tensor, e: int) -> torch.Tensor:
        return config.scale * x @ adapter.lora_A[e].T @ adapter.lora_B[e].T

    x = torch.randn(4, 4, 6, generator=g)
    with torch.no_grad():
        default, on_dim_1 = adapter(x), adapter(x, batch_dim=1)
        assert adapter.grouped(x).shape == (2, 2, 4, 6)
        torch.testing.assert_close(adapter.grouped(x)[1], x[2:])
        for e in range(2):
            torch.testing.assert_close(default[2 * e : 2 * e + 2], by_hand(x[2 * e : 2 * e + 2], e))
        torch.testing.assert_close(on_dim_1[:, :2], by_hand(x[:, :2], 0))
        torch.testing.assert_close(on_dim_1[:, 2:], by_hand(x[:, 2:], 1))
        torch.testing.assert_close(
            adapter.delta_weight(), config.scale * adapter.lora_B[0] @ adapter.lora_A[0]
        )
        grouped = adapter.grouped_update(x)
        assert grouped.shape == (2, 2, 4, 6)
        torch.testing.assert_close(grouped[1], by_hand(x[2:], 1))

        linear = LoRALinear(nn.Linear(6, 18), qkv_slices(6), config, batch_dim=1).eval()
        randomise(linear)
        y = torch.randn(3, 4, 6, generator=g)  # (L, N, in): samples on dim 1
        out = linear(y)
        for e in range(2):
            cols = y[:, 2 * e : 2 * e + 2]
            expected = cols @ linear.weight.T + linear.bias
            for i, part in enumerate("qkv"):
                a, b = getattr(linear, part).lora_A[e], getattr(linear, part).lora_B[e]
                expected[..., 6 * i : 6 * (i + 1)] += config.scale * cols @ a.T @ b.T
            torch.testing.assert_close(out[:, 2 * e : 2 * e + 2], expected)


def test_lora_config_bounds_and_messages() -> None:
    LoRAConfig(rank=1, alpha=0.5, num_adapters=1)  # the smallest accepted values
    cases = {
        (("rank", 2.5),): "LoRAConfig.rank=2.5: expected an integer >= 1 (e.g. 16)",
        (("rank", True),): "LoRAConfig.rank=True: expected an integer >= 1 (e.g. 16)",
        (("rank", 0),): "LoRAConfig.rank=0: expected an integer >= 1 (e.g. 16)",
        (("alpha", 0.0),): "LoRAConfig.alpha=0.0: expected a number > 0 (e.g. 8)",
        (("num_adapters", 1.5),): "LoRAConfig.num_adapters=1.5: expected an integer >= 1",
        (("num_adapters", True),): "LoRAConfig.num_adapters=True: expected an integer >= 1",
        (("scaling", "sqrt"),): "LoRAConfig.scaling='sqrt': expected one of ('rslora', "
        "'standard') ('rslora' = alpha/sqrt(rank), 'standard' = alpha/rank)",
    }
    for items, expected in cases.items():
        with pytest.raises(CdfslError) as err:
            LoRAConfig(**dict(items))
        assert str(err.value) == expected


def test_initial_a_is_kaiming_uniform_and_adapters_stay_fp32() -> None:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform, a = sqrt(5)) by a KS distance, fp32
    even when torch's default dtype is float64; B = 0."""
    torch.set_default_dtype(torch.float64)
    try:
        adapter = LoRAAdapter(1024, 0, 8, LoRAConfig(rank=64))
    finally:
        torch.set_default_dtype(torch.float32)
    assert adapter.lora_A.dtype == torch.float32 and adapter.lora_B.dtype == torch.float32
    values = adapter.lora_A.detach().flatten().double().sort().values
    bound = 1 / math.sqrt(1024)
    cdf = ((values + bound) / (2 * bound)).clamp(0, 1)
    ranks = torch.arange(1, values.numel() + 1, dtype=torch.float64) / values.numel()
    ks = max((ranks - cdf).abs().max().item(), (cdf - (ranks - 1 / values.numel())).abs().max())
    assert ks < 1.63 / math.sqrt(values.numel())  # the 1% critical value
    assert values.abs().max() <= bound and torch.count_nonzero(adapter.lora_B) == 0


def test_dropout_masks_are_the_16_bit_draws_below_p() -> None:
    """Element i of a group is dropped iff its 16-bit draw u (as an unsigned fraction of
    65536) is below p, read from the stream's words: exact for a million draws."""
    for p in (0.75, 0.1):
        dropout = LoRADropout(p).train()
        numel = 1 << 20
        out = dropout(torch.ones(1, numel), DropoutStreams([9]))
        words = dropout_words(DropoutStreams([9]), numel // 4, torch.device("cpu"))
        u = (words.view(torch.int16)[0].long() + 32768).double() / 65536
        assert torch.equal(out[0] == 0, u < round(p * 65536) / 65536)


def test_dropout_draws_on_the_inputs_device(monkeypatch) -> None:
    """Keys, Weyl offsets and masks are made where the input lives (meta stands in for a GPU)."""
    import cdfsl.lora as lora

    monkeypatch.setattr(lora, "_WEYL", {})  # offsets are cached per process: make them here
    dropout = LoRADropout(0.5).train()
    out = dropout(torch.ones(2, 9, device="meta"), DropoutStreams([1, 2]))
    assert out.device.type == "meta" and out.shape == (2, 9)


def test_weyl_offsets_are_multiples_of_gamma_when_fresh_and_cached(monkeypatch) -> None:
    import cdfsl.lora as lora

    monkeypatch.setattr(lora, "_WEYL", {})
    gamma = 0x9E3779B97F4A7C15
    for words in (5, 3, 5):
        expected = [
            ((i * gamma) % 2**64) - (2**64 if (i * gamma) % 2**64 >> 63 else 0)
            for i in range(words)
        ]
        got = lora._weyl(DropoutStreams([0]), words, torch.device("cpu"))
        assert got.dtype == torch.int64 and got.tolist() == expected
        # A compiled graph's (product with the streams' gamma tensor, uncached): the same.
        with monkeypatch.context() as compiling:
            compiling.setattr(torch.compiler, "is_compiling", lambda: True)
            inline = lora._weyl(DropoutStreams([0]), words, torch.device("cpu"))
        assert inline.tolist() == expected
    for words in range(100):
        lora._weyl(DropoutStreams([0]), words + 10, torch.device("cpu"))
    assert len(lora._WEYL) <= 65  # bounded


def test_int16_draws_are_each_words_fields_low_bits_first(monkeypatch) -> None:
    """Eager (a dtype view) and compiled (shifted fields) draws: each equals the word's 16-bit
    field j, read as a signed int16, at position 4 i + j; extremes included."""
    import cdfsl.lora as lora

    words = torch.tensor(
        [[0, -1, 2**63 - 1, -(2**63)], [0x7FFF_8000_0001_FFFF, 0x0123_4567_89AB_CDEF, 5, -6]]
    )
    want = [
        [((w >> (16 * j)) & 0xFFFF) - (0x10000 if (w >> (16 * j)) & 0x8000 else 0) for w in row
         for j in range(4)]
        for row in words.tolist()
    ]  # fmt: skip
    assert lora.int16_draws(words).tolist() == want
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    fields = lora.int16_draws(words)
    assert fields.dtype == torch.int16 and fields.tolist() == want


def test_dropout_masks_of_the_compiled_branch_are_the_eager_ones(monkeypatch) -> None:
    """What a compiled graph computes (its Weyl products from the streams' gamma tensor, its
    int16 fields shifted out), run eagerly: the masks of the eager branch, call after call."""
    dropout = LoRADropout(0.25).train()
    ones = torch.ones(3, 7, 9)
    eager_streams, graph_streams = DropoutStreams([4, 5, 6]), DropoutStreams([4, 5, 6])
    eager = [dropout(ones, eager_streams) for _ in range(3)]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    graph = [dropout(ones, graph_streams) for _ in range(3)]
    for want, got in zip(eager, graph, strict=True):
        assert torch.equal(want, got)
    assert graph_streams.calls == 3


def test_merging_adds_no_state_dict_key_and_save_writes_pt_metadata(tmp_path) -> None:
    from safetensors import safe_open

    root = _linear_root(LoRAConfig(rank=2))
    keys = set(root.state_dict())
    merge_lora(root)
    assert set(root.state_dict()) == keys
    unmerge_lora(root)
    save_lora(root, tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}  # what transformers / peft loaders check


def test_inject_lora_refusals_in_full() -> None:
    with pytest.raises(CdfslError) as err:
        inject_lora(nn.MultiheadAttention(8, 2), LoRAConfig())
    assert str(err.value) == (
        "root is itself a MultiheadAttention: expected a module containing it, since "
        "inject_lora replaces modules in their parent; pass the parent module"
    )
    with pytest.raises(CdfslError) as err:
        inject_lora(nn.Sequential(nn.Linear(2, 2)), LoRAConfig())
    supported = ", ".join(sorted(t.__name__ for t in LAYOUT_HANDLERS))
    assert "AttentionRope, EvaAttention, MultiheadAttention" in supported
    assert str(err.value) == (
        f"Sequential has no attention module LoRA can adapt: expected one of ({supported}); "
        "pass the vision tower (e.g. model.visual) or register a layout handler"
    )


def test_a_seed_gives_the_same_initial_a_whatever_the_default_dtype() -> None:
    adapters_by_dtype = []
    for dtype in (torch.float32, torch.float64):
        torch.set_default_dtype(dtype)
        try:
            root = _linear_root(LoRAConfig(rank=2))
            reset_lora(root, seed=3)
        finally:
            torch.set_default_dtype(torch.float32)
        adapters_by_dtype.append(root.proj.q.lora_A.detach().clone())
    assert torch.equal(*adapters_by_dtype)


def test_dropout_refuses_a_stream_count_other_than_the_groups() -> None:
    with pytest.raises(CdfslError) as err:
        LoRADropout(0.5).train()(torch.ones(3, 4), DropoutStreams([1, 2]))
    assert str(err.value) == (
        "LoRA dropout with 2 streams for 3 adapter groups: expected one per group; call "
        "set_lora_dropout_seeds with num_adapters seeds"
    )


def test_a_batch_first_attention_step_copies_only_the_update_and_one_gradient():
    """Forward and backward of a batch-first LoRA attention (two adapter sets, dropout on) copy
    at most the q/k/v update once (joining the base output) and the q/k/v gradient once
    (assembling the heads), plus the adapters' own gradients: no copy for the transposed
    layout, the dropout or the in-place update that autograd would copy per adapter."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        elements = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            mask_cast = func.__name__.startswith("_to_copy") and args[0].dtype == torch.bool
            if func.__name__.split(".")[0] in ("copy_", "clone", "cat", "_to_copy", "contiguous"):
                # The dropout mask made a factor in x's dtype is a new tensor, not a copy of x.
                self.elements += 0 if mask_cast else out.numel()
            return out

    torch.manual_seed(0)
    n, length, dim = 6, 5, 16
    mha = nn.MultiheadAttention(dim, 2, batch_first=True)
    attn = LoRAMultiheadAttention(mha, LoRAConfig(rank=2, num_adapters=2, dropout=0.25)).train()
    set_lora_dropout_seeds(attn, [1, 2])
    x = torch.randn(n, length, dim, requires_grad=True)
    with Copies() as copies:
        out, _ = attn(x, x, x, need_weights=False)
        out.square().sum().backward()
    adapters = sum(p.numel() for p in lora_parameters(attn))
    assert copies.elements <= 2 * n * length * 3 * dim + adapters, copies.elements
