"""All-way K-shot evaluation (the CoOp / CLIP-LoRA protocol): every class at once, full test set.

For each K of ``shots`` and each seed of ``seeds``: draw K training images per class from the
``train`` split, train the method on them (``fit_episode``, T = steps_per_shot · K), then score
a validation set of min(K, ``max_val_shots``) images per class drawn from ``val`` (from the
training images not drawn, when the dataset has no val split, as ImageNet) and the whole
``test`` split. One result row per (K, seed) goes to ``results.jsonl`` (resumable: finished
pairs are skipped); ``summary.json`` holds, per K, the mean and spread of test accuracy over
seeds. Validation accuracy is reported, never used to pick anything; test labels are only
ever compared with finished predictions.

Draws are pure functions of (seed, K): the version-stable raw PCG64 stream that episodes use,
of ``default_rng([seed, 2·K + stream])`` with stream 0 for training and 1 for validation, so
they are the same on every machine and numpy version. A class
with fewer than K training images contributes all of them (as CoOp) and is named in the row.

Every step trains on all K·C drawn images at once, as an episode does: memory grows with the
number of classes (ImageNet at 16 shots is 16,000 images per step).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cdfsl.data.base import LabelledImages
from cdfsl.data.episodes import UniformDraws
from cdfsl.engine import FitConfig, episode_seed, fit_episode, predict_logits
from cdfsl.errors import CdfslError
from cdfsl.fewshot.methods.base import FewShotMethod
from cdfsl.results.stats import mean_ci95
from cdfsl.results.store import ResultStore, check_run_config, write_json_atomic

__all__ = ["AllWayEvaluator", "AllWayProtocol", "allway_table", "draw_per_class"]

# Stream numbers keep the training and validation draws of one (seed, K) independent.
_TRAIN_STREAM, _VAL_STREAM = 0, 1


@dataclass
class AllWayProtocol:
    """K-shot sizes, seeds (CoOp's 1, 2, 3) and the validation cap per class (CoOp's 4)."""

    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: tuple[int, ...] = (1, 2, 3)
    max_val_shots: int = 4

    def __post_init__(self) -> None:
        self.shots = tuple(self.shots)
        self.seeds = tuple(self.seeds)
        for name, values in (("shots", self.shots), ("seeds", self.seeds)):
            if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
                raise CdfslError(
                    f"{name}={list(values)}; expected a non-empty list of integers; fix --{name}"
                )
        if min(self.shots) < 1 or min(self.seeds) < 0:
            raise CdfslError(
                f"shots={list(self.shots)}, seeds={list(self.seeds)}; expected shots >= 1 and "
                "seeds >= 0; fix --shots or --seeds"
            )
        if self.max_val_shots < 0:
            raise CdfslError(
                f"max_val_shots={self.max_val_shots}; expected >= 0; fix --max_val_shots"
            )


def draw_per_class(
    targets: Sequence[int], k: int, seed: int, stream: int = _TRAIN_STREAM,
    exclude: frozenset[int] = frozenset(),
) -> list[int]:  # fmt: skip
    """``k`` distinct indices of each class (all of a smaller class), class-major, in draw order.

    A pure function of (targets, k, seed, stream, exclude); ``exclude`` indices are never drawn.
    """
    draws = UniformDraws(seed, 2 * k + stream)
    members: dict[int, list[int]] = {}
    for index, label in enumerate(targets):
        if index not in exclude:
            members.setdefault(int(label), []).append(index)
    picked: list[int] = []
    for label in sorted(members):
        pool = members[label]
        picked.extend(draws.sample(pool, min(k, len(pool))))
    return picked


class _Images(Dataset):
    """``indices`` of a dataset as (3, H, W) tensors, for a DataLoader with workers."""

    def __init__(self, dataset: LabelledImages, indices: Sequence[int], to_tensor: Any) -> None:
        self.dataset, self.indices, self.to_tensor = dataset, list(indices), to_tensor

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Tensor:
        return self.to_tensor(self.dataset.load(self.indices[i]))


class AllWayEvaluator:
    """Run (or resume) the all-way K-shot protocol into ``output_dir``; see the module docstring.

    ``splits`` maps "train", "test" and optionally "val" to datasets with the same class names.
    ``batch_size`` and ``workers`` only set how validation and test images are loaded and scored.
    """

    def __init__(
        self,
        method: FewShotMethod,
        splits: Mapping[str, LabelledImages],
        protocol: AllWayProtocol,
        output_dir: str | Path,
        fit: FitConfig | None = None,
        config: dict[str, Any] | None = None,
        progress: bool = True,
        batch_size: int = 256,
        workers: int = 0,
    ) -> None:
        missing = [s for s in ("train", "test") if s not in splits]
        if missing:
            raise CdfslError(
                f"all-way evaluation needs train and test splits; the dataset has "
                f"{', '.join(splits) or 'none'}; use a source with splits (cdfsl data list)"
            )
        self.train, self.test, self.val = splits["train"], splits["test"], splits.get("val")
        names = self.train.class_names
        for split in ("val", "test"):
            if split in splits and splits[split].class_names != names:
                raise CdfslError(
                    f"the {split} split's classes differ from train's; expected one class list "
                    "across splits; check the dataset's split files"
                )
        self.class_names = names
        self.method = method
        self.protocol = protocol
        self.fit = fit or FitConfig()
        self.output_dir = Path(output_dir)
        self.store = ResultStore(self.output_dir / "results.jsonl")
        self.progress = progress
        self.batch_size = batch_size
        self.workers = workers
        self.config = {
            "method": type(method).__name__,
            "protocol": {"name": "all-way", "max_val_shots": protocol.max_val_shots},
            "fit": self.fit.record(),
            "classes": len(names),
            **(config or {}),
        }

    def _accuracy(self, dataset: LabelledImages, indices: Sequence[int]) -> float | None:
        """Accuracy of the fitted method on ``indices`` of ``dataset``; None when empty."""
        if not indices:
            return None
        loader = DataLoader(
            _Images(dataset, indices, self.method.to_tensor()),
            batch_size=self.batch_size, num_workers=self.workers,
        )  # fmt: skip
        targets = torch.tensor([dataset.targets[i] for i in indices])
        predictions = [predict_logits(self.method, images, self.fit).argmax(1) for images in loader]
        return float((torch.cat(predictions) == targets).float().mean())

    def run_one(self, shots: int, seed: int) -> dict[str, Any]:
        """Train on a K-shot draw of ``seed`` and score validation and test; the result row."""
        start = time.perf_counter()
        train_targets = self.train.targets
        support = draw_per_class(train_targets, shots, seed)
        val_shots = min(shots, self.protocol.max_val_shots)
        if self.val is not None:
            val_set, val = self.val, draw_per_class(self.val.targets, val_shots, seed, _VAL_STREAM)
        else:
            val_set = self.train
            val = draw_per_class(train_targets, val_shots, seed, _VAL_STREAM, frozenset(support))
        to_tensor = self.method.to_tensor()
        images = torch.stack([to_tensor(self.train.load(i)) for i in support])
        labels = torch.tensor([train_targets[i] for i in support])
        counts = np.bincount(labels.numpy(), minlength=len(self.class_names))

        method = self.method
        method.reset(episode_seed(seed, shots))
        method.to(self.fit.device())
        method.set_classes(self.class_names)
        steps = 0
        if method.trainable:
            steps = self.fit.total_steps(shots)
            fit_episode(method, images, labels, steps, self.fit)
        return {
            "shots": shots,
            "seed": seed,
            "support_ids": [self.train.sample_id(i) for i in support],
            "short_classes": [self.class_names[c] for c in np.flatnonzero(counts < shots)],
            "val_accuracy": self._accuracy(val_set, val) if val_shots else None,
            "val_images": len(val) if val_shots else 0,
            "test_accuracy": self._accuracy(self.test, range(len(self.test))),
            "test_images": len(self.test),
            "steps": steps,
            "seconds": round(time.perf_counter() - start, 4),
            "terms": dict(method.last_terms) if method.trainable else {},
        }

    def run(self) -> dict[str, Any]:
        """Run every unfinished (K, seed), then write and return the summary."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # Shots and seeds may change on resume; they are not part of the recorded config.
        check_run_config(self.output_dir, self.config)
        done = {(row["shots"], row["seed"]) for row in self.store.rows()}
        pairs = [(k, s) for k in self.protocol.shots for s in self.protocol.seeds]
        todo = [pair for pair in pairs if pair not in done]
        bar = tqdm(
            total=len(pairs), initial=len(pairs) - len(todo), disable=not self.progress,
            desc=f"{self.config['method']} all-way", unit="run",
        )  # fmt: skip
        with bar:
            for shots, seed in todo:
                row = self.run_one(shots, seed)
                self.store.append(row)
                bar.update(1)
                bar.set_postfix(k=shots, seed=seed, acc=f"{100 * row['test_accuracy']:.2f}")
        return self.write_summary()

    def write_summary(self) -> dict[str, Any]:
        """Write and return the summary of the stored rows (see :func:`summarize_allway`)."""
        summary = summarize_allway(self.store.rows(), self.protocol, self.config)
        write_json_atomic(self.output_dir / "summary.json", summary)
        return summary


def summarize_allway(
    rows: Sequence[Mapping[str, Any]], protocol: AllWayProtocol, config: Mapping[str, Any]
) -> dict[str, Any]:
    """Per K of ``protocol``: test accuracy mean, std (over seeds), CI95, min, max; val mean."""
    per_shot = []
    for shots in protocol.shots:
        chosen = [r for r in rows if r["shots"] == shots and r["seed"] in protocol.seeds]
        if not chosen:
            continue
        tests = [r["test_accuracy"] for r in chosen]
        vals = [r["val_accuracy"] for r in chosen if r["val_accuracy"] is not None]
        stats = mean_ci95(tests)
        per_shot.append({
            "shots": shots,
            "seeds": sorted(r["seed"] for r in chosen),
            "accuracy": stats["mean"],
            "std": stats["std"],
            "ci95": stats["ci95"],
            "min": min(tests),
            "max": max(tests),
            "val_accuracy": float(np.mean(vals)) if vals else None,
        })  # fmt: skip
    return {**config, "results": per_shot}


def allway_table(summary: dict[str, Any]) -> str:
    """A markdown table of an all-way summary: one row per K, test mean ± std over seeds."""
    lines = [
        "| method | backbone | dataset | shots | seeds | test accuracy (%) | val accuracy (%) |",
        "|" + "---|" * 7,
    ]
    for r in summary["results"]:
        val = f"{100 * r['val_accuracy']:.2f}" if r["val_accuracy"] is not None else "-"
        lines.append(
            f"| {summary['method']} | {summary.get('backbone', '-')} | "
            f"{summary.get('dataset', '-')} | {r['shots']} | {len(r['seeds'])} | "
            f"{100 * r['accuracy']:.2f} ± {100 * r['std']:.2f} | {val} |"
        )
    return "\n".join(lines)
