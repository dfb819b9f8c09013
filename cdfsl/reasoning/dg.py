"""Domain-generalization evaluation: answer, parse, score per held-out domain, tabulate.

Accuracy per held-out domain comes with a 95% confidence interval from
:func:`cdfsl.results.stats.mean_ci95` over per-image correctness (0/1): the normal
approximation z·s/√n with the sample standard deviation, i.e. the Wald interval of a
proportion (with n/(n-1) inside the square root). The average over held-out domains is the mean
of the per-domain accuracies; its half-width is √(Σ h_k²)/K, the domains being independent
samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cdfsl.reasoning.answers import conclusion_text, parse_class
from cdfsl.reasoning.model import GenerativeVLM, ImageInputs
from cdfsl.reasoning.prompts import label_prompt, reason_prompt
from cdfsl.results.stats import mean_ci95

ANSWER_MODES: tuple[str, ...] = ("label", "reason")
"""``label``: answer q_cls, parse the whole answer; ``reason``: answer q_reason, parse its
CONCLUSION."""


def generate_all(
    model: GenerativeVLM,
    image_inputs: ImageInputs,
    prompt: str,
    max_new_tokens: int,
    batch_size: int = 64,
) -> list[str]:
    """``model``'s greedy answer to ``prompt`` for every image, in batches."""
    answers: list[str] = []
    for start in range(0, len(image_inputs), batch_size):
        indices = range(start, min(start + batch_size, len(image_inputs)))
        chunk = image_inputs.take(indices)
        answers += model.generate(chunk, [prompt] * len(indices), max_new_tokens)
    return answers


def answer_class(answer: str, mode: str, class_names: Sequence[str]) -> int | None:
    """The class ``answer`` names: the whole answer (``label``) or its CONCLUSION (``reason``)."""
    text = answer if mode == "label" else conclusion_text(answer)
    return parse_class(text, class_names)


@dataclass
class DomainResult:
    """Answers on one held-out domain and their score."""

    domain: str
    mode: str
    accuracy: float
    ci95: float
    n: int
    unparsable: int
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "mode": self.mode,
            "accuracy": self.accuracy,
            "ci95": self.ci95,
            "n": self.n,
            "unparsable": self.unparsable,
        }


def score_answers(
    domain: str,
    mode: str,
    answers: Sequence[str],
    labels: Sequence[int],
    class_names: Sequence[str],
    image_ids: Sequence[str],
) -> DomainResult:
    """Parse each answer and score it; an unparsable answer is wrong and kept in ``rows``."""
    rows = []
    correct = []
    for image_id, answer, label in zip(image_ids, answers, labels, strict=True):
        predicted = answer_class(answer, mode, class_names)
        correct.append(float(predicted == label))
        rows.append(
            {
                "image_id": image_id,
                "answer": answer,
                "predicted": None if predicted is None else class_names[predicted],
                "label": class_names[label],
                "parsed": predicted is not None,
                "correct": predicted == label,
            }
        )
    stats = mean_ci95(correct)
    unparsable = sum(not r["parsed"] for r in rows)
    return DomainResult(domain, mode, stats["mean"], stats["ci95"], len(rows), unparsable, rows)


def evaluate_domain(
    model: GenerativeVLM,
    domain: str,
    image_inputs: ImageInputs,
    labels: Sequence[int],
    class_names: Sequence[str],
    image_ids: Sequence[str],
    mode: str = "label",
    max_new_tokens: int = 128,
    batch_size: int = 64,
) -> DomainResult:
    """Answer every image of a held-out domain with the ``mode`` prompt and score the answers."""
    if mode not in ANSWER_MODES:
        raise ValueError(f"answer mode {mode!r}; expected one of {ANSWER_MODES}")
    prompt = label_prompt() if mode == "label" else reason_prompt()
    tokens = max_new_tokens if mode == "reason" else min(max_new_tokens, 32)
    with torch.no_grad():
        answers = generate_all(model, image_inputs, prompt, tokens, batch_size)
    return score_answers(domain, mode, answers, labels, class_names, image_ids)


def average(results: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean accuracy over domains and its half-width √(Σ h²)/K."""
    k = len(results)
    if k == 0:
        return {"accuracy": math.nan, "ci95": math.nan}
    return {
        "accuracy": sum(r["accuracy"] for r in results) / k,
        "ci95": math.sqrt(sum(r["ci95"] ** 2 for r in results)) / k,
    }


def markdown_table(
    rows: Mapping[str, Mapping[str, Mapping[str, float]]],
    domains: Sequence[str],
    notes: Mapping[str, str] | None = None,
) -> str:
    """One row per method: accuracy ± CI95 (%) per held-out domain, then the average.

    rows: method -> domain -> {"accuracy", "ci95"}; a missing domain prints "-". ``notes``:
    method -> text for an extra "answer" column.
    """
    header = ["method", *([] if notes is None else ["answer"]), *domains, "average"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(r: Mapping[str, float] | None) -> str:
        if r is None or math.isnan(r["accuracy"]):
            return "-"
        return f"{100 * r['accuracy']:.1f} ± {100 * r['ci95']:.1f}"

    for method, per_domain in rows.items():
        done = [per_domain[d] for d in domains if d in per_domain]
        avg = average(done) if len(done) == len(domains) else None
        extra = [] if notes is None else [notes.get(method, "")]
        cells = [method, *extra, *(cell(per_domain.get(d)) for d in domains), cell(avg)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
