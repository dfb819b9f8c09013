"""Per-step loss terms and alignment metrics of one training run, for plots."""

from __future__ import annotations

from typing import Any

import lightning as L


class TermHistory(L.Callback):
    """Records ``pl_module.last_terms`` after every training step into :attr:`steps`."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        self.steps.append({"step": float(trainer.global_step - 1), **pl_module.last_terms})
