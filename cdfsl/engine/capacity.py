"""How many episodes train side by side: the configured E, or what memory holds."""

from __future__ import annotations

import math
import os

import torch

from cdfsl.engine.fit import _ONE_EPISODE_PRECISIONS, FitConfig, _check_scaler_episodes
from cdfsl.errors import CdfslError
from cdfsl.fewshot.methods.base import FewShotMethod
from cdfsl.fewshot.methods.frozen import FrozenFeatureMethod

#: Activations kept for the backward pass per element of a LoRA projection's input: a ViT
#: block saves about 16 of the residual's size (norms, q/k/v, attention, MLP at 4x). An
#: estimate for choosing E, not a measurement.
_SAVED_PER_PROJECTED_ELEMENT = 16
#: Bytes of a saved activation by precision: autocast keeps most of them in 16 bits.
_ACTIVATION_BYTES = {"32-true": 4, "bf16-mixed": 2, "16-mixed": 2}
_MAX_EPISODES_PER_STEP = {"cpu": 8, "cuda": 32}
#: On a CPU, side-by-side episodes stop paying once a step's batch outgrows the caches: Mind
#: micro-clip 5-way (benchmarks/engine_speed.py, one thread, Intel Xeon, 2026-12-07) ran 1-shot
#: (30 images an episode-step) at 75.5 ms per episode-step for E = 1 and 77.7 for E = 8, 5-shot
#: (150 images) at 354.5 for E = 1 and 420.2 for E = 8. Automatic E keeps a CPU step's images
#: at or under this count (at least one episode).
_CPU_IMAGES_PER_STEP = 256
#: Frozen-feature heads fit side by side on cached features: a few kB an episode.
_MAX_FROZEN_EPISODES = 64


def episodes_per_step(method: FewShotMethod, support_images: int, fit: FitConfig) -> int:
    """How many episodes train side by side: ``fit.episodes_per_step``, or from memory.

    Automatic: the activation memory of one training image is estimated from the inputs of the
    LoRA projections in a one-image forward (``_SAVED_PER_PROJECTED_ELEMENT`` activations of
    ``_ACTIVATION_BYTES[precision]`` each), and E is what half this process's share of the free
    memory holds for the images an episode forwards a step (``support_images`` per view, once
    more when the method forwards its clean support separately, as Mind does), between 1 and
    8 (CPU) or 32 (CUDA). The free memory is the device's (CUDA) or MemAvailable (CPU), shared
    by the launcher's local ranks on the same device (``LOCAL_WORLD_SIZE``). On a CPU, E also
    keeps a step's images at or under ``_CPU_IMAGES_PER_STEP`` (256). Mini-batched
    support sets (``fit.batch_size``) train one episode at a time; frozen-feature heads, fitted
    on cached features, 64 at a time.
    """
    if fit.episodes_per_step is not None:
        if fit.episodes_per_step < 1:
            raise CdfslError(
                f"episodes_per_step={fit.episodes_per_step}: expected an integer >= 1, or null "
                "to choose from memory"
            )
        _check_scaler_episodes(fit.precision, fit.episodes_per_step)
        return fit.episodes_per_step
    if fit.precision in _ONE_EPISODE_PRECISIONS:
        return 1
    if isinstance(method, FrozenFeatureMethod):
        return _MAX_FROZEN_EPISODES
    device = fit.device()
    cap = _MAX_EPISODES_PER_STEP.get(device.type, 1)
    if not method.trainable:
        return cap
    if fit.batch_size is not None:
        return 1
    images = support_images * (max(1, len(method.views or ())) + int(method.forwards_support))
    if device.type == "cpu":
        cap = min(cap, max(1, _CPU_IMAGES_PER_STEP // images))
    per_element = _SAVED_PER_PROJECTED_ELEMENT * _ACTIVATION_BYTES.get(str(fit.precision), 4)
    need = images * per_element * _projected_elements(method, device)
    share = _free_bytes(device) // _ranks_sharing(device)
    return int(max(1, min(cap, share // 2 // max(1, need))))


def _ranks_sharing(device: torch.device) -> int:
    """How many of the launcher's local ranks share ``device``'s memory (1 without one)."""
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    if device.type == "cuda":
        return math.ceil(local / max(1, torch.cuda.device_count()))
    return local


def _projected_elements(method: FewShotMethod, device: torch.device) -> int:
    """Sum of the LoRA projections' input sizes in a forward of one image."""
    from cdfsl.lora import LoRAProjection, adapter_sets

    seen: list[int] = []
    root = method.backbone.lora_root()
    hooks = [
        m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].numel()))
        for m in root.modules()
        if isinstance(m, LoRAProjection)
    ]
    # One image per adapter set: the adapters may still hold the E sets of the last group.
    images = adapter_sets(root) if hooks else 1
    size = method.backbone.preprocess.size
    try:
        with torch.no_grad():
            method.backbone.to(device).encode_image(torch.zeros(images, 3, *size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return sum(seen) // images


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as handle:
            info = dict(line.split(":", 1) for line in handle)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 4 << 30  # no /proc (macOS, Windows): assume 4 GiB
