"""The open_clip CLIP family: a VisionTransformer image tower and a causal text transformer."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from open_clip.factory import LOCAL_DIR_PREFIX
from torch import Tensor, nn

from cdfsl.assets import assets_dir
from cdfsl.backbones.base import Backbone, Preprocess
from cdfsl.backbones.registry import BACKBONES, FAMILIES, BackboneEntry, BackboneFamily


class ClipBackbone(Backbone):
    """Adapter over ``open_clip.CLIP``; the vision tower's attention blocks take LoRA."""

    def __init__(self, name: str, model: nn.Module, tokenizer: Callable) -> None:
        preprocess = Preprocess.from_open_clip(model.visual.preprocess_cfg)
        super().__init__(name, preprocess, float(model.logit_scale.detach().exp()))
        bias = getattr(model, "logit_bias", None)
        self.logit_bias = None if bias is None else float(bias.detach())
        self.model = model
        self._tokenizer = tokenizer

    @classmethod
    def from_open_clip(cls, name: str, model: nn.Module, tokenizer: Callable) -> ClipBackbone:
        return cls(name, model, tokenizer)

    def encode_image(self, images: Tensor) -> Tensor:
        return self.model.encode_image(images)

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.model.encode_text(tokens)

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        return self._tokenizer(list(texts)).to(self.device)

    def lora_root(self) -> nn.Module:
        return self.model.visual


# Generic rule: any open_clip model without a more specific family class.
FAMILIES.add(BackboneFamily(lambda model_name: True, ClipBackbone))

for _row in (
    BackboneEntry("clip-vit-b16", "ViT-B-16", "openai", "OpenAI CLIP ViT-B/16 (the paper's)"),
    BackboneEntry("clip-vit-b32", "ViT-B-32", "openai", "OpenAI CLIP ViT-B/32"),
    BackboneEntry("clip-vit-l14", "ViT-L-14", "openai", "OpenAI CLIP ViT-L/14"),
    BackboneEntry(
        "tiny-clip", "cdfsl-tiny-clip", None, "random-init 32 px CLIP for tests (~3M params)"
    ),
    BackboneEntry(
        "micro-clip",
        f"{LOCAL_DIR_PREFIX}{assets_dir() / 'micro-clip'}",
        None,
        "CLIP pretrained by cdfsl on the micro world's source domain (offline default)",
        how_to_get="rebuild it with: python -m cdfsl.pretrain_micro --output assets/micro-clip",
    ),
):
    BACKBONES.add(_row)
