"""LoRA on timm's attention layouts: fused ``qkv`` (Attention, AttentionRope) and separate q/k/v."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import open_clip
import pytest
import torch
from open_clip.timm_model import TimmModel
from timm.layers import Attention, AttentionRope
from timm.models.eva import EvaAttention
from torch import nn

from cdfsl.backbones import list_backbones
from cdfsl.errors import CdfslError
from cdfsl.lora import (
    LAYOUT_HANDLERS,
    LoRAAdapter,
    LoRAConfig,
    LoRALinear,
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
    unmerge_lora,
)

DIM, HEADS = 32, 4

# name -> (constructor, fused): every attention layout the open_clip timm towers use.
LAYOUTS: dict[str, tuple[Callable[[], nn.Module], bool]] = {
    "attention": (lambda: Attention(DIM, HEADS, qkv_bias=True), True),  # SigLIP, SigLIP2
    "attention_rope": (lambda: AttentionRope(DIM, HEADS), True),  # PE-Core
    "attention_rope_separate_gqa": (
        lambda: AttentionRope(DIM, HEADS, qkv_fused=False, num_kv_heads=2),
        False,
    ),
    "eva_separate": (  # EVA02
        lambda: EvaAttention(DIM, HEADS, qkv_fused=False, norm_layer=nn.LayerNorm),
        False,
    ),
    "eva_fused_no_bias": (
        lambda: EvaAttention(DIM, HEADS, qkv_bias=False, norm_layer=nn.LayerNorm),
        True,
    ),
    "eva_fused_bias_separate": (
        lambda: EvaAttention(DIM, HEADS, qkv_bias_separate=True, norm_layer=nn.LayerNorm),
        True,
    ),
}


def stack(layout: str, blocks: int = 2) -> nn.Module:
    """``blocks`` attention modules of one layout in a row, with random biases, seeded."""
    torch.manual_seed(0)
    make, _ = LAYOUTS[layout]
    model = nn.Sequential(*(make() for _ in range(blocks)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # EvaAttention zero-initialises q/v biases
                p.normal_()
    return model


def randomise(root: nn.Module, seed: int = 2, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(root):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def tokens(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 6, DIM, generator=torch.Generator().manual_seed(1))


def projections(module: nn.Module) -> dict[str, nn.Module]:
    """The q/k/v projection modules of a timm attention module, fused or separate."""
    if getattr(module, "qkv", None) is not None:
        return {"qkv": module.qkv}
    return {f"{p}_proj": getattr(module, f"{p}_proj") for p in "qkv"}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("targets", [("q", "k", "v"), ("q", "v")])
def test_injection_names_keys_and_untouched_original(layout: str, targets) -> None:
    model = stack(layout)
    original = model[0]
    original_projections = projections(original)
    keys = model.state_dict()
    names = inject_lora(model, LoRAConfig(rank=4, targets=targets))

    fused = LAYOUTS[layout][1]
    per_block = [f"qkv.{t}" if fused else f"{t}_proj.{t}" for t in targets]
    assert names == [f"{i}.{n}" for i in range(2) for n in per_block]
    assert len([m for m in model.modules() if isinstance(m, LoRAAdapter)]) == 2 * len(targets)
    # The timm module stays (its forward, RoPE and norms are reused); only projections change.
    assert type(model[0]) is type(original) and model[0] is not original
    assert projections(original) == original_projections  # a handler never edits in place
    for name, proj in projections(model[0]).items():
        adapted = fused or name[0] in targets
        assert isinstance(proj, LoRALinear) is adapted
        if adapted:
            assert proj.weight is original_projections[name].weight
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in keys.items())  # base checkpoints still load
    assert set(state) - set(keys) == {f"{n}.lora_{m}" for n in names for m in "AB"}
    proj_out = model[0].attn_dim if hasattr(model[0], "attn_dim") else DIM
    a = next(m for m in model.modules() if isinstance(m, LoRAAdapter))
    assert a.lora_A.shape == (1, 4, DIM) and a.lora_B.shape[1] in (proj_out, proj_out // 2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero_b_is_bit_exact_with_dropout(layout: str) -> None:
    base = stack(layout)
    model = copy.deepcopy(base)
    inject_lora(model, LoRAConfig(rank=4, dropout=0.5))
    for train in (True, False):
        base.train(train)
        model.train(train)
        assert torch.equal(model(tokens()), base(tokens()))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_projection_update_matches_the_formula(layout: str) -> None:
    base = stack(layout)
    model = copy.deepcopy(base)
    inject_lora(model, LoRAConfig(rank=4, alpha=3.0, targets=("q", "v")))
    randomise(model)
    model.eval()
    x = tokens()
    scale = 3.0 / math.sqrt(4)
    with torch.no_grad():
        for name, proj in projections(model[0]).items():
            delta = proj(x) - projections(base[0])[name](x)
            expected = torch.zeros_like(delta)
            for adapter in proj.adapters() if isinstance(proj, LoRALinear) else ():
                a, b = adapter.lora_A[0], adapter.lora_B[0]
                expected[..., adapter.start : adapter.stop] = scale * x @ a.T @ b.T
            torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-5)
            if name == "qkv":  # k rows carry no update
                rows = delta.shape[-1] // 3
                assert torch.count_nonzero(delta[..., rows : 2 * rows]) == 0
        # ... and the update reaches the attention output.
        assert not torch.allclose(model(x), base(x))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_only_adapters_get_gradients(layout: str) -> None:
    model = stack(layout)
    inject_lora(model, LoRAConfig(rank=4))
    randomise(model)
    mark_only_lora_trainable(model)
    model.train()
    model(tokens()).square().sum().backward()
    lora_ids = {id(p) for p in lora_parameters(model)}
    assert len(lora_ids) == 2 * 2 * 3
    for name, p in model.named_parameters():
        if id(p) in lora_ids:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_merge_equals_unmerged_and_unmerge_restores(layout: str) -> None:
    model = stack(layout)
    inject_lora(model, LoRAConfig(rank=4))
    randomise(model)
    model.eval()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" not in n}
    x = tokens()
    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)
        merged = model(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)
    unmerge_lora(model)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)
    with torch.no_grad():
        assert torch.equal(model(x), unmerged)


@pytest.mark.parametrize("layout", ["attention", "attention_rope_separate_gqa"])
def test_reset_save_load_and_adapter_sets(layout: str, tmp_path) -> None:
    model = stack(layout)
    inject_lora(model, LoRAConfig(rank=4))
    randomise(model)
    model.eval()
    save_lora(model, tmp_path / "a.safetensors")
    fresh = stack(layout).eval()
    inject_lora(fresh, LoRAConfig(rank=4))
    load_lora(fresh, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(tokens()), model(tokens()))
    reset_lora(fresh, seed=3)
    assert all(torch.count_nonzero(p) == 0 for n, p in fresh.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        assert torch.equal(fresh(tokens()), stack(layout).eval()(tokens()))

    # Two adapter sets side by side: samples 0-1 use set 0, samples 2-3 set 1.
    pair = stack(layout).eval()
    inject_lora(pair, LoRAConfig(rank=4, num_adapters=2))
    randomise(pair)
    with torch.no_grad():
        together = pair(tokens())
        for e in range(2):
            single = stack(layout).eval()
            inject_lora(single, LoRAConfig(rank=4))
            load_lora_state_dict(single, lora_state_dict(pair, adapter_index=e))
            alone = single(tokens()[2 * e : 2 * e + 2])
            torch.testing.assert_close(together[2 * e : 2 * e + 2], alone, atol=1e-5, rtol=1e-5)


def test_bypassed_fused_qkv_is_refused_and_a_failed_injection_changes_nothing() -> None:
    # EvaAttention with q/v biases calls F.linear(x, qkv.weight) itself: adapters would be dead.
    model = nn.Sequential(Attention(DIM, HEADS), EvaAttention(DIM, HEADS, norm_layer=nn.LayerNorm))
    first = model[0]
    with pytest.raises(CdfslError, match="qkv_bias_separate=True or qkv_fused=False"):
        inject_lora(model, LoRAConfig(rank=4))
    assert model[0] is first and type(first.qkv) is nn.Linear
    assert not any(isinstance(m, LoRAAdapter) for m in model.modules())


def _family_rows() -> list[str]:
    # local-dir rows (micro-clip) keep their config beside their weights, which may be absent.
    rows = [e.model for e in list_backbones() if not e.model.startswith("local-dir:")]
    return sorted(
        m
        for m in rows
        if "timm_model_name" in (open_clip.get_model_config(m) or {}).get("vision_cfg", {})
    )


@pytest.mark.parametrize("model_name", _family_rows())
def test_every_registered_timm_tower_gets_qkv_lora_on_every_block(model_name: str) -> None:
    # The real open_clip configs of the registry rows, built on the meta device (no memory, no
    # weights): each block's attention is adapted, the MAP pooling head is left alone.
    cfg = open_clip.get_model_config(model_name)
    vision = cfg["vision_cfg"]
    with torch.device("meta"):
        tower = TimmModel(
            vision["timm_model_name"],
            cfg["embed_dim"],
            image_size=vision["image_size"],
            pool=vision["timm_pool"],
            proj=vision["timm_proj"],
        )
    names = inject_lora(tower, LoRAConfig())
    depth = len(tower.trunk.blocks)
    assert depth >= 2
    assert names == [f"trunk.blocks.{i}.attn.qkv.{p}" for i in range(depth) for p in "qkv"]
    assert not any(isinstance(m, LoRAAdapter) for m in tower.trunk.attn_pool.modules())


# -- mutation follow-up (issue 23): refusals in full, a layout registered by a user ---------------


def test_timm_layouts_without_projections_are_refused_in_full() -> None:
    broken = AttentionRope(DIM, HEADS, qkv_fused=False)
    del broken.qkv, broken.k_proj  # attributes absent altogether are as missing as wrong ones
    broken.v_proj = nn.Identity()
    with pytest.raises(CdfslError) as err:
        inject_lora(nn.Sequential(broken), LoRAConfig(rank=4))
    assert str(err.value) == (
        "AttentionRope has no nn.Linear k_proj, v_proj and no fused qkv: expected timm's fused "
        "or separate q/k/v projections; register a layout handler"
    )
    with pytest.raises(CdfslError) as err:
        inject_lora(nn.Sequential(EvaAttention(DIM, HEADS, norm_layer=nn.LayerNorm)), LoRAConfig())
    assert str(err.value) == (
        "EvaAttention with separate q/v biases and a fused qkv Linear bypasses qkv.forward: "
        "expected qkv_bias_separate=True or qkv_fused=False; build the timm model with one of "
        "them or register a layout handler for it"
    )


def test_a_layout_of_ones_own_is_one_registered_handler() -> None:
    class _OwnAttention(nn.Module):  # a new type per call: the registry outlives the test
        """A layout no handler knows: one fused q/k/v Linear called ``to_qkv``."""

        def __init__(self) -> None:
            super().__init__()
            self.to_qkv = nn.Linear(DIM, 3 * DIM)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.to_qkv(x)

    model = nn.Sequential(_OwnAttention())
    with pytest.raises(CdfslError, match="has no attention module LoRA can adapt"):
        inject_lora(copy.deepcopy(model), LoRAConfig(rank=4))

    @LAYOUT_HANDLERS.register(_OwnAttention)
    def _own(module: nn.Module, config: LoRAConfig) -> nn.Module:
        module.to_qkv = LoRALinear(module.to_qkv, qkv_slices(DIM), config)
        return module

    assert LAYOUT_HANDLERS[_OwnAttention] is _own
    names = inject_lora(model, LoRAConfig(rank=4))
    assert names == ["0.to_qkv.q", "0.to_qkv.k", "0.to_qkv.v"]
    assert isinstance(model[0].to_qkv, LoRALinear)
