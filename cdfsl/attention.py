"""The attention kernels cdfsl's LoRA attention runs, and which one it runs where.

Two kernels compute ``softmax(q kᵀ / √d + mask) v``; they differ in rounding and speed only:

* ``sdpa``: ``F.scaled_dot_product_attention`` (torch picks flash, math, ... itself): the
  reference's kernel, and the one every row was made with before this choice existed;
* ``explicit``: the three plain ops (scores, softmax, weighted sum), as timm's non-fused path.

``auto`` (the default) picks per device type and compute dtype from :data:`AUTO_KERNELS`: on a
CPU under bf16 the explicit ops, since torch's CPU flash kernel is the slow part of a bf16 step
there (forward + backward on an AMD EPYC with avx512_bf16, one thread, 2026-12-07: 2.7-3.3x
the explicit ops' time at ViT-B/16's 30 x 12 heads x 197 tokens, 5.3-6.3x at micro-clip's
240 x 4 x 26; a whole LoRA step 1.1x faster for ViT-B/16 and 2x for micro-clip); SDPA
everywhere else (in fp32 flash wins at 197 tokens, and CUDA has its fused kernels).

The LoRA attention modules carry the choice as ``attention_kernel`` (``auto`` unless set);
:func:`set_attention_kernel` sets it on every module of a tree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdfsl.errors import CdfslError
from cdfsl.registry import Registry

__all__ = [
    "ATTENTION_KERNELS",
    "AUTO",
    "AUTO_KERNELS",
    "AttentionKernel",
    "attention_kernel_in",
    "check_attention_setting",
    "choose_timm_kernel",
    "compute_dtype",
    "explicit_attention",
    "resolve_attention_kernel",
    "set_attention_kernel",
]

#: The setting that picks a kernel per device type and compute dtype.
AUTO = "auto"


def explicit_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
) -> Tensor:
    """``softmax(q kᵀ / √d + mask) v`` as plain ops, with ``F.scaled_dot_product_attention``'s
    arguments: a boolean ``attn_mask`` marks the keys that take part, a float one is added;
    ``dropout_p`` drops attention weights; ``is_causal`` hides the keys after each query."""
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
    if is_causal:
        length, source = scores.shape[-2:]
        keep = torch.ones(length, source, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p)
    return weights @ v


@dataclass(frozen=True)
class AttentionKernel:
    """An attention kernel: ``fn`` with ``F.scaled_dot_product_attention``'s signature, and
    ``timm_fused``, the ``fused_attn`` flag that makes a timm attention run the same kernel."""

    fn: Callable[..., Tensor]
    timm_fused: bool


ATTENTION_KERNELS: Registry[str, AttentionKernel] = Registry(
    "attention kernel",
    {
        "sdpa": AttentionKernel(F.scaled_dot_product_attention, timm_fused=True),
        "explicit": AttentionKernel(explicit_attention, timm_fused=False),
    },
    fix="set attention to auto, sdpa or explicit",
)

#: ``auto``'s pick per (device type, compute dtype); any other pair runs ``sdpa``.
AUTO_KERNELS: dict[tuple[str, torch.dtype], str] = {("cpu", torch.bfloat16): "explicit"}


def check_attention_setting(name: str) -> None:
    """Refuse an attention setting other than ``auto`` or a registered kernel."""
    if name != AUTO and name not in ATTENTION_KERNELS:
        choices = ", ".join([AUTO, *sorted(ATTENTION_KERNELS)])
        raise CdfslError(f"attention={name!r}: expected one of {choices}; fix --attention")


def resolve_attention_kernel(name: str, device_type: str, dtype: torch.dtype) -> str:
    """The kernel setting ``name`` runs for inputs on ``device_type`` computed in ``dtype``."""
    check_attention_setting(name)
    if name != AUTO:
        return name
    return AUTO_KERNELS.get((device_type, dtype), "sdpa")


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` compute in: autocast's where it is on, else ``x``'s own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _choosers(root: nn.Module) -> list[nn.Module]:
    """The modules under ``root`` that carry an ``attention_kernel`` setting."""
    return [module for module in root.modules() if hasattr(module, "attention_kernel")]


def set_attention_kernel(root: nn.Module, name: str) -> None:
    """Set every LoRA attention module under ``root`` to run kernel setting ``name``."""
    check_attention_setting(name)
    for module in _choosers(root):
        module.attention_kernel = name


@contextmanager
def attention_kernel_in(root: nn.Module, name: str) -> Iterator[None]:
    """Inside, ``root``'s LoRA attention modules run kernel setting ``name``; then their own."""
    check_attention_setting(name)
    saved = [(module, module.attention_kernel) for module in _choosers(root)]
    try:
        for module, _ in saved:
            module.attention_kernel = name
        yield
    finally:
        for module, previous in saved:
            module.attention_kernel = previous


def choose_timm_kernel(
    module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]
) -> None:
    """Forward pre-hook of a timm attention: its ``fused_attn`` as its setting picks for this
    call's input (timm reads the flag at every forward)."""
    x = args[0] if args else kwargs["x"]
    assert isinstance(x, Tensor)
    kernel = resolve_attention_kernel(module.attention_kernel, x.device.type, compute_dtype(x))
    module.fused_attn = ATTENTION_KERNELS[kernel].timm_fused
