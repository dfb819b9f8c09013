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
    LORA_CONFIG_KEY,
    DropoutStreams,
    LoRAAdapter,
    LoRAConfig,
    LoRADropout,
    LoRALinear,
    LoRAMultiheadAttention,
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
    splitmix64,
    unmerge_lora,
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
