"""Summary tables as text: what the CLI prints and the demo writes as markdown."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def summary_table(summaries: Sequence[dict[str, Any]]) -> str:
    """A markdown table, one row per summary: method, backbone, dataset, protocol, mean ± CI95.

    Where episodes failed (``episodes_failed``, non-finite loss or logits) the episodes cell
    counts them beside the successful ones, and a note under the table says that the mean and
    CI95 are over the successful episodes only.
    """
    header = "| method | backbone | dataset | way | shot | query | episodes | accuracy (%) |"
    lines = [header, "|" + "---|" * 8]
    failed_total = 0
    for s in summaries:
        p = s["protocol"]
        failed = int(s.get("episodes_failed", 0))
        failed_total += failed
        episodes = f"{s['episodes_done']}" + (f" (+{failed} failed)" if failed else "")
        lines.append(
            f"| {s['method']} | {s.get('backbone', '-')} | {s.get('dataset', '-')} "
            f"| {p['n_way']} | {p['k_shot']} | {p['n_query']} | {episodes} "
            f"| {100 * s['accuracy']:.2f} ± {100 * s['ci95']:.2f} |"
        )
    if failed_total:
        lines.append(
            f"\n{failed_total} failed episode{'s' if failed_total > 1 else ''} (non-finite loss "
            'or logits; rows with status "failed" and the step and term) are left out: mean '
            "± CI95 over the successful episodes only."
        )
    return "\n".join(lines)
