"""LoRA on the attention in-projections (q, k, v) of a vision tower.

One concept, one place: a ``LoRAProjection`` is a linear projection ``y = x W^T + b`` whose output
is split into named row slices (``q``, ``k``, ``v`` of a fused in-projection, or one full slice of a
plain ``nn.Linear``); each targeted slice carries a ``LoRAAdapter`` that adds
``scale * dropout(x) A^T B^T`` to its rows. Two hosts share that logic and keep the original
``Parameter`` objects (and so the original state-dict keys):

* ``LoRAMultiheadAttention`` replaces ``nn.MultiheadAttention`` (open_clip's residual blocks);
* ``LoRALinear`` replaces an ``nn.Linear``: timm's fused ``qkv`` (``Attention`` in SigLIP towers,
  ``AttentionRope`` in PE-Core towers; q, k, v row slices) or separate ``q_proj``/``k_proj``/
  ``v_proj`` (``AttentionRope``/``EvaAttention`` with ``qkv_fused=False``, e.g. EVA02; one full
  slice each). The timm module itself stays, with its projection children swapped.

``inject_lora`` walks a module tree and asks a registry of layout handlers, keyed by exact module
type, for the replacement of each match; a new layout registers a handler with
``LAYOUT_HANDLERS.register(module_type)``.

With ``num_adapters = E > 1`` every adapter holds ``E`` independent sets (``A: (E, r, in)``,
``B: (E, out, r)``); the batch is split into ``E`` contiguous groups and group ``e`` uses set ``e``.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from timm.layers import AttentionRope as TimmAttentionRope
from timm.models.eva import EvaAttention
from torch import Tensor, nn

from cdfsl.attention import (
    ATTENTION_KERNELS,
    AUTO,
    choose_timm_kernel,
    compute_dtype,
    resolve_attention_kernel,
)
from cdfsl.errors import CdfslError
from cdfsl.plumbing import write_bytes_atomic
from cdfsl.registry import Registry

__all__ = [
    "LORA_CONFIG_KEY",
    "DropoutStreams",
    "LoRAAdapter",
    "LoRAConfig",
    "LoRADropout",
    "LoRALinear",
    "LoRAMultiheadAttention",
    "LoRAProjection",
    "adapter_sets",
    "inject_lora",
    "load_lora",
    "load_lora_state_dict",
    "lora_parameters",
    "lora_state_dict",
    "mark_only_lora_trainable",
    "merge_lora",
    "qkv_slices",
    "reset_lora",
    "save_lora",
    "set_lora_dropout_seeds",
    "set_num_adapters",
    "splitmix64",
    "unmerge_lora",
    "zero_set_gradients",
]

_PARTS = ("q", "k", "v")
_INT64_MIN = -(2**63)
_MASK64 = (1 << 64) - 1
# SplitMix64's increment (the golden ratio) and output multipliers.
_GAMMA, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_SCALINGS = ("rslora", "standard")

#: State-dict entry holding the ``LoRAConfig`` as UTF-8 JSON bytes (a uint8 tensor).
LORA_CONFIG_KEY = "__lora_config__"


@dataclass
class LoRAConfig:
    """LoRA hyper-parameters.

    ``scale`` is ``alpha / sqrt(rank)`` for ``scaling="rslora"`` and ``alpha / rank`` for
    ``"standard"``; ``dropout`` acts on each adapter's input; ``num_adapters`` independent adapter
    sets are trained side by side, one per contiguous batch group.
    """

    rank: int = 16
    alpha: float = 8.0
    dropout: float = 0.25
    targets: tuple[str, ...] = _PARTS
    scaling: str = "rslora"
    num_adapters: int = 1

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)  # lists arrive from YAML / CLI parsers
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise CdfslError(f"LoRAConfig.rank={self.rank!r}: expected an integer >= 1 (e.g. 16)")
        if not self.alpha > 0:
            raise CdfslError(f"LoRAConfig.alpha={self.alpha!r}: expected a number > 0 (e.g. 8)")
        if not 0.0 <= self.dropout < 1.0:
            raise CdfslError(f"LoRAConfig.dropout={self.dropout!r}: expected 0 <= dropout < 1")
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise CdfslError(
                f"LoRAConfig.targets={self.targets!r}: expected a non-empty subset of "
                f"{_PARTS} without repeats"
            )
        if not set(self.targets) <= set(_PARTS):
            raise CdfslError(
                f"LoRAConfig.targets={self.targets!r}: unknown projection; use any of {_PARTS}"
            )
        if self.scaling not in _SCALINGS:
            raise CdfslError(
                f"LoRAConfig.scaling={self.scaling!r}: expected one of {_SCALINGS} "
                "('rslora' = alpha/sqrt(rank), 'standard' = alpha/rank)"
            )
        n = self.num_adapters
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise CdfslError(f"LoRAConfig.num_adapters={n!r}: expected an integer >= 1")

    @property
    def scale(self) -> float:
        """The factor multiplying ``B A``: ``alpha/sqrt(rank)`` (rslora) or ``alpha/rank``."""
        if self.scaling == "rslora":
            return self.alpha / math.sqrt(self.rank)
        return self.alpha / self.rank


def qkv_slices(dim: int) -> dict[str, tuple[int, int]]:
    """Row slices of a fused ``(3*dim, dim)`` q/k/v projection, in q, k, v order."""
    return {"q": (0, dim), "k": (dim, 2 * dim), "v": (2 * dim, 3 * dim)}


def _kaiming_a(rank: int, in_features: int, generator: torch.Generator | None) -> Tensor:
    # Drawn on the CPU so that a given seed yields the same A on every device.
    a = torch.empty(rank, in_features, dtype=torch.float32)
    return nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)


def _int64(value: int) -> int:
    """``value`` mod 2**64 as the signed int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


def splitmix64(value: int) -> int:
    """SplitMix64's output function (Steele et al., OOPSLA 2014) on a Python int, mod 2**64."""
    z = value & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _mix64_(z: Tensor) -> Tensor:
    """:func:`splitmix64` in place on int64 ``z``, in plain integer ops (the same on every device).

    Products wrap mod 2**64 as two's complement; right shifts are made logical with a mask.
    """
    tmp = torch.empty_like(z)
    for shift, mult in ((30, _MIX1), (27, _MIX2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=tmp)
        z.bitwise_xor_(tmp.bitwise_and_((1 << (64 - shift)) - 1))
        if mult is not None:
            z.mul_(_int64(mult))
    return z


def _memory_order(t: Tensor, start: int, stop: int) -> tuple[int, ...]:
    """Dimensions ``start..stop-1`` of ``t`` from the largest stride to the smallest: permuted
    so, a dense tensor reshapes without a copy (a size-1 dimension's stride does not matter)."""
    return tuple(sorted(range(start, stop), key=lambda d: -t.stride(d)))


def _inverse(order: Sequence[int]) -> tuple[int, ...]:
    """The permutation that undoes ``order``."""
    return tuple(sorted(range(len(order)), key=order.__getitem__))


class DropoutStreams:
    """Counter-based dropout draws for ``E`` adapter sets, one stream per set.

    The mask words of set ``e`` at dropout call ``c`` (counted over all adapters, in module-call
    order) and word ``i`` are ``splitmix64(key_e + ((c << 40) + i) * gamma)`` with
    ``key_e = splitmix64(seeds[e])``: a SplitMix64 sequence read at positions that depend on the
    set's seed, the call and the element alone. Draws are integer arithmetic, identical on every
    device and for any number of sets side by side; a set's masks do not depend on the others.
    The call count is a tensor on the draws' device, so a compiled forward reads and advances it
    in its graph (a Python int would be a constant there, recompiled at every call).
    """

    def __init__(self, seeds: Sequence[int]) -> None:
        self.seeds = [int(seed) for seed in seeds]
        # The keys and the count live on the draws' device (moved at the first call there):
        # attributes, not a dict per device, which a compiled graph would guard on.
        self._keys = torch.tensor(
            [_int64(splitmix64(seed)) for seed in self.seeds], dtype=torch.int64
        ).view(-1, 1)
        self._calls = torch.zeros((), dtype=torch.int64)
        # gamma as a tensor, for compiled graphs: inductor folds arange(W) * constant into
        # index arithmetic, which does not wrap mod 2**64 and overflows.
        self._gamma = torch.tensor(_int64(_GAMMA), dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.seeds)

    @property
    def calls(self) -> int:
        """Dropout calls drawn so far (reads the count back: a device sync)."""
        return int(self._calls)

    def _to(self, device: torch.device) -> None:
        if self._calls.device != device:
            self._keys, self._calls = self._keys.to(device), self._calls.to(device)
            self._gamma = self._gamma.to(device)

    def keys(self, device: torch.device) -> Tensor:
        """``(E, 1)`` int64 stream keys on ``device``."""
        self._to(device)
        return self._keys

    def gamma(self, device: torch.device) -> Tensor:
        """SplitMix64's increment as an int64 scalar on ``device``."""
        self._to(device)
        return self._gamma

    def next_offset(self, device: torch.device) -> Tensor:
        """The Weyl offset ``(c << 40) * gamma`` of the next call ``c``: an int64 scalar on
        ``device``, where the count then moves."""
        self._to(device)
        offset = torch.bitwise_left_shift(self._calls, 40).mul_(_int64(_GAMMA))
        # A new count, not add_: a compiled graph may save the count it read for its backward
        # (to recompute the mask), and a later graph's in-place step would invalidate it.
        self._calls = self._calls + 1
        return offset


_WEYL: dict[tuple[int, torch.device], Tensor] = {}


def _weyl(streams: DropoutStreams, words: int, device: torch.device) -> Tensor:
    """``i * gamma`` mod 2**64 for ``i < words``, cached per size and device."""
    if torch.compiler.is_compiling():  # a graph computes it inline (a dict would be guarded)
        return torch.arange(words, dtype=torch.int64, device=device) * streams.gamma(device)
    key = (words, device)
    if key not in _WEYL:
        if len(_WEYL) > 64:
            _WEYL.clear()
        _WEYL[key] = torch.arange(words, dtype=torch.int64, device=device).mul_(_int64(_GAMMA))
    return _WEYL[key]


def dropout_words(streams: DropoutStreams, words: int, device: torch.device) -> Tensor:
    """The next call's ``(E, words)`` int64 random words of every stream in ``streams``."""
    offset = streams.next_offset(device)
    z = torch.add(streams.keys(device), _weyl(streams, words, device))
    return _mix64_(z.add_(offset))


def int16_draws(words: Tensor) -> Tensor:
    """``words: (E, W)`` int64 as ``(E, 4W)`` int16 draws: each word's four 16-bit fields, low
    bits first (the word's memory order on a little-endian machine, as ``view(torch.int16)``)."""
    if not torch.compiler.is_compiling():
        return words.view(torch.int16)
    # Inductor (torch 2.14) writes out of bounds for a dtype view of a computed buffer whose
    # element size changes: a compiled graph shifts the fields out instead (the same values).
    shifts = torch.arange(0, 64, 16, dtype=torch.int64, device=words.device)
    fields = torch.bitwise_right_shift(words.unsqueeze(-1), shifts).bitwise_and_(0xFFFF)
    return (fields.bitwise_xor_(0x8000) - 0x8000).to(torch.int16).flatten(-2)


class LoRADropout(nn.Module):
    """Inverted dropout on grouped inputs, each group's mask from its own stream.

    ``forward(x: (E, ...), streams)`` zeroes each element with probability ``p`` in training
    mode and returns ``x`` unchanged in eval mode. It does **not** rescale by ``1/(1-p)``:
    ``keep_scale`` is that factor, for the caller to fold into a later (smaller) product. The mask
    of group ``e`` comes from stream ``e`` of ``streams`` (:class:`DropoutStreams`; fresh keys
    from torch's default CPU generator at every call when None) and has the group's shape, so it
    does not depend on how many groups share the call. Masks come from 16 random bits per
    element, so ``p`` acts rounded to a multiple of 1/65536 (exact for 0.25, 0.5, ...).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)
        self._threshold = round(self.p * 65536) - 32768  # int16 draw < threshold: dropped

    @property
    def keep_scale(self) -> float:
        """``1 / (1 - p)``, the factor inverted dropout multiplies kept elements by."""
        return 1.0 / (1.0 - self.p)

    def forward(self, x: Tensor, streams: DropoutStreams | None = None) -> Tensor:
        if not self.training or self.p == 0:
            return x
        groups = x.shape[0]
        if streams is None:
            seeds = torch.randint(_INT64_MIN, 2**63 - 1, (groups,), dtype=torch.int64)
            streams = DropoutStreams(seeds.tolist())
        if len(streams) != groups:
            raise CdfslError(
                f"LoRA dropout with {len(streams)} streams for {groups} adapter groups: "
                "expected one per group; call set_lora_dropout_seeds with num_adapters seeds"
            )
        numel = x[0].numel()
        words = dropout_words(streams, (numel + 3) // 4, x.device)
        keep = int16_draws(words)[:, :numel] >= self._threshold
        # A product rather than masked_fill or where: it keeps x's layout (their outputs follow
        # the mask's, so a transposed x would be copied twice more) and gives the same values.
        # The mask is cast to x's dtype once: a bool factor is cast in forward and in backward.
        return x * keep.view(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


class LoRAAdapter(nn.Module):
    """Low-rank update of rows ``[start, stop)`` of a projection: ``scale * dropout(x) A^T B^T``.

    ``lora_A``: ``(E, rank, in_features)``, Kaiming-uniform; ``lora_B``: ``(E, stop - start,
    rank)``, zeros; both fp32 whatever the base dtype (under autocast the products run in the
    autocast dtype, as the Mind reference's fp32 LoRA over an fp16 model does).
    ``E = num_adapters``.
    """

    def __init__(
        self,
        in_features: int,
        start: int,
        stop: int,
        config: LoRAConfig,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.start, self.stop = in_features, start, stop
        self.rank, self.num_adapters, self.scale = config.rank, config.num_adapters, config.scale
        shape_a = (config.num_adapters, config.rank, in_features)
        shape_b = (config.num_adapters, stop - start, config.rank)
        self.lora_A = nn.Parameter(torch.empty(shape_a, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(shape_b, device=device, dtype=torch.float32))
        self.dropout = LoRADropout(config.dropout)
        #: One dropout stream per adapter set (None: fresh unseeded keys at every call).
        self.streams: DropoutStreams | None = None
        # The pre-merge base rows, so that unmerge restores them bit-exactly ((W + d) - d != W
        # in floating point). Not persistent: merging is a runtime state, not a checkpoint.
        self.register_buffer("pre_merge_rows", None, persistent=False)
        self.reset(generator=None)

    @property
    def merged(self) -> bool:
        """Whether the update is folded into the base weight (and skipped in ``forward``)."""
        return self.pre_merge_rows is not None

    def grouped(self, x: Tensor, batch_dim: int = 0) -> Tensor:
        """``x: (..., in)`` as ``(E, ..., n, ..., in)``: a view, group ``e`` = samples of set e.

        ``x.shape[batch_dim]`` must be divisible by ``E``; group ``e`` is the ``e``-th contiguous
        block of ``x.shape[batch_dim] / E`` samples.
        """
        n, e = x.shape[batch_dim], self.num_adapters
        if n % e:
            raise CdfslError(
                f"LoRA batch of {n} samples: expected a multiple of num_adapters={e} "
                "(one contiguous group per adapter set); pad or trim the batch to fit"
            )
        return x.unflatten(batch_dim, (e, n // e)).movedim(batch_dim, 0)

    def forward(self, x: Tensor, batch_dim: int = 0) -> Tensor:
        """The update for input ``x: (..., in_features)``, shape ``(..., stop - start)``."""
        d = self.grouped_update(x, batch_dim)
        return d.movedim(0, batch_dim).flatten(batch_dim, batch_dim + 1)

    def grouped_update(self, x: Tensor, batch_dim: int = 0) -> Tensor:
        """The update for ``x: (..., in_features)`` in the layout of :meth:`grouped`.

        Under autocast the products run in the autocast dtype; otherwise ``x`` is cast to the
        adapter dtype (fp32).
        """
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)
        h = self.dropout(self.grouped(x, batch_dim), self.streams)
        scale = self.scale
        if self.dropout.training and self.dropout.p > 0:
            scale *= self.dropout.keep_scale
        # The products run over the rows in memory order (E first), so that no copy is made
        # for a transposed input (a batch-first attention's (L, N, D) view); the dropout mask
        # above is keyed by the logical order, whatever the layout.
        order = (0, *_memory_order(h, 1, h.dim() - 1), h.dim() - 1)
        rows = h.permute(order)
        flat = rows.reshape(rows.shape[0], -1, self.in_features)  # (E, M, in)
        d = torch.bmm(torch.bmm(flat, self.lora_A.mT) * scale, self.lora_B.mT)
        return d.view(*rows.shape[:-1], -1).permute(_inverse(order))

    def delta_weight(self, index: int = 0) -> Tensor:
        """``scale * B[index] @ A[index]``, shape ``(stop - start, in_features)``, fp32."""
        return (self.lora_B[index] @ self.lora_A[index]) * self.scale

    @torch.no_grad()
    def reset(self, generator: torch.Generator | None, index: int | None = None) -> None:
        """Redraw A (Kaiming-uniform, a=sqrt(5)) and zero B for set ``index``, or all sets.

        One draw is shared by all reset sets, so set ``e`` gets the values a single-set adapter
        would get from the same generator state.
        """
        a = _kaiming_a(self.rank, self.in_features, generator)
        sets = range(self.num_adapters) if index is None else (index,)
        for e in sets:
            self.lora_A[e].copy_(a)
            self.lora_B[e].zero_()

    @torch.no_grad()
    def resize(self, num_adapters: int) -> None:
        """Hold ``num_adapters`` sets (new Parameters, A redrawn unseeded, B zero)."""
        device = self.lora_A.device
        self.num_adapters = num_adapters
        self.lora_A = nn.Parameter(
            torch.empty((num_adapters, *self.lora_A.shape[1:]), device=device),
            requires_grad=self.lora_A.requires_grad,
        )
        self.lora_B = nn.Parameter(
            torch.empty((num_adapters, *self.lora_B.shape[1:]), device=device),
            requires_grad=self.lora_B.requires_grad,
        )
        self.streams = None
        self.reset(generator=None)

    @torch.no_grad()
    def merge(self, weight: Tensor) -> None:
        """Add ``delta_weight()`` to ``weight[start:stop]`` in place (no-op when merged)."""
        if self.merged:
            return
        rows = weight[self.start : self.stop]
        self.pre_merge_rows = rows.clone()
        rows.add_(self.delta_weight(0).to(rows.dtype))

    @torch.no_grad()
    def unmerge(self, weight: Tensor) -> None:
        """Restore ``weight[start:stop]`` to its value before ``merge`` (no-op when unmerged)."""
        if not self.merged:
            return
        weight[self.start : self.stop].copy_(self.pre_merge_rows)
        self.pre_merge_rows = None

    def extra_repr(self) -> str:
        return (
            f"rows={self.start}:{self.stop}, in_features={self.in_features}, rank={self.rank}, "
            f"num_adapters={self.num_adapters}, scale={self.scale:g}, merged={self.merged}"
        )


class LoRAProjection(nn.Module):
    """Base of the modules holding a linear projection with LoRA adapters on named output slices.

    A subclass owns the base ``weight: (out, in)`` and ``bias: (out,)`` under its own names (so
    the host's state-dict keys stay those of the module it replaces) and returns them from
    ``base_weight_and_bias``; adapters are child modules named after their slice (``q``, ...).
    """

    def __init__(
        self,
        in_features: int,
        slices: dict[str, tuple[int, int]],
        config: LoRAConfig,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        for name in config.targets:
            if name in slices:
                start, stop = slices[name]
                self.add_module(name, LoRAAdapter(in_features, start, stop, config, device))

    def base_weight_and_bias(self) -> tuple[Tensor, Tensor | None]:
        """The base ``weight: (out, in)`` and ``bias: (out,)`` (or ``None``)."""
        raise NotImplementedError

    def adapters(self) -> Iterator[LoRAAdapter]:
        """The adapters of this projection, in slice order."""
        return (m for m in self.children() if isinstance(m, LoRAAdapter))

    def project(
        self, x: Tensor, start: int = 0, stop: int | None = None, batch_dim: int = 0
    ) -> Tensor:
        """Rows ``[start, stop)`` of the adapted projection of ``x: (..., in)``, ``(..., rows)``.

        ``x W^T + b`` plus the update of every unmerged adapter whose slice lies in the range;
        ``batch_dim`` is the dimension of ``x`` that indexes samples (used when ``E > 1``).
        """
        weight, bias = self.base_weight_and_bias()
        stop = weight.shape[0] if stop is None else stop
        if (start, stop) != (0, weight.shape[0]):
            weight = weight[start:stop]
            bias = None if bias is None else bias[start:stop]
        if torch.is_autocast_enabled(x.device.type):
            # Cast once here rather than once in every matmul (base and each adapter) that
            # autocast would cast it for.
            x = x.to(torch.get_autocast_dtype(x.device.type))
        # Always a 2-D matmul: with a 3-D input in a low-precision dtype, CPU matmul expands
        # and copies the weight once per leading index (measured: 7x slower in bf16). Rows in
        # memory order: a transposed input (a batch-first attention's (L, N, D) view)
        # is not copied. The adapters' updates join the base output out of place: an in-place
        # add into a view of it would make autograd copy the whole gradient per adapter.
        order = (*_memory_order(x, 0, x.dim() - 1), x.dim() - 1)
        rows = x.permute(order)
        y = F.linear(rows.reshape(-1, x.shape[-1]), weight, bias)
        parts: list[Tensor] = []
        at = start
        for adapter in self.adapters():
            if adapter.merged or not (start <= adapter.start and adapter.stop <= stop):
                continue
            if adapter.start > at:
                parts.append(y.new_zeros(()).expand(len(y), adapter.start - at))
            parts.append(adapter(x, batch_dim).permute(order).reshape(len(y), -1))
            at = adapter.stop
        if parts:
            if at < stop:
                parts.append(y.new_zeros(()).expand(len(y), stop - at))
            # Summed at the higher precision, rounded to the base's (fp32 adapters on a bf16 base).
            y = (y + torch.cat(parts, dim=-1)).to(y.dtype)
        return y.view(*rows.shape[:-1], -1).permute(_inverse(order))

    def merge(self) -> None:
        """Fold every adapter into the base weight; requires ``num_adapters == 1``."""
        if self.config.num_adapters != 1:
            raise CdfslError(
                f"merge_lora with num_adapters={self.config.num_adapters}: expected 1, since one "
                "base weight can hold only one adapter set; export one set with "
                "lora_state_dict(root, adapter_index=e) into a single-adapter model and merge that"
            )
        weight, _ = self.base_weight_and_bias()
        for adapter in self.adapters():
            adapter.merge(weight)

    def unmerge(self) -> None:
        """Restore the base weight saved by ``merge``."""
        weight, _ = self.base_weight_and_bias()
        for adapter in self.adapters():
            adapter.unmerge(weight)


class LoRALinear(LoRAProjection):
    """Drop-in for an ``nn.Linear`` (same ``weight``/``bias`` Parameters) with LoRA on slices.

    ``forward(x: (..., in)) -> (..., out)``; ``batch_dim`` indexes samples in ``x``.
    """

    def __init__(
        self,
        linear: nn.Linear,
        slices: dict[str, tuple[int, int]],
        config: LoRAConfig,
        batch_dim: int = 0,
    ) -> None:
        super().__init__(linear.in_features, slices, config, linear.weight.device)
        self.in_features, self.out_features, self.batch_dim = (
            linear.in_features,
            linear.out_features,
            batch_dim,
        )
        self.weight = linear.weight
        self.bias = linear.bias

    def base_weight_and_bias(self) -> tuple[Tensor, Tensor | None]:
        return self.weight, self.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.project(x, batch_dim=self.batch_dim)


def _canonical_mask(mask: Tensor | None, dtype: torch.dtype, name: str) -> Tensor | None:
    # Additive float mask, as torch's MHA builds it: boolean True means "masked".
    if mask is None or torch.is_floating_point(mask):
        return mask
    if mask.dtype != torch.bool:
        raise CdfslError(f"{name} of dtype {mask.dtype}: expected bool or floating point")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _heads(proj: Tensor, n: int, heads: int) -> tuple[Tensor, ...]:
    """``(L, N, n·E)`` projections -> ``n`` ``(N, heads, L, E / heads)`` views, no copy.

    The values torch's packed path gets by copying q, k and v apart and regrouping their heads:
    SDPA reads the strided views to the same bits, and the backward assembles one gradient
    instead of zero-filling and copying each slice.
    """
    length, batch = proj.shape[:2]
    if proj.stride(1) > proj.stride(0):
        # Batch-major memory (a batch-first attention): split the heads there, so that their
        # gradients assemble in that order and reach the projection without another copy.
        split = proj.transpose(0, 1).view(batch, length, n, heads, -1)
        return split.permute(2, 0, 3, 1, 4).unbind(0)
    return proj.view(length, batch, n, heads, -1).permute(2, 1, 3, 0, 4).unbind(0)


class LoRAMultiheadAttention(LoRAProjection):
    """Drop-in for ``nn.MultiheadAttention`` with LoRA on the q/k/v rows of ``in_proj_weight``.

    Keeps the original ``in_proj_weight: (3E, E)``, ``in_proj_bias: (3E,)`` and ``out_proj``.
    Reproduces the op sequence of torch's non-fast path (so with ``B = 0`` outputs are bit-identical
    to it) and returns ``(out, None)``: attention weights are never computed, whatever
    ``need_weights`` says. Inputs are ``(N, L, E)`` if ``batch_first`` else ``(L, N, E)``, or
    unbatched ``(L, E)``; ``attn_mask`` is ``(L, S)`` or ``(N*heads, L, S)``, bool or additive.
    """

    def __init__(self, mha: nn.MultiheadAttention, config: LoRAConfig) -> None:
        unsupported = {
            "separate q/k/v weights (kdim or vdim != embed_dim)": not mha._qkv_same_embed_dim,
            "add_bias_kv=True": mha.bias_k is not None or mha.bias_v is not None,
            "add_zero_attn=True": mha.add_zero_attn,
        }
        for what, present in unsupported.items():
            if present:
                raise CdfslError(
                    f"nn.MultiheadAttention with {what}: expected packed self-attention as in "
                    "open_clip's ResidualAttentionBlock; pass inject_lora a root (e.g. "
                    "visual.transformer) that holds only supported attention modules"
                )
        e = mha.embed_dim
        super().__init__(e, qkv_slices(e), config, mha.in_proj_weight.device)
        self.embed_dim, self.num_heads, self.head_dim = e, mha.num_heads, mha.head_dim
        self.kdim = self.vdim = e
        self._qkv_same_embed_dim = True
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        self.attention_kernel = AUTO  # see cdfsl.attention

    def base_weight_and_bias(self) -> tuple[Tensor, Tensor | None]:
        return self.in_proj_weight, self.in_proj_bias

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, None]:
        """Attention output, ``(N, L, E)`` if batch_first else ``(L, N, E)``, and ``None``."""
        batched = query.dim() == 3
        # Keep the identities query is key is value: they pick the fused (and exact) projection.
        if batched and self.batch_first:
            query, key, value = _retied(query, key, value, lambda t: t.transpose(1, 0))
        elif not batched:
            query, key, value = _retied(query, key, value, lambda t: t.unsqueeze(1))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        heads = self.num_heads

        key_padding_mask = _canonical_mask(key_padding_mask, query.dtype, "key_padding_mask")
        if is_causal and attn_mask is None:
            raise CdfslError("is_causal=True without attn_mask: pass the causal mask as attn_mask")
        if is_causal and key_padding_mask is None:
            attn_mask = None  # SDPA applies the causal hint itself
        else:
            attn_mask = _canonical_mask(attn_mask, query.dtype, "attn_mask")
            is_causal = False

        if query is key and key is value:
            q, k, v = _heads(self.project(query, batch_dim=1), 3, heads)
        elif key is value:
            (q,) = _heads(self.project(query, 0, embed_dim, batch_dim=1), 1, heads)
            k, v = _heads(self.project(key, embed_dim, None, batch_dim=1), 2, heads)
        else:
            (q,) = _heads(self.project(query, 0, embed_dim, batch_dim=1), 1, heads)
            (k,) = _heads(self.project(key, embed_dim, 2 * embed_dim, batch_dim=1), 1, heads)
            (v,) = _heads(self.project(value, 2 * embed_dim, None, batch_dim=1), 1, heads)

        if attn_mask is not None:
            full = (bsz * heads, tgt_len, src_len)
            if tuple(attn_mask.shape) not in (full, full[1:]):
                shape = tuple(attn_mask.shape)
                raise CdfslError(f"attn_mask of shape {shape}: expected {full[1:]} or {full}")
            if attn_mask.dim() == 2:
                attn_mask = attn_mask.unsqueeze(0)
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
            kpm = kpm.reshape(bsz * heads, 1, src_len)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, heads, -1, src_len)

        dropout_p = self.dropout if self.training else 0.0
        kernel = resolve_attention_kernel(self.attention_kernel, q.device.type, compute_dtype(q))
        out = ATTENTION_KERNELS[kernel].fn(q, k, v, attn_mask, dropout_p, is_causal)
        if batched and self.batch_first:  # rows in the caller's (N, L) order: no transposes
            out = out.transpose(1, 2).reshape(bsz * tgt_len, embed_dim)
            out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
            return out.view(bsz, tgt_len, -1), None
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(tgt_len, bsz, -1)
        return (out if batched else out.squeeze(1)), None


def _retied(
    query: Tensor, key: Tensor, value: Tensor, fn: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    q = fn(query)
    k = q if key is query else fn(key)
    v = k if value is key else fn(value)
    return q, k, v


# ----------------------------------------------------------------------------- layout registry

LayoutHandler = Callable[[nn.Module, LoRAConfig], nn.Module]
LAYOUT_HANDLERS: Registry[type[nn.Module], LayoutHandler] = Registry("LoRA layout")
"""Module type -> ``handler(module, config) -> module`` for modules of exactly that type
(``@LAYOUT_HANDLERS.register(module_type)``). The handler returns the module that takes
``module``'s place (a new one, or ``module`` itself after replacing some of its children with
``LoRALinear``); ``inject_lora`` does not descend into it further."""


@LAYOUT_HANDLERS.register(nn.MultiheadAttention)
def _multihead_attention(module: nn.Module, config: LoRAConfig) -> nn.Module:
    assert isinstance(module, nn.MultiheadAttention)
    return LoRAMultiheadAttention(module, config)


def _with_children(module: nn.Module, children: dict[str, nn.Module]) -> nn.Module:
    """A shallow copy of ``module`` with the named ``children`` swapped in; ``module`` is untouched.

    The copy shares every Parameter and buffer (so state-dict keys and values stay), but owns its
    child table: ``inject_lora`` swaps it in only once every handler has succeeded.
    """
    twin = copy.copy(module)
    for key, value in module.__dict__.items():
        if isinstance(value, (dict, set)):  # _modules, _parameters, _buffers, hook tables
            twin.__dict__[key] = copy.copy(value)
    for name, child in children.items():
        setattr(twin, name, child)
    return twin


def _timm_qkv(module: nn.Module, config: LoRAConfig) -> nn.Module:
    """timm attention: LoRA on the fused ``qkv`` Linear, or on ``q_proj``/``k_proj``/``v_proj``.

    Inputs are ``(B, N, C)``, so samples lie on dim 0 (the ``LoRALinear`` default).
    """
    qkv = getattr(module, "qkv", None)
    if isinstance(qkv, nn.Linear):
        # EvaAttention with q/v biases calls F.linear(x, self.qkv.weight, bias) itself, which
        # would skip the adapters silently; only its qkv_bias_separate mode calls self.qkv(x).
        if getattr(module, "q_bias", None) is not None and not module.qkv_bias_separate:
            raise CdfslError(
                f"{type(module).__name__} with separate q/v biases and a fused qkv Linear bypasses "
                "qkv.forward: expected qkv_bias_separate=True or qkv_fused=False; build the timm "
                "model with one of them or register a layout handler for it"
            )
        rows = qkv.out_features // 3
        return _with_kernel_choice(
            _with_children(module, {"qkv": LoRALinear(qkv, qkv_slices(rows), config)})
        )
    projections = {part: getattr(module, f"{part}_proj", None) for part in config.targets}
    missing = [f"{part}_proj" for part, proj in projections.items() if type(proj) is not nn.Linear]
    if missing:
        raise CdfslError(
            f"{type(module).__name__} has no nn.Linear {', '.join(missing)} and no fused qkv: "
            "expected timm's fused or separate q/k/v projections; register a layout handler"
        )
    return _with_kernel_choice(
        _with_children(
            module,
            {
                f"{part}_proj": LoRALinear(proj, {part: (0, proj.out_features)}, config)
                for part, proj in projections.items()
            },
        )
    )


def _with_kernel_choice(attention: nn.Module) -> nn.Module:
    """``attention`` (a timm attention) choosing its kernel at every call, as
    ``LoRAMultiheadAttention`` does (``attention_kernel``, see :mod:`cdfsl.attention`)."""
    attention.attention_kernel = AUTO
    attention.register_forward_pre_hook(choose_timm_kernel, with_kwargs=True)
    return attention


for _timm_type in (TimmAttention, TimmAttentionRope, EvaAttention):
    LAYOUT_HANDLERS.register(_timm_type, _timm_qkv)


# ----------------------------------------------------------------------------- public functions


def _named_adapters(root: nn.Module) -> list[tuple[str, LoRAAdapter]]:
    return [(n, m) for n, m in root.named_modules() if isinstance(m, LoRAAdapter)]


def _projections(root: nn.Module) -> list[LoRAProjection]:
    found = [m for m in root.modules() if isinstance(m, LoRAProjection)]
    if not found:
        raise CdfslError(
            f"{type(root).__name__} has no LoRA adapters: expected a module passed to "
            "inject_lora; call inject_lora(root, config) first"
        )
    return found


def _config(root: nn.Module) -> LoRAConfig:
    configs = [p.config for p in _projections(root)]
    if any(c != configs[0] for c in configs):
        raise CdfslError(
            f"{type(root).__name__} holds adapters injected with different configs: expected "
            "one config per root; save and load each injected subtree separately"
        )
    return configs[0]


def inject_lora(root: nn.Module, config: LoRAConfig) -> list[str]:
    """Replace every supported attention module under ``root`` by its LoRA version, in place.

    Returns the qualified names (relative to ``root``) of the adapted projections, e.g.
    ``"transformer.resblocks.0.attn.q"``; adapters start with B = 0, so outputs are unchanged.
    Load or cast the base weights before injecting: adapters are created fp32 on their device.
    """
    if any(isinstance(m, LoRAProjection) for m in root.modules()):
        raise CdfslError(
            f"{type(root).__name__} already holds LoRA adapters: expected a model without them; "
            "inject once, and use reset_lora to re-initialise"
        )
    if type(root) in LAYOUT_HANDLERS:
        raise CdfslError(
            f"root is itself a {type(root).__name__}: expected a module containing it, since "
            "inject_lora replaces modules in their parent; pass the parent module"
        )
    config = replace(config)  # a private copy: later edits to the caller's config change nothing
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    names: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            qualified = f"{prefix}{child_name}"
            handler = LAYOUT_HANDLERS.get(type(child))
            if handler is None:
                visit(child, qualified + ".")
                continue
            replacement = handler(child, config)
            replacement.train(child.training)  # new modules would otherwise start in train mode
            swaps.append((module, child_name, replacement))
            names.extend(f"{qualified}.{name}" for name, _ in _named_adapters(replacement))

    visit(root, "")  # swap only once every handler has succeeded, so a failure changes nothing
    for parent, child_name, replacement in swaps:
        setattr(parent, child_name, replacement)
    if not names:
        supported = ", ".join(sorted(t.__name__ for t in LAYOUT_HANDLERS))
        raise CdfslError(
            f"{type(root).__name__} has no attention module LoRA can adapt: expected one of "
            f"({supported}); pass the vision tower (e.g. model.visual) or register a layout handler"
        )
    return names


def lora_parameters(root: nn.Module) -> list[nn.Parameter]:
    """All LoRA ``A`` and ``B`` parameters under ``root``, in module order."""
    return [p for _, a in _named_adapters(root) for p in (a.lora_A, a.lora_B)]


def mark_only_lora_trainable(root: nn.Module) -> None:
    """Set ``requires_grad`` to False for every parameter under ``root`` except LoRA A and B."""
    for p in root.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(root):
        p.requires_grad_(True)


def _require_unmerged(root: nn.Module, action: str) -> None:
    if any(a.merged for _, a in _named_adapters(root)):
        raise CdfslError(f"{action} on merged LoRA weights: expected unmerged; call unmerge_lora")


def _check_index(root: nn.Module, adapter_index: int | None, action: str) -> None:
    if adapter_index is None:
        return
    n = _config(root).num_adapters
    if not 0 <= adapter_index < n:
        raise CdfslError(
            f"{action} adapter_index={adapter_index}: expected 0 <= adapter_index < "
            f"num_adapters={n}"
        )


def reset_lora(root: nn.Module, seed: int, adapter_index: int | None = None) -> None:
    """Redraw every A (Kaiming-uniform from ``torch.Generator().manual_seed(seed)``) and zero B.

    Only set ``adapter_index`` when given, else all sets (which then share their initial A). A
    set's values depend only on ``seed``, not on ``num_adapters`` or ``adapter_index``.
    """
    _projections(root)
    _require_unmerged(root, "reset_lora")
    _check_index(root, adapter_index, "reset_lora")
    generator = torch.Generator().manual_seed(seed)
    for _, adapter in _named_adapters(root):
        adapter.reset(generator, adapter_index)


def adapter_sets(root: nn.Module) -> int:
    """How many adapter sets (``num_adapters``) the adapters under ``root`` hold."""
    return _config(root).num_adapters


def set_num_adapters(root: nn.Module, num_adapters: int) -> None:
    """Give every adapter under ``root`` ``num_adapters`` sets (fresh A, B = 0; reset them next).

    The Parameters are replaced, so build the optimiser afterwards.
    """
    _require_unmerged(root, "set_num_adapters")
    for projection in _projections(root):
        projection.config = replace(projection.config, num_adapters=num_adapters)
        for adapter in projection.adapters():
            adapter.resize(num_adapters)


def set_lora_dropout_seeds(root: nn.Module, seeds: Sequence[int] | None) -> None:
    """Draw set ``e``'s dropout masks from a counter-based stream seeded ``seeds[e]``.

    All adapters share one :class:`DropoutStreams` and count calls in module-call order, so an
    episode's masks depend on its seed alone, not on the other sets or the device. None: fresh
    unseeded draws.
    """
    n = _config(root).num_adapters
    if seeds is not None and len(seeds) != n:
        raise CdfslError(
            f"set_lora_dropout_seeds with {len(seeds)} seeds: expected num_adapters={n}"
        )
    streams = None if seeds is None else DropoutStreams(seeds)
    for _, adapter in _named_adapters(root):
        adapter.streams = streams


def zero_set_gradients(root: nn.Module, sets: Sequence[int] | Tensor) -> None:
    """Zero the gradients of adapter sets ``sets`` under ``root`` (the others keep theirs).

    ``sets``: set indices, or a boolean ``(E,)`` tensor on the adapters' device (no host sync).
    """
    if isinstance(sets, Tensor):
        for _, adapter in _named_adapters(root):
            for param in (adapter.lora_A, adapter.lora_B):
                if param.grad is not None:
                    param.grad.masked_fill_(sets.view(-1, *[1] * (param.grad.dim() - 1)), 0)
        return
    index = list(sets)
    for _, adapter in _named_adapters(root):
        for param in (adapter.lora_A, adapter.lora_B):
            if param.grad is not None:
                param.grad[index] = 0


def merge_lora(root: nn.Module) -> None:
    """Fold ``scale * B @ A`` into each adapted base weight; forward then skips the updates."""
    for projection in _projections(root):
        projection.merge()


def unmerge_lora(root: nn.Module) -> None:
    """Undo ``merge_lora``: restore the base weights bit-exactly as they were before merging."""
    for projection in _projections(root):
        projection.unmerge()


def _config_entry(config: LoRAConfig) -> Tensor:
    data = json.dumps(asdict(config), sort_keys=True).encode()
    return torch.tensor(list(data), dtype=torch.uint8)


def lora_state_dict(root: nn.Module, adapter_index: int | None = None) -> dict[str, Tensor]:
    """Copies of the LoRA weights, keyed ``"<adapter path>.lora_A"`` / ``".lora_B"``, plus config.

    With ``adapter_index``, only that set, shaped and configured as a single-adapter model's.
    The config travels as UTF-8 JSON bytes under ``LORA_CONFIG_KEY``.
    """
    config = _config(root)
    _check_index(root, adapter_index, "lora_state_dict")
    pick = slice(None) if adapter_index is None else slice(adapter_index, adapter_index + 1)
    state = {}
    for name, adapter in _named_adapters(root):
        state[f"{name}.lora_A"] = adapter.lora_A.detach()[pick].clone()
        state[f"{name}.lora_B"] = adapter.lora_B.detach()[pick].clone()
    if adapter_index is not None:
        config = LoRAConfig(**{**asdict(config), "num_adapters": 1})
    state[LORA_CONFIG_KEY] = _config_entry(config)
    return state


def load_lora_state_dict(root: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy ``state`` (as from ``lora_state_dict``) into the adapters under ``root``, strictly.

    Every adapter weight must be present with its exact shape and no other key may appear; the
    config entry, when present, must match the injected config (dropout aside).
    """
    config = _config(root)
    _require_unmerged(root, "load_lora_state_dict")
    if LORA_CONFIG_KEY in state:
        try:
            saved = json.loads(bytes(state[LORA_CONFIG_KEY].tolist()).decode())
            saved["targets"] = tuple(saved["targets"])
        except (ValueError, KeyError, TypeError) as err:
            raise CdfslError(f"LoRA state {LORA_CONFIG_KEY!r}: unreadable config ({err})") from err
        ours = asdict(config)
        differ = [
            f"{f.name}={saved.get(f.name)!r} (model has {ours[f.name]!r})"
            for f in fields(LoRAConfig)
            if f.name != "dropout" and saved.get(f.name) != ours[f.name]
        ]
        if differ:
            raise CdfslError(
                f"LoRA state saved with {', '.join(differ)}: expected the injected config; "
                "inject_lora with the config the adapters were trained with"
            )
    params = {}
    for name, adapter in _named_adapters(root):
        params[f"{name}.lora_A"] = adapter.lora_A
        params[f"{name}.lora_B"] = adapter.lora_B
    keys = set(state) - {LORA_CONFIG_KEY}
    missing, unexpected = sorted(set(params) - keys), sorted(keys - set(params))
    if missing or unexpected:
        raise CdfslError(
            f"LoRA state with missing keys {missing[:3]}{'...' if len(missing) > 3 else ''} and "
            f"unexpected keys {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}: expected "
            "exactly the adapters of this model; inject_lora with the same targets and root"
        )
    for key, param in params.items():
        if state[key].shape != param.shape:
            raise CdfslError(
                f"LoRA state {key!r} of shape {tuple(state[key].shape)}: expected "
                f"{tuple(param.shape)}; inject_lora with the rank and num_adapters of the save"
            )
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key])


def save_lora(root: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``lora_state_dict(root)`` to ``path`` as a safetensors file, atomically."""
    from safetensors.torch import save

    write_bytes_atomic(path, save(lora_state_dict(root), metadata={"format": "pt"}))


def load_lora(root: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a safetensors file written by ``save_lora`` into the adapters under ``root``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise CdfslError(f"LoRA file {str(path)!r} does not exist: expected a file from save_lora")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CdfslError(
            f"LoRA file {str(path)!r} is not a readable safetensors file ({err}); "
            "expected a file written by save_lora"
        ) from err
    load_lora_state_dict(root, state)
