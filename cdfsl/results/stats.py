"""Mean accuracy over episodes with a 95% confidence interval, as a torchmetrics Metric."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

Z_95 = 1.959963984540054


class EpisodeAccuracy(Metric):
    """Mean and 95% CI half-width of per-episode accuracies.

    CI95 = z·s/√n with s the sample standard deviation (n − 1 in the denominator) and z the
    normal 97.5% quantile: the few-shot literature's convention, with the unbiased variance.
    Sums are the state, so the metric reduces correctly across processes.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        """``kwargs`` go to torchmetrics' ``Metric`` (e.g. ``sync_on_compute``)."""
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, accuracies: Tensor) -> None:
        """``accuracies: (E,)`` per-episode accuracies in [0, 1]."""
        values = accuracies.detach().to(torch.float64).flatten()
        self.total += values.sum()
        self.total_sq += (values**2).sum()
        self.count += values.numel()

    def compute(self) -> dict[str, float]:
        n = int(self.count)
        if n == 0:
            return {"mean": math.nan, "ci95": math.nan, "std": math.nan, "episodes": 0}
        mean = float(self.total) / n
        var = (float(self.total_sq) - n * mean * mean) / (n - 1) if n > 1 else 0.0
        std = math.sqrt(max(var, 0.0))
        return {"mean": mean, "ci95": Z_95 * std / math.sqrt(n), "std": std, "episodes": n}


def mean_ci95(accuracies: list[float]) -> dict[str, float]:
    """:class:`EpisodeAccuracy` over a list, for summaries of stored rows."""
    # The list is all the rows; in a process group (a sharded run) torchmetrics would otherwise
    # sum it with the other ranks' lists, and wait for ranks that never compute one.
    metric = EpisodeAccuracy(sync_on_compute=False)
    if accuracies:
        metric.update(torch.tensor(accuracies, dtype=torch.float64))
    return metric.compute()
