"""Shards of an episodic run: which process runs which episode, their files, and merging them.

Episode ``i`` belongs to shard ``i % count``. A shard appends its rows (``ResultStore`` rows)
to ``OUTPUT/shards/<name>.jsonl`` and records the run's whole configuration beside them in
``<name>.json``, with its fingerprint (what ``run.json`` holds): a merge needs the episode
count, which the fingerprint leaves out so that it may change on resume. Merging rewrites
``OUTPUT/results.jsonl`` with every finished row, sorted by episode, each episode once, then
deletes the shard files it read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdfsl.errors import CdfslError
from cdfsl.results.store import ResultStore, write_json_atomic

SHARDS = "shards"
RESULTS = "results.jsonl"
#: The ``status`` of a row whose episode stopped on a non-finite loss or logit.
FAILED = "failed"


@dataclass(frozen=True)
class Shard:
    """Episodes ``i`` with ``i % count == index``.

    ``ranked``: rank ``index`` of a torch.distributed group of ``count`` processes, whose rank 0
    merges at the end; otherwise a static shard (``--shard K/N``) that ``cdfsl merge`` merges.
    """

    index: int
    count: int
    ranked: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise CdfslError(
                f"shard {self.index}/{self.count}; expected K/N with 0 <= K < N; "
                "fix: --shard 0/N ... --shard N-1/N"
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"K/N"`` as a static shard."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if match is None:
            raise CdfslError(f"--shard {text!r}; expected K/N, e.g. 0/4; fix the --shard value")
        return cls(int(match[1]), int(match[2]))

    @classmethod
    def from_name(cls, name: str) -> Shard:
        """The shard of a file stem ``rank-R-of-W`` or ``shard-K-of-N``."""
        match = re.fullmatch(r"(rank|shard)-(\d+)-of-(\d+)", name)
        if match is None:
            raise CdfslError(
                f"{name!r} in a shards folder; expected rank-R-of-W or shard-K-of-N; "
                "fix: move that file out of the shards folder"
            )
        return cls(int(match[2]), int(match[3]), ranked=match[1] == "rank")

    @property
    def name(self) -> str:
        """The file stem: ``rank-R-of-W`` or ``shard-K-of-N``."""
        return f"{'rank' if self.ranked else 'shard'}-{self.index}-of-{self.count}"

    def owns(self, episode: int) -> bool:
        return episode % self.count == self.index

    def rows_path(self, output_dir: str | Path) -> Path:
        return Path(output_dir) / SHARDS / f"{self.name}.jsonl"

    def config_path(self, output_dir: str | Path) -> Path:
        return Path(output_dir) / SHARDS / f"{self.name}.json"


def shard_files(output_dir: str | Path) -> list[Path]:
    """The shards' row files in ``output_dir``, in name order."""
    return sorted((Path(output_dir) / SHARDS).glob("*.jsonl"))


def shard_configs(output_dir: str | Path) -> list[Path]:
    """The shards' configuration files in ``output_dir``, in name order: one per shard that
    started, with rows or without (a shard with nothing left to run writes none)."""
    return sorted((Path(output_dir) / SHARDS).glob("*.json"))


def finished_rows(output_dir: str | Path) -> dict[int, dict[str, Any]]:
    """Every finished row of ``output_dir`` by episode: results.jsonl first, then the shards.

    Read-only: a torn last line is skipped, not cut, since its writer may still be at work. An
    episode found twice (a merge killed before it deleted its shards) keeps its first row; the
    rows of one episode are equal apart from timings. A failed row (``status: failed``) gives
    way to a later successful one: the row of a retried episode (``--retry_failed``).
    """
    rows: dict[int, dict[str, Any]] = {}
    for path in [Path(output_dir) / RESULTS, *shard_files(output_dir)]:
        for row in ResultStore(path).rows():
            index = int(row["episode"])
            if index not in rows or (failed(rows[index]) and not failed(row)):
                rows[index] = row
    return rows


def failed(row: dict[str, Any]) -> bool:
    """Whether ``row`` records a failed episode (a non-finite loss or logit; see the runner)."""
    return row.get("status") == FAILED


def merge(output_dir: str | Path) -> list[dict[str, Any]]:
    """Rewrite results.jsonl with every finished row, sorted by episode; delete merged shards.

    Returns the merged rows. Run it once the shards are done: rows a shard appends during the
    merge would be deleted with its file. results.jsonl is replaced in one rename before any
    shard is deleted, so a kill at any point loses no row.
    """
    output_dir = Path(output_dir)
    files = [*shard_files(output_dir), *shard_configs(output_dir)]
    rows = [row for _, row in sorted(finished_rows(output_dir).items())]
    ResultStore(output_dir / RESULTS).replace(rows)
    for path in files:
        path.unlink(missing_ok=True)
    folder = output_dir / SHARDS
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    return rows


def record_config(
    output_dir: str | Path, shard: Shard, config: dict[str, Any], fingerprint: dict[str, Any]
) -> None:
    """Write the run's configuration and fingerprint beside ``shard``'s rows, for a merge."""
    write_json_atomic(shard.config_path(output_dir), {"config": config, "fingerprint": fingerprint})


def recorded_config(output_dir: str | Path) -> dict[str, Any]:
    """The configuration the shards of ``output_dir`` recorded (the first by name); refuses
    when their fingerprints or episode counts differ."""
    output_dir = Path(output_dir)
    records = {path.stem: json.loads(path.read_text()) for path in shard_configs(output_dir)}
    if not records:
        state = "results.jsonl is all there is" if (output_dir / RESULTS).exists() else "no rows"
        raise CdfslError(
            f"found no shard files in {output_dir / SHARDS} ({state}); expected "
            "shard-K-of-N.jsonl and .json from cdfsl eval --shard K/N; fix: run the shards first"
        )
    # What must agree: the fingerprint (as run.json checks it) and the episode count.
    keys = {
        name: {**r["fingerprint"], "episodes": r["config"]["protocol"]["episodes"]}
        for name, r in records.items()
    }
    (first_name, first), *others = keys.items()
    for name, key in others:
        changed = sorted(k for k in set(first) | set(key) if first.get(k) != key.get(k))
        if changed:
            counts = {n: k["episodes"] for n, k in keys.items()}
            raise CdfslError(
                f"shards {first_name} and {name} recorded different settings "
                f"({', '.join(changed)}; episodes {counts}); expected one run; fix: rerun the "
                "shards that differ with the same settings"
            )
    return records[first_name]["config"]


def describe(indices: Iterable[int]) -> str:
    """Sorted indices with runs collapsed: ``1, 3, 5-9``."""
    spans: list[list[int]] = []
    for i in sorted(indices):
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
