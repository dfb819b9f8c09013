"""Summary tables as text: what the CLI prints and the demo writes as markdown."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def summary_table(summaries: Sequence[dict[str, Any]]) -> str:
    """A markdown table, one row per summary: method, backbone, dataset, protocol, mean ± CI95."""
    header = "| method | backbone | dataset | way | shot | query | episodes | accuracy (%) |"
    lines = [header, "|" + "---|" * 8]
    for s in summaries:
        p = s["protocol"]
        lines.append(
            f"| {s['method']} | {s.get('backbone', '-')} | {s.get('dataset', '-')} "
            f"| {p['n_way']} | {p['k_shot']} | {p['n_query']} | {s['episodes_done']} "
            f"| {100 * s['accuracy']:.2f} ± {100 * s['ci95']:.2f} |"
        )
    return "\n".join(lines)
