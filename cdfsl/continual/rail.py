"""RAIL: closed-form ridge regression on frozen VLM features, learned domain after domain.

Two regressors hold, after every update, exactly the ridge solution on all data seen so far,
whatever the block sizes and their order, without storing past images:

- :class:`PrimalRegressor`: a frozen random ReLU layer ``phi(x) = ReLU(x W_rhl)`` (H units) and
  the recursive least-squares (Woodbury) update of ``M = (Phi^T Phi + lambda I)^-1`` and
  ``W = M Phi^T Y``. Memory is H² however much data it has seen.
- :class:`DualRegressor`: kernel ridge regression with an RBF kernel; it keeps every training
  feature and updates ``(K + lambda I)^-1`` by blocks through the Schur complement.

:func:`fuse` is RAIL-Fusion: a sample whose zero-shot argmax is a learned class takes the
regressor's scores on the learned classes; any other keeps its zero-shot probabilities.
Paper: Xu et al., NeurIPS 2024, arXiv 2406.18868; docs/fidelity.md maps its public code to cdfsl.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from cdfsl.errors import CdfslError
from cdfsl.registry import Registry

DTYPES: Registry[str, torch.dtype] = Registry(
    "dtype", {"float32": torch.float32, "float64": torch.float64}, fix="pass float64"
)
"""The solver dtypes a recipe may name."""


def _uniform_fan_in(generator: torch.Generator, in_dim: int, hidden: int) -> Tensor:
    """U(-1/sqrt(in_dim), 1/sqrt(in_dim)): ``nn.Linear``'s default initialisation.

    The reference builds its random layer as ``nn.Linear(512, 15000, bias=False)`` and never
    re-initialises it; PyTorch draws such a weight with ``kaiming_uniform_(a=sqrt(5))``, whose
    bound is ``sqrt(6 / ((1 + 5) fan_in)) = 1/sqrt(fan_in)``, fan_in = in_dim. A unit-norm x
    then has pre-activations of variance ``1/(3 in_dim)``.
    """
    bound = in_dim**-0.5
    uniform = torch.rand(in_dim, hidden, generator=generator, dtype=torch.float32)
    return uniform.mul_(2.0 * bound).sub_(bound)


def _standard_normal(generator: torch.Generator, in_dim: int, hidden: int) -> Tensor:
    """N(0, 1): unit-variance pre-activations for unit-norm x, whatever in_dim (cdfsl's
    earlier layer). Scaling phi by c acts as dividing lambda by c², so at in_dim = 512 this
    layer is ~1,500x less regularised than the reference's for one lambda."""
    return torch.randn(in_dim, hidden, generator=generator, dtype=torch.float32)


RANDOM_LAYER_INITS = Registry(
    "random layer init",
    {
        "uniform_fan_in": _uniform_fan_in,
        "normal": _standard_normal,
    },
)
"""How :class:`PrimalRegressor` draws its random layer ``W_rhl: (in_dim, hidden)``, float32:
name -> fn(generator, in_dim, hidden). ``uniform_fan_in`` is the reference's."""


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return DTYPES.lookup(dtype)


def _check_features(features: Tensor, in_dim: int | None) -> None:
    if features.ndim != 2 or (in_dim is not None and features.shape[1] != in_dim):
        want = f"(N, {in_dim})" if in_dim is not None else "(N, D)"
        raise CdfslError(
            f"features of shape {tuple(features.shape)}: expected {want}; pass one feature "
            "row per sample, from the backbone the regressor learned with"
        )


def _check_block(
    features: Tensor, labels: Tensor, num_classes: int, known_classes: int, in_dim: int | None
) -> None:
    """Shapes and label range of an update; errors name the argument and the fix."""
    _check_features(features, in_dim)
    if labels.shape != (features.shape[0],):
        raise CdfslError(
            f"labels of shape {tuple(labels.shape)}: expected ({features.shape[0]},), one class "
            "index per feature row"
        )
    if num_classes < known_classes:
        raise CdfslError(
            f"num_classes={num_classes}: expected >= {known_classes} (classes already learned); "
            "pass the size of the label space seen so far, which only grows"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise CdfslError(
            f"labels in [{int(labels.min())}, {int(labels.max())}]: expected 0 <= label < "
            f"num_classes={num_classes}; raise num_classes to cover the new classes"
        )


class PrimalRegressor:
    """Ridge regression on random ReLU features, updated recursively (RLS / Woodbury).

    After any sequence of :meth:`update` calls, ``weights`` equals
    ``(Phi^T Phi + reg I)^-1 Phi^T Y`` over every sample seen, ``Y`` one-hot over the classes
    seen so far. State: ``inverse`` M (H, H), ``weights`` W (H, C), ``projection`` (in_dim, H).

    Args:
        in_dim: feature dimension D of the backbone.
        hidden: H, units of the random layer (the paper's 15000; accuracy saturates near 10k).
        reg: lambda, the ridge penalty.
        seed: seeds ``projection`` (drawn in float32 so that a float32 and a float64 regressor
            with one seed share the same layer).
        random_init: a row of :data:`RANDOM_LAYER_INITS`: ``"uniform_fan_in"`` (default, the
            reference's ``nn.Linear`` init, U(±1/sqrt(in_dim))) or ``"normal"`` (N(0, 1)).
        dtype: float64 (default) or float32 for M, W and the update's arithmetic.
        block_size: rows per RLS step; peak extra memory is a few (H, block_size) matrices.
        device: where M, W and the arithmetic live.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int = 15000,
        reg: float = 0.1,
        seed: int = 0,
        *,
        random_init: str = "uniform_fan_in",
        dtype: torch.dtype | str = torch.float64,
        block_size: int = 1024,
        device: str | torch.device = "cpu",
    ) -> None:
        if in_dim < 1 or hidden < 1 or block_size < 1:
            raise CdfslError(
                f"PrimalRegressor(in_dim={in_dim}, hidden={hidden}, block_size={block_size}): "
                "expected positive integers"
            )
        if not reg > 0:
            raise CdfslError(f"PrimalRegressor reg={reg}: expected lambda > 0 (e.g. 0.1)")
        draw = RANDOM_LAYER_INITS.get(random_init)
        if draw is None:
            raise CdfslError(
                f"PrimalRegressor random_init={random_init!r}: expected one of "
                f"{sorted(RANDOM_LAYER_INITS)} (uniform_fan_in is the reference's)"
            )
        self.in_dim, self.hidden, self.reg, self.seed = in_dim, hidden, float(reg), seed
        self.random_init = random_init
        self.dtype = _as_dtype(dtype)
        self.block_size = block_size
        self.device = torch.device(device)
        weight = draw(torch.Generator().manual_seed(seed), in_dim, hidden)
        self.projection = weight.to(self.device, self.dtype)
        # M starts as (0 + lambda I)^-1, the joint solution on no data; allocated on first use.
        self.inverse: Tensor | None = None
        self.weights = torch.zeros(hidden, 0, dtype=self.dtype, device=self.device)

    @property
    def num_classes(self) -> int:
        """Columns of W: the size of the label space learned so far."""
        return self.weights.shape[1]

    def hidden_features(self, x: Tensor) -> Tensor:
        """``x: (B, in_dim)`` -> ``phi(x) = ReLU(x W_rhl)``: ``(B, hidden)``, regressor dtype."""
        return F.relu(x.to(self.device, self.dtype) @ self.projection)

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor, num_classes: int) -> None:
        """Learn ``features: (N, in_dim)`` with ``labels: (N,)`` in ``[0, num_classes)``.

        W is first padded with zero columns up to ``num_classes`` (a class never seen has
        zero targets in every past row, so zero is its joint solution), then each block of
        rows (Phi_b, Y_b) applies, with P = M Phi_b^T and S = I + Phi_b P:

            K = P S^-1;   M <- M - K P^T;   W <- W + K (Y_b - Phi_b W).

        K equals the *updated* M times Phi_b^T (expand M_new Phi_b^T = P - K (S - I) = K), so
        this is the paper's W <- W + M Phi_b^T (Y_b - Phi_b W) without a second H²·b product.
        """
        _check_block(features, labels, num_classes, self.num_classes, self.in_dim)
        if num_classes > self.num_classes:
            pad = self.weights.new_zeros(self.hidden, num_classes - self.num_classes)
            self.weights = torch.cat([self.weights, pad], dim=1)
        if self.inverse is None:
            self.inverse = torch.eye(self.hidden, dtype=self.dtype, device=self.device)
            self.inverse /= self.reg
        labels = labels.to(self.device)
        for start in range(0, features.shape[0], self.block_size):
            phi = self.hidden_features(features[start : start + self.block_size])
            targets = F.one_hot(labels[start : start + self.block_size], num_classes)
            targets = targets.to(self.dtype)
            gain_in = self.inverse @ phi.T  # P: (H, b)
            innovation = phi @ gain_in  # Phi_b M Phi_b^T: (b, b)
            innovation.diagonal().add_(1.0)
            # S is symmetric, so P S^-1 = (S^-1 P^T)^T.
            gain = torch.linalg.solve(innovation, gain_in.T).T  # K: (H, b)
            residual = targets - phi @ self.weights  # (b, C)
            # In place: M is the one H x H buffer; no second one is ever allocated.
            self.inverse.addmm_(gain, gain_in.T, alpha=-1.0)
            self.weights.addmm_(gain, residual)

    @torch.no_grad()
    def scores(self, features: Tensor) -> Tensor:
        """``features: (B, in_dim)`` -> ``phi(x) W``: ``(B, num_classes)``, the regressor dtype."""
        _check_features(features, self.in_dim)
        out = [
            self.hidden_features(features[start : start + self.block_size]) @ self.weights
            for start in range(0, features.shape[0], self.block_size)
        ]
        return torch.cat(out) if out else self.weights.new_zeros(0, self.num_classes)

    def state_bytes(self) -> int:
        """Bytes held by M, W and the random layer."""
        held = [self.projection, self.weights, *([] if self.inverse is None else [self.inverse])]
        return sum(t.numel() * t.element_size() for t in held)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue learning: hyper-parameters, M, W and the layer."""
        return {
            "kind": "primal",
            "config": {
                "in_dim": self.in_dim, "hidden": self.hidden, "reg": self.reg, "seed": self.seed,
                "random_init": self.random_init,
                "dtype": str(self.dtype).removeprefix("torch."), "block_size": self.block_size,
            },
            "projection": self.projection.cpu(),
            "inverse": None if self.inverse is None else self.inverse.cpu(),
            "weights": self.weights.cpu(),
        }  # fmt: skip

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Any], device: str | torch.device = "cpu"
    ) -> PrimalRegressor:
        """The regressor :meth:`state_dict` describes (states saved before ``random_init`` existed
        drew their layer from N(0, 1))."""
        regressor = cls(**{"random_init": "normal", **state["config"]}, device=device)
        regressor.projection = state["projection"].to(regressor.device, regressor.dtype)
        inverse = state["inverse"]
        if inverse is not None:
            inverse = inverse.to(regressor.device, regressor.dtype)
        regressor.inverse = inverse
        regressor.weights = state["weights"].to(regressor.device, regressor.dtype)
        return regressor


def rbf_kernel(a: Tensor, b: Tensor, gamma: float) -> Tensor:
    """``a: (N, D)``, ``b: (M, D)`` -> ``exp(-gamma ||a_i - b_j||²)``: ``(N, M)``."""
    sq = (a * a).sum(1, keepdim=True) + (b * b).sum(1) - 2.0 * (a @ b.T)
    # Rounding can make the squared distance of near-equal rows slightly negative.
    return torch.exp(-gamma * sq.clamp_min_(0.0))


class DualRegressor:
    """Kernel ridge regression with an RBF kernel, its inverse updated by blocks.

    After any sequence of :meth:`update` calls, ``inverse`` equals ``(K + reg I)^-1`` and
    ``alpha`` equals ``(K + reg I)^-1 Y`` over every stored feature ``memory: (N, D)``;
    ``f(x) = k(x, memory) alpha``. Memory and time grow as N² and N³ (N = 17,600 at 16 shots
    on the paper's ten domains); during an update the old and the grown inverse coexist.

    Args:
        gamma: the RBF width, ``k(x, x') = exp(-gamma ||x - x'||²)``.
        reg: lambda, the ridge penalty.
        dtype: float64 (default) or float32 for the stored features, inverse and arithmetic.
        block_size: rows added per Schur step; also the query batch of :meth:`scores`.
        device: where the state and the arithmetic live.
    """

    def __init__(
        self,
        gamma: float = 0.1,
        reg: float = 1e-3,
        *,
        dtype: torch.dtype | str = torch.float64,
        block_size: int = 1024,
        device: str | torch.device = "cpu",
    ) -> None:
        if not gamma > 0 or not reg > 0:
            raise CdfslError(f"DualRegressor(gamma={gamma}, reg={reg}): expected both > 0")
        if block_size < 1:
            raise CdfslError(f"DualRegressor block_size={block_size}: expected an integer >= 1")
        self.gamma, self.reg = float(gamma), float(reg)
        self.dtype = _as_dtype(dtype)
        self.block_size = block_size
        self.device = torch.device(device)
        self.memory = torch.zeros(0, 0, dtype=self.dtype, device=self.device)
        self.inverse = torch.zeros(0, 0, dtype=self.dtype, device=self.device)
        self.alpha = torch.zeros(0, 0, dtype=self.dtype, device=self.device)

    @property
    def num_classes(self) -> int:
        """Columns of alpha: the size of the label space learned so far."""
        return self.alpha.shape[1]

    @property
    def num_stored(self) -> int:
        """N, the number of training features held."""
        return self.memory.shape[0]

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor, num_classes: int) -> None:
        """Store ``features: (N_new, D)`` with ``labels: (N_new,)`` in ``[0, num_classes)``.

        For each block X_b appended to the stored A = K + lambda I (inverse known), with
        B = k(X, X_b), D = k(X_b, X_b) + lambda I and the Schur complement
        S = D - B^T A^-1 B, the block inverse is

            [[A^-1 + A^-1 B S^-1 B^T A^-1, -A^-1 B S^-1], [-S^-1 B^T A^-1, S^-1]]

        and alpha = inverse [Y; Y_b] becomes
        [alpha + A^-1 B S^-1 (B^T alpha - Y_b); S^-1 (Y_b - B^T alpha)]: no re-solve.
        """
        in_dim = self.memory.shape[1] if self.num_stored else None
        _check_block(features, labels, num_classes, self.num_classes, in_dim)
        x_new = features.to(self.device, self.dtype)
        if not self.num_stored:
            self.memory = x_new.new_zeros(0, x_new.shape[1])
        n_old, n_new = self.num_stored, x_new.shape[0]
        total = n_old + n_new
        # One buffer for the grown inverse; each block fills its rows and columns in place.
        inverse = self.inverse.new_empty(total, total)
        inverse[:n_old, :n_old] = self.inverse
        self.inverse = inverse  # drop the old (n_old, n_old) buffer before the blocks run
        alpha = torch.zeros(total, num_classes, dtype=self.dtype, device=self.device)
        alpha[:n_old, : self.num_classes] = self.alpha
        self.alpha = alpha
        memory = torch.cat([self.memory, x_new])
        labels = labels.to(self.device)
        n = n_old
        for start in range(0, n_new, self.block_size):
            x_b = x_new[start : start + self.block_size]
            b = x_b.shape[0]
            y_b = F.one_hot(labels[start : start + b], num_classes).to(self.dtype)
            a_inv = inverse[:n, :n]
            cross = rbf_kernel(memory[:n], x_b, self.gamma)  # B: (n, b)
            a_inv_b = a_inv @ cross  # A^-1 B: (n, b)
            schur = rbf_kernel(x_b, x_b, self.gamma) - cross.T @ a_inv_b
            schur.diagonal().add_(self.reg)
            schur_inv = torch.linalg.inv(schur)
            # S is symmetric; symmetrising its rounded inverse keeps the stored inverse so.
            schur_inv = 0.5 * (schur_inv + schur_inv.T)
            gain = a_inv_b @ schur_inv  # A^-1 B S^-1: (n, b)
            residual = cross.T @ alpha[:n] - y_b  # B^T alpha - Y_b: (b, C)
            a_inv.addmm_(gain, a_inv_b.T)
            inverse[:n, n : n + b] = -gain
            inverse[n : n + b, :n] = -gain.T
            inverse[n : n + b, n : n + b] = schur_inv
            alpha[:n].addmm_(gain, residual)
            alpha[n : n + b] = -schur_inv @ residual
            n += b
        self.memory = memory

    @torch.no_grad()
    def scores(self, features: Tensor) -> Tensor:
        """``features: (B, D)`` -> ``k(x, memory) alpha``: ``(B, num_classes)``, regressor dtype."""
        in_dim = self.memory.shape[1] if self.num_stored else None
        _check_features(features, in_dim)
        x = features.to(self.device, self.dtype)
        if not self.num_stored:
            return x.new_zeros(x.shape[0], 0)
        out = [
            rbf_kernel(x[start : start + self.block_size], self.memory, self.gamma) @ self.alpha
            for start in range(0, x.shape[0], self.block_size)
        ]
        return torch.cat(out) if out else x.new_zeros(0, self.num_classes)

    def state_bytes(self) -> int:
        """Bytes held by the stored features, the inverse and alpha."""
        held = (self.memory, self.inverse, self.alpha)
        return sum(t.numel() * t.element_size() for t in held)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue learning."""
        return {
            "kind": "dual",
            "config": {
                "gamma": self.gamma, "reg": self.reg, "block_size": self.block_size,
                "dtype": str(self.dtype).removeprefix("torch."),
            },
            "memory": self.memory.cpu(),
            "inverse": self.inverse.cpu(),
            "alpha": self.alpha.cpu(),
        }  # fmt: skip

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Any], device: str | torch.device = "cpu"
    ) -> DualRegressor:
        """The regressor :meth:`state_dict` describes."""
        regressor = cls(**state["config"], device=device)
        for key in ("memory", "inverse", "alpha"):
            setattr(regressor, key, state[key].to(regressor.device, regressor.dtype))
        return regressor


def fuse(
    zero_shot_probs: Tensor, regressor_scores: Tensor, seen_class_mask: Tensor, beta: float = 0.8
) -> Tensor:
    """RAIL-Fusion: ``(B, C)`` scores whose argmax is the prediction.

    ``zero_shot_probs: (B, C)`` softmax over every class of the sequence; ``regressor_scores:
    (B, C)`` the regressor's f(x) (columns of unseen classes are ignored); ``seen_class_mask:
    (C,)`` bool, the classes of domains already learned. A row whose zero-shot argmax is a
    seen class gets ``(1 - beta) p_zs + beta [f(x) on seen classes, 0 elsewhere]``; any other
    row keeps ``p_zs``, so RAIL predicts as zero-shot on samples it takes as unseen.
    """
    if zero_shot_probs.ndim != 2 or regressor_scores.shape != zero_shot_probs.shape:
        raise CdfslError(
            f"fuse got zero_shot_probs {tuple(zero_shot_probs.shape)} and regressor_scores "
            f"{tuple(regressor_scores.shape)}: expected both (B, C); pad regressor scores with "
            "zero columns for classes the regressor has not learned"
        )
    seen = seen_class_mask.to(device=zero_shot_probs.device, dtype=torch.bool)
    if seen.shape != (zero_shot_probs.shape[1],):
        raise CdfslError(
            f"seen_class_mask of shape {tuple(seen.shape)}: expected ({zero_shot_probs.shape[1]},),"
            " one flag per class of the sequence"
        )
    if not 0.0 <= beta <= 1.0:
        raise CdfslError(f"beta={beta}: expected 0 <= beta <= 1 (the paper's 0.8)")
    regressor = torch.where(seen, regressor_scores.to(zero_shot_probs.dtype), 0.0)
    in_distribution = seen[zero_shot_probs.argmax(dim=1)]
    fused = (1.0 - beta) * zero_shot_probs + beta * regressor
    return torch.where(in_distribution[:, None], fused, zero_shot_probs)
