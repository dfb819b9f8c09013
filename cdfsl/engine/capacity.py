"""How many episodes train side by side: the configured E, or what memory holds."""

from __future__ import annotations

import torch

from cdfsl.engine.fit import _ONE_EPISODE_PRECISIONS, FitConfig, _check_scaler_episodes
from cdfsl.errors import CdfslError
from cdfsl.methods.base import FewShotMethod

#: Bytes kept for the backward pass per element of a LoRA projection's input: a ViT block
#: saves about 16 activations of the residual's size (norms, q/k/v, attention, MLP at 4x),
#: 4 bytes each in fp32. An estimate for choosing E, not a measurement.
_BYTES_PER_PROJECTED_ELEMENT = 64
_MAX_EPISODES_PER_STEP = {"cpu": 8, "cuda": 32}


def episodes_per_step(method: FewShotMethod, support_images: int, fit: FitConfig) -> int:
    """How many episodes train side by side: ``fit.episodes_per_step``, or from memory.

    Automatic: the activation memory of one training image is estimated from the inputs of the
    LoRA projections in a one-image forward (see ``_BYTES_PER_PROJECTED_ELEMENT``), and E is
    what half the free memory (CUDA: free device memory; CPU: MemAvailable) holds for
    ``support_images·views`` images per episode, between 1 and 8 (CPU) or 32 (CUDA).
    Mini-batched support sets (``fit.batch_size``) train one episode at a time.
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
    device = fit.device()
    cap = _MAX_EPISODES_PER_STEP.get(device.type, 1)
    if not method.trainable:
        return cap
    if fit.batch_size is not None:
        return 1
    images = support_images * max(1, len(method.views or ()))
    need = images * _BYTES_PER_PROJECTED_ELEMENT * _projected_elements(method, device)
    return int(max(1, min(cap, _free_bytes(device) // 2 // max(1, need))))


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
