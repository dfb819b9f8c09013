"""The linear probe: L2-regularised multinomial logistic regression on the support features.

Reference: CLIP's linear-probe evaluation (Radford et al., 2021, appendix A.3: scikit-learn's
L-BFGS logistic regression) as its README's example runs it, ``openai/CLIP`` ``README.md``
("Linear-probe evaluation"): ``LogisticRegression(random_state=0, C=0.316, max_iter=1000)``,
i.e. minimise ``½‖W‖² + C·Σ_i CE(W f_i + b, y_i)`` with an unpenalised intercept. The paper
sweeps C on a validation split; the few-shot protocol has none, so C stays at the README's
0.316. Features are the L2-normalised clean support features (LAION CLIP_benchmark's
``normalize: True``). The optimum is solved to convergence (Newton's method in float64 on the
span of the support features, where the optimal W lies), not stopped after L-BFGS's tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cdfsl.errors import CdfslError
from cdfsl.fewshot.methods.base import EpisodeState
from cdfsl.fewshot.methods.frozen import FrozenFeatureMethod, SupportSet, one_hot


@dataclass
class LogisticHead:
    """``weight (N, D)`` and ``bias (N,)`` of a fitted probe; ``steps`` Newton steps taken."""

    weight: Tensor
    bias: Tensor
    steps: int

    def logits(self, feats: Tensor) -> Tensor:
        return (feats.double() @ self.weight.t() + self.bias).float()


def _objective(theta: Tensor, a: Tensor, y: Tensor, c: float, penalty: Tensor) -> Tensor:
    logits = a @ theta.t()
    ce = -(torch.log_softmax(logits, -1) * y).sum()
    # The intercept's common shift changes no prediction; ½(Σ_c b_c)² pins it at Σ_c b_c = 0.
    return 0.5 * (theta * theta * penalty).sum() + 0.5 * theta[:, -1].sum() ** 2 + c * ce


def fit_logistic_regression(
    feats: Tensor, labels: Tensor, classes: int, c: float, max_steps: int = 100, tol: float = 1e-10
) -> LogisticHead:
    """argmin over W, b of ``½‖W‖² + c·Σ_i CE(W f_i + b, y_i)`` (scikit-learn's objective).

    Newton's method with a backtracking line search, in float64, on the coordinates of the
    features in their span (W's optimum lies there: the loss gradient does, and the penalty is
    isotropic), so a step costs a solve of ``N·(r + 1)`` unknowns with r ≤ the support size.
    """
    if c <= 0:
        raise CdfslError(f"C={c}: expected a positive inverse regularisation strength; fix c")
    x = feats.double()
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    rank = int((s > s[0] * 1e-10).sum()) if len(s) and float(s[0]) > 0 else 0
    basis = vh[:rank].t()  # (D, r)
    a = torch.cat([x @ basis, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
    y = one_hot(labels, classes).to(a)
    width = rank + 1
    penalty = torch.ones(classes, width, dtype=a.dtype, device=a.device)
    penalty[:, -1] = 0.0
    gauge = torch.zeros(classes, width, classes, width, dtype=a.dtype, device=a.device)
    gauge[:, -1, :, -1] = 1.0
    gauge = gauge.reshape(classes * width, classes * width)
    theta = torch.zeros(classes, width, dtype=a.dtype, device=a.device)
    steps = 0
    for steps in range(1, max_steps + 1):
        p = torch.softmax(a @ theta.t(), -1)
        grad = c * (p - y).t() @ a + theta * penalty
        grad[:, -1] += theta[:, -1].sum()
        if float(grad.abs().max()) < tol:
            steps -= 1
            break
        curvature = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (n, N, N)
        hessian = c * torch.einsum("icd,ij,ik->cjdk", curvature, a, a).reshape(
            classes * width, classes * width
        )
        hessian += torch.diag(penalty.reshape(-1)) + gauge
        step = torch.linalg.solve(hessian, grad.reshape(-1)).reshape(classes, width)
        value, size = _objective(theta, a, y, c, penalty), 1.0
        slope = float((grad * step).sum())
        while size > 1e-12:
            candidate = theta - size * step
            if _objective(candidate, a, y, c, penalty) <= value - 1e-4 * size * slope:
                break
            size /= 2
        theta = theta - size * step
    return LogisticHead(theta[:, :-1] @ basis.t(), theta[:, -1].clone(), steps)


class LinearProbe(FrozenFeatureMethod):
    """CLIP's linear probe: logistic regression on the clean support features.

    Args (beyond :class:`FrozenFeatureMethod`, through ``kwargs``):
        c: scikit-learn's inverse regularisation strength C (0.316, CLIP's README).
        max_steps: Newton steps at most (it converges in tens).
    """

    def __init__(self, *, c: float = 0.316, max_steps: int = 100, **kwargs: Any) -> None:
        if c <= 0 or max_steps < 1:
            raise CdfslError(
                f"c={c}, max_steps={max_steps}: expected c > 0 and max_steps >= 1; fix them"
            )
        super().__init__(**kwargs)
        self.c, self.max_steps = float(c), int(max_steps)

    def fit_support(self, episode: EpisodeState, support: SupportSet) -> int:
        head = fit_logistic_regression(
            support.features, support.labels, len(episode.class_names), self.c, self.max_steps
        )
        episode.memory["head"] = head
        return head.steps

    def predict_features(self, feats: Tensor, episode: EpisodeState) -> Tensor:
        return episode.memory["head"].logits(feats)
