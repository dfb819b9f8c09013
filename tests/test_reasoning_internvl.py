"""The InternVL model wrapper on a tiny random InternVL built offline (transformers, peft)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cdfsl.errors import WeightsError

if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("peft") is None:
    pytest.skip(
        "transformers and peft are not installed (pip install 'cdfsl[reason]')",
        allow_module_level=True,
    )

import numpy as np
from PIL import Image

from cdfsl.reasoning.internvl import (
    InternVLReasoner,
    LoRASettings,
    resolve_model_dir,
    tile_grid,
    tile_image,
)
from cdfsl.reasoning.mtct import MTCTModule, mtct_loss

WORDS = (
    "what", "is", "the", "class", "of", "this", "image", "?", "answer", "with", "name", "think",
    "in", "five", "stages", ",", "and", "end", ".", "user", "assistant", "cat", "dog", "bird",
    "a", "summary",
)  # fmt: skip
SPECIALS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_internvl(folder: Path) -> Path:
    """Save a random InternVL (2-layer ViT on 28-px images, 2-layer Qwen2) and its processor
    (word-level tokenizer, one image token per tile) to ``folder``, as a hub repo would be."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
        InternVLVisionConfig,
        PreTrainedTokenizerFast,
        Qwen2Config,
    )

    vocab = {w: i for i, w in enumerate([*SPECIALS, "<video>", *sorted(set(WORDS))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>",
        extra_special_tokens={
            "start_image_token": "<img>", "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>",
        },
    )  # fmt: skip
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[2:]})
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size={"height": 28, "width": 28}),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(),
        image_seq_length=1,
        chat_template=CHAT_TEMPLATE,
    )
    vision = InternVLVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=[28, 28], patch_size=[14, 14],
    )  # fmt: skip
    text = Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=len(tokenizer),
    )  # fmt: skip
    config = InternVLConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_seq_length=1,
        image_token_id=tokenizer.context_image_token_id, downsample_ratio=0.5,
    )  # fmt: skip
    torch.manual_seed(0)
    InternVLForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_internvl(tmp_path_factory.mktemp("tiny-internvl"))


@pytest.fixture(scope="module")
def reasoner(tiny_dir) -> InternVLReasoner:
    return InternVLReasoner.from_pretrained(str(tiny_dir), LoRASettings(), dtype="float32")


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)) for _ in range(n)]


def test_lora_on_every_vision_and_llm_projection_only(reasoner, tiny_dir):
    from transformers import InternVLForConditionalGeneration

    placed = set(reasoner.lora_modules())
    base = InternVLForConditionalGeneration.from_pretrained(tiny_dir)
    linear = {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    vision = {n for n in linear if ".vision_tower.encoder.layer." in n}
    llm = {n for n in linear if ".language_model.layers." in n}
    assert len(vision) == 12 and len(llm) == 14  # 2 layers x (4 attention + 2 MLP) / (4 + 3)
    assert placed == vision | llm
    assert not any("multi_modal_projector" in n or "lm_head" in n for n in placed)
    trainable = [n for n, p in reasoner.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("vision_tower" in n for n in trainable) and any(
        "language_model" in n for n in trainable
    )
    layer = reasoner.model.get_submodule("model.vision_tower.encoder.layer.0.attention.q_proj")
    assert layer.r["default"] == 8 and layer.scaling["default"] == pytest.approx(16 / 8)


def test_lora_placement_follows_the_settings(tiny_dir):
    only_llm = InternVLReasoner.from_pretrained(
        str(tiny_dir), LoRASettings(vision=False), dtype="float32"
    )
    assert only_llm.lora_modules() and all("language_model" in n for n in only_llm.lora_modules())
    frozen = InternVLReasoner.from_pretrained(str(tiny_dir), None, dtype="float32")
    assert not frozen.lora_modules()
    assert not any(p.requires_grad for p in frozen.parameters())


def full_sequence_nll(reasoner, pixels, prompt, target) -> list[float]:
    """-log p of each target token and the end token, from the model's ordinary full logits
    (``pixels``: one image's single tile, (1, 3, S, S))."""
    tok = reasoner.tokenizer
    prefix = tok(reasoner.prompt_text(prompt), add_special_tokens=False)["input_ids"]
    answer = [*tok(target, add_special_tokens=False)["input_ids"], reasoner.end_id]
    ids = torch.tensor([prefix + answer])
    with torch.no_grad():
        logits = reasoner.model(input_ids=ids, pixel_values=pixels).logits[0]
    log_p = F.log_softmax(logits.double(), dim=-1)
    return [-float(log_p[len(prefix) + j - 1, t]) for j, t in enumerate(answer)]


def test_nll_sum_and_mean_by_hand_with_padding(reasoner):
    pixels = reasoner.image_inputs(images(3))
    assert pixels.shape == (3, 1, 3, 28, 28)  # 40 x 36 px: one 28-px tile per image
    prompts = ["what is the class of this image ?"] * 2 + ["think in five stages ."]
    targets = ["cat", "dog bird a", "a summary , and end"]
    with torch.no_grad():
        summed = reasoner.nll(pixels, prompts, targets)
        mean = reasoner.nll(pixels, prompts, targets, length_normalise=True)
    for i in range(3):
        by_hand = full_sequence_nll(reasoner, pixels[i], prompts[i], targets[i])
        assert summed[i].item() == pytest.approx(sum(by_hand), rel=1e-4)
        assert mean[i].item() == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-4)
    text = reasoner.prompt_text("what ?")
    assert text.count("<IMG_CONTEXT>") == 1 and "<img><IMG_CONTEXT></img>" in text


def test_mtct_gradients_reach_lora_of_both_towers(reasoner):
    reasoner.reset_trainable(0)
    pixels = reasoner.image_inputs(images(2))
    module = MTCTModule(reasoner, label_prompt_text="what ?", reason_prompt_text="think .")
    batch = {"image_inputs": pixels, "labels": ["cat", "dog"], "chains": ["a summary", None]}
    terms = module.loss_terms(batch)
    assert terms["label_nll"].shape == (2,) and terms["chain_nll"].shape == (1,)
    mtct_loss(terms["label_nll"], terms["chain_nll"]).backward()
    grads = {n: p.grad for n, p in reasoner.model.named_parameters() if p.requires_grad}
    for tower in ("vision_tower", "language_model"):
        # B starts at zero, so only the B matrices get a gradient at the first step
        assert any(
            g is not None and g.abs().sum() > 0
            for n, g in grads.items()
            if tower in n and "lora_B" in n
        )
    reasoner.zero_grad()


def test_reset_starts_from_the_base_model_and_generate_decodes(reasoner, tiny_dir):
    from transformers import InternVLForConditionalGeneration

    with torch.no_grad():
        for name, p in reasoner.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    pixels = reasoner.image_inputs(images(2))
    prompts = ["what is the class of this image ?", "what ?"]
    shifted = reasoner.nll(pixels, prompts, ["cat", "dog"]).detach()
    reasoner.reset_trainable(3)
    restored = reasoner.nll(pixels, prompts, ["cat", "dog"]).detach()
    base = InternVLForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32)
    plain = InternVLReasoner(base, reasoner.processor, lora=None)
    assert torch.allclose(restored, plain.nll(pixels, prompts, ["cat", "dog"]), atol=1e-5)
    assert not torch.allclose(shifted, restored)
    answers = reasoner.generate(pixels, prompts, max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert all("<|im_end|>" not in a and "<pad>" not in a for a in answers)
    state = reasoner.trainable_state_dict()
    assert state and all("lora_" in k for k in state)


def test_missing_weights_fail_at_once_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(WeightsError, match=r"not on this machine.*model\.path=DIR"):
        resolve_model_dir("OpenGVLab/InternVL3-8B-hf", cache_dir=str(tmp_path / "hub"))
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "models" / "nowhere" / "InternVL3"))
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match=r"lacks model\*\.safetensors, tokenizer_config\.json"):
        InternVLReasoner.from_pretrained(str(partial))


# -- dynamic tiling ------------------------------------------------------------------------------
def test_tiles_agree_with_internvl_processor_crop_to_patches():
    """An independent implementation: the -hf processor's own ``crop_to_patches`` tiling."""
    from transformers import GotOcr2ImageProcessor

    processor = GotOcr2ImageProcessor(size={"height": 448, "width": 448})
    sizes = [(448, 448), (896, 448), (672, 448), (4480, 448), (448, 8960), (1000, 10), (300, 500)]
    for width, height in sizes:
        image = Image.new("RGB", (width, height))
        out = processor(images=[image], crop_to_patches=True, max_patches=12, return_tensors="pt")
        assert len(tile_image(image)) == int(out["num_patches"][0]), (width, height)
        columns, rows = tile_grid(width, height)
        assert int(out["num_patches"][0]) == columns * rows + (columns * rows > 1)


def block_image(width: int, height: int, seed: int) -> Image.Image:
    """An image of 14-px blocks of random colour (so that tiles and thumbnails differ)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 255, (height // 14, width // 14, 3), dtype=np.uint8)
    return Image.fromarray(blocks.repeat(14, axis=0).repeat(14, axis=1))


def processor_reference(reasoner, image, prompt, target):
    """input ids, pixels and per-token NLLs of ``target`` through InternVL's own processor
    (``crop_to_patches`` on, 12 tiles at most) and the model's full logits."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = reasoner.processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = reasoner.processor(
        text=[text], images=[image], return_tensors="pt", crop_to_patches=True, max_patches=12
    )
    answer = [*reasoner.tokenizer(target, add_special_tokens=False)["input_ids"], reasoner.end_id]
    prefix = inputs["input_ids"][0].tolist()
    ids = torch.tensor([prefix + answer])
    with torch.no_grad():
        logits = reasoner.model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0]
    log_p = F.log_softmax(logits.double(), dim=-1)
    nll = [-float(log_p[len(prefix) + j - 1, t]) for j, t in enumerate(answer)]
    return prefix, inputs["pixel_values"], nll, logits[len(prefix) - 1]


def test_several_tiles_per_image_score_and_generate_as_internvl_processor(reasoner):
    reasoner.reset_trainable(0)
    assert reasoner.max_tiles == 12  # InternVL's default
    # 28 x 28: 1 tile; 56 x 28: 2 x 1 + thumbnail; 56 x 56: 2 x 2 + thumbnail (28-px tiles)
    shots = [block_image(28, 28, 0), block_image(56, 28, 1), block_image(56, 56, 2)]
    pixels = reasoner.image_inputs(shots)
    assert pixels.shape == (3, 5, 3, 28, 28)
    assert reasoner.tile_counts(pixels) == [1, 3, 5]
    assert pixels[0, 1:].isnan().all() and not pixels[2].isnan().any()
    prompts = ["what is the class of this image ?", "what ?", "think in five stages ."]
    targets = ["cat", "dog bird", "a summary , and end"]
    with torch.no_grad():
        summed = reasoner.nll(pixels, prompts, targets)
    first = reasoner.generate(pixels, prompts, max_new_tokens=1)
    for i, image in enumerate(shots):
        prefix, reference_pixels, nll, last = processor_reference(
            reasoner, image, prompts[i], targets[i]
        )
        n = len(reference_pixels)
        assert torch.allclose(pixels[i, :n], reference_pixels, atol=1e-5)
        assert reasoner._prompt_ids(prompts[i], n) == prefix
        assert prefix.count(reasoner.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")) == n
        assert summed[i].item() == pytest.approx(sum(nll), rel=1e-4)
        expected = reasoner.tokenizer.decode([int(last.argmax())], skip_special_tokens=True)
        assert first[i] == expected.strip()
    answers = reasoner.generate(pixels, prompts, max_new_tokens=3)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_one_tile_per_image_is_the_old_single_resized_tile(tiny_dir):
    single = InternVLReasoner.from_pretrained(str(tiny_dir), None, dtype="float32", max_tiles=1)
    shots = [block_image(56, 28, 1), block_image(56, 56, 2)]
    pixels = single.image_inputs(shots)
    old = single.processor.image_processor(images=shots, crop_to_patches=False, return_tensors="pt")
    assert pixels.shape == (2, 1, 3, 28, 28)
    assert torch.equal(pixels[:, 0], old["pixel_values"])


# -- gradient checkpointing ----------------------------------------------------------------------
def test_gradient_checkpointing_keeps_the_adapters_gradients(tiny_dir):
    """transformers 4.x's default reentrant checkpoint left the loss without gradient
    (``inject_adapter_in_model`` sets no input gradients); the non-reentrant one must give the
    LoRA weights of both towers the same gradients as no checkpointing."""
    grads = {}
    for checkpointing in (False, True):
        model = InternVLReasoner.from_pretrained(
            str(tiny_dir), LoRASettings(dropout=0.0), dtype="float32",
            gradient_checkpointing=checkpointing,
        )  # fmt: skip
        if checkpointing:
            funcs = [
                m._gradient_checkpointing_func
                for m in model.model.modules()
                if getattr(m, "gradient_checkpointing", False)
            ]
            assert funcs and all(f.keywords == {"use_reentrant": False} for f in funcs)
        model.train()
        pixels = model.image_inputs([block_image(56, 28, 1), block_image(28, 28, 0)])
        model.nll(pixels, ["what ?", "think ."], ["cat", "a summary"]).sum().backward()
        grads[checkpointing] = {
            n: p.grad.clone() for n, p in model.model.named_parameters() if "lora_B" in n
        }
    for tower in ("vision_tower", "language_model"):
        assert any(g.abs().sum() > 0 for n, g in grads[True].items() if tower in n)
    assert grads[True].keys() == grads[False].keys()
    for name, g in grads[True].items():
        assert torch.allclose(g, grads[False][name], atol=1e-6), name
