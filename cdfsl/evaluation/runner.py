"""Episodic evaluation: episode -> reset adapters -> fit on support -> score queries -> row."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from cdfsl.data.base import LabelledImages
from cdfsl.data.episodes import EpisodeManifest, EpisodeSampler, load_episode, manifest_lines
from cdfsl.errors import CdfslError
from cdfsl.evaluation import distributed, shards
from cdfsl.evaluation.progress import RowProgress
from cdfsl.evaluation.shards import Shard
from cdfsl.evaluation.stats import mean_ci95
from cdfsl.evaluation.store import ResultStore, check_run_config, plain_json, write_json_atomic
from cdfsl.lora import LoRAAdapter
from cdfsl.methods.base import FewShotMethod
from cdfsl.plumbing import quiet_lightning, resolve_device

_AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def device_fingerprint(device: torch.device) -> dict[str, str]:
    """What of ``device`` a row depends on: its type, and a GPU's model name."""
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device)}
    return {"type": device.type}


#: The Lightning precisions a fit accepts: fp32, or fp32 adapters under fp16 / bf16 autocast.
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")

#: Version of the training engine in every run fingerprint: rows of another version are refused.
ENGINE_VERSION = 3


@dataclass
class EpisodeProtocol:
    """N-way K-shot episodes with Q queries per class; episode i depends only on (seed, i)."""

    n_way: int = 5
    k_shot: int = 1
    n_query: int = 15
    episodes: int = 800
    seed: int = 0


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
    fp32); ``deterministic``: Lightning's ``deterministic`` (deterministic kernels only, e.g.
    CUDA attention backward and ``index_add``; CUDA needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8``).
    """

    steps_per_shot: int = 250
    steps: int | None = None
    precision: str = "bf16-mixed"
    accelerator: str = "auto"
    batch_size: int | None = None
    episodes_per_step: int | None = None
    tf32: bool = False
    deterministic: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise CdfslError(
                f"precision={self.precision!r}: expected one of {', '.join(PRECISIONS)} (the LoRA "
                "weights stay fp32; a '*-true' low precision would cast them); fix --precision"
            )

    def total_steps(self, k_shot: int) -> int:
        steps = self.steps if self.steps is not None else self.steps_per_shot * k_shot
        if steps < 1:
            raise CdfslError(f"steps must be >= 1, got {steps}; set --steps or --steps_per_shot")
        return steps

    def device(self) -> torch.device:
        """CUDA when asked for and present, else the CPU; under a launcher, cuda:LOCAL_RANK."""
        index = distributed.cuda_index() if "LOCAL_RANK" in os.environ else None
        return resolve_device(self.accelerator, index)


#: Bytes kept for the backward pass per element of a LoRA projection's input: a ViT block
#: saves about 16 activations of the residual's size (norms, q/k/v, attention, MLP at 4x),
#: 4 bytes each in fp32. An estimate for choosing E, not a measurement.
_BYTES_PER_PROJECTED_ELEMENT = 64
_MAX_EPISODES_PER_STEP = {"cpu": 8, "cuda": 32}


def episodes_per_step(method: FewShotMethod, protocol: EpisodeProtocol, fit: FitConfig) -> int:
    """How many episodes train side by side: ``fit.episodes_per_step``, or from memory.

    Automatic: the activation memory of one training image is estimated from the inputs of the
    LoRA projections in a one-image forward (see ``_BYTES_PER_PROJECTED_ELEMENT``), and E is
    what half the free memory (CUDA: free device memory; CPU: MemAvailable) holds for
    ``n_way·k_shot·views`` images per episode, between 1 and 8 (CPU) or 32 (CUDA).
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
    images = protocol.n_way * protocol.k_shot * max(1, len(method.views or ()))
    need = images * _BYTES_PER_PROJECTED_ELEMENT * _projected_elements(method, device)
    return int(max(1, min(cap, _free_bytes(device) // 2 // max(1, need))))


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


class NonFiniteGuard(L.Callback):
    """Stops each episode whose loss turns non-finite; the episodes beside it train on as before.

    After each backward, before the optimiser step, an episode whose ``loss`` is NaN or ±inf is
    recorded in ``failures[e]``: ``step`` (0-based optimiser step), ``term`` (the first
    non-finite term other than ``loss``, else ``loss``), ``non_finite`` (all of them) and
    ``terms`` (that step's terms, non-finite ones as None). From then on adapter set ``e``'s
    gradients are zeroed, so nothing non-finite enters AdamW's state. Adapter set ``e`` gets
    its gradient from episode ``e``'s loss alone, so the other episodes' rows do not change.
    Once every episode has failed, training stops (``all_failed``).
    """

    def __init__(self) -> None:
        self.failures: dict[int, dict[str, Any]] = {}
        self.all_failed = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.failures, self.all_failed = {}, False

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        episodes = pl_module.episodes
        losses = torch.stack([episode.terms["loss"] for episode in episodes])
        if not bool(torch.isfinite(losses).all()):  # one device sync a step
            for e, episode in enumerate(episodes):
                if e not in self.failures and not bool(torch.isfinite(episode.terms["loss"])):
                    self.failures[e] = _failure(trainer.global_step, pl_module.episode_terms(e))
        if not self.failures:
            return
        for adapter in pl_module.modules():
            if isinstance(adapter, LoRAAdapter):
                for param in (adapter.lora_A, adapter.lora_B):
                    if param.grad is not None:
                        param.grad[list(self.failures)] = 0
        if len(self.failures) == len(episodes):
            self.all_failed = trainer.should_stop = True


def _failure(step: int, terms: Mapping[str, float]) -> dict[str, Any]:
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
    loader = support_loader(images, labels, steps, fit.batch_size, getattr(method, "seed", 0))
    # Lightning keeps the mode it finds; a model left in eval() by scoring would train without
    # LoRA dropout.
    method.train()
    sampling = getattr(method, "view_sampling", None)
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
        if sampling is not None:
            method.view_sampling = sampling


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


def _mini_batched(fit: FitConfig, support_size: int) -> bool:
    """Whether the steps see different subsets of the support set."""
    return fit.batch_size is not None and fit.batch_size < support_size


def _fit(
    method: FewShotMethod, loader: DataLoader, steps: int, fit: FitConfig, device: torch.device,
    callbacks: list[L.Callback] | None,
) -> None:  # fmt: skip
    if fit.deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    with quiet_lightning(), tf32_allowed(fit.tf32):
        trainer = L.Trainer(
            accelerator=device.type,
            # devices=1 would be cuda:0 for every rank of a launcher.
            devices=[device.index] if device.index is not None else 1,
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


def support_loader(
    images: Tensor, labels: Tensor, steps: int, batch_size: int | None, seed: int
) -> DataLoader:
    """``steps`` support batches, one optimiser step each, as one epoch for ``Trainer.fit``.

    ``batch_size`` None: the whole set every step; otherwise shuffled passes from ``seed``.
    """
    if batch_size is not None and batch_size < 1:
        raise CdfslError(f"batch_size must be >= 1 or null, got {batch_size}")
    return DataLoader(_SupportBatches(images, labels, steps, batch_size, seed), batch_size=None)


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
    dtype = _AUTOCAST.get(fit.precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    count = max(1, len(method.episodes))
    grouped = images.unflatten(0, (count, -1))  # (E, Q, 3, H, W)
    step = max(1, batch_size // count)
    out = []
    with autocast, tf32_allowed(fit.tf32):
        for start in range(0, grouped.shape[1], step):
            chunk = grouped[:, start : start + step].flatten(0, 1).to(device)
            out.append(method(chunk).float().cpu().unflatten(0, (count, -1)))
    return torch.cat(out, dim=1).flatten(0, 1)


def summarize_rows(rows: Sequence[Mapping[str, Any]], config: Mapping[str, Any]) -> dict[str, Any]:
    """An episodic run's summary: ``config`` with mean accuracy, CI95 and std over the successful
    rows (``episodes_done`` of them), the failed episodes (``episodes_failed``,
    ``failed_episodes``: rows with ``status: failed``, left out of the statistics) and the mean
    seconds per episode over all ``rows``."""
    failed = sorted(int(row["episode"]) for row in rows if shards.failed(row))
    stats = mean_ci95([row["accuracy"] for row in rows if not shards.failed(row)])
    return {
        **config,
        "accuracy": stats["mean"],
        "ci95": stats["ci95"],
        "std": stats["std"],
        "episodes_done": stats["episodes"],
        "episodes_failed": len(failed),
        "failed_episodes": failed,
        "seconds_per_episode": float(np.mean([r["seconds"] for r in rows])) if rows else None,
    }


def protocol_manifest(dataset: LabelledImages, protocol: EpisodeProtocol) -> list[dict[str, Any]]:
    """The manifest lines of ``protocol``'s episodes over ``dataset`` (see
    :func:`cdfsl.data.episodes.manifest_lines`), with the training seeds their rows carry."""
    sampler = EpisodeSampler(
        dataset.targets, protocol.n_way, protocol.k_shot, protocol.n_query, protocol.episodes,
        protocol.seed, dataset.class_names,
    )  # fmt: skip
    return manifest_lines(sampler, dataset, functools.partial(episode_seed, protocol.seed))


def manifest_digest(lines: Sequence[Mapping[str, Any]]) -> str:
    """sha256 of manifest ``lines`` as canonical JSON (sorted keys), one line each."""
    text = "".join(json.dumps(dict(line), sort_keys=True) + "\n" for line in lines)
    return hashlib.sha256(text.encode()).hexdigest()


class EpisodicEvaluator:
    """Run (or resume) an episodic evaluation into ``output_dir``.

    Writes ``results.jsonl`` (one row per finished episode, sorted by episode), ``run.json``
    (the configuration, checked on resume) and ``summary.json``. ``shard`` runs only episodes
    ``i % shard.count == shard.index``, into ``shards/`` (see :meth:`run`). Nothing is ever
    selected on query labels: the queries are predicted once, after training, and only then
    scored.

    ``manifest``: evaluate its episodes (the first ``protocol.episodes``, whose way, shot and
    query it must match) instead of sampling them; the run's fingerprint records its digest.
    An episode whose loss or query logits turn non-finite is a row with ``status: failed``
    (see :class:`NonFiniteGuard`); a resumed run skips it unless ``retry_failed``.
    """

    def __init__(
        self,
        method: FewShotMethod,
        dataset: LabelledImages,
        protocol: EpisodeProtocol,
        output_dir: str | Path,
        fit: FitConfig | None = None,
        config: dict[str, Any] | None = None,
        progress: bool = True,
        shard: Shard | None = None,
        manifest: EpisodeManifest | None = None,
        retry_failed: bool = False,
    ) -> None:
        self.method = method
        self.manifest = manifest
        self.retry_failed = retry_failed
        self.shard = shard
        self.dataset = dataset
        self.protocol = protocol
        self.fit = fit or FitConfig()
        self.output_dir = Path(output_dir)
        self.store = ResultStore(self.output_dir / "results.jsonl")
        self.config = {
            "method": type(method).__name__,
            # A resumed run must not mix rows of different engines: engine 1 drew dropout from
            # the global RNG, engine 2 from per-episode streams with a mask that never dropped
            # one element in four, engine 3 drops every element with probability p.
            "engine": ENGINE_VERSION,
            # Random streams and kernels differ between device types (and GPU models): rows
            # made on one are not those of another, so a resume elsewhere is refused.
            "device": device_fingerprint(self.fit.device()),
            # A resumed run must not mix episodes trained with other hyper-parameters.
            "method_args": plain_json(dict(method.hparams)),
            "protocol": asdict(protocol),
            "fit": asdict(self.fit),
            **(config or {}),
        }
        self.progress = progress
        self.sampler: EpisodeSampler | EpisodeManifest
        if manifest is None:
            self.sampler = EpisodeSampler(
                dataset.targets, protocol.n_way, protocol.k_shot, protocol.n_query,
                protocol.episodes, protocol.seed,
            )  # fmt: skip
        else:
            check_manifest(manifest, protocol)
            self.sampler = manifest
            self.config["manifest"] = {
                "path": manifest.source,
                "sha256": manifest_digest(manifest.lines),
            }

    def _fingerprint(self) -> dict[str, Any]:
        """The configuration a resumed run must share; the episode count may grow or shrink."""
        config = json.loads(json.dumps(self.config, sort_keys=True))
        config["protocol"].pop("episodes")
        config["fit"].pop("episodes_per_step", None)  # rows do not depend on it
        if "manifest" in config:
            config["manifest"].pop("path")  # the episodes are what counts, not where they lie
        return config

    def _episode_seed(self, index: int) -> int:
        seed = self.manifest.seed(index) if self.manifest is not None else None
        return episode_seed(self.protocol.seed, index) if seed is None else seed

    def _class_names(self, index: int) -> list[str] | None:
        return self.manifest.class_names(index) if self.manifest is not None else None

    def run_episodes(
        self, indices: Sequence[int], callbacks: list[L.Callback] | None = None
    ) -> list[dict[str, Any]]:
        """Fit and score the episodes ``indices`` side by side; their rows (not stored).

        The episodes train together (one adapter set each, see
        :meth:`FewShotMethod.start_episodes`); a row depends only on (protocol seed, index,
        configuration), never on which other episodes share the call. ``seconds`` is the
        group's time divided among its episodes. A row has ``status`` ``"ok"``, or
        ``"failed"`` with no accuracy and a ``failure`` (``step``, ``term``, ``non_finite``;
        its ``terms`` are those of the failing step) when the episode's loss turned non-finite
        in training (:class:`NonFiniteGuard`) or its query logits did (``term``
        ``"query_logits"``, ``step`` the step count).
        """
        start = time.perf_counter()
        method = self.method
        to_tensor = method.to_tensor()
        episodes = [
            load_episode(self.dataset, self.sampler.episode(i), to_tensor, self._class_names(i))
            for i in indices
        ]
        seeds = [self._episode_seed(i) for i in indices]
        method.to(self.fit.device())
        method.start_episodes(seeds, [episode.class_names for episode in episodes])
        steps, guard = 0, NonFiniteGuard()
        if method.trainable:
            steps = self.fit.total_steps(self.protocol.k_shot)
            images = torch.cat([episode.support_images for episode in episodes])
            labels = torch.cat([episode.support_labels for episode in episodes])
            fit_episode(method, images, labels, steps, self.fit, [*(callbacks or ()), guard])
        queries = torch.cat([episode.query_images for episode in episodes])
        logits = predict_logits(method, queries, self.fit).chunk(len(episodes))
        seconds = round((time.perf_counter() - start) / len(episodes), 4)
        rows = []
        for position, (index, episode) in enumerate(zip(indices, episodes, strict=True)):
            terms = method.episode_terms(position) if method.trainable else {}
            failure = guard.failures.get(position)
            if failure is None and not bool(torch.isfinite(logits[position]).all()):
                failure = {"step": steps, "term": "query_logits", "non_finite": ["query_logits"]}
                failure["terms"] = _failure(steps, terms)["terms"]
            row: dict[str, Any] = {
                "episode": index,
                "seed": seeds[position],
                "classes": episode.class_names,
                "support_ids": list(episode.support_ids),
                "query_ids": list(episode.query_ids),
                "status": "ok",
                "steps": steps,
                "seconds": seconds,
                "terms": terms,
            }  # fmt: skip
            if failure is None:
                hits = logits[position].argmax(dim=1) == episode.query_labels
                row["accuracy"] = float(hits.float().mean())
            else:
                row["status"], row["terms"] = shards.FAILED, failure.pop("terms")
                row["failure"] = failure
            rows.append(row)
        return rows

    def run_episode(self, index: int, callbacks: list[L.Callback] | None = None) -> dict[str, Any]:
        """Fit and score episode ``index`` alone; returns its result row (not stored)."""
        return self.run_episodes([index], callbacks)[0]

    def run(
        self, on_episode: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any] | None:
        """Evaluate every unfinished episode of this process's share, then merge and summarize.

        Episodes in results.jsonl or in any shard file count as finished, whatever world size or
        shard count wrote them. Without a shard the rows go to results.jsonl, then any shard
        files are merged into it and the summary is written and returned. A ranked shard (one
        rank of a torch.distributed group) appends to its own file; once every rank is done,
        rank 0 merges and writes the summary, which every rank returns. A static shard only
        appends to its file and returns None: ``cdfsl merge`` merges once all shards are done.
        ``on_episode`` is called with each stored row (e.g. to report progress elsewhere).
        """
        shard = self.shard
        ranked = shard is not None and shard.ranked
        if ranked:
            self._check_group(shard)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # In a group rank 0 alone reads what is finished (and records run.json), before any rank
        # writes: every rank then splits the same list.
        done = distributed.on_rank0(self._finished) if ranked else self._finished()
        store = self.store if shard is None else ResultStore(shard.rows_path(self.output_dir))
        if shard is not None:
            shards.record_config(self.output_dir, shard, self.config, self._fingerprint())
        share = [i for i in range(self.protocol.episodes) if shard is None or shard.owns(i)]
        todo = [i for i in share if i not in done]
        # One bar per run: rank 0's counts every rank's episodes (from their files, also while it
        # waits for them); a static shard's counts its share.
        bar = RowProgress(
            [self.output_dir], range(self.protocol.episodes) if ranked else share,
            f"{self.config['method']} {self.protocol.n_way}w{self.protocol.k_shot}s"
            + (f" {shard.name}" if shard is not None and not ranked else ""),
            enabled=self.progress and not (ranked and shard.index != 0), accuracy=True,
        )  # fmt: skip
        with bar:
            size = episodes_per_step(self.method, self.protocol, self.fit)
            for group in (todo[i : i + size] for i in range(0, len(todo), size)):
                for row in self.run_episodes(group):
                    store.append(row)
                    if on_episode is not None:
                        on_episode(row)
            if shard is None:
                shards.merge(self.output_dir)
                return self.write_summary()
            if not ranked:
                return None
            distributed.barrier()
        return distributed.on_rank0(self._merge_and_summarize)

    def _check_group(self, shard: Shard) -> None:
        group = distributed.ranked_shard()
        if group != shard:
            raise CdfslError(
                f"ranked shard {shard.name} but the process group is "
                f"{group.name if group else 'absent'}; expected the group's own rank and size; "
                "fix: pass distributed.ranked_shard() inside distributed.process_group()"
            )

    def _finished(self) -> set[int]:
        """Check (or record) run.json; the episodes finished in results.jsonl or any shard
        (failed ones too, unless ``retry_failed``)."""
        check_run_config(self.output_dir, self._fingerprint())
        rows = shards.finished_rows(self.output_dir)
        return {i for i, row in rows.items() if not (self.retry_failed and shards.failed(row))}

    def _merge_and_summarize(self) -> dict[str, Any]:
        shards.merge(self.output_dir)
        return self.write_summary()

    def write_summary(self) -> dict[str, Any]:
        """Write and return the summary of results.jsonl (see :func:`summarize_rows`)."""
        summary = summarize_rows(self.store.rows(), self.config)
        write_json_atomic(self.output_dir / "summary.json", summary)
        return summary


def check_manifest(manifest: EpisodeManifest, protocol: EpisodeProtocol) -> None:
    """Refuse a ``protocol`` whose way, shot or query differ from ``manifest``'s episodes, or
    that asks for more episodes than it holds."""
    shape = (manifest.n_way, manifest.k_shot, manifest.n_query)
    if shape != (protocol.n_way, protocol.k_shot, protocol.n_query):
        raise CdfslError(
            f"{manifest.source} holds {shape[0]}-way {shape[1]}-shot {shape[2]}-query episodes, "
            f"the protocol is {protocol.n_way}-way {protocol.k_shot}-shot {protocol.n_query}-query;"
            f" expected the same; fix: pass --way {shape[0]} --shot {shape[1]} --query {shape[2]}"
        )
    if protocol.episodes > manifest.episodes:
        raise CdfslError(
            f"{protocol.episodes} episodes asked of {manifest.source}, which holds "
            f"{manifest.episodes}; expected at most that many; fix: --episodes {manifest.episodes}"
        )
