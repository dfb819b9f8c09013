"""SARR, self-aligned reasoning regularisation: retrain on the model's own correct chains.

Each of N rounds (default 3):

1. the current model answers q_reason for every training image;
2. a generated chain is kept only if its CONCLUSION parses to the image's true class (and
   it fits the model's context: a chain cut at the token limit is not kept);
3. those images train on their own kept chain, every other image on its teacher chain;
4. the model is retrained with the MTCT loss from where it stands.

Round ``r`` writes ``round-r/`` under the output folder: ``generated.jsonl`` (every generated
chain with ``accepted``), ``chains.jsonl`` (the chains it trained on), ``adapter.pt`` (the
trainable weights after it) and, last, ``metrics.json`` (acceptance rate, training losses,
held-out accuracy when an evaluator is given). A round with ``metrics.json`` is done: a rerun
loads its weights and goes on with the next one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cdfsl.plumbing import save_torch_atomic, write_jsonl_atomic
from cdfsl.reasoning.answers import conclusion_text, parse_class
from cdfsl.reasoning.chains import Chain, write_chains
from cdfsl.reasoning.dg import generate_all
from cdfsl.reasoning.model import GenerativeVLM, ImageInputs
from cdfsl.reasoning.mtct import ReasoningExamples, TrainConfig, train_mtct
from cdfsl.reasoning.prompts import reason_prompt
from cdfsl.results.store import write_json_atomic

log = logging.getLogger(__name__)

SELF_SOURCE = "self"


@dataclass
class SARRConfig:
    """``rounds`` of SARR, each retraining ``epochs_per_round`` epochs (None: train.epochs)."""

    rounds: int = 3
    epochs_per_round: int | None = None


def select_self_chains(
    image_ids: Sequence[str],
    labels: Sequence[int],
    generated: Sequence[str],
    class_names: Sequence[str],
    round_: int,
) -> tuple[list[Chain], list[bool]]:
    """The generated chains whose CONCLUSION parses to the image's class, and per image whether
    its chain was kept."""
    accepted = [
        parse_class(conclusion_text(text), class_names) == label
        for text, label in zip(generated, labels, strict=True)
    ]
    kept = [
        Chain(image_id, text, SELF_SOURCE, round_)
        for image_id, text, ok in zip(image_ids, generated, accepted, strict=True)
        if ok
    ]
    return kept, accepted


def replace_chains(
    teacher: Mapping[str, Chain], own: Sequence[Chain], image_ids: Sequence[str]
) -> list[Chain | None]:
    """Per image: its own kept chain if there is one, else the teacher's (None if neither)."""
    mine = {c.image_id: c for c in own}
    return [mine.get(i, teacher.get(i)) for i in image_ids]


class SARRRunner:
    """Runs SARR rounds on ``model`` in place (module docstring), resumable per round.

    ``train_inputs``: the model inputs of the training images, whose ids, labels
    and teacher chains (by id; images without one train on the label alone) are given.
    ``evaluate``: called after each round with the model; its dict goes into the round's
    metrics (held-out accuracy), never into a decision.
    """

    def __init__(
        self,
        model: GenerativeVLM,
        train_inputs: ImageInputs,
        image_ids: Sequence[str],
        labels: Sequence[int],
        class_names: Sequence[str],
        teacher_chains: Mapping[str, Chain],
        train: TrainConfig,
        output_dir: str | Path,
        config: SARRConfig | None = None,
        evaluate: Callable[[GenerativeVLM], dict[str, Any]] | None = None,
        max_new_tokens: int = 128,
        generate_batch_size: int = 64,
    ) -> None:
        self.model = model
        self.train_inputs = train_inputs
        self.image_ids = list(image_ids)
        self.labels = list(labels)
        self.class_names = list(class_names)
        self.teacher = dict(teacher_chains)
        self.train = train
        self.config = config or SARRConfig()
        self.output_dir = Path(output_dir)
        self.evaluate = evaluate
        self.max_new_tokens = max_new_tokens
        self.generate_batch_size = generate_batch_size

    def round_dir(self, round_: int) -> Path:
        return self.output_dir / f"round-{round_}"

    def completed(self) -> list[int]:
        """Rounds whose ``metrics.json`` exists, in order, stopping at the first gap."""
        done = []
        for r in range(1, self.config.rounds + 1):
            if not (self.round_dir(r) / "metrics.json").is_file():
                break
            done.append(r)
        return done

    def run(self) -> list[dict[str, Any]]:
        """Every round's metrics, running the rounds not yet done."""
        done = self.completed()
        if done:
            state = torch.load(self.round_dir(done[-1]) / "adapter.pt", weights_only=True)
            self.model.load_trainable_state_dict(state)
            log.info("SARR: rounds %s done, resuming after round %d", done, done[-1])
        history = [json.loads((self.round_dir(r) / "metrics.json").read_text()) for r in done]
        for r in range(len(done) + 1, self.config.rounds + 1):
            history.append(self.run_round(r))
        return history

    def run_round(self, round_: int) -> dict[str, Any]:
        """Generate, filter, replace, retrain; write the round's files; return its metrics."""
        folder = self.round_dir(round_)
        start = time.perf_counter()
        self.model.eval()
        generated = generate_all(
            self.model, self.train_inputs, reason_prompt(), self.max_new_tokens,
            self.generate_batch_size,
        )  # fmt: skip
        kept, accepted = select_self_chains(
            self.image_ids, self.labels, generated, self.class_names, round_
        )
        # A chain cut at the token limit may still conclude correctly, but cannot be trained on
        # with its end token inside the context: it keeps the teacher's chain instead.
        too_long = {c.image_id for c in kept if not self.model.fits(reason_prompt(), c.chain)}
        kept = [c for c in kept if c.image_id not in too_long]
        accepted = [
            ok and i not in too_long for i, ok in zip(self.image_ids, accepted, strict=True)
        ]
        _write_generated(folder / "generated.jsonl", self.image_ids, generated, accepted, round_)
        chains = replace_chains(self.teacher, kept, self.image_ids)
        write_chains(folder / "chains.jsonl", [c for c in chains if c is not None])
        generate_s = time.perf_counter() - start
        examples = ReasoningExamples(
            self.train_inputs, self.labels, self.class_names,
            [None if c is None else c.chain for c in chains],
        )  # fmt: skip
        train_config = TrainConfig(**{**asdict(self.train), "seed": self.train.seed + round_})
        training = train_mtct(
            self.model, examples, train_config, folder, epochs=self.config.epochs_per_round
        )
        save_torch_atomic(self.model.trainable_state_dict(), folder / "adapter.pt")
        metrics: dict[str, Any] = {
            "round": round_,
            "generated": len(generated),
            "accepted": len(kept),
            "acceptance_rate": len(kept) / max(1, len(generated)),
            "too_long": len(too_long),
            "teacher_chains": sum(c is not None and c.source != SELF_SOURCE for c in chains),
            "generate_s": generate_s,
            "train": training,
        }
        if self.evaluate is not None:
            metrics["held_out"] = self.evaluate(self.model)
        write_json_atomic(folder / "metrics.json", metrics)
        log.info(
            "SARR round %d: %d/%d chains accepted (%.1f%%)",
            round_, len(kept), len(generated), 100 * metrics["acceptance_rate"],
        )  # fmt: skip
        return metrics


def _write_generated(
    path: Path,
    image_ids: Sequence[str],
    texts: Sequence[str],
    accepted: Sequence[bool],
    round_: int,
) -> None:
    rows = (
        {
            "image_id": image_id,
            "chain": text,
            "source": SELF_SOURCE,
            "round": round_,
            "accepted": ok,
        }
        for image_id, text, ok in zip(image_ids, texts, accepted, strict=True)
    )
    write_jsonl_atomic(path, rows)
