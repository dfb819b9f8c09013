"""InternVL3 (its Hugging Face ``-hf`` form) as a :class:`GenerativeVLM`, LoRA by PEFT.

Needs the ``reason`` extra (transformers, peft). Weights are read from a local directory, a
copy of the hub repo (``config.json``, ``model*.safetensors``, tokenizer and processor files),
or from the Hugging Face cache, never from the network: a missing file fails at once with a
:class:`~cdfsl.errors.WeightsError` that says what to put where.

Each image is tiled as InternVL's own processor and fine-tuning tile it (:func:`tile_grid`,
:func:`tile_image`): up to ``max_tiles`` = 12 tiles of 448 px in the grid whose aspect ratio is
closest to the image's, plus a 448-px thumbnail of the whole image when there is more than one
tile. Its prompt holds ``<img>`` + tiles x ``image_seq_length`` x ``<IMG_CONTEXT>`` + ``</img>``
where the chat template puts the image. ``max_tiles=1`` is one tile per image (the whole image
resized to 448 x 448), as cdfsl did before. LoRA (rank 8, as in the paper) goes on the attention
and MLP projections of both the vision encoder and the language model; the projector and the LM
head stay frozen.
"""

from __future__ import annotations

import math
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

from cdfsl.errors import CdfslError, WeightsError
from cdfsl.reasoning.model import GenerativeVLM, require_reason_extra

DEFAULT_INTERNVL = "OpenGVLab/InternVL3-8B-hf"
INTERNVL_MAX_TILES = 12
"""InternVL's default most tiles per image (``max_num`` / ``max_dynamic_patch``; the -hf
processor's ``max_patches``)."""
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


def tile_grid(
    width: int,
    height: int,
    max_tiles: int = INTERNVL_MAX_TILES,
    min_tiles: int = 1,
    tile_size: int = 448,
) -> tuple[int, int]:
    """InternVL's tile grid ``(columns, rows)`` for a ``width`` x ``height`` image.

    Of the grids with ``min_tiles <= columns · rows <= max_tiles``, visited by tile count (then
    columns), the one whose aspect ratio ``columns / rows`` is closest to ``width / height``; on
    a tie the later (larger) grid wins only while the image's area exceeds half the grid's,
    ``0.5 · tile_size² · columns · rows``, so that a small image is not blown up.
    """
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"tiles between {min_tiles} and {max_tiles}: expected 1 <= min <= max")
    aspect = width / height
    area = width * height
    grids = sorted(
        ((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
         if min_tiles <= c * r <= max_tiles),
        key=lambda g: (g[0] * g[1], g[0]),
    )  # fmt: skip
    best, best_diff = grids[0], math.inf
    for columns, rows in grids:
        diff = abs(aspect - columns / rows)
        if diff < best_diff:
            best, best_diff = (columns, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * columns * rows:
            best = (columns, rows)
    return best


def tile_image(
    image: Image.Image,
    tile_size: int = 448,
    max_tiles: int = INTERNVL_MAX_TILES,
    thumbnail: bool = True,
) -> list[Image.Image]:
    """InternVL's dynamic tiling of ``image``: the :func:`tile_grid` tiles, row by row, then
    (if more than one tile and ``thumbnail``) the whole image as a thumbnail.

    The image is resized (bicubic) to ``tile_size · columns`` x ``tile_size · rows`` and cut;
    a single tile and the thumbnail are returned as the whole image, for the processor to
    resize to ``tile_size`` x ``tile_size``.
    """
    columns, rows = tile_grid(image.width, image.height, max_tiles, tile_size=tile_size)
    if columns * rows == 1:
        return [image]
    s = tile_size
    canvas = image.resize((s * columns, s * rows), Image.Resampling.BICUBIC)
    tiles = [
        canvas.crop((c * s, r * s, (c + 1) * s, (r + 1) * s))
        for r in range(rows)
        for c in range(columns)
    ]
    return [*tiles, image] if thumbnail else tiles


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing of ``model``'s layers with torch's non-reentrant checkpoint.

    transformers 4.x defaults to the reentrant checkpoint, whose output has no gradient when no
    input of the checkpointed layer needs one: the frozen embeddings and pixels never do, and
    PEFT's ``inject_adapter_in_model`` (unlike ``get_peft_model``) does not turn on
    ``enable_input_require_grads``, so the loss had no gradient at all. The non-reentrant
    checkpoint follows the gradients of the LoRA weights inside each layer, on 4.x and 5.x
    alike (5.x's own default).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # newer 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


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
    ``max_tiles``: most 448-px tiles per image (:func:`tile_image`). The spec names the model
    ("Paper: InternVL3-8B, LoRA rank 8 on both the vision encoder and the LLM") and nothing of
    its preprocessing, so the default is InternVL's own: 12, with a thumbnail (its processor's
    ``crop_to_patches`` and its fine-tuning's ``dynamic_image_size``); 1 is one tile per image,
    no thumbnail (cdfsl's earlier behaviour).
    ``gradient_checkpointing``: :func:`enable_gradient_checkpointing`.
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        lora: LoRASettings | None = None,
        end_of_answer: str | None = None,
        seed: int = 0,
        max_tiles: int = INTERNVL_MAX_TILES,
        gradient_checkpointing: bool = False,
    ) -> None:
        require_reason_extra("the InternVL model")
        if max_tiles < 1:
            raise CdfslError(f"max_tiles={max_tiles}; expected at least 1 tile per image")
        super().__init__()
        self.max_tiles = max_tiles
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
        size = processor.image_processor.size
        self.tile_size = int(size["height"] if isinstance(size, dict) else size.height)
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.model)

    @classmethod
    def from_pretrained(
        cls,
        path: str = DEFAULT_INTERNVL,
        lora: LoRASettings | None = None,
        dtype: str = "bfloat16",
        device: str = "cpu",
        cache_dir: str | None = None,
        seed: int = 0,
        max_tiles: int = INTERNVL_MAX_TILES,
        gradient_checkpointing: bool = False,
    ) -> InternVLReasoner:
        """Load model and processor from local files only (see :func:`resolve_model_dir`)."""
        require_reason_extra("the InternVL model")
        from transformers import AutoProcessor, InternVLForConditionalGeneration

        folder = resolve_model_dir(path, cache_dir)
        try:
            processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            model = InternVLForConditionalGeneration.from_pretrained(
                folder, local_files_only=True, dtype=getattr(torch, dtype)
            )
        except (OSError, ValueError) as err:
            raise WeightsError(f"could not load InternVL from {str(folder)!r}: {err}") from err
        return cls(
            model.to(device), processor, lora, seed=seed, max_tiles=max_tiles,
            gradient_checkpointing=gradient_checkpointing,
        )  # fmt: skip

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
        """(B, T, 3, S, S) normalised pixels of each image's tiles (:func:`tile_image`), T the
        most tiles of any image of the batch; an image with fewer is padded with NaN tiles,
        which never reach the model."""
        per_image = [tile_image(im.convert("RGB"), self.tile_size, self.max_tiles) for im in images]
        flat = [tile for tiles in per_image for tile in tiles]
        pixels = self.processor.image_processor(
            images=flat, crop_to_patches=False, return_tensors="pt"
        )["pixel_values"]
        most = max(len(tiles) for tiles in per_image)
        out = torch.full((len(images), most, *pixels.shape[1:]), math.nan, dtype=pixels.dtype)
        start = 0
        for i, tiles in enumerate(per_image):
            out[i, : len(tiles)] = pixels[start : start + len(tiles)]
            start += len(tiles)
        return out

    @staticmethod
    def tile_counts(image_inputs: Tensor) -> list[int]:
        """How many real (not NaN-padded) tiles each image of ``image_inputs`` has."""
        return (~image_inputs.flatten(2)[..., 0].isnan()).sum(dim=1).tolist()

    def prompt_text(self, prompt: str, tiles: int = 1) -> str:
        """The chat-formatted user turn with the tokens of an image of ``tiles`` tiles, ending
        where the answer starts."""
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
        ]
        text = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        image = self.processor.image_token
        expanded = (
            self.processor.start_image_token
            + image * (self.image_seq_length * tiles)
            + self.processor.end_image_token
        )
        return text.replace(image, expanded, 1)

    def _prompt_ids(self, prompt: str, tiles: int = 1) -> list[int]:
        text = self.prompt_text(prompt, tiles)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _target_ids(self, target: str) -> list[int]:
        return [*self.tokenizer(target, add_special_tokens=False)["input_ids"], self.end_id]

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _pixels(self, image_inputs: Tensor) -> Tensor:
        """Every real tile of the batch, image by image, (N, 3, S, S), on the model's device."""
        real = ~image_inputs.flatten(2)[..., 0].isnan()
        return image_inputs[real].to(self._device, self.model.dtype)

    # -- scoring and generation ----------------------------------------------------------------
    def nll(
        self,
        image_inputs: Tensor,
        prompts: Sequence[str],
        targets: Sequence[str],
        length_normalise: bool = False,
    ) -> Tensor:
        """(B,) NLL of each target's tokens and the end-of-answer token (right-padded batch)."""
        tiles = self.tile_counts(image_inputs)
        prefixes = [self._prompt_ids(p, n) for p, n in zip(prompts, tiles, strict=True)]
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
        tiles = self.tile_counts(image_inputs)
        prefixes = [self._prompt_ids(p, n) for p, n in zip(prompts, tiles, strict=True)]
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
