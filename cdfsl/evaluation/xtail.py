"""X-TAIL: a frozen VLM learns a sequence of domains; every domain is tested after every step.

The label space is the union of the class names of all domains of the sequence, in sequence
order, names never merged across domains. The domain of a test image is unknown: every
prediction is an argmax over the whole union, seen and not yet seen. After learning domain t,
every domain k is evaluated: ``a[t][k]`` (rows: steps, columns: domains).

Methods, each resumable per step (a kill loses at most the step it was in):

- ``zero-shot``: the frozen model with ``template`` prompts; learns nothing.
- ``finetune``: LoRA cross-entropy fine-tuning on each domain's training shots in turn, over
  that domain's class names, the adapters carried from domain to domain (the forgetting that
  RAIL avoids).
- ``primal`` / ``dual``: Primal-RAIL and Dual-RAIL on cached frozen features, with RAIL-Fusion.

Where the public RAIL implementation (github.com/linghan1997/Regression-based-Analytic-
Incremental-Learning, ``primal_RAIL.py``) makes a choice the spec leaves open, it is a named
option whose default is the reference's: the class names in prompts (``class_name_style``),
the framing of training and test images (``train_preprocess``, ``train_crop_scale``,
``test_preprocess``), the draw for a class with fewer images than ``shots``
(``small_classes``) and the random layer's scale (``primal.random_init``).

Output directory: ``run.json`` (the sequence; checked on resume), one folder per method with
``run.json`` (its settings, checked on resume), ``steps.jsonl`` (one row per step),
``state.pt`` (the learner after the last finished step), ``matrix.json`` and ``matrix.png``;
then ``summary.json``, ``summary.md`` and ``xtail.png`` over all methods.
"""

from __future__ import annotations

import ctypes
import importlib
import math
import os
import re
import resource
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

from cdfsl.backbones import Backbone, create_backbone
from cdfsl.backbones.base import GEOMETRIES, Preprocess
from cdfsl.data.base import LabelledImages
from cdfsl.data.episodes import _UniformDraws
from cdfsl.data.mnist import TORCHVISION_CLASSES
from cdfsl.data.sources import DataConfig, build_dataset
from cdfsl.data.views import ViewSpec
from cdfsl.errors import CdfslError
from cdfsl.evaluation.runner import FitConfig, episode_seed, fit_episode, predict_logits
from cdfsl.evaluation.store import ResultStore, check_run_config, plain_json, write_json_atomic
from cdfsl.features import FeatureCache, ImageFeatures, backbone_fingerprint
from cdfsl.lora import LoRAConfig, load_lora_state_dict, lora_state_dict
from cdfsl.methods.rail import DualAdapter, PrimalAdapter, fuse

METHODS = ("zero-shot", "finetune", "primal", "dual")
"""Method names a recipe's ``methods`` list may hold, in the order they are run."""
METHOD_TITLES = {
    "zero-shot": "Zero-shot",
    "finetune": "LoRA fine-tune (sequential)",
    "primal": "Primal-RAIL",
    "dual": "Dual-RAIL",
}


# -- configuration ---------------------------------------------------------------------------
@dataclass
class DomainConfig:
    """One domain of the sequence.

    ``train`` and ``test`` each describe a dataset split: either a :class:`DataConfig` mapping
    (``source``, ``root``, ``class_names``, ``options``) of a registered source, or
    ``class_path`` + ``init_args`` of any ``LabelledImages`` class. Both splits must share
    their class names.
    """

    name: str
    train: dict[str, Any]
    test: dict[str, Any]


@dataclass
class PrimalConfig:
    """:class:`~cdfsl.methods.rail.PrimalAdapter` settings (the paper's H and lambda).

    ``random_init``: ``uniform_fan_in`` (the reference's ``nn.Linear`` layer) or ``normal``.
    """

    hidden: int = 15000
    reg: float = 0.1
    seed: int = 0
    random_init: str = "uniform_fan_in"
    dtype: str = "float64"
    block_size: int = 1024


@dataclass
class DualConfig:
    """:class:`~cdfsl.methods.rail.DualAdapter` settings (the paper's gamma and lambda)."""

    gamma: float = 0.1
    reg: float = 1e-3
    dtype: str = "float64"
    block_size: int = 1024


@dataclass
class FineTuneConfig:
    """The sequential fine-tuning baseline: ``steps`` LoRA-CE steps per domain.

    ``images_per_step``: training images drawn per step; None uses all of the domain's shots.
    """

    steps: int = 50
    images_per_step: int | None = None
    lr: float = 2e-4
    weight_decay: float = 1e-2
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    views: list[ViewSpec] | None = None
    precision: str = "32-true"
    accelerator: str = "auto"


@dataclass
class XTailConfig:
    """An X-TAIL run: the domain sequence, the backbone, the methods and where results go.

    ``shots``: training images per class drawn from each train split (seeded by ``seed`` and
    the domain's position); None uses the whole split. ``small_classes``: how a class with
    fewer images than ``shots`` is drawn, a row of :data:`SMALL_CLASS_DRAWS` (default
    ``with_replacement``, the reference's; ``keep_all`` keeps its images once each).
    ``class_name_style``: a row of :data:`CLASS_NAME_STYLES`, how the datasets' class names
    become prompt names (default ``rail_reference``; ``dataset`` keeps them).
    ``train_preprocess`` / ``test_preprocess``: how images are framed to the model's input
    size, a name :func:`framing` knows (defaults: the reference's seeded
    ``random_resized_crop`` of area ``train_crop_scale`` for training features, CLIP's
    ``short_side_crop`` for test images; ``squash`` was cdfsl's earlier choice for both).
    ``beta``: RAIL-Fusion's adapter weight.
    ``data_root``: the ``root`` of every split given by a registered source without one (the
    folder that holds all the datasets).
    ``device``: "auto" (CUDA when present), "cpu" or "cuda" for features and adapters.
    """

    domains: list[DomainConfig] = field(default_factory=list)
    data_root: str | None = None
    backbone: str = "micro-clip"
    pretrained: str | None = "default"
    template: str = "a photo of a {}."
    shots: int | None = 16
    small_classes: str = "with_replacement"
    class_name_style: str = "rail_reference"
    train_preprocess: str = "random_resized_crop"
    train_crop_scale: tuple[float, float] = (0.9, 1.0)
    test_preprocess: str = "short_side_crop"
    seed: int = 0
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    beta: float = 0.8
    primal: PrimalConfig = field(default_factory=PrimalConfig)
    dual: DualConfig = field(default_factory=DualConfig)
    finetune: FineTuneConfig = field(default_factory=FineTuneConfig)
    output: str = "runs/rail"
    cache_dir: str | None = None
    batch_size: int = 256
    device: str = "auto"
    progress: bool = True


# -- metrics and reports ---------------------------------------------------------------------
def xtail_metrics(matrix: Sequence[Sequence[float]] | np.ndarray) -> dict[str, float]:
    """Transfer, Average and Last of a ``(K, K)`` matrix ``a[t][k]`` (row: after step t).

    Transfer = mean over k >= 2 of the mean over t < k of a[t][k] (only entries above the
    diagonal: domains not learned yet; NaN when K = 1); Average = mean over k of the mean over
    all t of a[t][k]; Last = mean over k of a[K][k].
    """
    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise CdfslError(f"accuracy matrix of shape {a.shape}: expected (K, K) with K >= 1")
    k = a.shape[0]
    transfer = [a[:col, col].mean() for col in range(1, k)]
    return {
        "transfer": float(np.mean(transfer)) if transfer else math.nan,
        "average": float(a.mean(axis=0).mean()),
        "last": float(a[-1].mean()),
    }


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def format_matrix(matrix: Sequence[Sequence[float]], domains: Sequence[str]) -> str:
    """A markdown table of ``a[t][k]`` in percent: one row per step, one column per domain."""
    lines = [
        "| after \\ on | " + " | ".join(domains) + " |",
        "|---|" + "---:|" * len(domains),
    ]
    for name, row in zip(domains, matrix, strict=False):
        lines.append(f"| {name} | " + " | ".join(_pct(v) for v in row) + " |")
    return "\n".join(lines)


def format_summary(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table: method, Transfer, Average, Last (%), seconds and peak memory per update."""
    lines = [
        "| method | Transfer | Average | Last | s / domain update "
        "| update peak RSS (MB) | update extra RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, res in results.items():
        m = res["metrics"]
        secs, peak = res.get("update_seconds_mean"), res.get("update_peak_rss_mb_max")
        extra = res.get("update_extra_rss_mb_max")
        lines.append(
            f"| {METHOD_TITLES.get(name, name)} | {_pct(m['transfer'])} | {_pct(m['average'])} "
            f"| {_pct(m['last'])} | {'-' if secs is None else f'{secs:.2f}'} "
            f"| {'-' if peak is None else f'{peak:.0f}'} "
            f"| {'-' if extra is None else f'{extra:.0f}'} |"
        )
    return "\n".join(lines)


def plot_matrices(matrices: Mapping[str, Sequence[Sequence[float]]], domains: Sequence[str]) -> Any:
    """A matplotlib ``Figure`` (Agg canvas) with one annotated heatmap per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = len(domains)
    n = max(1, len(matrices))
    side = 1.0 + 0.55 * k
    fig = Figure(figsize=(side * n + 0.6, side + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (name, matrix) in zip(
        fig.subplots(1, n, squeeze=False)[0], matrices.items(), strict=False
    ):
        a = 100 * np.asarray(matrix, dtype=np.float64)
        im = ax.imshow(a, vmin=0, vmax=100, cmap="viridis")
        for t in range(a.shape[0]):
            for col in range(a.shape[1]):
                colour = "black" if a[t, col] > 60 else "white"
                ax.text(
                    col, t, f"{a[t, col]:.0f}", ha="center", va="center", fontsize=7, color=colour
                )
        m = xtail_metrics(matrix)
        ax.set_title(
            f"{METHOD_TITLES.get(name, name)}\nT {_pct(m['transfer'])}  A {_pct(m['average'])}  "
            f"L {_pct(m['last'])}",
            fontsize=9,
        )
        ax.set_xticks(range(k), domains, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(k), domains, fontsize=7)
        ax.set_xlabel("evaluated on", fontsize=8)
        ax.set_ylabel("after learning", fontsize=8)
    fig.colorbar(im, ax=fig.axes, shrink=0.8, label="accuracy (%)")
    return fig


# -- data ------------------------------------------------------------------------------------
def build_split(spec: Mapping[str, Any], data_root: str | None = None) -> LabelledImages:
    """A dataset split from a recipe mapping: ``class_path`` + ``init_args``, or a DataConfig.

    ``data_root`` stands in for the ``root`` of a DataConfig mapping that has none.
    """
    spec = dict(spec)
    if "class_path" in spec:
        path = str(spec.pop("class_path"))
        init_args = dict(spec.pop("init_args", None) or {})
        module_name, _, class_name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError) as err:
            raise CdfslError(
                f"class_path {path!r}: expected an importable LabelledImages class such as "
                "cdfsl.data.micro_world.MicroWorld; fix the dotted path"
            ) from err
        if spec:
            raise CdfslError(
                f"split with class_path {path!r} has extra keys {sorted(spec)}: expected only "
                "class_path and init_args; move them under init_args"
            )
        return cls(**init_args)
    allowed = set(DataConfig.__dataclass_fields__)
    if not set(spec) <= allowed:
        raise CdfslError(
            f"split keys {sorted(set(spec) - allowed)} unknown: expected {sorted(allowed)} of a "
            "registered source, or class_path + init_args"
        )
    data = DataConfig(**spec)
    if data.root is None:
        data.root = data_root
    return build_dataset(data)


def _draw_with_replacement(draws: _UniformDraws, members: Sequence[int], shots: int) -> list[int]:
    """``shots`` uniform draws with replacement: the reference's ``random.choices(items, k)``."""
    return [int(members[draws.below(len(members))]) for _ in range(shots)]


def _keep_all(draws: _UniformDraws, members: Sequence[int], shots: int) -> list[int]:
    """Every image of the class once (cdfsl's earlier rule)."""
    return [int(m) for m in members]


SMALL_CLASS_DRAWS = {
    "with_replacement": _draw_with_replacement,
    "keep_all": _keep_all,
}
"""How :func:`few_shot_indices` draws a class with fewer images than ``shots``: name ->
fn(draws, member indices, shots). ``with_replacement`` is the reference's
(``DatasetBase.generate_fewshot_dataset``: ``random.sample`` when a class has at least
``num_shots`` items, else ``random.choices(items, k=num_shots)``)."""


def few_shot_indices(
    targets: Sequence[int], shots: int | None, seed: int, small_classes: str = "with_replacement"
) -> list[int]:
    """``shots`` indices per class drawn without replacement, sorted (repeats kept).

    A class with fewer than ``shots`` images is drawn by ``SMALL_CLASS_DRAWS[small_classes]``.
    Class c's draw depends only on ``(seed, c)``, through the version-stable raw stream that
    ``cdfsl.data.episodes`` draws episodes from; ``shots=None`` keeps every index.
    """
    small = SMALL_CLASS_DRAWS.get(small_classes)
    if small is None:
        raise CdfslError(
            f"small_classes={small_classes!r}: expected one of {sorted(SMALL_CLASS_DRAWS)} "
            "(with_replacement is the reference's)"
        )
    if shots is None:
        return list(range(len(targets)))
    if shots < 1:
        raise CdfslError(f"shots={shots}: expected an integer >= 1 or null for the whole split")
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(targets):
        by_class.setdefault(int(c), []).append(i)
    chosen: list[int] = []
    for c, members in sorted(by_class.items()):
        draws = _UniformDraws(seed, c)
        if len(members) >= shots:
            chosen.extend(draws.sample(members, shots))
        else:
            chosen.extend(small(draws, members, shots))
    return sorted(chosen)


# -- class names -----------------------------------------------------------------------------
def _mnist_reference_names(names: Sequence[str]) -> list[str]:
    """MNIST's prompt names in the reference: torchvision's classes as ``number: "0 - zero"``
    (``scenario_datasets/collections.py``: ``'number: "{}"'.format(classname)``)."""
    if len(names) != len(TORCHVISION_CLASSES):
        raise CdfslError(f"MNIST with {len(names)} classes: expected the ten digits")
    return [f'number: "{name}"' for name in TORCHVISION_CLASSES]


def _satellite_location(names: Sequence[str]) -> list[str]:
    """EuroSAT's names in the reference: the CoOp split's name + " satellite location"
    (``scenario_datasets/eurosat.py`` renames every train and test item so)."""
    return [f"{name} satellite location" for name in names]


CLASS_NAME_STYLES: dict[str, dict[str, Any]] = {
    "rail_reference": {
        "mnist": _mnist_reference_names,
        "cdfsl.data.mnist.Mnist": _mnist_reference_names,
        "eurosat-fsl": _satellite_location,
        "eurosat": _satellite_location,
    },
    "dataset": {},
}
"""How a domain's class names become prompt names: style -> {split's ``source`` (or
``class_path``) -> fn(names) -> names}; a dataset the style does not name keeps its names.
``rail_reference`` is the reference's; ``dataset`` keeps every dataset's own names. (Every
other Order-I dataset's names come from the same CoOp split files in the reference and cdfsl,
underscores read as spaces.)"""


def prompt_names(style: str, spec: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    """``names`` of the dataset built from split ``spec`` as ``CLASS_NAME_STYLES[style]`` says."""
    rules = CLASS_NAME_STYLES.get(style)
    if rules is None:
        raise CdfslError(
            f"class_name_style={style!r}: expected one of {sorted(CLASS_NAME_STYLES)} "
            "(rail_reference is the reference's)"
        )
    rule = rules.get(spec.get("source") or spec.get("class_path"))
    return list(rule(names)) if rule is not None else list(names)


# -- framing ---------------------------------------------------------------------------------
def _as_pil(image: Tensor) -> Image.Image:
    """``(3, H, W)`` uint8 -> the same pixels as an RGB PIL image."""
    return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy(), "RGB")


@dataclass(frozen=True)
class GeometryFraming:
    """A deterministic framing: ``Preprocess.to_tensor(geometry)`` (a row of ``GEOMETRIES``)."""

    geometry: str

    def __call__(self, image: Image.Image, preprocess: Preprocess, seed: int, index: int) -> Any:
        framed = preprocess.to_tensor(self.geometry)(image)  # uint8 / 255: exact
        return _as_pil(framed.mul(255).round_().to(torch.uint8))


@dataclass(frozen=True)
class RandomResizedCropFraming:
    """torchvision's ``RandomResizedCrop(size, scale, ratio)``, its draw seeded per image.

    The reference extracts training features through CLIP's train transform,
    ``RandomResizedCrop(224, scale=(0.9, 1.0), interpolation=BICUBIC)`` (``clip/clip.py``),
    fresh per pass; here image ``index`` is cropped from the stream ``(seed, index)``, so
    features are reproducible and cacheable. :meth:`box` is torchvision's ``get_params``: ten
    tries of an area fraction uniform in ``scale`` and a log-uniform aspect ratio in
    ``ratio``, else the largest centred crop within ``ratio``.
    """

    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def box(self, width: int, height: int, draws: _UniformDraws) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` of the crop in a ``width`` x ``height`` image."""

        def uniform(low: float, high: float) -> float:
            return low + (high - low) * draws.below(1 << 53) * 2.0**-53

        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * uniform(*self.scale)
            aspect = math.exp(uniform(*log_ratio))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                return draws.below(height - h + 1), draws.below(width - w + 1), h, w
        ratio = width / height
        if ratio < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif ratio > max(self.ratio):
            w, h = round(height * max(self.ratio)), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Image.Image, preprocess: Preprocess, seed: int, index: int) -> Any:
        top, left, h, w = self.box(*image.size, _UniformDraws(seed, index))
        pixels = v2.functional.pil_to_tensor(image)
        interpolation = v2.InterpolationMode(preprocess.interpolation)
        crop = v2.functional.resized_crop(
            pixels, top, left, h, w, list(preprocess.size), interpolation, antialias=True
        )
        return _as_pil(crop)


def framing(name: str, crop_scale: Sequence[float] = (0.9, 1.0)) -> Any:
    """The framing ``name``: ``random_resized_crop`` (seeded, area fraction in ``crop_scale``)
    or a geometry of ``cdfsl.backbones.base.GEOMETRIES`` (``short_side_crop``, ``squash``, ...).

    A framing maps ``(image, preprocess, seed, index)`` to the image at ``preprocess.size``.
    """
    low, high = (float(v) for v in crop_scale)
    if not 0.0 < low <= high <= 1.0:
        raise CdfslError(f"train_crop_scale={list(crop_scale)}: expected 0 < low <= high <= 1")
    builders = {"random_resized_crop": lambda: RandomResizedCropFraming((low, high))}
    builders |= {g: lambda g=g: GeometryFraming(g) for g in GEOMETRIES}
    if name not in builders:
        raise CdfslError(
            f"preprocess {name!r}: expected one of {sorted(builders)} (the reference: "
            "random_resized_crop for training features, short_side_crop for test images)"
        )
    return builders[name]()


class FramedImages:
    """``dataset`` with image i framed as ``frame(dataset.load(i), preprocess, seed, i)``;
    a ``LabelledImages`` whose images already have the model's input size."""

    def __init__(
        self, dataset: LabelledImages, frame: Any, preprocess: Preprocess, seed: int
    ) -> None:
        self.dataset, self.frame, self.preprocess, self.seed = dataset, frame, preprocess, seed

    @property
    def targets(self) -> list[int]:
        return self.dataset.targets

    @property
    def class_names(self) -> list[str]:
        return self.dataset.class_names

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> Image.Image:
        return self.frame(self.dataset.load(index), self.preprocess, self.seed, index)

    def sample_id(self, index: int) -> str:
        return self.dataset.sample_id(index)

    def identity(self) -> dict[str, Any]:
        """What the framed pixels depend on besides the dataset: for the feature cache key."""
        return {"framing": repr(self.frame), "size": list(self.preprocess.size),
                "interpolation": self.preprocess.interpolation, "seed": self.seed}  # fmt: skip

    def __repr__(self) -> str:
        return f"FramedImages({self.dataset!r}, {self.frame!r})"


class Subset:
    """The rows ``indices`` of a ``LabelledImages``; a ``LabelledImages`` itself."""

    def __init__(self, dataset: LabelledImages, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    @property
    def targets(self) -> list[int]:
        full = self.dataset.targets
        return [full[i] for i in self.indices]

    @property
    def class_names(self) -> list[str]:
        return self.dataset.class_names

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> Image.Image:
        return self.dataset.load(self.indices[index])

    def sample_id(self, index: int) -> str:
        return self.dataset.sample_id(self.indices[index])

    def __repr__(self) -> str:
        return f"Subset({self.dataset!r}, {len(self)} of {len(self.dataset)})"


@dataclass
class DomainSplit:
    """One domain's data before any model sees it: the drawn training shots (unframed), the
    test split and the prompt names (after ``class_name_style``)."""

    name: str
    train: Subset
    test: LabelledImages
    class_names: list[str]


def domain_splits(cfg: XTailConfig) -> list[DomainSplit]:
    """Every domain of ``cfg``, built and checked as a run builds them (no backbone needed).

    Domain t's shots come from ``few_shot_indices`` seeded ``episode_seed(cfg.seed, t)``.
    """
    out = []
    for position, dcfg in enumerate(cfg.domains):
        full_train = build_split(dcfg.train, cfg.data_root)
        test = build_split(dcfg.test, cfg.data_root)
        if list(full_train.class_names) != list(test.class_names):
            raise CdfslError(
                f"domain {dcfg.name!r}: train and test splits have different class names; "
                "expected the same classes in the same order in both splits"
            )
        shots_seed = episode_seed(cfg.seed, position)
        picked = few_shot_indices(full_train.targets, cfg.shots, shots_seed, cfg.small_classes)
        names = prompt_names(cfg.class_name_style, dcfg.test, test.class_names)
        out.append(DomainSplit(dcfg.name, Subset(full_train, picked), test, names))
    return out


@dataclass
class Domain:
    """A domain as the runner uses it: splits, cached features and its slice of the union."""

    name: str
    class_names: list[str]  # prompt names (after class_name_style)
    offset: int  # union index of its first class
    train: LabelledImages
    test: LabelledImages
    train_feats: ImageFeatures
    test_feats: ImageFeatures

    @property
    def end(self) -> int:
        return self.offset + len(self.class_names)


# -- memory ----------------------------------------------------------------------------------
def _status_kb(field_name: str) -> int | None:
    """A ``VmHWM`` / ``VmRSS`` line of ``/proc/self/status`` in kB, or None off Linux."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"{field_name}:\s+(\d+)\s+kB", text)
    return int(match.group(1)) if match else None


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc), so a block's new allocations show in RSS.

    Without it, pages freed earlier but still resident are reused silently and the block's
    peak looks smaller than it is.
    """
    with suppress(OSError, AttributeError):  # not glibc: the figure is then a lower bound
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextmanager
def peak_rss() -> Iterator[dict[str, float]]:
    """Peak resident memory (MB) of the process inside the block.

    Fills ``peak_mb`` (the high-water mark) and ``extra_mb`` (it minus the resident memory on
    entry: what the block itself added at its peak). On Linux the high-water mark is reset on
    entry through ``/proc/self/clear_refs``; elsewhere ``peak_mb`` is the process peak so far
    (``getrusage``) and ``extra_mb`` is NaN.
    """
    out: dict[str, float] = {}
    entry_kb = None
    _release_freed_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        entry_kb = _status_kb("VmRSS")
    except OSError:
        pass
    try:
        yield out
    finally:
        hwm = _status_kb("VmHWM") if entry_kb is not None else None
        if hwm is None:  # ru_maxrss: kB on Linux, bytes on macOS
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            hwm = rss // 1024 if os.uname().sysname == "Darwin" else rss
        out["peak_mb"] = hwm / 1024
        out["extra_mb"] = (hwm - entry_kb) / 1024 if entry_kb is not None else math.nan


# -- learners --------------------------------------------------------------------------------
def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CdfslError(f"device {device!r} requested but CUDA is absent; pass --device cpu")
    return torch.device(device)


class _Learner:
    """One method in the sequence: learn domain t, predict union indices for a domain."""

    name: str

    def learn(self, step: int) -> None:
        """Learn domain ``step``."""

    def predict(self, domain: int) -> Tensor:
        """``(N_test,)`` predicted union indices for the test split of ``domain``."""
        raise NotImplementedError

    def state(self) -> dict[str, Any] | None:
        return None

    def load_state(self, state: dict[str, Any] | None) -> None:
        """Continue from :meth:`state`."""

    def state_bytes(self) -> int | None:
        return None


class _FeatureLearner(_Learner):
    """Shared zero-shot probabilities on cached features; RAIL adds an adapter and fusion."""

    def __init__(
        self, name: str, domains: list[Domain], text_feats: Tensor, scale: float,
        device: torch.device, batch_size: int,
    ) -> None:  # fmt: skip
        self.name, self.domains, self.device, self.batch_size = name, domains, device, batch_size
        self.text_feats = text_feats.to(device)
        self.scale = scale

    def zero_shot_probs(self, feats: Tensor) -> Tensor:
        """``feats: (B, D)`` normalised -> ``(B, C)`` softmax(s · cos) over the union."""
        return torch.softmax(self.scale * feats.to(self.device) @ self.text_feats.T, dim=1)

    def predict_batch(self, feats: Tensor) -> Tensor:
        return self.zero_shot_probs(feats).argmax(dim=1)

    def predict(self, domain: int) -> Tensor:
        feats = self.domains[domain].test_feats.features
        out = [
            self.predict_batch(feats[i : i + self.batch_size]).cpu()
            for i in range(0, len(feats), self.batch_size)
        ]
        return torch.cat(out)


class _RailLearner(_FeatureLearner):
    def __init__(self, adapter: PrimalAdapter | DualAdapter, beta: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.adapter, self.beta = adapter, beta

    def learn(self, step: int) -> None:
        d = self.domains[step]
        labels = d.train_feats.labels + d.offset  # union indices
        self.adapter.update(d.train_feats.features, labels, num_classes=d.end)

    def predict_batch(self, feats: Tensor) -> Tensor:
        probs = self.zero_shot_probs(feats)
        seen = self.adapter.num_classes
        scores = torch.zeros_like(probs)
        if seen:
            scores[:, :seen] = self.adapter.scores(feats).to(probs.device, probs.dtype)
        mask = torch.arange(probs.shape[1], device=probs.device) < seen
        return fuse(probs, scores, mask, self.beta).argmax(dim=1)

    def state(self) -> dict[str, Any]:
        return self.adapter.state_dict()

    def load_state(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            cls = PrimalAdapter if state["kind"] == "primal" else DualAdapter
            self.adapter = cls.from_state_dict(state, self.device)

    def state_bytes(self) -> int:
        return self.adapter.state_bytes()


class _FineTuneLearner(_Learner):
    """LoRA-CE on each domain's training shots in turn (its own classes), adapters carried."""

    name = "finetune"

    def __init__(self, cfg: XTailConfig, domains: list[Domain], union_names: list[str]) -> None:
        from cdfsl.methods.lora_ce import LoRAFineTune

        ft = cfg.finetune
        # Seeded as the feature backbone was, so a random-init backbone is the same model.
        torch.manual_seed(cfg.seed)
        self.method = LoRAFineTune(
            backbone=cfg.backbone, pretrained=cfg.pretrained, template=cfg.template,
            lora=ft.lora, views=ft.views, lr=ft.lr, weight_decay=ft.weight_decay, seed=cfg.seed,
        )  # fmt: skip
        self.method.reset(cfg.seed)
        self.fit = FitConfig(
            steps=ft.steps, precision=ft.precision, accelerator=ft.accelerator,
            batch_size=ft.images_per_step,
        )  # fmt: skip
        self.cfg, self.domains, self.union_names = cfg, domains, union_names
        # Domain images are framed to the input size already (FramedImages): no second frame.
        self.to_tensor = self.method.backbone.preprocess.to_tensor("squash")
        self.method.set_classes(union_names)

    def _images(self, dataset: LabelledImages, start: int, stop: int) -> Tensor:
        return torch.stack([self.to_tensor(dataset.load(i)) for i in range(start, stop)])

    def learn(self, step: int) -> None:
        d = self.domains[step]
        images = self._images(d.train, 0, len(d.train))
        labels = torch.tensor(d.train.targets, dtype=torch.long)  # the domain's own classes
        self.method.set_classes(d.class_names)
        seed = episode_seed(self.cfg.seed, step)
        torch.manual_seed(seed)
        self.method.seed = seed
        fit_episode(self.method, images, labels, self.cfg.finetune.steps, self.fit)
        self.method.set_classes(self.union_names)

    def predict(self, domain: int) -> Tensor:
        test = self.domains[domain].test
        out = []
        for start in range(0, len(test), 1024):
            images = self._images(test, start, min(start + 1024, len(test)))
            logits = predict_logits(self.method, images, self.fit, self.cfg.batch_size)
            out.append(logits.argmax(dim=1))
        return torch.cat(out)

    def state(self) -> dict[str, Any]:
        return lora_state_dict(self.method.backbone.lora_root())

    def load_state(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            load_lora_state_dict(self.method.backbone.lora_root(), state)

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state().values())


# -- the run ---------------------------------------------------------------------------------
def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class XTailRun:
    """Run (or resume) an X-TAIL sequence: see the module docstring for the output layout."""

    def __init__(self, config: XTailConfig) -> None:
        if not config.domains:
            raise CdfslError("no domains given: expected a recipe with a 'domains' list")
        names = [d.name for d in config.domains]
        if len(set(names)) != len(names):
            raise CdfslError(f"domain names {names} repeat: expected each domain once")
        unknown = [m for m in config.methods if m not in METHODS]
        if unknown or not config.methods:
            raise CdfslError(
                f"methods {config.methods}: expected a non-empty subset of {list(METHODS)}"
            )
        self.config = config
        self.output = Path(config.output)
        self.device = _resolve_device(config.device)
        self.cache = FeatureCache(config.cache_dir)

    # -- set-up -------------------------------------------------------------------------------
    def _prepare(self) -> None:
        cfg = self.config
        torch.manual_seed(cfg.seed)  # a random-init backbone is then the same on every run
        self.backbone: Backbone = create_backbone(cfg.backbone, cfg.pretrained, self.device)
        self.backbone.requires_grad_(False)
        self.backbone_key = backbone_fingerprint(self.backbone)
        self.domains: list[Domain] = []
        preprocess = self.backbone.preprocess
        train_frame = framing(cfg.train_preprocess, cfg.train_crop_scale)
        test_frame = framing(cfg.test_preprocess)
        offset = 0
        for position, part in enumerate(domain_splits(cfg)):
            # The crop of training row i comes from stream (crop_seed, i): a pure function of
            # the run's seed, the domain's place and the row.
            crop_seed = episode_seed(episode_seed(cfg.seed, position), 0)
            train = FramedImages(part.train, train_frame, preprocess, crop_seed)
            test = FramedImages(part.test, test_frame, preprocess, 0)
            feats = {
                split: self.cache.image_features(
                    self.backbone, data,
                    identity={"domain": part.name, "split": split, **data.identity()},
                    batch_size=cfg.batch_size, progress=cfg.progress,
                    backbone_key=self.backbone_key, desc=f"{part.name} {split} features",
                )
                for split, data in (("train", train), ("test", test))
            }  # fmt: skip
            domain = Domain(
                part.name, part.class_names, offset, train, test, feats["train"], feats["test"]
            )
            self.domains.append(domain)
            offset += len(part.class_names)
        self.union_names = [name for d in self.domains for name in d.class_names]
        self.text_feats = self.cache.text_features(
            self.backbone, self.union_names, cfg.template, self.backbone_key
        )

    def _fingerprint(self) -> dict[str, Any]:
        cfg = self.config
        return plain_json(
            {
                "backbone": cfg.backbone, "pretrained": cfg.pretrained,
                "backbone_fingerprint": self.backbone_key, "template": cfg.template,
                "shots": cfg.shots, "small_classes": cfg.small_classes, "seed": cfg.seed,
                "domains": cfg.domains, "class_name_style": cfg.class_name_style,
                "class_names": self.union_names, "train_preprocess": cfg.train_preprocess,
                "train_crop_scale": cfg.train_crop_scale, "test_preprocess": cfg.test_preprocess,
                "train_ids": [d.train_feats.key for d in self.domains],
                "test_ids": [d.test_feats.key for d in self.domains],
            }
        )  # fmt: skip

    def _learner(self, name: str) -> _Learner:
        cfg = self.config
        common = {
            "name": name, "domains": self.domains, "text_feats": self.text_feats,
            "scale": self.backbone.logit_scale, "device": self.device,
            "batch_size": cfg.batch_size,
        }  # fmt: skip
        if name == "zero-shot":
            return _FeatureLearner(**common)
        if name == "primal":
            p = cfg.primal
            dim = self.domains[0].train_feats.features.shape[1]
            adapter = PrimalAdapter(
                dim, p.hidden, p.reg, p.seed, random_init=p.random_init, dtype=p.dtype,
                block_size=p.block_size, device=self.device,
            )  # fmt: skip
            return _RailLearner(adapter, cfg.beta, **common)
        if name == "dual":
            q = cfg.dual
            adapter = DualAdapter(
                q.gamma, q.reg, dtype=q.dtype, block_size=q.block_size, device=self.device
            )
            return _RailLearner(adapter, cfg.beta, **common)
        return _FineTuneLearner(cfg, self.domains, self.union_names)

    def _method_config(self, name: str) -> dict[str, Any]:
        cfg = self.config
        extra = {
            "primal": {"primal": cfg.primal, "beta": cfg.beta},
            "dual": {"dual": cfg.dual, "beta": cfg.beta},
            "finetune": {"finetune": cfg.finetune},
        }.get(name, {})
        return plain_json({"method": name, **extra})

    # -- one method ---------------------------------------------------------------------------
    def _evaluate(self, learner: _Learner) -> dict[str, float]:
        accs = {}
        for k, d in enumerate(self.domains):
            predicted = learner.predict(k)
            truth = d.test_feats.labels + d.offset
            accs[d.name] = float((predicted == truth).double().mean())
        return accs

    def run_method(self, name: str) -> dict[str, Any]:
        """Learn every unfinished step of method ``name``; returns its matrix and metrics."""
        folder = self.output / name
        folder.mkdir(parents=True, exist_ok=True)
        check_run_config(folder, self._method_config(name))
        store = ResultStore(folder / "steps.jsonl")
        state_path = folder / "state.pt"
        rows = {row["episode"]: row for row in store.rows()}
        saved = None
        if state_path.exists() and len(rows) < len(self.domains):  # M may be gigabytes
            saved = torch.load(state_path, map_location="cpu", weights_only=True)
        if saved is not None and saved["step"] not in rows:
            # Killed between saving the state and appending its row: the row is in the state.
            store.append(saved["row"])
            rows[saved["step"]] = saved["row"]
        last = max(rows, default=-1)
        if sorted(rows) != list(range(last + 1)):
            raise CdfslError(
                f"{store.path} holds steps {sorted(rows)}: expected 0..{last} without gaps; "
                "delete the method's folder to rerun it"
            )
        learner = None
        if last + 1 < len(self.domains):
            learner = self._learner(name)
            if last >= 0:
                if saved is None or saved["step"] != last:
                    raise CdfslError(
                        f"{state_path} is missing or not at step {last}: expected the learner "
                        f"saved with the last row of {store.path}; delete {folder} to rerun it"
                    )
                learner.load_state(saved["state"])
            del saved
        bar = None
        if self.config.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=len(self.domains), initial=last + 1, desc=f"X-TAIL {name}", unit="domain"
            )
        for step in range(last + 1, len(self.domains)):
            start = time.perf_counter()
            with peak_rss() as memory:
                learner.learn(step)
            update_seconds = time.perf_counter() - start
            start = time.perf_counter()
            accs = self._evaluate(learner)
            state_bytes = learner.state_bytes()
            row = {
                "episode": step,
                "step": step,
                "learned": self.domains[step].name,
                "accuracy": accs,
                "update_seconds": round(update_seconds, 4),
                "update_peak_rss_mb": round(memory["peak_mb"], 1),
                "update_extra_rss_mb": round(memory["extra_mb"], 1),
                "eval_seconds": round(time.perf_counter() - start, 4),
                "state_mb": None if state_bytes is None else round(state_bytes / 2**20, 2),
            }
            _atomic_torch_save({"step": step, "row": row, "state": learner.state()}, state_path)
            store.append(row)
            rows[step] = row
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        del learner
        ordered = [rows[t] for t in range(len(self.domains))]
        matrix = [[row["accuracy"][d.name] for d in self.domains] for row in ordered]
        learning = name != "zero-shot"
        seconds = [row["update_seconds"] for row in ordered]
        peaks = [row["update_peak_rss_mb"] for row in ordered]
        extras = [row["update_extra_rss_mb"] for row in ordered]
        result = {
            "method": name,
            "domains": [d.name for d in self.domains],
            "matrix": matrix,
            "metrics": xtail_metrics(matrix),
            "update_seconds": seconds,
            "update_seconds_mean": float(np.mean(seconds)) if learning else None,
            "update_peak_rss_mb_max": max(peaks) if learning else None,
            "update_extra_rss_mb_max": max(extras) if learning else None,
            "state_mb": ordered[-1]["state_mb"],
        }
        write_json_atomic(folder / "matrix.json", _json_safe(result))
        fig = plot_matrices({name: matrix}, result["domains"])
        fig.savefig(folder / "matrix.png", dpi=120)
        return result

    def run(self) -> dict[str, Any]:
        """Every method of the config, in :data:`METHODS` order; returns ``{method: result}``."""
        self.output.mkdir(parents=True, exist_ok=True)
        self._prepare()
        check_run_config(self.output, self._fingerprint())
        results = {}
        for name in (m for m in METHODS if m in self.config.methods):
            results[name] = self.run_method(name)
        domains = [d.name for d in self.domains]
        summary = {
            "domains": domains,
            "classes": {d.name: len(d.class_names) for d in self.domains},
            "train_images": {d.name: len(d.train) for d in self.domains},
            "test_images": {d.name: len(d.test) for d in self.domains},
            "backbone": self.config.backbone,
            "methods": results,
        }
        write_json_atomic(self.output / "summary.json", _json_safe(summary))
        (self.output / "summary.md").write_text(self.report(results) + "\n")
        fig = plot_matrices({n: r["matrix"] for n, r in results.items()}, domains)
        fig.savefig(self.output / "xtail.png", dpi=120)
        return results

    def report(self, results: Mapping[str, Mapping[str, Any]]) -> str:
        """The K×K matrix of every method, then the metrics table, as markdown."""
        domains = [d.name for d in self.domains]
        parts = []
        for name, res in results.items():
            parts.append(f"### {METHOD_TITLES.get(name, name)} (accuracy %, row: after learning)")
            parts.append(format_matrix(res["matrix"], domains))
            m = res["metrics"]
            parts.append(
                f"Transfer {_pct(m['transfer'])} · Average {_pct(m['average'])} · "
                f"Last {_pct(m['last'])}\n"
            )
        parts.append(format_summary(results))
        return "\n\n".join(parts)
