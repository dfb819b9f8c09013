"""Fitting E episodes side by side: the configuration, the support batches, the Trainer.

One support set per episode, ``E`` episodes over one frozen backbone (the method's adapter sets),
T optimiser steps each (:func:`fit_episode`); an episode whose loss turns non-finite stops on its
own (:class:`NonFiniteGuard`). Nothing here knows about protocols, rows or result files.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cdfsl.attention import (
    AUTO,
    attention_kernel_in,
    check_attention_setting,
    resolve_attention_kernel,
)
from cdfsl.compiling import EAGER, STEP_COMPILERS, compiled_features_in, resolve_step_compiler
from cdfsl.errors import CdfslError
from cdfsl.fewshot.methods.base import FewShotMethod
from cdfsl.lora import zero_set_gradients
from cdfsl.plumbing import cuda_index, quiet_lightning, resolve_device
from cdfsl.registry import Registry

_AUTOCAST: Registry[str, torch.dtype] = Registry(
    "autocast precision", {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
)


def autocast_dtype(precision: str | int | None, device_type: str) -> torch.dtype | None:
    """The dtype ``precision``'s autocast computes in on ``device_type`` (None: no autocast).

    Lightning trains ``16-mixed`` on a CPU as bf16-mixed (with a warning): so does cdfsl.
    """
    dtype = _AUTOCAST.get(str(precision))
    if device_type == "cpu" and dtype is torch.float16:
        return torch.bfloat16
    return dtype


_CAST_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@contextmanager
def frozen_weights_in(root: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Inside, the frozen weights and biases of ``root``'s linear and convolution layers (LoRA
    projections' base weights included) are held in ``dtype``; on exit, the fp32 originals.

    Autocast casts a frozen weight again at every call (it caches casts of trainable leaves
    only), forward and backward; casting once gives the same values, since autocast's cast is
    the same rounding. Only weights that no op outside autocast's low-precision list reads are
    cast: layer norms, embeddings and the LoRA adapters stay fp32.
    """
    from cdfsl.lora import LoRAProjection

    saved: dict[int, tuple[nn.Parameter, Tensor]] = {}
    if dtype is not None:
        for module in root.modules():
            if isinstance(module, LoRAProjection):
                params = module.base_weight_and_bias()
            elif isinstance(module, _CAST_LAYERS):
                params = (module.weight, module.bias)
            else:
                continue
            for param in params:
                if param is None or param.requires_grad or param.dtype != torch.float32:
                    continue
                if id(param) not in saved:
                    saved[id(param)] = (param, param.data)
                    param.data = param.data.to(dtype)
    try:
        yield
    finally:
        for param, data in saved.values():
            param.data = data


#: The Lightning precisions a fit accepts: fp32, or fp32 adapters under fp16 / bf16 autocast.
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")


#: Version of the training engine in every run fingerprint: rows of another version are refused.
ENGINE_VERSION = 5


def device_fingerprint(device: torch.device) -> dict[str, str]:
    """What of ``device`` a row depends on: its type, and a GPU's model name."""
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device)}
    return {"type": device.type}


@dataclass
class FitConfig:
    """How long and where each episode trains.

    ``steps`` fixes the step count; otherwise it is ``steps_per_shot · k_shot`` (the paper's
    T = 250·K). ``precision`` is a Lightning precision string; the queries are predicted under
    the same autocast. ``batch_size`` None trains on the whole support set every step (the
    paper's episodes; Mind requires it); a number draws that many support images per step,
    for support sets too large for one batch (all-way protocols on big datasets).
    ``episodes_per_step`` episodes train side by side in one pass over the frozen backbone
    (None: as many as memory allows, see :func:`episodes_per_step`); rows do not depend on it.
    ``tf32``: let CUDA matmuls and convolutions run in TF32 under ``32-true`` (off: fp32 is
    fp32); ``attention``: the LoRA attention's kernel, ``auto`` (per device and precision),
    ``sdpa`` or ``explicit`` (see :mod:`cdfsl.attention`); ``compile``: how the training
    forward runs, ``eager`` or ``inductor`` (see :mod:`cdfsl.compiling`); ``deterministic``:
    Lightning's ``deterministic`` (deterministic kernels only, e.g. CUDA attention backward
    and ``index_add``; CUDA needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8``).
    """

    steps_per_shot: int = 250
    steps: int | None = None
    precision: str = "bf16-mixed"
    accelerator: str = "auto"
    batch_size: int | None = None
    episodes_per_step: int | None = None
    tf32: bool = False
    deterministic: bool = False
    attention: str = AUTO
    compile: str = EAGER

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise CdfslError(
                f"precision={self.precision!r}: expected one of {', '.join(PRECISIONS)} (the LoRA "
                "weights stay fp32; a '*-true' low precision would cast them); fix --precision"
            )
        check_attention_setting(self.attention)
        STEP_COMPILERS.lookup(self.compile, "compile")

    def attention_kernel(self) -> str:
        """The attention kernel this fit's LoRA attention runs on its device and precision."""
        device = self.device()
        dtype = autocast_dtype(self.precision, device.type) or torch.float32
        return resolve_attention_kernel(self.attention, device.type, dtype)

    def record(self) -> dict[str, Any]:
        """The fields as a run records them, ``attention`` as the kernel it resolves to and
        ``compile`` as the compiler that runs here; each left out where it is what every row
        made before the setting existed ran (SDPA, eager), so their runs stay resumable."""
        record = asdict(self)
        del record["attention"], record["compile"]
        kernel = self.attention_kernel()
        if kernel != "sdpa":
            record["attention"] = kernel
        compiler = resolve_step_compiler(self.compile, self.device().type)
        if compiler != EAGER:
            record["compile"] = compiler
        return record

    def total_steps(self, k_shot: int) -> int:
        steps = self.steps if self.steps is not None else self.steps_per_shot * k_shot
        if steps < 1:
            raise CdfslError(f"steps must be >= 1, got {steps}; set --steps or --steps_per_shot")
        return steps

    def device(self) -> torch.device:
        """CUDA when asked for and present, else the CPU; under a launcher, cuda:LOCAL_RANK."""
        index = cuda_index() if "LOCAL_RANK" in os.environ else None
        return resolve_device(self.accelerator, index)


#: Precisions whose one loss scaler would couple episodes trained side by side: an overflow
#: in one episode skips the step of all and lowers the shared scale.
_ONE_EPISODE_PRECISIONS = ("16-mixed",)


def _check_scaler_episodes(precision: str, episodes: int) -> None:
    if precision in _ONE_EPISODE_PRECISIONS and episodes > 1:
        raise CdfslError(
            f"precision {precision!r} with {episodes} episodes per step: one GradScaler would "
            "cover every episode (an overflow in one skips the step of all); expected one "
            "episode per step under 16-mixed; set --episodes_per_step 1 (or null), or use "
            "--precision bf16-mixed"
        )


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (Linux: amx_bf16 or avx512_bf16 flags).

    Without them torch runs bf16 matmuls in emulation, far slower than fp32 (measured on an
    AVX2 EPYC: 1 vs 86 GFLOP/s for a 1024² matmul). True where the flags cannot be read.
    """
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:
        return True
    return not flags or "amx_bf16" in flags or "avx512_bf16" in flags


def episode_seed(seed: int, index: int) -> int:
    """A 31-bit seed for episode ``index``, a pure function of (seed, index)."""
    return int(np.random.SeedSequence([seed, index, 1]).generate_state(1)[0] & 0x7FFFFFFF)


class _SupportBatches(Dataset):
    """``steps`` batches of the support set, one optimiser step each; item ``i`` is step ``i``.

    ``batch_size`` None: the whole set every step, in a fixed order. Otherwise shuffled passes
    over the set, ``batch_size`` images a step, from a generator seeded with ``seed``.
    """

    def __init__(
        self, images: Tensor, labels: Tensor, steps: int, batch_size: int | None, seed: int
    ) -> None:
        self.images, self.labels, self.steps = images, labels, steps
        self.index: list[Tensor] | None = None
        n = len(images)
        if batch_size is not None and batch_size < n:
            generator = torch.Generator().manual_seed(seed)
            order, position, self.index = torch.randperm(n, generator=generator), 0, []
            for _ in range(steps):
                if position + batch_size > n:
                    order, position = torch.randperm(n, generator=generator), 0
                self.index.append(order[position : position + batch_size])
                position += batch_size

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> tuple[Tensor, Tensor]:
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} of {self.steps}")
        if self.index is None:
            return self.images, self.labels
        return self.images[self.index[step]], self.labels[self.index[step]]


def support_loader(
    images: Tensor, labels: Tensor, steps: int, batch_size: int | None, seed: int
) -> DataLoader:
    """``steps`` support batches, one optimiser step each, as one epoch for ``Trainer.fit``.

    ``batch_size`` None: the whole set every step; otherwise shuffled passes from ``seed``.
    """
    if batch_size is not None and batch_size < 1:
        raise CdfslError(f"batch_size must be >= 1 or null, got {batch_size}")
    return DataLoader(_SupportBatches(images, labels, steps, batch_size, seed), batch_size=None)


class NonFiniteGuard(L.Callback):
    """Stops each episode whose loss turns non-finite; the episodes beside it train on as before.

    After each backward, before the optimiser step, an episode whose ``loss`` is NaN or ±inf is
    recorded in ``failures[e]``: ``step`` (0-based optimiser step), ``term`` (the first
    non-finite term other than ``loss``, else ``loss``), ``non_finite`` (all of them) and
    ``terms`` (that step's terms, non-finite ones as None). From then on adapter set ``e``'s
    gradients are zeroed, so nothing non-finite enters AdamW's state. Adapter set ``e`` gets
    its gradient from episode ``e``'s loss alone, so the other episodes' rows do not change.
    Once every episode has failed, training stops (``all_failed``).

    No host sync a step: the gradients are masked on the device, and each step's finite flags
    are read on the host one step later (and at the end of training), when the device has long
    computed them; so training stops one step after the last episode fails.
    """

    def __init__(self) -> None:
        self.failures: dict[int, dict[str, Any]] = {}
        self.all_failed = False
        self._failed: Tensor | None = None
        self._pending: _StepCheck | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.failures, self.all_failed, self._failed, self._pending = {}, False, None, None

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        episodes = pl_module.episodes
        finite = torch.isfinite(torch.stack([episode.terms["loss"] for episode in episodes]))
        self._collect(trainer, pl_module)
        self._failed = ~finite if self._failed is None else self._failed | ~finite
        zero_set_gradients(pl_module, self._failed)
        self._pending = _StepCheck.taken(trainer.global_step, finite, pl_module.terms_snapshot())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._collect(trainer, pl_module)

    def _collect(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record the episodes the pending step's flags show failed for the first time."""
        check, self._pending = self._pending, None
        if check is None:
            return
        for e, ok in enumerate(check.finite()):
            if not ok and e not in self.failures:
                terms = pl_module.episode_terms(e, check.snapshot[e])
                self.failures[e] = failure_record(check.step, terms)
        if self.failures and len(self.failures) == len(pl_module.episodes):
            self.all_failed = trainer.should_stop = True


@dataclass
class _StepCheck:
    """One step's finite flags on their way to the host, and that step's terms."""

    step: int
    flags: Tensor
    event: Any
    snapshot: list[Any]

    @classmethod
    def taken(cls, step: int, finite: Tensor, snapshot: list[Any]) -> _StepCheck:
        event = None
        if finite.device.type == "cuda":
            flags = finite.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            flags = finite.clone()
        return cls(int(step), flags, event, snapshot)

    def finite(self) -> list[bool]:
        if self.event is not None:
            self.event.synchronize()
        return self.flags.tolist()


def failure_record(step: int, terms: Mapping[str, float]) -> dict[str, Any]:
    """A failed episode's record: the step, the first non-finite term and all of them."""
    bad = [key for key, value in terms.items() if not np.isfinite(value)]
    return {
        "step": int(step),
        "term": next((key for key in bad if key != "loss"), bad[0] if bad else "loss"),
        "non_finite": bad,
        "terms": {key: (value if np.isfinite(value) else None) for key, value in terms.items()},
    }


def fit_episode(
    method: FewShotMethod, images: Tensor, labels: Tensor, steps: int, fit: FitConfig,
    callbacks: list[L.Callback] | None = None,
) -> None:  # fmt: skip
    """Train ``method`` for ``steps`` steps on one support set with a fresh Trainer.

    A :class:`NonFiniteGuard` among ``callbacks`` may end training early once every episode
    has failed; any other early stop is an interruption (KeyboardInterrupt).
    """
    device = fit.device()
    if fit.batch_size is not None and len(method.episodes) > 1:
        raise CdfslError(
            f"batch_size={fit.batch_size} with {len(method.episodes)} episodes per step: "
            "expected one episode per step for mini-batched support sets; set "
            "episodes_per_step to 1 (or null)"
        )
    _check_scaler_episodes(fit.precision, len(method.episodes))
    warn_if_slow_bf16(fit.precision, device.type)
    # On the device once: Lightning's per-step transfer of each batch is then a no-op.
    images, labels = images.to(device), labels.to(device)
    loader = support_loader(images, labels, steps, fit.batch_size, method.seed)
    # Lightning keeps the mode it finds; a model left in eval() by scoring would train without
    # LoRA dropout.
    method.train()
    sampling = method.view_sampling
    if _mini_batched(fit, len(images)) and sampling == "per_episode" and method.views:
        warnings.warn(
            f"view_sampling per_episode with batch_size={fit.batch_size} of {len(images)} support "
            "images: every step holds other images, so their views are drawn per_step for this "
            "fit (as CLIP-LoRA's loop does); set view_sampling: per_step to say so",
            stacklevel=2,
        )
        method.view_sampling = "per_step"
    try:
        _fit(method, loader, steps, fit, device, callbacks)
    finally:
        method.view_sampling = sampling


def _mini_batched(fit: FitConfig, support_size: int) -> bool:
    """Whether the steps see different subsets of the support set."""
    return fit.batch_size is not None and fit.batch_size < support_size


def _fit(
    method: FewShotMethod, loader: DataLoader, steps: int, fit: FitConfig, device: torch.device,
    callbacks: list[L.Callback] | None,
) -> None:  # fmt: skip
    dtype = autocast_dtype(fit.precision, device.type)
    root = method.backbone.lora_root()
    with (
        quiet_lightning(),
        cuda_numerics(fit.tf32, fit.deterministic, device.type),
        frozen_weights_in(root, dtype),
        attention_kernel_in(root, fit.attention),
        compiled_features_in(method, fit.compile, device.type),
    ):
        trainer = L.Trainer(
            accelerator=device.type,
            strategy=_StayOnDevice(device),  # the exact device, cuda:k of a launcher rank too
            precision=fit.precision,
            deterministic=fit.deterministic,
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
        )
        trainer.fit(method, loader)
    all_failed = any(isinstance(c, NonFiniteGuard) and c.all_failed for c in callbacks or ())
    if not all_failed:
        check_finished(trainer, steps)


class _StayOnDevice(SingleDeviceStrategy):
    """Lightning's one-device strategy, except that its teardown leaves the model where it is.

    Lightning moves the model (the whole backbone) to the CPU when ``fit`` ends; the evaluator
    scores and trains the next group on the same device, so that is two copies of the backbone
    per group for nothing. The optimiser, whose state Lightning would move too, goes with its
    Trainer.
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__(device=device)

    def teardown(self) -> None:
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()


@contextmanager
def tf32_allowed(allowed: bool) -> Iterator[None]:
    """CUDA matmuls and cuDNN convolutions in TF32 (``allowed``) or fp32 inside the block;
    torch lets cuDNN use TF32 by default, so ``32-true`` on a GPU would not be fp32."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@contextmanager
def cuda_numerics(tf32: bool, deterministic: bool, device_type: str) -> Iterator[None]:
    """TF32 as asked inside the block; with ``deterministic`` on CUDA, the cuBLAS workspace
    setting deterministic matmuls need (set before the first cuBLAS call, kept afterwards)."""
    if deterministic and device_type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    with tf32_allowed(tf32):
        yield


def warn_if_slow_bf16(precision: str | int | None, device_type: str) -> None:
    """Warn that bf16 on this CPU is emulated (no bf16 matrix units) and fp32 is faster."""
    if device_type == "cpu" and str(precision).startswith("bf16") and not cpu_has_bf16():
        warnings.warn(
            f"precision {precision!r} on a CPU without bf16 matrix units (no amx_bf16 or "
            "avx512_bf16 flag): bf16 matmuls run 10-80x slower than fp32 here; pass "
            "--precision 32-true",
            stacklevel=3,
        )


def check_finished(trainer: L.Trainer, steps: int) -> None:
    """Raise ``KeyboardInterrupt`` unless ``trainer`` ran all ``steps`` steps.

    Lightning turns Ctrl-C into a graceful stop; a half-trained model must not be scored or
    saved as if it were trained.
    """
    if trainer.interrupted or trainer.global_step != steps:
        raise KeyboardInterrupt
