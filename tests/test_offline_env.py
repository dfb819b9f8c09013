"""The Hugging Face offline conventions where cdfsl looks for weights and tokenizers.

``HF_HOME`` / ``HF_HUB_CACHE`` choose the cache that is searched (read when huggingface_hub is
imported, so those cases run in a fresh interpreter), and ``HF_HUB_OFFLINE=1`` forbids every
download, even an allowed one. The caches are temporary folders holding tiny generated files in
the hub's layout; nothing is loaded and nothing is requested.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import open_clip
import pytest

from cdfsl.backbones import create_backbone
from cdfsl.backbones.registry import hub_offline, resolve_entry, resolve_weights
from cdfsl.errors import WeightsError

CLIP_REPO = "timm/vit_base_patch16_clip_224.openai"  # clip-vit-b16's open_clip hub repo
SIGLIP_TOKENIZER = "timm/ViT-B-16-SigLIP"
HF_ENVS = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE")


def write_hub_repo(cache: Path, repo_id: str, files: dict[str, str]) -> Path:
    """A repo in the Hugging Face cache layout: ``models--org--name/{refs/main,snapshots/REV}``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return snapshot


def fill_cache(cache: Path) -> tuple[Path, Path]:
    weights = write_hub_repo(cache, CLIP_REPO, {"open_clip_model.safetensors": "not loaded"})
    tokenizer = write_hub_repo(
        cache, SIGLIP_TOKENIZER, {"tokenizer_config.json": "{}", "tokenizer.json": "{}"}
    )
    return weights / "open_clip_model.safetensors", tokenizer


LOOKUP = """
import json, sys
from cdfsl.backbones.registry import resolve_entry, resolve_weights, weights_available
from cdfsl.backbones.tokenizers import find_tokenizer_dir
entry = resolve_entry("clip-vit-b16")
print(json.dumps({
    "weights": resolve_weights(entry, "default").checkpoint,
    "tokenizer": find_tokenizer_dir(sys.argv[1]),
    "available": weights_available(entry),
}))
"""


def lookup_in_fresh_process(tmp_path: Path, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in HF_ENVS}
    clean.update(env, HOME=str(tmp_path / "home"), CDFSL_ALLOW_DOWNLOAD="0", OMP_NUM_THREADS="1")
    clean.pop("CDFSL_TOKENIZER_DIR", None)
    done = subprocess.run(
        [sys.executable, "-c", LOOKUP, SIGLIP_TOKENIZER],
        env=clean,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_hf_home_and_hf_hub_cache_choose_the_cache_searched(tmp_path) -> None:
    weights, tokenizer = fill_cache(tmp_path / "hf-home" / "hub")
    found = lookup_in_fresh_process(tmp_path, HF_HOME=str(tmp_path / "hf-home"))
    assert found == {"weights": str(weights), "tokenizer": str(tokenizer), "available": True}
    # HF_HUB_CACHE wins over HF_HOME, as in huggingface_hub.
    weights, tokenizer = fill_cache(tmp_path / "hub-cache")
    found = lookup_in_fresh_process(
        tmp_path, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_CACHE=str(tmp_path / "hub-cache")
    )
    assert found == {"weights": str(weights), "tokenizer": str(tokenizer), "available": True}


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download started although HF_HUB_OFFLINE=1")

    monkeypatch.setattr(open_clip, "download_pretrained", refuse)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(open_clip, "create_model", refuse)
    monkeypatch.delenv("CDFSL_TOKENIZER_DIR", raising=False)


@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_hf_hub_offline_forbids_downloads_even_when_allowed(
    no_network, monkeypatch, tmp_path, value
):
    empty = str(tmp_path / "empty-cache")
    monkeypatch.setenv("CDFSL_ALLOW_DOWNLOAD", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_offline()
    with pytest.raises(WeightsError, match="unset HF_HUB_OFFLINE and set CDFSL_ALLOW_DOWNLOAD=1"):
        resolve_weights(resolve_entry("clip-vit-b16"), "default", empty, allow_download=True)
    with pytest.raises(WeightsError) as err:
        create_backbone("siglip-vit-b16", cache_dir=empty, allow_download=True)
    assert "\n" not in str(err.value)
    assert "needs the Hugging Face tokenizer" in str(err.value)


def test_files_in_the_cache_load_under_hf_hub_offline(no_network, monkeypatch, tmp_path) -> None:
    weights, _ = fill_cache(tmp_path / "cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    entry = resolve_entry("clip-vit-b16")
    assert resolve_weights(entry, "default", str(tmp_path / "cache")).checkpoint == str(weights)


def test_offline_is_off_unless_set(monkeypatch) -> None:
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    assert not hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub_offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert hub_offline()
