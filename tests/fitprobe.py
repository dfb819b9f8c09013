"""A Lightning callback that ``cdfsl fit`` tests name by class path (``fitprobe.Probe``)."""

from __future__ import annotations

import json

import lightning as L


class Probe(L.Callback):
    """Writes what the Trainer it was handed ran with to ``path`` when training ends."""

    def __init__(self, path: str) -> None:
        self.path, self.batches = path, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1

    def on_train_end(self, trainer, pl_module) -> None:
        seen = {
            "batches": self.batches,
            "precision": trainer.precision,
            "steps": trainer.global_step,
        }
        with open(self.path, "w") as file:
            json.dump(seen, file)
