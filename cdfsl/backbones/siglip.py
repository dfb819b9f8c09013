"""The open_clip SigLIP and SigLIP2 families: a timm ViT image tower and a sigmoid-trained head.

open_clip builds them as ``CustomTextCLIP``: ``visual`` is a ``TimmModel`` around timm's
``VisionTransformer`` (no class token, MAP attention-pool head, blocks with timm's ``Attention``
and its fused ``qkv`` Linear), ``text`` an open_clip ``TextTransformer`` (``nn.MultiheadAttention``,
no causal mask, last-token pooling), plus a learnt ``logit_bias``. SigLIP2 differs on the text
side only (Gemma tokenizer, tanh-GELU); both name a Hugging Face tokenizer whose files must be on
the machine (see :mod:`cdfsl.backbones.tokenizers`).
"""

from __future__ import annotations

from typing import Any

from timm.models import VisionTransformer, register_model

from cdfsl.backbones.clip import ClipBackbone
from cdfsl.backbones.registry import BACKBONES, FAMILIES, BackboneEntry, BackboneFamily


class SiglipBackbone(ClipBackbone):
    """Adapter over an open_clip SigLIP / SigLIP2 ``CustomTextCLIP``.

    Logits: SigLIP is trained with a pairwise sigmoid loss on ``s·cos + b``. cdfsl classifies an
    image among the episode's N classes with a softmax over ``s·cos_c + b`` instead, for every
    family alike: the task is single-label, the methods' losses (CE, Mind's SVL and RA) are
    defined on softmax logits, and a sigmoid loss would need its bias re-tuned for N-way
    episodes. The model's own learnt ``logit_scale`` is kept (a recipe's ``logit_scale``
    overrides it), and so is ``logit_bias``: it is the same for every class, so it leaves the
    softmax, the loss and the argmax unchanged, while each logit stays the model's own pairwise
    logit (``sigmoid(logit)`` is SigLIP's match probability).

    LoRA goes on the q/k/v of the vision tower's blocks (``ClipBackbone.lora_root``); the MAP
    pooling head keeps its pretrained weights, as the paper adapts the blocks only.
    """


def _is_siglip(model_name: str) -> bool:
    # open_clip's naming: every SigLIP/SigLIP2 config (and cdfsl's tiny ones) says "SigLIP".
    return "siglip" in model_name.lower()


FAMILIES.add(BackboneFamily(_is_siglip, SiglipBackbone))


@register_model
def cdfsl_tiny_siglip_vit(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """A 32 px, 2-block timm ``VisionTransformer`` built like ``vit_base_patch16_siglip_224``.

    Random init only: the image tower of the ``tiny-siglip`` test configs.
    """
    if pretrained:
        raise ValueError("cdfsl_tiny_siglip_vit has no pretrained weights")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)  # timm.create_model's bookkeeping, not VisionTransformer arguments
    args = {
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 64,
        "depth": 2,
        "num_heads": 4,
        "class_token": False,
        "global_pool": "map",
    }
    return VisionTransformer(**{**args, **kwargs})


for _row in (
    BackboneEntry("siglip-vit-b16", "ViT-B-16-SigLIP", "webli", "SigLIP ViT-B/16, 224 px"),
    BackboneEntry("siglip-vit-b16-256", "ViT-B-16-SigLIP-256", "webli", "SigLIP ViT-B/16, 256 px"),
    BackboneEntry("siglip-vit-b16-384", "ViT-B-16-SigLIP-384", "webli", "SigLIP ViT-B/16, 384 px"),
    BackboneEntry("siglip-vit-l16", "ViT-L-16-SigLIP-256", "webli", "SigLIP ViT-L/16, 256 px"),
    BackboneEntry("siglip-so400m14", "ViT-SO400M-14-SigLIP", "webli", "SigLIP SO400M/14, 224 px"),
    BackboneEntry("siglip2-vit-b16", "ViT-B-16-SigLIP2", "webli", "SigLIP2 ViT-B/16, 224 px"),
    BackboneEntry(
        "siglip2-vit-b16-256", "ViT-B-16-SigLIP2-256", "webli", "SigLIP2 ViT-B/16, 256 px"
    ),
    BackboneEntry("siglip2-vit-l16", "ViT-L-16-SigLIP2-256", "webli", "SigLIP2 ViT-L/16, 256 px"),
    BackboneEntry(
        "siglip2-so400m14", "ViT-SO400M-14-SigLIP2", "webli", "SigLIP2 SO400M/14, 224 px"
    ),
    BackboneEntry(
        "tiny-siglip", "cdfsl-tiny-siglip", None, "random-init 32 px SigLIP for tests (timm tower)"
    ),
    BackboneEntry(
        "tiny-siglip2", "cdfsl-tiny-siglip2", None, "random-init 32 px SigLIP2 for tests"
    ),
):
    BACKBONES.add(_row)
