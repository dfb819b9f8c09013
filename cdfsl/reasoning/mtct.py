"""MTCT, multi-task cross-training: every image with the label prompt and the reasoning prompt.

Per batch of B images, the loss is

    L = w_label · mean_i NLL(label_i | image_i, q_cls)
      + w_chain · mean_{i with a chain} (1/T_i) · NLL(chain_i | image_i, q_reason)

where the chain NLL is averaged over the chain's T_i tokens (end-of-answer included) and the
label NLL, by default, is the label answer's NLL, summed over its tokens (end-of-answer
included), weighted 1:1 by default. Each image thus appears twice per epoch, once per prompt,
in the same step. ``w_chain = 0`` is label-only training and ``w_label = 0`` chain-only
training; both terms are logged (``train/label_nll``, ``train/chain_nll``).

``label_reduction`` (:data:`NLL_REDUCTIONS`) says how the label's tokens are reduced: "sum"
(the default) follows the paper's "Loss = NLL of the label answer + length-normalised NLL of the
chain (mean over the chain's tokens), weighted 1:1", which length-normalises the chain alone
(the NLL of an answer being the sum over its tokens); "mean" averages the label's tokens too,
so that a label token and a chain token weigh the same.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from cdfsl.errors import CdfslError
from cdfsl.plumbing import quiet_lightning, warmup_cosine
from cdfsl.reasoning.model import GenerativeVLM, ImageInputs
from cdfsl.reasoning.prompts import label_prompt, reason_prompt

NLL_REDUCTIONS: Mapping[str, bool] = {"sum": False, "mean": True}
"""How a target's token NLLs are reduced: name -> ``length_normalise`` of
:meth:`~cdfsl.reasoning.model.GenerativeVLM.nll` ("sum": the answer's NLL; "mean": per token)."""


def check_label_reduction(name: str) -> None:
    """Raise :class:`CdfslError` unless ``name`` is a key of :data:`NLL_REDUCTIONS`."""
    if name not in NLL_REDUCTIONS:
        raise CdfslError(
            f"label_reduction={name!r}; expected one of {', '.join(map(repr, NLL_REDUCTIONS))}"
        )


@dataclass
class TrainConfig:
    """One training stage. ``batch_size`` images per optimiser step, in micro-batches of
    ``micro_batch_size`` (gradient accumulation; None: no accumulation). AdamW with linear
    warm-up over ``warmup_ratio`` of the steps, then cosine decay to zero. ``label_reduction``:
    "sum" (the paper's, module docstring) or "mean" over the label's tokens."""

    epochs: int = 3
    batch_size: int = 128
    micro_batch_size: int | None = None
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    label_weight: float = 1.0
    chain_weight: float = 1.0
    label_reduction: str = "sum"
    gradient_clip: float | None = 1.0
    precision: str = "32-true"
    accelerator: str = "auto"
    seed: int = 0
    progress: bool = False


def mtct_loss(
    label_nll: Tensor | None,
    chain_nll: Tensor | None,
    label_weight: float = 1.0,
    chain_weight: float = 1.0,
) -> Tensor:
    """``label_weight · mean(label_nll) + chain_weight · mean(chain_nll)``; a None or empty term
    (or a zero weight) contributes nothing.

    label_nll: (B,) label NLLs (summed or per token, see ``label_reduction``); chain_nll: (B',)
    length-normalised chain NLLs.
    """
    terms = [
        weight * values.mean()
        for values, weight in ((label_nll, label_weight), (chain_nll, chain_weight))
        if values is not None and values.numel() and weight
    ]
    if not terms:
        raise CdfslError("MTCT step with no loss term: set label_weight or chain_weight above 0")
    return torch.stack(terms).sum()


class ReasoningExamples(Dataset):
    """Training images (their model inputs) with their class name and chain (or None).

    ``chains[i]`` None means image ``i`` has no valid chain and trains on its label alone.
    """

    def __init__(
        self,
        image_inputs: ImageInputs,
        labels: Sequence[int],
        class_names: Sequence[str],
        chains: Sequence[str | None],
    ) -> None:
        if not len(image_inputs) == len(labels) == len(chains):
            raise ValueError(
                f"{len(image_inputs)} image inputs, {len(labels)} labels, {len(chains)} chains"
            )
        self.image_inputs = image_inputs
        self.labels = list(labels)
        self.class_names = list(class_names)
        self.chains = list(chains)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, indices: list[int]) -> dict[str, Any]:
        """A batch: ``image_inputs`` (B, ...), ``labels`` (class names), ``chains`` (str|None)."""
        return {
            "image_inputs": self.image_inputs.take(indices),
            "labels": [self.class_names[self.labels[i]] for i in indices],
            "chains": [self.chains[i] for i in indices],
        }

    def with_chains_only(self) -> ReasoningExamples:
        """The images that have a chain (chain-only training skips the others)."""
        keep = [i for i, c in enumerate(self.chains) if c is not None]
        return ReasoningExamples(
            self.image_inputs.subset(keep),
            [self.labels[i] for i in keep],
            self.class_names,
            [self.chains[i] for i in keep],
        )


class MTCTModule(L.LightningModule):
    """The MTCT objective (module docstring) over a :class:`GenerativeVLM`'s trainable weights.

    ``label_reduction``: a key of :data:`NLL_REDUCTIONS` ("sum", the paper's, by default).
    """

    def __init__(
        self,
        model: GenerativeVLM,
        label_weight: float = 1.0,
        chain_weight: float = 1.0,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        label_prompt_text: str | None = None,
        reason_prompt_text: str | None = None,
        label_reduction: str = "sum",
    ) -> None:
        super().__init__()
        check_label_reduction(label_reduction)
        self.label_reduction = label_reduction
        self.model = model
        self.label_weight = label_weight
        self.chain_weight = chain_weight
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.q_cls = label_prompt_text or label_prompt()
        self.q_reason = reason_prompt_text or reason_prompt()

    def loss_terms(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """``label_nll`` (B,) and ``chain_nll`` (B',) of the batch; a term with weight 0 is
        skipped (not computed)."""
        inputs = batch["image_inputs"]
        terms: dict[str, Tensor] = {}
        if self.label_weight:
            labels = batch["labels"]
            terms["label_nll"] = self.model.nll(
                inputs, [self.q_cls] * len(labels), labels,
                length_normalise=NLL_REDUCTIONS[self.label_reduction],
            )  # fmt: skip
        with_chain = [i for i, c in enumerate(batch["chains"]) if c is not None]
        if self.chain_weight and with_chain:
            chains = [batch["chains"][i] for i in with_chain]
            terms["chain_nll"] = self.model.nll(
                inputs[with_chain], [self.q_reason] * len(chains), chains, length_normalise=True
            )
        return terms

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        terms = self.loss_terms(batch)
        loss = mtct_loss(
            terms.get("label_nll"), terms.get("chain_nll"), self.label_weight, self.chain_weight
        )
        size = len(batch["labels"])
        for name, values in terms.items():
            self.log(f"train/{name}", values.mean(), on_step=True, on_epoch=True, batch_size=size)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimiser = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, round(self.warmup_ratio * total))

        def factor(step: int) -> float:
            return warmup_cosine(step, total, warmup)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
        return {
            "optimizer": optimiser,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def train_mtct(
    model: GenerativeVLM,
    examples: ReasoningExamples,
    config: TrainConfig,
    log_dir: str | Path | None = None,
    epochs: int | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place on ``examples`` with the MTCT loss of ``config``'s weights.

    Chain-only training (label weight 0) drops the images without a chain. ``epochs``
    overrides ``config.epochs`` (SARR rounds). Writes ``log/metrics.csv`` (per-step and
    per-epoch losses) under ``log_dir``. Returns the last epoch's mean terms and the wall time.
    Raises ``KeyboardInterrupt`` if Lightning stopped early on Ctrl-C, so that a half-trained
    model is never saved as finished.
    """
    from lightning.pytorch.loggers import CSVLogger

    if not config.label_weight:
        examples = examples.with_chains_only()
    if len(examples) == 0:
        raise CdfslError(
            "no training examples: chain-only training needs images with a valid chain; check "
            "the chain report"
        )
    micro = config.micro_batch_size or config.batch_size
    if config.batch_size % micro:
        raise CdfslError(
            f"batch_size={config.batch_size} is not a multiple of micro_batch_size={micro}; "
            "pick sizes that divide"
        )
    L.seed_everything(config.seed, workers=True, verbose=False)
    module = MTCTModule(
        model, config.label_weight, config.chain_weight, config.lr, config.weight_decay,
        config.warmup_ratio, label_reduction=config.label_reduction,
    )  # fmt: skip
    loader = DataLoader(
        examples, batch_size=micro, shuffle=True, collate_fn=examples.collate, num_workers=0
    )
    logger = CSVLogger(str(log_dir), name="log", version="") if log_dir is not None else False
    max_epochs = epochs if epochs is not None else config.epochs
    with quiet_lightning():
        trainer = L.Trainer(
            max_epochs=max_epochs,
            accumulate_grad_batches=config.batch_size // micro,
            gradient_clip_val=config.gradient_clip,
            precision=config.precision,
            accelerator=config.accelerator,
            devices=1,
            logger=logger,
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=config.progress,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        start = time.perf_counter()
        model.train()
        trainer.fit(module, loader)
        model.eval()
    if trainer.interrupted or trainer.current_epoch != max_epochs:
        raise KeyboardInterrupt
    metrics = {
        k.removeprefix("train/").removesuffix("_epoch"): float(v)
        for k, v in trainer.callback_metrics.items()
        if k.endswith("_epoch")
    }
    return {
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "examples": len(examples),
        "wall_s": time.perf_counter() - start,
        **metrics,
    }
