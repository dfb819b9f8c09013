"""The open_clip PE-Core family (Meta's Perception Encoder): a timm Eva image tower with RoPE.

open_clip builds them as ``CustomTextCLIP``: ``visual`` is a ``TimmModel`` around timm's ``Eva``
(class token, 2-D rotary position embedding, blocks with timm's ``AttentionRope`` and its fused
``qkv`` Linear, MAP attention-pool head, then a Linear head as the projection), ``text`` an
open_clip ``TextTransformer`` (``nn.MultiheadAttention``, causal) with the bundled BPE tokenizer,
so no tokenizer files are needed. Trained with the softmax CLIP loss: no logit bias. The weights'
preprocessing is the tag's (mean = std = 0.5, bilinear), applied by the registry.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from timm.layers import LayerNorm
from timm.models import Eva, register_model

from cdfsl.backbones.clip import ClipBackbone
from cdfsl.backbones.registry import BACKBONES, FAMILIES, BackboneEntry, BackboneFamily


class PeCoreBackbone(ClipBackbone):
    """Adapter over an open_clip PE-Core ``CustomTextCLIP``; logits are ``s·cos``, as for CLIP.

    LoRA goes on the q/k/v of the vision tower's blocks (``ClipBackbone.lora_root``); the MAP
    pooling head keeps its pretrained weights, as the paper adapts the blocks only.
    """


def _is_pe_core(model_name: str) -> bool:
    # open_clip names them PE-Core-<size>-<patch>[-<px>]; cdfsl's tiny config follows suit.
    return "pe-core" in model_name.lower()


FAMILIES.add(BackboneFamily(_is_pe_core, PeCoreBackbone))


@register_model
def cdfsl_tiny_pe_core_vit(pretrained: bool = False, **kwargs: Any) -> Eva:
    """A 32 px, 2-block timm ``Eva`` built like ``vit_pe_core_base_patch16_224``.

    Random init only: the image tower of the ``tiny-pe-core`` test config.
    """
    if pretrained:
        raise ValueError("cdfsl_tiny_pe_core_vit has no pretrained weights")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)  # timm.create_model's bookkeeping, not Eva arguments
    args = {
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 64,
        "depth": 2,
        "num_heads": 4,
        "mlp_ratio": 4.0,
        "global_pool": "map",
        "attn_type": "rope",
        "use_pre_transformer_norm": True,
        "use_rot_pos_emb": True,
        "ref_feat_shape": (4, 4),
        "rope_grid_offset": 1.0,
        "rope_grid_indexing": "xy",
        "attn_pool_num_heads": 4,
        "attn_pool_mlp_ratio": 4.0,
        "norm_layer": partial(LayerNorm, eps=1e-5),
    }
    return Eva(**{**args, **kwargs})


for _row in (
    BackboneEntry("pe-core-t16", "PE-Core-T-16-384", "meta", "PE-Core T/16, 384 px"),
    BackboneEntry("pe-core-s16", "PE-Core-S-16-384", "meta", "PE-Core S/16, 384 px"),
    BackboneEntry(
        "pe-core-b16", "PE-Core-B-16", "meta", "PE-Core B/16, 224 px (recipes/pe-core-b16)"
    ),
    BackboneEntry("pe-core-l14", "PE-Core-L-14-336", "meta", "PE-Core L/14, 336 px"),
    BackboneEntry("pe-core-g14", "PE-Core-bigG-14-448", "meta", "PE-Core bigG/14, 448 px"),
    BackboneEntry(
        "tiny-pe-core", "cdfsl-tiny-pe-core", None, "random-init 32 px PE-Core for tests (Eva)"
    ),
):
    BACKBONES.add(_row)
