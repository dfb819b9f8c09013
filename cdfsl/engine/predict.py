"""Scoring images with E episodes' adapters, in eval mode under the fit's autocast."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from cdfsl.attention import attention_kernel_in
from cdfsl.engine.fit import FitConfig, autocast_dtype, frozen_weights_in, tf32_allowed
from cdfsl.fewshot.methods.base import FewShotMethod


@torch.no_grad()
def predict_logits(
    method: FewShotMethod, images: Tensor, fit: FitConfig, batch_size: int = 256
) -> Tensor:
    """``images: (E·Q, 3, H, W)`` in [0, 1] -> ``(E·Q, N)`` logits, eval mode, ``fit``'s autocast.

    With ``E = len(method.episodes)`` episodes the images are E contiguous groups of Q, group
    ``e`` scored by episode ``e``; each forward takes the same slice of every group, at most
    ``batch_size`` images in all.
    """
    device = fit.device()
    method.to(device).eval()
    dtype = autocast_dtype(fit.precision, device.type)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    count = max(1, len(method.episodes))
    grouped = images.unflatten(0, (count, -1))  # (E, Q, 3, H, W)
    step = max(1, batch_size // count)
    out = []
    root = method.backbone.lora_root()
    with (
        autocast,
        tf32_allowed(fit.tf32),
        frozen_weights_in(root, dtype),
        attention_kernel_in(root, fit.attention),
    ):
        for start in range(0, grouped.shape[1], step):
            chunk = grouped[:, start : start + step].flatten(0, 1).to(device)
            out.append(method(chunk).float().cpu().unflatten(0, (count, -1)))
    return torch.cat(out, dim=1).flatten(0, 1)
