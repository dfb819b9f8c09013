"""The benchmarks time what they claim to: the reference replica is the reference's function."""

import gc
import importlib.util
from pathlib import Path

import torch

from cdfsl.lora import LoRAConfig, LoRAMultiheadAttention
from cdfsl.methods import Mind

ROOT = Path(__file__).resolve().parent.parent


def _engine_speed():
    spec = importlib.util.spec_from_file_location(
        "engine_speed", ROOT / "benchmarks" / "engine_speed.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_lora_attention_computes_cdfsls_lora_attention():
    """With the same A and B and no dropout, the replica of the Mind reference's
    PlainMultiheadAttentionLoRA (separate q/k/v, the merged B A update) gives cdfsl's image
    features, in training mode and merged for evaluation, and trains as many parameters."""
    bench = _engine_speed()
    lora = LoRAConfig(rank=4, alpha=8.0, dropout=0.0)
    names = ["red fox", "blue jay", "gray wolf"]
    torch.manual_seed(0)
    ours = Mind(backbone="tiny-clip", pretrained=None, class_names=names, lora=lora)
    plain = Mind(backbone="tiny-clip", pretrained=None, class_names=names, lora=None)
    plain.load_state_dict(ours.state_dict(), strict=False)
    theirs = bench.with_reference_layers(plain.requires_grad_(False), lora)
    layers = [m for m in ours.modules() if isinstance(m, LoRAMultiheadAttention)]
    replicas = [m for m in theirs.modules() if isinstance(m, bench.ReferenceLoRAAttention)]
    assert len(layers) == len(replicas) > 0
    with torch.no_grad():
        for layer, replica in zip(layers, replicas, strict=True):
            for i, part in enumerate("qkv"):
                adapter = getattr(layer, part)
                adapter.lora_B.normal_(std=0.05)
                replica.lora_A[i].copy_(adapter.lora_A[0])
                replica.lora_B[i].copy_(adapter.lora_B[0])
    trainable = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (ours, theirs)]
    assert trainable[0] == trainable[1]
    images = torch.rand(4, 3, 32, 32)
    ours.train(), theirs.train()
    torch.testing.assert_close(theirs.image_features(images), ours.image_features(images))
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs.image_features(images), ours.image_features(images))


def test_bf16_loops_hold_the_frozen_weights_in_bf16_for_good():
    """The bf16 loops time models whose frozen vision weights stay bf16 (the reference's
    ``clip_model.half()``) after the casting context is out of reach, and whose adapters
    stay fp32; fp32 loops keep every weight fp32."""
    bench = _engine_speed()
    lora = LoRAConfig(rank=4)
    ours = bench.held_in(Mind(backbone="tiny-clip", pretrained=None, lora=lora), torch.bfloat16)
    plain = Mind(backbone="tiny-clip", pretrained=None, lora=None).requires_grad_(False)
    theirs = bench.held_in(bench.with_reference_layers(plain, lora), torch.bfloat16)
    kept = bench.held_in(Mind(backbone="tiny-clip", pretrained=None, lora=lora), torch.float32)
    gc.collect()
    for model in (ours, theirs):
        root = model.backbone.lora_root()
        linears = [m for m in root.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
        trained = [p for p in model.parameters() if p.requires_grad]
        assert trained and all(p.dtype == torch.float32 for p in trained)
    replicas = [m for m in theirs.modules() if isinstance(m, bench.ReferenceLoRAAttention)]
    assert replicas and all(m.weight.dtype == torch.bfloat16 for m in replicas)
    assert all(p.dtype == torch.float32 for p in kept.parameters())
