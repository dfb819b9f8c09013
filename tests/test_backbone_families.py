"""SigLIP, SigLIP2 and PE-Core beside CLIP: tiny random-init configs of the real classes."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import huggingface_hub
import open_clip
import pytest
import torch
from imagegen import make_image_folder
from open_clip.timm_model import TimmModel
from safetensors.torch import save_file
from timm.layers import Attention, AttentionRope
from timm.models import Eva, VisionTransformer

from cdfsl.backbones import Backbone, create_backbone, list_backbones
from cdfsl.backbones.clip import ClipBackbone
from cdfsl.backbones.pe_core import PeCoreBackbone
from cdfsl.backbones.registry import _family_for, resolve_entry, resolve_weights
from cdfsl.backbones.siglip import SiglipBackbone
from cdfsl.backbones.tokenizers import TOKENIZER_DIR_ENV, find_tokenizer_dir, resolve_tokenizer
from cdfsl.cli import main
from cdfsl.errors import WeightsError
from cdfsl.lora import (
    LoRAAdapter,
    LoRAConfig,
    inject_lora,
    lora_parameters,
    mark_only_lora_trainable,
    merge_lora,
    unmerge_lora,
)

ROOT = Path(__file__).resolve().parents[1]
TINY_MIND = str(ROOT / "recipes/tiny/mind.yaml")
SIGLIP_TOKENIZER = "timm/ViT-B-16-SigLIP"

# tiny name -> (adapter, timm trunk class, attention class, has logit bias)
TINY = {
    "tiny-siglip": (SiglipBackbone, VisionTransformer, Attention, True),
    "tiny-siglip2": (SiglipBackbone, VisionTransformer, Attention, True),
    "tiny-pe-core": (PeCoreBackbone, Eva, AttentionRope, False),
}


@pytest.fixture(scope="module")
def built() -> dict[str, Backbone]:
    torch.manual_seed(0)
    return {name: create_backbone(name, pretrained=None) for name in TINY}


@pytest.fixture(params=sorted(TINY))
def tiny(request, built) -> Backbone:
    return copy.deepcopy(built[request.param])


def images(backbone: Backbone, n: int = 4) -> torch.Tensor:
    x = torch.rand(n, 3, *backbone.preprocess.size, generator=torch.Generator().manual_seed(1))
    return backbone.normalize(x)


def randomise(root: torch.nn.Module, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in lora_parameters(root):
            p.copy_(torch.randn(p.shape, generator=g) * std)


# ----------------------------------------------------------------------------- tiny towers


def test_tiny_configs_build_the_real_classes(tiny: Backbone) -> None:
    adapter, trunk, attention, has_bias = TINY[tiny.name]
    cfg = open_clip.get_model_config(resolve_entry(tiny.name).model)
    assert type(tiny) is adapter
    assert isinstance(tiny.model, open_clip.CustomTextCLIP)
    assert isinstance(tiny.model.visual, TimmModel) and type(tiny.model.visual.trunk) is trunk
    assert {type(b.attn) for b in tiny.model.visual.trunk.blocks} == {attention}
    assert (tiny.logit_bias == cfg.get("init_logit_bias")) if has_bias else tiny.logit_bias is None
    assert tiny.logit_scale == pytest.approx(float(tiny.model.logit_scale.detach().exp()))
    assert tiny.preprocess.size == (cfg["vision_cfg"]["image_size"],) * 2
    with torch.no_grad():
        feats = tiny.encode_image(images(tiny))
    assert feats.shape == (4, cfg["embed_dim"])
    text = tiny.text_features(["a photo of a cat.", "a photo of a dog."])
    assert text.shape == (2, cfg["embed_dim"])
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(text[0], text[1])


def test_lora_counts_per_block_and_projection(tiny: Backbone) -> None:
    text_modules = dict(tiny.model.text.named_modules())
    names = inject_lora(tiny.lora_root(), LoRAConfig(rank=4, targets=("q", "v")))
    depth = len(tiny.model.visual.trunk.blocks)
    assert names == [f"trunk.blocks.{i}.attn.qkv.{p}" for i in range(depth) for p in "qv"]
    adapters = [m for m in tiny.model.modules() if isinstance(m, LoRAAdapter)]
    assert len(adapters) == depth * 2
    width = tiny.model.visual.trunk.embed_dim
    assert {(a.start, a.stop) for a in adapters} == {(0, width), (2 * width, 3 * width)}
    assert not any(isinstance(m, LoRAAdapter) for m in tiny.model.visual.trunk.attn_pool.modules())
    assert dict(tiny.model.text.named_modules()) == text_modules  # text tower untouched


def test_zero_b_leaves_features_exactly_unchanged(tiny: Backbone) -> None:
    base = copy.deepcopy(tiny)
    inject_lora(tiny.lora_root(), LoRAConfig(rank=4))
    x = images(tiny)
    with torch.no_grad():
        for train in (True, False):  # LoRA dropout active, then not
            tiny.train(train)
            base.train(train)
            assert torch.equal(tiny.encode_image(x), base.encode_image(x))


def test_only_adapters_get_gradients(tiny: Backbone) -> None:
    inject_lora(tiny.lora_root(), LoRAConfig(rank=4))
    randomise(tiny.lora_root())
    mark_only_lora_trainable(tiny)
    tiny.train()
    tiny.encode_image(images(tiny)).square().sum().backward()
    lora_ids = {id(p) for p in lora_parameters(tiny)}
    assert len(lora_ids) == 2 * 3 * len(tiny.model.visual.trunk.blocks)
    for name, p in tiny.named_parameters():
        if id(p) in lora_ids:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_merge_equals_unmerged(tiny: Backbone) -> None:
    inject_lora(tiny.lora_root(), LoRAConfig(rank=4))
    randomise(tiny.lora_root())
    tiny.eval()
    qkv = tiny.model.visual.trunk.blocks[0].attn.qkv.weight
    before = qkv.detach().clone()
    x = images(tiny)
    with torch.no_grad():
        unmerged = tiny.encode_image(x)
        merge_lora(tiny.lora_root())
        assert not torch.equal(qkv, before)
        torch.testing.assert_close(tiny.encode_image(x), unmerged, atol=1e-5, rtol=1e-5)
        unmerge_lora(tiny.lora_root())
        assert torch.equal(qkv, before)
        assert torch.equal(tiny.encode_image(x), unmerged)


@pytest.mark.parametrize("backbone", ["tiny-clip", "tiny-siglip", "tiny-siglip2", "tiny-pe-core"])
def test_one_mind_recipe_runs_on_every_family(backbone, tmp_path, capsys) -> None:
    folder = make_image_folder(tmp_path / "data", {"Cat": 3, "Dog": 3, "Bird": 3}, size=20)
    out = tmp_path / "out"
    code = main(
        ["eval", "--config", TINY_MIND, "--method.init_args.backbone", backbone,
         "--data.root", str(folder), "--output", str(out), "--way", "3", "--shot", "1",
         "--query", "2", "--steps", "2", "--episodes", "1", "--progress", "false"]
    )  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == 0
    assert f"| Mind | {backbone} | data | 3 | 1 | 2 | 1 |" in stdout
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["steps"] == 2
    assert torch.isfinite(torch.tensor(rows[0]["terms"]["loss"]))


# ----------------------------------------------------------------------------- registry rows

REAL_ROWS = {
    "siglip-vit-b16": ("ViT-B-16-SigLIP", SiglipBackbone, 224),
    "siglip2-vit-b16": ("ViT-B-16-SigLIP2", SiglipBackbone, 224),
    "pe-core-b16": ("PE-Core-B-16", PeCoreBackbone, 224),
    "pe-core-l14": ("PE-Core-L-14-336", PeCoreBackbone, 336),
    "pe-core-t16": ("PE-Core-T-16-384", PeCoreBackbone, 384),
    "pe-core-s16": ("PE-Core-S-16-384", PeCoreBackbone, 384),
}


def test_rows_name_real_open_clip_models_tags_and_families() -> None:
    entries = {e.name: e for e in list_backbones()}
    for name, (model, adapter, size) in REAL_ROWS.items():
        assert entries[name].model == model
        assert _family_for(model) is adapter
        assert open_clip.get_model_config(model)["vision_cfg"]["image_size"] == size
    assert _family_for("ViT-B-16") is ClipBackbone
    for entry in entries.values():  # every row's default tag is one open_clip knows
        if entry.pretrained is not None:
            assert open_clip.get_pretrained_cfg(entry.model, entry.pretrained), entry.name


@pytest.mark.parametrize(
    ("name", "mean", "interpolation"),
    [
        ("siglip-vit-b16", (0.5, 0.5, 0.5), "bicubic"),
        ("siglip2-vit-b16", (0.5, 0.5, 0.5), "bicubic"),
        ("pe-core-b16", (0.5, 0.5, 0.5), "bilinear"),
        ("clip-vit-b16", open_clip.OPENAI_DATASET_MEAN, "bicubic"),
    ],
)
def test_local_checkpoint_keeps_the_tags_preprocessing(name, mean, interpolation, tmp_path):
    checkpoint = tmp_path / "weights.safetensors"
    checkpoint.write_bytes(b"")  # only its existence matters to the lookup
    weights = resolve_weights(resolve_entry(name), str(checkpoint))
    assert weights.checkpoint == str(checkpoint)
    assert tuple(weights.tag_cfg["mean"]) == tuple(mean)
    assert weights.tag_cfg["interpolation"] == interpolation
    assert bool(weights.tag_cfg.get("quick_gelu")) is (name == "clip-vit-b16")


def test_pe_core_preprocessing_reaches_the_backbone(monkeypatch, tmp_path) -> None:
    # Build the tiny PE-Core in place of PE-Core-B-16, with the kwargs the registry passes.
    seen = {}
    real_create = open_clip.create_model

    def create_tiny(model_name, pretrained=None, **kwargs):
        seen.update(model=model_name, pretrained=pretrained, **kwargs)
        return real_create("cdfsl-tiny-pe-core", pretrained=None, **kwargs)

    monkeypatch.setattr(open_clip, "create_model", create_tiny)
    checkpoint = tmp_path / "pe.safetensors"
    checkpoint.write_bytes(b"")
    backbone = create_backbone("pe-core-b16", pretrained=str(checkpoint))
    assert (seen["model"], seen["pretrained"]) == ("PE-Core-B-16", str(checkpoint))
    assert seen["force_quick_gelu"] is False
    assert backbone.preprocess.mean == (0.5, 0.5, 0.5) == backbone.preprocess.std
    assert backbone.preprocess.interpolation == "bilinear"
    assert type(backbone) is PeCoreBackbone


def test_pretrained_directory_loads_the_hub_weight_file(built, tmp_path) -> None:
    tiny = built["tiny-pe-core"]
    save_file(tiny.model.state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    loaded = create_backbone("tiny-pe-core", pretrained=str(tmp_path))
    x = images(tiny)
    with torch.no_grad():
        assert torch.equal(loaded.eval().encode_image(x), tiny.eval().encode_image(x))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match=r"has no open_clip_model\.safetensors"):
        create_backbone("tiny-pe-core", pretrained=str(empty))


# ----------------------------------------------------------------------------- offline failures


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No download may start and no model may be built; the HF cache is an empty folder."""

    def refuse(*args, **kwargs):
        raise AssertionError("network or model build attempted before the files were checked")

    monkeypatch.delenv("CDFSL_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.delenv(TOKENIZER_DIR_ENV, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(open_clip, "download_pretrained", refuse)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(open_clip, "create_model", refuse)
    return tmp_path


@pytest.mark.parametrize(
    ("name", "model"),
    [("siglip-vit-b16", "ViT-B-16-SigLIP"), ("siglip2-vit-b16", "ViT-B-16-SigLIP2")],
)
def test_siglip_without_weights_or_tokenizer_fails_at_once(offline, name, model) -> None:
    with pytest.raises(WeightsError) as err:
        create_backbone(name, cache_dir=str(offline / "hf"))
    message = str(err.value)
    assert "\n" not in message
    for part in (
        f"'{model}' tag 'webli' are not in the local cache",
        "pretrained=/path/to/checkpoint",
        f"tokenizer 'timm/{model}'",
        "tokenizer=DIR",
        f"{TOKENIZER_DIR_ENV}=ROOT with the files in ROOT/timm/{model}/",
    ):
        assert part in message


def test_siglip_with_weights_but_no_tokenizer_names_only_the_tokenizer(offline) -> None:
    checkpoint = offline / "siglip.safetensors"
    checkpoint.write_bytes(b"")
    with pytest.raises(WeightsError) as err:
        create_backbone("siglip-vit-b16", pretrained=str(checkpoint))
    assert str(err.value).startswith("backbone 'siglip-vit-b16' needs the Hugging Face tokenizer")
    assert "weights" not in str(err.value)
    with pytest.raises(WeightsError, match=r"tokenizer='.*nowhere' .* is not a directory with"):
        create_backbone("siglip-vit-b16", pretrained=str(checkpoint), tokenizer=offline / "nowhere")
    with pytest.raises(WeightsError, match="names no Hugging Face tokenizer"):
        create_backbone("tiny-pe-core", pretrained=None, tokenizer=offline)


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is not None, reason="needs transformers missing"
)
def test_no_weight_download_starts_when_the_tokenizer_cannot_load(offline, monkeypatch) -> None:
    monkeypatch.setenv("CDFSL_ALLOW_DOWNLOAD", "1")
    with pytest.raises(WeightsError) as err:
        create_backbone("siglip-vit-b16", cache_dir=str(offline / "hf"))
    assert "pip install transformers" in str(err.value)
    assert "failed" not in str(err.value)  # no download began (the fixture would refuse it)


def write_tokenizer(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_tokenizer_files_are_found_in_each_documented_place(offline, monkeypatch) -> None:
    assert find_tokenizer_dir(SIGLIP_TOKENIZER) is None
    # The Hugging Face cache layout, read without a request.
    repo = offline / "hf" / "models--timm--ViT-B-16-SigLIP"
    snapshot = write_tokenizer(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert find_tokenizer_dir(SIGLIP_TOKENIZER) == str(snapshot)
    # $CDFSL_TOKENIZER_DIR/<hub id>/ wins over the cache, a pretrained directory over both.
    root = offline / "tokenizers"
    write_tokenizer(root / SIGLIP_TOKENIZER)
    monkeypatch.setenv(TOKENIZER_DIR_ENV, str(root))
    assert find_tokenizer_dir(SIGLIP_TOKENIZER) == str(root / SIGLIP_TOKENIZER)
    copy_of_repo = write_tokenizer(offline / "repo")
    assert find_tokenizer_dir(SIGLIP_TOKENIZER, str(copy_of_repo)) == str(copy_of_repo)
    # A folder without the vocabulary file does not count.
    (copy_of_repo / "tokenizer.json").unlink()
    assert find_tokenizer_dir(SIGLIP_TOKENIZER, str(copy_of_repo)) == str(root / SIGLIP_TOKENIZER)


def test_found_tokenizer_needs_transformers(offline, monkeypatch) -> None:
    folder = write_tokenizer(offline / "tok")
    if importlib.util.find_spec("transformers") is None:
        with pytest.raises(WeightsError, match="pip install transformers"):
            resolve_tokenizer("siglip-vit-b16", "ViT-B-16-SigLIP", tokenizer=folder)
    else:
        source = resolve_tokenizer("siglip-vit-b16", "ViT-B-16-SigLIP", tokenizer=folder)
        assert (source.hub_id, source.location) == (SIGLIP_TOKENIZER, str(folder))
    # Families with the bundled BPE vocabulary need no files at all.
    assert resolve_tokenizer("pe-core-b16", "PE-Core-B-16").location is None


def test_backbones_command_lists_the_families(offline, capsys) -> None:
    assert main(["backbones"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    for name in ("tiny-siglip", "tiny-siglip2", "tiny-pe-core"):
        assert rows[name][-2:] == ["32", "yes"]
    for name, (model, _, size) in REAL_ROWS.items():
        assert rows[name][1] == model and rows[name][-2:] == [str(size), "no"]


def test_local_hf_tokenizer_is_read_with_the_models_settings(offline, monkeypatch) -> None:
    # Runs where transformers is installed: a hand-made tokenizer in place of SigLIP's files.
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = offline / "tokenizers" / SIGLIP_TOKENIZER
    folder.mkdir(parents=True)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "photo": 4, "of": 5, "cat": 6}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setenv(TOKENIZER_DIR_ENV, str(offline / "tokenizers"))
    # In place of the fixture's refusal: the tiny SigLIP, built by open_clip's own factory.
    monkeypatch.setattr(
        open_clip,
        "create_model",
        lambda name, pretrained=None, **kw: open_clip.factory.create_model(
            "cdfsl-tiny-siglip", pretrained=None, **kw
        ),
    )
    checkpoint = offline / "siglip.safetensors"
    checkpoint.write_bytes(b"")
    backbone = create_backbone("siglip-vit-b16", pretrained=str(checkpoint))
    ids = backbone.tokenize(["A photo of a Cat.", "a dog"])
    context = open_clip.get_model_config("ViT-B-16-SigLIP")["text_cfg"]["context_length"]
    assert ids.shape == (2, context)
    assert ids[0, :6].tolist() == [3, 4, 5, 3, 6, 0]  # "canonicalize": lower case, no punctuation
    assert ids[1, :3].tolist() == [3, 2, 0]
