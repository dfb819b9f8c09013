"""The micro MLLM: a frozen micro-clip vision tower, a projector and a small causal LM.

Real MLLM weights cannot be downloaded offline, so cdfsl builds a tiny one that trains on a
CPU in minutes:

- vision: the ViT of ``assets/micro-clip`` (pretrained on the micro world by
  :mod:`cdfsl.pretrain_micro`), frozen; its patch tokens (after its final norm), optionally
  average-pooled to ``image_grid`` x ``image_grid``, joined by their mean: grid² + 1 image
  tokens. ``vision="random"`` uses a randomly initialised tower of the same shape, for tests
  and development. Because the tower is frozen,
  :meth:`MicroMLLM.image_inputs` returns those features, computed once per image per run;
- projector: LayerNorm -> Linear -> GELU -> Linear into the LM width, plus a learned embedding
  per image slot;
- language model: a pre-norm causal transformer (learned positions, tied input/output word
  embeddings) over a word-level vocabulary (:class:`WordVocabulary`) built from the texts it
  will see: the prompts, the class names and the chains. Trained from scratch.

The sequence is ``[image tokens] <bos> prompt words target words <eos>``; the loss reads the
target words and ``<eos>``. Generation is greedy with a key/value cache.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.factory import LOCAL_DIR_PREFIX
from PIL import Image
from torch import Tensor, nn

from cdfsl.assets import assets_dir
from cdfsl.errors import CdfslError, WeightsError
from cdfsl.reasoning.model import GenerativeVLM

_TAG = re.compile(r"</?[A-Z]+>")
_TOKEN = re.compile(r"</?[A-Z]+>|[A-Za-z]+|\d+|[^\sA-Za-z\d]")
_NO_SPACE_BEFORE = re.compile(r" ([.,;:?!])")


class WordVocabulary:
    """Words -> ids: four specials, then the sorted words of the texts it was built from.

    Words are lower-cased runs of letters, digits, single punctuation marks and the chain tags
    (``<SUMMARY>``, ``</CONCLUSION>``, ...) kept whole. Unknown words map to ``<unk>``.
    """

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
    PAD, BOS, EOS, UNK = 0, 1, 2, 3

    def __init__(self, words: Iterable[str]) -> None:
        rest = sorted(set(words) - set(self.SPECIALS))
        self.words: list[str] = [*self.SPECIALS, *rest]
        self._ids = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> WordVocabulary:
        return cls(w for text in texts for w in cls.split(text))

    @staticmethod
    def split(text: str) -> list[str]:
        """The words of ``text``: tags kept, everything else lower-cased."""
        return [t if _TAG.fullmatch(t) else t.lower() for t in _TOKEN.findall(text)]

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(w, self.UNK) for w in self.split(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first ``<eos>``, joined by spaces, no space before punctuation."""
        words = []
        for i in ids:
            if i == self.EOS:
                break
            if i not in (self.PAD, self.BOS):
                words.append(self.words[i])
        return _NO_SPACE_BEFORE.sub(r"\1", " ".join(words))


@dataclass
class MicroMLLMConfig:
    """Shape of the micro MLLM.

    ``vision``: "micro-clip" (``assets/micro-clip``), a local open_clip model directory, or
    "random" (a random tower of micro-clip's shape). ``image_grid``: patch tokens are
    average-pooled to ``image_grid`` x ``image_grid`` (None: the tower's own grid).
    ``max_length``: longest sequence, image tokens included.
    """

    vision: str = "micro-clip"
    width: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    image_grid: int | None = None
    max_length: int = 192
    dropout: float = 0.1


_MODEL_FILES = ("open_clip_config.json", "open_clip_model.safetensors")


def micro_clip_dir() -> Path:
    """Where the shipped micro CLIP lives (``$CDFSL_ASSETS/micro-clip``)."""
    return assets_dir() / "micro-clip"


def load_vision_tower(vision: str) -> tuple[nn.Module, dict]:
    """The frozen vision tower named by ``vision`` and its preprocessing (size, mean, std).

    Raises :class:`WeightsError` when the micro-clip files are not on this machine.
    """
    if vision == "random":
        from cdfsl.pretrain_micro import MICRO_CLIP_CFG, PREPROCESS_CFG

        # micro-clip's vision tower, randomly initialised; a token text tower keeps it small.
        tiny_text = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
        torch.manual_seed(0)
        visual = open_clip.CLIP(**{**MICRO_CLIP_CFG, "text_cfg": tiny_text}).visual
        return visual.requires_grad_(False).eval(), _preprocess(PREPROCESS_CFG)
    folder = micro_clip_dir() if vision == "micro-clip" else Path(vision).expanduser()
    missing = [f for f in _MODEL_FILES if not (folder / f).is_file()]
    if missing:
        raise WeightsError(
            f"vision tower {vision!r} needs {', '.join(missing)} in {folder}, which "
            f"{'is' if len(missing) == 1 else 'are'} not there; build micro-clip with "
            f"`cdfsl pretrain-micro --output {micro_clip_dir()}` (about 25 minutes on "
            "a CPU), or set model.vision: random for a random tower"
        )
    config = json.loads((folder / "open_clip_config.json").read_text())
    model = open_clip.create_model(f"{LOCAL_DIR_PREFIX}{folder}")
    size = config["model_cfg"]["vision_cfg"]["image_size"]
    preprocess = _preprocess({"size": size, **config.get("preprocess_cfg", {})})
    return model.visual.requires_grad_(False).eval(), preprocess


def _preprocess(cfg: dict) -> dict:
    """Size, mean and std of an open_clip ``preprocess_cfg`` (CLIP's mean/std if absent)."""
    size = cfg["size"]
    return {
        "size": int(size[0] if isinstance(size, (list, tuple)) else size),
        "mean": tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        "std": tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
    }


class _Block(nn.Module):
    """Pre-norm causal self-attention + MLP, with an optional key/value cache."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln_attn = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.ln_mlp = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, past: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x: (B, T, D); past: cached (k, v) of earlier positions, each (B, H, T0, D/H)."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_attn(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        # With a cache the new positions come last, so they may attend to everything cached;
        # new steps are one token each during generation, so no mask is needed then.
        causal = past is None and t > 1
        drop = self.dropout.p if self.training else 0.0
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=drop)
        x = x + self.dropout(self.out(attn.transpose(1, 2).reshape(b, t, d)))
        x = x + self.dropout(self.mlp(self.ln_mlp(x)))
        return x, (k, v)


class MicroMLLM(GenerativeVLM):
    """The micro MLLM (module docstring); implements :class:`GenerativeVLM`."""

    cache_image_inputs = True  # a few dozen frozen feature vectors per image

    def __init__(
        self,
        config: MicroMLLMConfig,
        vocabulary: WordVocabulary,
        vision: nn.Module | None = None,
        preprocess: dict | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if vision is None:
            vision, preprocess = load_vision_tower(config.vision)
        self.config = config
        self.vocabulary = vocabulary
        self.vision = vision.requires_grad_(False).eval()
        self.preprocess = preprocess or {"size": 64, "mean": (0.5,) * 3, "std": (0.25,) * 3}
        self.feature_width = feature_width = self.vision.transformer.width
        native = self.vision.grid_size[0]
        self.grid = config.image_grid or native
        self.num_image_tokens = self.grid**2 + 1
        width = config.width
        self.projector = nn.Sequential(
            nn.LayerNorm(feature_width),
            nn.Linear(feature_width, width),
            nn.GELU(),
            nn.Linear(width, width),
        )
        self.image_slots = nn.Parameter(torch.zeros(self.num_image_tokens, width))
        self.word_embedding = nn.Embedding(len(vocabulary), width)
        self.positions = nn.Parameter(torch.zeros(config.max_length, width))
        self.blocks = nn.ModuleList(
            _Block(width, config.heads, config.mlp_ratio, config.dropout)
            for _ in range(config.layers)
        )
        self.ln_final = nn.LayerNorm(width)
        self.reset_trainable(seed)

    # -- weights ------------------------------------------------------------------------------
    def reset_trainable(self, seed: int) -> None:
        """Fresh from-scratch weights for the projector and the LM (GPT-2-style init)."""
        generator = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            with torch.no_grad():
                if name.endswith("bias") or ".ln_" in name or "ln_final" in name:
                    p.fill_(0.0 if name.endswith("bias") else 1.0)
                elif "projector.0" in name:  # the projector's LayerNorm weight
                    p.fill_(1.0)
                else:
                    std = 0.02
                    if name.endswith(("out.weight", "mlp.2.weight")):
                        std /= math.sqrt(2 * self.config.layers)  # residual branches
                    p.copy_(torch.randn(p.shape, generator=generator) * std)

    def model_card(self) -> dict:
        """Config, vocabulary and parameter counts, JSON-ready."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {
            "config": asdict(self.config),
            "vocabulary_size": len(self.vocabulary),
            "trainable_parameters": trainable,
            "vision_parameters": sum(p.numel() for p in self.vision.parameters()),
        }

    # -- images --------------------------------------------------------------------------------
    @torch.no_grad()
    def image_inputs(self, images: Sequence[Image.Image], batch_size: int = 256) -> Tensor:
        """(B, grid² + 1, width): pooled patch tokens and their mean, of the frozen tower."""
        size = self.preprocess["size"]
        mean = torch.tensor(self.preprocess["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess["std"]).view(1, 3, 1, 1)
        self.vision.output_tokens = True
        self.vision.eval()
        out = []
        for start in range(0, len(images), batch_size):
            chunk = [
                np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
                for im in images[start : start + batch_size]
            ]
            pixels = torch.from_numpy(np.stack(chunk)).permute(0, 3, 1, 2).float() / 255.0
            _, tokens = self.vision((pixels - mean) / std)
            b, n, c = tokens.shape
            side = math.isqrt(n)
            grid = tokens.transpose(1, 2).reshape(b, c, side, side)
            pooled = F.adaptive_avg_pool2d(grid, self.grid).flatten(2).transpose(1, 2)
            out.append(torch.cat([pooled, tokens.mean(dim=1, keepdim=True)], dim=1))
        return torch.cat(out).float()

    # -- sequences -----------------------------------------------------------------------------
    def _prefix_ids(self, prompt: str) -> list[int]:
        return [WordVocabulary.BOS, *self.vocabulary.encode(prompt)]

    def _target_ids(self, target: str) -> list[int]:
        return [*self.vocabulary.encode(target), WordVocabulary.EOS]

    def fits(self, prompt: str, target: str) -> bool:
        """Whether image tokens, prompt, target and ``<eos>`` fit in ``max_length``."""
        tokens = len(self._prefix_ids(prompt)) + len(self._target_ids(target))
        return tokens + self.num_image_tokens <= self.config.max_length

    def _check_length(self, tokens: int) -> None:
        if tokens + self.num_image_tokens > self.config.max_length:
            raise CdfslError(
                f"a sequence of {tokens} words plus {self.num_image_tokens} image tokens exceeds "
                f"the micro MLLM's max_length={self.config.max_length}; raise model.max_length "
                "in the recipe or shorten the chains"
            )

    def _hidden(
        self,
        image_inputs: Tensor,
        ids: Tensor,
        start: int = 0,
        past: list[tuple[Tensor, Tensor]] | None = None,
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Final hidden states (B, T, D) of ``ids`` at positions ``start..``; image tokens are
        prepended when ``past`` is None."""
        x = self.word_embedding(ids)
        if past is None:
            image = self.projector(image_inputs.to(x.dtype)) + self.image_slots
            x = torch.cat([image, x], dim=1)
        x = x + self.positions[start : start + x.shape[1]]
        cache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if past is None else past[i])
            cache.append(kv)
        return self.ln_final(x), cache

    def _logits(self, hidden: Tensor) -> Tensor:
        return hidden @ self.word_embedding.weight.T

    def nll(
        self,
        image_inputs: Tensor,
        prompts: Sequence[str],
        targets: Sequence[str],
        length_normalise: bool = False,
    ) -> Tensor:
        """(B,) NLL of each target's words and ``<eos>``; summed, or their mean if normalised."""
        prefixes = [self._prefix_ids(p) for p in prompts]
        answers = [self._target_ids(t) for t in targets]
        rows = [p + a for p, a in zip(prefixes, answers, strict=True)]
        length = max(len(r) for r in rows)
        self._check_length(length)
        ids = torch.full((len(rows), length), WordVocabulary.PAD, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, (p, r) in enumerate(zip(prefixes, rows, strict=True)):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, len(p) : len(r)] = True
        device = self.word_embedding.weight.device
        ids, mask = ids.to(device), mask.to(device)
        hidden, _ = self._hidden(image_inputs.to(device), ids)
        # Position n_img + j - 1 predicts word j: the image tokens' last one predicts <bos>'s
        # successor only through the prompt, so text position j is read at n_img + j - 1.
        n_img = self.num_image_tokens
        logits = self._logits(hidden[:, n_img - 1 : n_img + length - 1]).float()
        token_nll = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
        token_nll = token_nll * mask
        total = token_nll.sum(dim=1)
        return total / mask.sum(dim=1) if length_normalise else total

    @torch.no_grad()
    def generate(
        self, image_inputs: Tensor, prompts: Sequence[str], max_new_tokens: int = 128
    ) -> list[str]:
        """Greedy answers; rows with equal prompt length decode together with a KV cache."""
        was_training = self.training
        self.eval()
        answers: list[str] = [""] * len(prompts)
        groups: dict[int, list[int]] = {}
        prefixes = [self._prefix_ids(p) for p in prompts]
        for i, p in enumerate(prefixes):
            groups.setdefault(len(p), []).append(i)
        device = self.word_embedding.weight.device
        for length, rows in groups.items():
            self._check_length(length)
            steps = min(max_new_tokens, self.config.max_length - self.num_image_tokens - length)
            ids = torch.tensor([prefixes[i] for i in rows], device=device)
            hidden, cache = self._hidden(image_inputs[rows].to(device), ids)
            position = hidden.shape[1]
            out = torch.full((len(rows), steps), WordVocabulary.PAD, dtype=torch.long)
            done = torch.zeros(len(rows), dtype=torch.bool, device=device)
            for step in range(steps):
                token = self._logits(hidden[:, -1]).argmax(dim=-1)
                token = torch.where(done, WordVocabulary.PAD, token)
                out[:, step] = token.cpu()
                done |= token == WordVocabulary.EOS
                if bool(done.all()) or step == steps - 1:
                    break
                hidden, cache = self._hidden(
                    image_inputs[rows], token[:, None], start=position, past=cache
                )
                position += 1
            for k, i in enumerate(rows):
                answers[i] = self.vocabulary.decode(out[k].tolist())
        self.train(was_training)
        return answers
