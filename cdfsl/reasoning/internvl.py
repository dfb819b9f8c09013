"""InternVL3 (its Hugging Face ``-hf`` form) as a :class:`GenerativeVLM`, LoRA by PEFT.

Needs the ``reason`` extra (transformers, peft). Weights are read from a local directory, a
copy of the hub repo (``config.json``, ``model*.safetensors``, tokenizer and processor files),
or from the Hugging Face cache, never from the network: a missing file fails at once with a
:class:`~cdfsl.errors.WeightsError` that says what to put where.

Each image is one 448-px tile (no dynamic tiling; DomainBed images are small), so its prompt
holds ``<img>`` + ``image_seq_length`` x ``<IMG_CONTEXT>`` + ``</img>`` where the chat template
puts the image. LoRA (rank 8, as in the paper) goes on the attention and MLP projections of
both the vision encoder and the language model; the projector and the LM head stay frozen.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from cdfsl.errors import WeightsError
from cdfsl.reasoning.adapter import GenerativeVLM, require_reason_extra

DEFAULT_INTERNVL = "OpenGVLab/InternVL3-8B-hf"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_VISION_LAYERS = (
    r"(.*\.)?vision_tower\.encoder\.layer\.\d+\."
    r"(attention\.(q_proj|k_proj|v_proj|projection_layer)|mlp\.(fc1|fc2))"
)
_LLM_LAYERS = (
    r"(.*\.)?language_model\.(model\.)?layers\.\d+\."
    r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
)


@dataclass
class LoRASettings:
    """PEFT LoRA on InternVL: rank, alpha, dropout, and which towers get adapters."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    vision: bool = True
    llm: bool = True


def lora_target_pattern(vision: bool = True, llm: bool = True) -> str:
    """PEFT ``target_modules`` regex: attention + MLP linears of the chosen towers."""
    parts = [p for p, on in ((_VISION_LAYERS, vision), (_LLM_LAYERS, llm)) if on]
    if not parts:
        raise WeightsError("LoRA on neither tower: set lora.vision or lora.llm (or both) to true")
    return "|".join(f"(?:{p})" for p in parts)


def _has_weights(folder: Path) -> bool:
    return any((folder / f).is_file() for f in _WEIGHT_FILES) or any(
        folder.glob("model-*.safetensors")
    )


def resolve_model_dir(path: str, cache_dir: str | None = None) -> Path:
    """The local folder holding ``path``: a directory, or a hub id found in the HF cache.

    Looks only at local files. Raises :class:`WeightsError` naming the missing files.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        if os.sep in path and not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
            raise WeightsError(
                f"InternVL directory {path!r} does not exist; pass model.path=DIR, a local copy of "
                f"the hub repo {DEFAULT_INTERNVL} (config.json, model*.safetensors, tokenizer and "
                "processor files)"
            )
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(path, "config.json", cache_dir=cache_dir)
        if not isinstance(found, str):
            raise WeightsError(
                f"InternVL weights {path!r} are not on this machine (neither a directory nor in "
                f"the Hugging Face cache); download the hub repo {path} where there is network "
                "access and pass model.path=DIR holding config.json, model*.safetensors and the "
                "tokenizer and processor files"
            )
        folder = Path(found).parent
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not _has_weights(folder):
        missing.append("model*.safetensors")
    if not (folder / "tokenizer_config.json").is_file():
        missing.append("tokenizer_config.json")
    if missing:
        raise WeightsError(
            f"InternVL directory {str(folder)!r} lacks {', '.join(missing)}; expected a full copy "
            f"of the hub repo (e.g. {DEFAULT_INTERNVL}); copy the missing files into it"
        )
    return folder


class InternVLReasoner(GenerativeVLM):
    """InternVL (``InternVLForConditionalGeneration`` + its processor) with PEFT LoRA adapters.

    ``lora=None`` trains nothing (zero-shot). ``end_of_answer``: the token that closes an
    answer in the chat template (default: the tokenizer's eos, ``<|im_end|>`` for InternVL3).
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        lora: LoRASettings | None = None,
        end_of_answer: str | None = None,
        seed: int = 0,
    ) -> None:
        require_reason_extra("the InternVL adapter")
        super().__init__()
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model.requires_grad_(False)
        self.lora = lora
        if lora is not None:
            from peft import LoraConfig, inject_adapter_in_model

            config = LoraConfig(
                r=lora.rank,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora_target_pattern(lora.vision, lora.llm),
                bias="none",
            )
            inject_adapter_in_model(config, self.model)
            for name, p in self.model.named_parameters():
                p.requires_grad_("lora_" in name)
                if "lora_" in name and p.dtype in (torch.float16, torch.bfloat16):
                    # Adapters train in fp32 beside a bf16 base (PEFT casts inputs to them).
                    p.data = p.data.float()
            self.reset_trainable(seed)
        end = end_of_answer or self.tokenizer.eos_token
        self.end_id = self.tokenizer.convert_tokens_to_ids(end)
        if self.end_id is None or self.end_id == self.tokenizer.unk_token_id:
            raise WeightsError(
                f"end-of-answer token {end!r} is not in the tokenizer; pass end_of_answer="
            )
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.end_id
        self.image_seq_length = int(
            getattr(processor, "image_seq_length", model.config.image_seq_length)
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str = DEFAULT_INTERNVL,
        lora: LoRASettings | None = None,
        dtype: str = "bfloat16",
        device: str = "cpu",
        cache_dir: str | None = None,
        seed: int = 0,
    ) -> InternVLReasoner:
        """Load model and processor from local files only (see :func:`resolve_model_dir`)."""
        require_reason_extra("the InternVL adapter")
        from transformers import AutoProcessor, InternVLForConditionalGeneration

        folder = resolve_model_dir(path, cache_dir)
        try:
            processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            model = InternVLForConditionalGeneration.from_pretrained(
                folder, local_files_only=True, dtype=getattr(torch, dtype)
            )
        except (OSError, ValueError) as err:
            raise WeightsError(f"could not load InternVL from {str(folder)!r}: {err}") from err
        return cls(model.to(device), processor, lora, seed=seed)

    # -- weights ------------------------------------------------------------------------------
    def reset_trainable(self, seed: int) -> None:
        """Fresh LoRA adapters (A random from ``seed``, B zero: the base model exactly)."""
        from peft.tuners.lora import LoraLayer

        torch.manual_seed(seed)
        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                for name in module.lora_A:
                    module.reset_lora_parameters(name, init_lora_weights=True)

    def lora_modules(self) -> list[str]:
        """Names of the modules that carry LoRA adapters."""
        from peft.tuners.lora import LoraLayer

        return [n for n, m in self.model.named_modules() if isinstance(m, LoraLayer)]

    # -- inputs --------------------------------------------------------------------------------
    @torch.no_grad()
    def image_inputs(self, images: Sequence[Image.Image]) -> Tensor:
        """(B, 3, S, S) normalised pixels, one tile per image."""
        rgb = [im.convert("RGB") for im in images]
        out = self.processor.image_processor(images=rgb, crop_to_patches=False, return_tensors="pt")
        return out["pixel_values"]

    def prompt_text(self, prompt: str) -> str:
        """The chat-formatted user turn with the image's tokens, ending where the answer starts."""
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
        ]
        text = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        image = self.processor.image_token
        expanded = (
            self.processor.start_image_token
            + image * self.image_seq_length
            + self.processor.end_image_token
        )
        return text.replace(image, expanded, 1)

    def _prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(self.prompt_text(prompt), add_special_tokens=False)["input_ids"]

    def _target_ids(self, target: str) -> list[int]:
        return [*self.tokenizer(target, add_special_tokens=False)["input_ids"], self.end_id]

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _pixels(self, image_inputs: Tensor) -> Tensor:
        return image_inputs.to(self._device, self.model.dtype)

    # -- scoring and generation ----------------------------------------------------------------
    def nll(
        self,
        image_inputs: Tensor,
        prompts: Sequence[str],
        targets: Sequence[str],
        length_normalise: bool = False,
    ) -> Tensor:
        """(B,) NLL of each target's tokens and the end-of-answer token (right-padded batch)."""
        prefixes = [self._prompt_ids(p) for p in prompts]
        rows = [p + self._target_ids(t) for p, t in zip(prefixes, targets, strict=True)]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention = torch.zeros(len(rows), length, dtype=torch.long)
        scored = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, (p, r) in enumerate(zip(prefixes, rows, strict=True)):
            ids[i, : len(r)] = torch.tensor(r)
            attention[i, : len(r)] = 1
            scored[i, len(p) : len(r)] = True
        device = self._device
        ids, attention, scored = ids.to(device), attention.to(device), scored.to(device)
        hidden = self.model.model(
            input_ids=ids, attention_mask=attention, pixel_values=self._pixels(image_inputs)
        ).last_hidden_state
        # Token t is predicted at position t - 1; only scored positions reach the LM head, so
        # the (tokens x 150k) logits exist for the answer tokens alone.
        predict = scored[:, 1:]
        logits = self.model.lm_head(hidden[:, :-1][predict]).float()
        token_nll = F.cross_entropy(logits, ids[:, 1:][predict], reduction="none")
        row_of = torch.arange(len(rows), device=device)[:, None].expand_as(predict)[predict]
        total = torch.zeros(len(rows), device=device).index_add(0, row_of, token_nll)
        return total / predict.sum(dim=1) if length_normalise else total

    @torch.no_grad()
    def generate(
        self, image_inputs: Tensor, prompts: Sequence[str], max_new_tokens: int = 128
    ) -> list[str]:
        """Greedy answers (left-padded batch), decoded without special tokens."""
        was_training = self.training
        self.eval()
        prefixes = [self._prompt_ids(p) for p in prompts]
        length = max(len(p) for p in prefixes)
        ids = torch.full((len(prefixes), length), self.pad_id, dtype=torch.long)
        attention = torch.zeros(len(prefixes), length, dtype=torch.long)
        for i, p in enumerate(prefixes):
            ids[i, length - len(p) :] = torch.tensor(p)
            attention[i, length - len(p) :] = 1
        out = self.model.generate(
            input_ids=ids.to(self._device),
            attention_mask=attention.to(self._device),
            pixel_values=self._pixels(image_inputs),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.end_id,
            pad_token_id=self.pad_id,
        )
        self.train(was_training)
        return [
            self.tokenizer.decode(row[length:], skip_special_tokens=True).strip()
            for row in out.tolist()
        ]
