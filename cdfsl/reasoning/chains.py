"""Reasoning chains: one JSONL row per image, from any teacher, validated before training.

A row is ``{"image_id": ..., "chain": ..., "source": ..., "round": ...}``: ``image_id`` is the
dataset's ``sample_id`` of the image, ``chain`` the five-stage text, ``source`` who wrote it
(``"template"``, ``"gpt-4o"``, ``"self"`` for SARR's own chains) and ``round`` the SARR round
that produced it (0 for teacher chains).

:func:`validate_chains` keeps a chain only if its image is known, it has the five tags in order
and its CONCLUSION parses to the image's class; every reject is counted with its reason, so a
bad chain file is reported before training instead of failing in the middle of it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cdfsl.errors import CdfslError
from cdfsl.plumbing import write_jsonl_atomic
from cdfsl.reasoning.answers import TAGS, conclusion_text, missing_tags, parse_class

MISSING_TAG = "missing tag"
WRONG_CONCLUSION = "wrong conclusion"
UNKNOWN_IMAGE = "unknown image id"
DUPLICATE_IMAGE = "duplicate image id"
MALFORMED_ROW = "malformed row"
REASONS: tuple[str, ...] = (
    MISSING_TAG,
    WRONG_CONCLUSION,
    UNKNOWN_IMAGE,
    DUPLICATE_IMAGE,
    MALFORMED_ROW,
)
"""Every reason a chain can be rejected for, in report order."""


@dataclass(frozen=True)
class Chain:
    """One reasoning chain for one image."""

    image_id: str
    chain: str
    source: str = "teacher"
    round: int = 0


@dataclass(frozen=True)
class Rejection:
    """A chain row that was not kept: where it came from, why, and the detail."""

    image_id: str | None
    reason: str
    detail: str
    where: str = ""


@dataclass
class ChainReport:
    """Result of a validation: the kept chains and the rejects with their reasons."""

    kept: list[Chain] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """Rejects per reason, every reason listed (zeros included), in :data:`REASONS` order."""
        found = Counter(r.reason for r in self.rejected)
        return {reason: found[reason] for reason in REASONS}

    def summary(self) -> dict[str, Any]:
        """JSON-ready counts and up to 20 example rejects."""
        return {
            "kept": len(self.kept),
            "rejected": len(self.rejected),
            "rejected_by_reason": self.counts,
            "examples": [asdict(r) for r in self.rejected[:20]],
        }

    def format(self, limit: int = 5) -> str:
        """Counts kept/rejected, rejects per reason, then the first ``limit`` rejects."""
        lines = [f"chains: {len(self.kept)} kept, {len(self.rejected)} rejected"]
        for reason, count in self.counts.items():
            if count:
                lines.append(f"  {reason}: {count}")
        for r in self.rejected[:limit]:
            where = f"{r.where}: " if r.where else ""
            lines.append(f"  {where}{r.image_id!r}: {r.reason} ({r.detail})")
        if len(self.rejected) > limit:
            lines.append(f"  ... {len(self.rejected) - limit} more (see the JSON report)")
        return "\n".join(lines)


def check_chain(chain: str, class_names: Sequence[str], label: int) -> tuple[str, str] | None:
    """Why ``chain`` cannot serve an image of class ``label``: ``(reason, detail)``, or None."""
    missing = missing_tags(chain)
    if missing:
        return MISSING_TAG, "lacks or misorders " + ", ".join(f"<{t}>…</{t}>" for t in missing)
    answer = conclusion_text(chain)
    predicted = parse_class(answer, class_names)
    if predicted is None:
        return WRONG_CONCLUSION, f"conclusion {answer!r} names no single class"
    if predicted != label:
        return (
            WRONG_CONCLUSION,
            f"conclusion names {class_names[predicted]!r}, the image is {class_names[label]!r}",
        )
    return None


def validate_chains(
    chains: Iterable[Chain],
    labels: Mapping[str, int],
    class_names: Sequence[str],
    rejected: Iterable[Rejection] = (),
) -> ChainReport:
    """Keep the chains of known images with five ordered tags and a correct CONCLUSION.

    ``labels``: image id -> class index of every image chains may describe. The first valid
    chain of an image is kept; later ones are rejected as duplicates. ``rejected``: rejects
    found earlier (malformed rows of the file), carried into the report.
    """
    report = ChainReport(rejected=list(rejected))
    seen: set[str] = set()
    for chain in chains:
        if chain.image_id not in labels:
            report.rejected.append(
                Rejection(chain.image_id, UNKNOWN_IMAGE, "no image of the dataset has this id")
            )
            continue
        problem = check_chain(chain.chain, class_names, labels[chain.image_id])
        if problem is not None:
            report.rejected.append(Rejection(chain.image_id, *problem))
        elif chain.image_id in seen:
            report.rejected.append(
                Rejection(chain.image_id, DUPLICATE_IMAGE, "an earlier row already has a chain")
            )
        else:
            seen.add(chain.image_id)
            report.kept.append(chain)
    return report


def chain_from_row(row: Any, source: str | None = None) -> Chain:
    """A :class:`Chain` from one parsed JSON row; raises ``ValueError`` saying what is wrong.

    ``source`` overrides the row's own (used when importing an external teacher's file).
    """
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    for key in ("image_id", "chain"):
        if not isinstance(row.get(key), str):
            raise ValueError(f"expected a string field {key!r}")
    round_ = row.get("round", 0)
    if not isinstance(round_, int):
        raise ValueError("expected an integer field 'round'")
    return Chain(row["image_id"], row["chain"], source or str(row.get("source", "teacher")), round_)


def read_chains(path: str | Path, source: str | None = None) -> tuple[list[Chain], list[Rejection]]:
    """Every row of the JSONL file ``path``; unreadable rows become ``malformed row`` rejects.

    Raises :class:`CdfslError` only when the file itself is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise CdfslError(
            f"chain file {str(path)!r} does not exist; expected a JSONL file with one "
            '{"image_id": ..., "chain": ...} object per line; fix the path'
        )
    chains: list[Chain] = []
    rejected: list[Rejection] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                chains.append(chain_from_row(json.loads(line), source))
            except (json.JSONDecodeError, ValueError) as err:
                rejected.append(Rejection(None, MALFORMED_ROW, str(err), f"{path}:{number}"))
    return chains, rejected


def write_chains(path: str | Path, chains: Iterable[Chain]) -> None:
    """Write ``chains`` as JSONL through a temporary file and a rename (never half a file)."""
    write_jsonl_atomic(path, (asdict(chain) for chain in chains))


class ChainStore:
    """A JSONL chain file: :meth:`write` replaces it atomically, :meth:`read` returns its rows."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> list[Chain]:
        """Every row; raises :class:`CdfslError` naming the first malformed line."""
        chains, rejected = read_chains(self.path)
        if rejected:
            raise CdfslError(
                f"{rejected[0].where} is not a chain row ({rejected[0].detail}); remove that "
                f"line or delete {self.path} to regenerate it"
            )
        return chains

    def write(self, chains: Iterable[Chain]) -> None:
        write_chains(self.path, chains)


def import_chains(
    path: str | Path,
    labels: Mapping[str, int],
    class_names: Sequence[str],
    source: str | None = None,
) -> ChainReport:
    """Read and validate an external teacher's JSONL chain file (rows need image_id, chain).

    ``source`` names the teacher in the kept rows (default: each row's own ``source``).
    """
    chains, malformed = read_chains(path, source)
    return validate_chains(chains, labels, class_names, malformed)


def chain_text(stages: Mapping[str, str]) -> str:
    """The five-stage chain text from ``{tag: stage text}`` (every tag of :data:`TAGS`)."""
    return " ".join(f"<{tag}> {stages[tag].strip()} </{tag}>" for tag in TAGS)
