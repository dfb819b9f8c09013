"""How a fit runs its training forward through the image tower: op by op, or compiled.

* ``eager``: op by op, as the reference runs it; every row before this setting was made so.
* ``inductor``: ``torch.compile`` (TorchInductor) of the method's ``image_features``: forward
  and backward of the tower, LoRA dropout draws included, as fused kernels around the matmuls.
  Rows differ from eager ones by float rounding only (the ops are the same, some of them fused;
  dropout masks are the same integers). It pays 40-90 s of compiling per process for
  micro-clip or ViT-B/16 (graphs are cached on disk across runs); measured on an AMD EPYC
  (2026-12-08) it then took a third off a micro-clip bf16 step, an eighth off an fp32 one and
  about 5% off a ViT-B/16 bf16 one, and nothing measurable off a whole fp32 Mind episode.

Inductor needs a C++ compiler for CPU code and Triton for CUDA code; where the device's is
missing, the fit warns once with what is missing and runs eagerly (and records ``eager``).
Scoring (no gradients, a few calls per episode) always runs eagerly.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cdfsl.registry import Registry

__all__ = [
    "EAGER",
    "STEP_COMPILERS",
    "StepCompiler",
    "compiled_features_in",
    "inductor_missing",
    "resolve_step_compiler",
]

#: The setting that compiles nothing.
EAGER = "eager"

Features = Callable[[Tensor], Tensor]


def inductor_missing(device_type: str) -> str | None:
    """What TorchInductor lacks to generate code for ``device_type`` here, or None."""
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton (pip install triton)"
    try:
        from torch._inductor import cpp_builder

        cpp_builder.get_cpp_compiler()
    except Exception:  # InvalidCxxCompiler, or an inductor that cannot even look
        return "a C++ compiler (install g++, or point the CXX environment variable at one)"
    return None


@dataclass(frozen=True)
class StepCompiler:
    """A way to run the training forward: ``wrap(fn)`` returns what runs in ``fn``'s place
    (None: ``fn`` itself); ``missing(device_type)`` says what this machine lacks for it."""

    wrap: Callable[[Features], Features] | None
    missing: Callable[[str], str | None]


def _inductor(fn: Features) -> Features:
    return torch.compile(fn, backend="inductor")


STEP_COMPILERS: Registry[str, StepCompiler] = Registry(
    "step compiler",
    {
        EAGER: StepCompiler(wrap=None, missing=lambda device_type: None),
        "inductor": StepCompiler(wrap=_inductor, missing=inductor_missing),
    },
    fix="set compile to eager or inductor",
)


@functools.cache
def _warn_fallback(name: str, device_type: str, missing: str) -> None:
    warnings.warn(
        f"compile={name!r} on {device_type}: this machine lacks {missing}; training runs "
        "eagerly (rows record compile='eager'); set --compile eager to silence this",
        stacklevel=3,
    )


def resolve_step_compiler(name: str, device_type: str, warn: bool = False) -> str:
    """The compiler setting ``name`` runs with on ``device_type``: itself, or ``eager`` where
    the machine lacks what it needs (with a warning, once per process, when ``warn``)."""
    missing = STEP_COMPILERS.lookup(name).missing(device_type)
    if missing is None:
        return name
    if warn:
        _warn_fallback(name, device_type, missing)
    return EAGER


@contextmanager
def compiled_features_in(method: nn.Module, name: str, device_type: str) -> Iterator[None]:
    """Inside, ``method``'s training steps take their image features through compiler
    ``name`` (or eagerly where this machine lacks it); then eagerly again."""
    wrap = STEP_COMPILERS.lookup(resolve_step_compiler(name, device_type, warn=True)).wrap
    # Compiled code is cached on image_features' code object, shared by every fit that
    # wraps it again, so later groups and methods reuse it while its guards hold.
    method.step_features = None if wrap is None else wrap(method.image_features)
    try:
        yield
    finally:
        method.step_features = None
