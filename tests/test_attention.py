"""The LoRA attention's kernels (SDPA, explicit ops) and which one runs per device and dtype."""

from __future__ import annotations

import math

import pytest
import torch
from timm.layers import Attention, AttentionRope
from timm.models.eva import EvaAttention
from torch import nn

from cdfsl.attention import (
    ATTENTION_KERNELS,
    attention_kernel_in,
    explicit_attention,
    resolve_attention_kernel,
    set_attention_kernel,
)
from cdfsl.engine import FitConfig
from cdfsl.errors import CdfslError
from cdfsl.lora import LoRAConfig, LoRAMultiheadAttention, inject_lora

KERNELS = sorted(ATTENTION_KERNELS)


def attention_by_hand(q, k, v, keep=None, bias=None):
    """Float64 attention, one query row at a time: w_j = exp(s_j - max s) / Σ exp(s - max s)."""
    n, heads, length, d = q.shape
    out = torch.zeros(n, heads, length, v.shape[-1], dtype=torch.float64)
    for b in range(n):
        for h in range(heads):
            for i in range(length):
                s = [float(q[b, h, i] @ k[b, h, j]) / math.sqrt(d) for j in range(k.shape[2])]
                if bias is not None:
                    s = [x + float(bias[i, j]) for j, x in enumerate(s)]
                if keep is not None:
                    s = [x if bool(keep[i, j]) else -math.inf for j, x in enumerate(s)]
                top = max(s)
                e = [math.exp(x - top) for x in s]
                out[b, h, i] = sum(w / sum(e) * v[b, h, j] for j, w in enumerate(e))
    return out


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mask", ["none", "bool", "float", "causal"])
def test_each_kernel_computes_softmax_attention(kernel, mask):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    keep = bias = attn_mask = None
    if mask == "bool":
        keep = torch.rand(5, 5, generator=g) > 0.4
        keep[:, 0] = True  # every query sees a key
        attn_mask = keep
    elif mask == "float":
        bias = torch.randn(5, 5, generator=g, dtype=torch.float64)
        attn_mask = bias
    elif mask == "causal":
        keep = torch.ones(5, 5, dtype=torch.bool).tril()
    expected = attention_by_hand(q, k, v, keep, bias)
    fn = ATTENTION_KERNELS[kernel].fn
    got = fn(q, k, v, attn_mask, 0.0, mask == "causal")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_explicit_attention_takes_sdpas_defaults_shapes_and_devices():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    by_hand = attention_by_hand(*(t.unsqueeze(1) for t in (q, k, v))).squeeze(1)
    torch.testing.assert_close(explicit_attention(q, k, v), by_hand)  # no mask, no dropout
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    by_hand = attention_by_hand(*(t.unsqueeze(1) for t in (q, k, v)), keep=causal).squeeze(1)
    torch.testing.assert_close(explicit_attention(q, k, v, is_causal=True), by_hand)  # (N, L, d)
    # The causal mask is made on the inputs' device (meta here: only shapes, no CPU tensor).
    meta = [t.to("meta") for t in (q, k, v)]
    assert explicit_attention(*meta, is_causal=True).device.type == "meta"


def test_explicit_dropout_drops_single_weights_and_rescales_the_rest():
    # v = I: the output rows are the attention weights themselves, each kept / (1 - p) or 0.
    torch.manual_seed(0)
    length, p = 64, 0.25
    q, k = torch.randn(2, 1, 2, length, 8, dtype=torch.float64).unbind(0)
    v = torch.eye(length, dtype=torch.float64).expand(1, 1, -1, -1)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), -1)
    got = explicit_attention(q, k, v, dropout_p=p)
    dropped = got == 0
    torch.testing.assert_close(got[~dropped], weights[~dropped] / (1 - p))
    rate = dropped.double().mean().item()
    assert 0.2 < rate < 0.3, rate  # 4096 draws: p ± 5 standard deviations
    assert dropped.any(-1).all() and (~dropped).any(-1).all()  # every row drops and keeps some


def test_auto_picks_explicit_only_for_bf16_on_a_cpu():
    assert resolve_attention_kernel("auto", "cpu", torch.bfloat16) == "explicit"
    assert resolve_attention_kernel("auto", "cpu", torch.float32) == "sdpa"
    assert resolve_attention_kernel("auto", "cuda", torch.bfloat16) == "sdpa"
    for kernel in KERNELS:  # a named kernel runs everywhere
        assert resolve_attention_kernel(kernel, "cpu", torch.bfloat16) == kernel
        assert resolve_attention_kernel(kernel, "cuda", torch.float32) == kernel
    with pytest.raises(CdfslError) as err:
        resolve_attention_kernel("flash", "cpu", torch.float32)
    assert str(err.value) == (
        "attention='flash': expected one of auto, explicit, sdpa; fix --attention"
    )


def lora_mha(batch_first: bool = True) -> LoRAMultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=batch_first)
    layer = LoRAMultiheadAttention(mha, LoRAConfig(rank=2, dropout=0.0))
    for adapter in layer.adapters():
        nn.init.normal_(adapter.lora_B, std=0.1)
    return layer


def test_lora_attention_runs_the_kernel_its_setting_picks(attention_calls):
    calls = attention_calls
    layer = lora_mha()
    x = torch.randn(3, 5, 16)
    layer(x, x, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x, x, x)
    assert calls == ["sdpa", "explicit"]
    calls.clear()
    with attention_kernel_in(layer, "sdpa"), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x, x, x)
    with attention_kernel_in(layer, "explicit"):
        layer(x, x, x)
    layer(x, x, x)  # the setting is back to auto: fp32 runs SDPA
    assert calls == ["sdpa", "explicit", "sdpa"]
    assert layer.attention_kernel == "auto"


@pytest.mark.parametrize("batch_first", [True, False])
def test_lora_attention_kernels_agree_forward_and_backward(batch_first):
    layer = lora_mha(batch_first)
    x = torch.randn(3, 5, 16)  # 3 samples of 5 tokens
    x = x if batch_first else x.transpose(0, 1).contiguous()
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[:, -1] = True  # the last key hidden
    results = {}
    for kernel in KERNELS:
        set_attention_kernel(layer, kernel)
        layer.zero_grad()
        out, _ = layer(x, x, x, attn_mask=mask)
        out.square().sum().backward()
        results[kernel] = [out, *(a.lora_B.grad for a in layer.adapters())]
    for got, expected in zip(results["explicit"], results["sdpa"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


TIMM = {
    "attention": lambda: Attention(16, 2, qkv_bias=True),
    "attention_rope": lambda: AttentionRope(16, 2),
    "eva_separate": lambda: EvaAttention(16, 2, qkv_fused=False, norm_layer=nn.LayerNorm),
}


@pytest.mark.parametrize("layout", sorted(TIMM))
def test_timm_attention_with_lora_runs_the_kernel_its_setting_picks(layout, attention_calls):
    torch.manual_seed(0)
    root = nn.Sequential(TIMM[layout]())
    inject_lora(root, LoRAConfig(rank=2, dropout=0.0))
    attention = root[0]
    x = torch.randn(3, 5, 16)
    out = {}
    for setting, autocast in [("auto", False), ("auto", True), ("sdpa", True), ("explicit", False)]:
        set_attention_kernel(root, setting)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out[setting, autocast] = root(x)
        expected = resolve_attention_kernel(
            setting, "cpu", torch.bfloat16 if autocast else torch.float32
        )
        assert attention.fused_attn is ATTENTION_KERNELS[expected].timm_fused, (setting, autocast)
    set_attention_kernel(root, "auto")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attention(x=x)  # the input passed by keyword
    assert attention.fused_attn is False
    # timm's own fused and explicit paths: the same attention to fp32 rounding.
    torch.testing.assert_close(out["explicit", False], out["auto", False], rtol=1e-5, atol=1e-6)
    assert attention_calls == []  # timm calls SDPA itself, never cdfsl's entries


def test_a_fit_records_the_kernel_it_runs_unless_it_is_sdpa(monkeypatch):
    bf16 = FitConfig(precision="bf16-mixed", accelerator="cpu")
    assert bf16.record()["attention"] == "explicit"
    # 16-mixed computes in bf16 on a CPU (as Lightning runs it), so it runs the same kernel.
    assert FitConfig(precision="16-mixed", accelerator="cpu").attention_kernel() == "explicit"
    for fit in (
        FitConfig(precision="32-true", accelerator="cpu"),
        FitConfig(precision="bf16-mixed", accelerator="cpu", attention="sdpa"),
    ):
        # SDPA runs: the record is that of a fit before the setting existed (runs stay resumable).
        assert "attention" not in fit.record()
        assert fit.attention_kernel() == "sdpa"
    assert (
        FitConfig(precision="32-true", accelerator="cpu", attention="explicit").record()[
            "attention"
        ]
        == "explicit"
    )
    with pytest.raises(CdfslError, match="attention='fast': expected one of auto, explicit, sdpa"):
        FitConfig(attention="fast")
