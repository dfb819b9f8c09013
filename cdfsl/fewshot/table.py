"""A grid's results as paper tables: mean ± CI95 per cell, paired differences, best marked.

Made from the cells' stored rows alone (:mod:`cdfsl.fewshot.grid`), so a resumed, sharded or
merged grid gives the same bytes. Per (backbone, shot, method) row and target column:

- the mean accuracy over the cell's successful episodes and its CI95 (1.96·s/√n with the sample
  standard deviation, as a run's summary); the ``average`` column is the mean over the targets,
  its CI95 √(Σ CI95ᵢ²)/T (the targets' episodes are independent);
- against the reference method, the mean difference over the episodes both finished (the same
  seeded episodes) and its CI95 (1.96·s/√n of the per-episode differences); ``significant``
  where that CI95 excludes zero (at least two pairs); the average column's difference is the
  mean of the targets' differences, its CI95 combined as the accuracies' are;
- ``best``: the highest mean of its column within its (backbone, shot) block, ties at the two
  decimals shown all marked.

Markdown and LaTeX show best in bold and a † after a mean whose paired difference from the
reference is significant. A cell without rows (a partial merge) shows a dash.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from cdfsl.fewshot.grid import Grid, GridCell, merge_grid, recorded_cells, run_grid
from cdfsl.results.shards import Shard, failed
from cdfsl.results.stats import mean_ci95
from cdfsl.results.store import ResultStore

#: The column that averages the targets.
AVERAGE = "average"
#: Marks a mean whose paired difference from the reference has a CI95 that excludes zero.
DAGGER = "†"
#: The files a table writes into its output folder.
TABLE_FILES = ("results.md", "results.csv", "results.tex", "results.jsonl", "accuracy.png")


@dataclass(frozen=True)
class Entry:
    """One table cell: a method's accuracy on a target (or the ``average``) and its paired
    difference from the reference (``delta`` None for the reference itself, without a
    reference, or without pairs). Fractions, not percent; ``accuracy`` NaN without rows."""

    backbone: str
    shot: int
    method: str
    target: str
    accuracy: float
    ci95: float
    episodes: int
    delta: float | None = None
    delta_ci95: float | None = None
    pairs: int = 0
    best: bool = False

    @property
    def found(self) -> bool:
        return self.episodes > 0 and not math.isnan(self.accuracy)

    @property
    def significant(self) -> bool:
        """Whether the paired difference's CI95 excludes zero (needs two pairs for a spread)."""
        if self.delta is None or self.delta_ci95 is None or self.pairs < 2:
            return False
        return abs(self.delta) > self.delta_ci95

    def row(self) -> dict[str, Any]:
        return {**asdict(self), "significant": self.significant}


def accuracies(cell: GridCell) -> dict[int, float]:
    """The cell's successful episodes' accuracies, by episode, within its episode count."""
    rows = ResultStore(cell.folder / "results.jsonl").rows()
    return {
        int(r["episode"]): float(r["accuracy"])
        for r in rows
        if not failed(r) and int(r["episode"]) < cell.episodes
    }


def paired(base: Mapping[int, float], other: Mapping[int, float]) -> dict[str, float]:
    """``other`` minus ``base`` over the episodes both hold: mean, ci95, std, episodes.

    Both methods see identical seeded episodes, so the per-episode difference removes the
    episode-to-episode spread that dominates each method's own CI95.
    """
    common = sorted(set(base) & set(other))
    return mean_ci95([other[e] - base[e] for e in common])


def entries(cells: Sequence[GridCell], reference: str | None) -> list[Entry]:
    """Every table cell of ``cells`` (in their order), then the averages; best marked."""
    accs = {(c.backbone, c.target, c.shot, c.method): accuracies(c) for c in cells}
    out = []
    for cell in cells:
        own = accs[cell.backbone, cell.target, cell.shot, cell.method]
        stats = mean_ci95(list(own.values()))
        entry = Entry(
            cell.backbone, cell.shot, cell.method, cell.target, stats["mean"], stats["ci95"],
            int(stats["episodes"]),
        )  # fmt: skip
        base = accs.get((cell.backbone, cell.target, cell.shot, reference))
        if base is not None and cell.method != reference:
            diff = paired(base, own)
            if diff["episodes"]:
                entry = replace(entry, delta=diff["mean"], delta_ci95=diff["ci95"],
                                pairs=int(diff["episodes"]))  # fmt: skip
        out.append(entry)
    return mark_best(out + averages(out))


def averages(cells: Sequence[Entry]) -> list[Entry]:
    """The ``average`` entry of each (backbone, shot, method) row over its targets; NaN where a
    target has no rows, and no difference unless every target has one."""
    rows: dict[tuple[str, int, str], list[Entry]] = {}
    for e in cells:
        rows.setdefault((e.backbone, e.shot, e.method), []).append(e)
    out = []
    for (backbone, shot, method), row in rows.items():
        n = len(row)
        if not all(e.found for e in row):
            out.append(Entry(backbone, shot, method, AVERAGE, math.nan, math.nan, 0))
            continue
        entry = Entry(
            backbone, shot, method, AVERAGE, sum(e.accuracy for e in row) / n,
            _quadrature(e.ci95 for e in row) / n, sum(e.episodes for e in row),
        )  # fmt: skip
        if all(e.delta is not None for e in row):
            entry = replace(
                entry, delta=sum(e.delta for e in row) / n,
                delta_ci95=_quadrature(e.delta_ci95 for e in row) / n,
                pairs=min(e.pairs for e in row),
            )  # fmt: skip
        out.append(entry)
    return out


def _quadrature(values: Any) -> float:
    # Independent estimates: variances add, so CI95s add in quadrature.
    return math.sqrt(sum(v * v for v in values))


def mark_best(cells: Sequence[Entry]) -> list[Entry]:
    """``cells`` with ``best`` set on the highest mean (at two decimals in percent) of each
    (backbone, shot, target) column; every tied mean is marked."""
    top: dict[tuple[str, int, str], float] = {}
    for e in cells:
        if e.found:
            key = (e.backbone, e.shot, e.target)
            top[key] = max(top.get(key, -math.inf), _shown(e.accuracy))
    return [
        replace(e, best=e.found and _shown(e.accuracy) == top[e.backbone, e.shot, e.target])
        for e in cells
    ]


def _shown(fraction: float) -> float:
    """A fraction as the table shows it: percent at two decimals."""
    return round(100 * fraction, 2)


def _layout(cells: Sequence[Entry]) -> tuple[list[str], list[tuple[str, int, str]]]:
    """The columns (targets in order, then ``average``) and the rows (backbone, shot, method)."""
    targets = list(dict.fromkeys(e.target for e in cells if e.target != AVERAGE))
    rows = list(dict.fromkeys((e.backbone, e.shot, e.method) for e in cells))
    return [*targets, AVERAGE], rows


def _by_key(cells: Sequence[Entry]) -> dict[tuple[str, int, str, str], Entry]:
    return {(e.backbone, e.shot, e.method, e.target): e for e in cells}


def _lines(
    rows: Sequence[tuple[str, int, str]],
    columns: Sequence[str],
    by_key: Mapping[tuple[str, int, str, str], Entry],
    several: bool,
    reference: str | None,
    accuracy: Callable[[Entry | None], str],
    delta: Callable[[Entry | None], str],
    escape: Callable[[str], str] = str,
) -> tuple[list[tuple[tuple[str, int], list[str]]], list[tuple[tuple[str, int], list[str]]]]:
    """The accuracy lines and (with a reference) the difference lines of a table, each keyed by
    its (backbone, shot) block: the lead cells, the row name and one cell per column, made by
    ``accuracy`` / ``delta``; names pass through ``escape``."""
    accs, diffs = [], []
    for backbone, shot, method in rows:
        lead = [escape(backbone)] * several + [str(shot)]
        found = [by_key.get((backbone, shot, method, c)) for c in columns]
        accs.append(((backbone, shot), [*lead, escape(method), *map(accuracy, found)]))
        if reference is not None and method != reference:
            name = escape(f"{method} - {reference}")
            diffs.append(((backbone, shot), [*lead, name, *map(delta, found)]))
    return accs, diffs


def markdown(cells: Sequence[Entry], reference: str | None) -> str:
    """The accuracy table, then (with a reference) the paired differences, as markdown."""
    columns, rows = _layout(cells)
    by_key = _by_key(cells)
    several = len({r[0] for r in rows}) > 1
    lead = ["backbone"] * several + ["shot", "method"]

    def table(lines: list[list[str]]) -> str:
        header = [*lead, *columns]
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])

    def accuracy(e: Entry | None) -> str:
        if e is None or not e.found:
            return "–"
        text = f"{100 * e.accuracy:.2f} ± {100 * e.ci95:.2f}"
        return (f"**{text}**" if e.best else text) + (DAGGER if e.significant else "")

    def delta(e: Entry | None) -> str:
        if e is None or e.delta is None:
            return "–"
        text = f"{100 * e.delta:+.2f} ± {100 * e.delta_ci95:.2f}"
        return text + (DAGGER if e.significant else "")

    accs, diffs = _lines(rows, columns, by_key, several, reference, accuracy, delta)
    text = table([line for _, line in accs])
    if diffs:
        text += (
            f"\n\nPaired over the same episodes: accuracy points minus {reference} (mean ± CI95)"
            f"; {DAGGER} where the CI95 excludes zero:\n\n{table([line for _, line in diffs])}"
        )
    return text


#: The columns of results.csv, one line per entry (fractions, not percent).
CSV_FIELDS = ["backbone", "shot", "method", "target", "accuracy", "ci95", "episodes", "best",
              "reference", "delta", "delta_ci95", "pairs", "significant"]  # fmt: skip


def csv_text(cells: Sequence[Entry], reference: str | None) -> str:
    """One line per entry (the ``average`` column's too): its fields as fractions, the
    ``reference`` its difference is taken from (empty without one) and ``significant``."""
    handle = io.StringIO()
    writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for e in cells:
        row = {**e.row(), "reference": reference if e.delta is not None else ""}
        writer.writerow({k: "" if _missing(v) else v for k, v in row.items()})
    return handle.getvalue()


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


_TEX_ESCAPES = {c: "\\" + c for c in "&%$#_{}"} | {"~": r"\textasciitilde{}",
                                                  "^": r"\textasciicircum{}",
                                                  "\\": r"\textbackslash{}"}  # fmt: skip


def tex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped."""
    return "".join(_TEX_ESCAPES.get(c, c) for c in text)


def latex(cells: Sequence[Entry], reference: str | None) -> str:
    """booktabs tabulars (``\\toprule``, ``\\midrule``, ``\\bottomrule``): the accuracies, then
    (with a reference) the paired differences; a ``\\midrule`` between (backbone, shot) blocks.
    Best means in ``\\textbf``, ``$^\\dagger$`` where the paired CI95 excludes zero."""
    columns, rows = _layout(cells)
    by_key = _by_key(cells)
    several = len({r[0] for r in rows}) > 1
    lead = ["Backbone"] * several + ["Shot", "Method"]
    dagger = r"$^\dagger$"

    def tabular(lines: list[tuple[tuple[str, int], list[str]]]) -> str:
        spec = "l" * len(lead) + "c" * len(columns)
        header = [*lead, *(tex_escape(c) if c != AVERAGE else "Average" for c in columns)]
        out = [rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(header) + r" \\",
               r"\midrule"]  # fmt: skip
        block = None
        for key, line in lines:
            if block is not None and key != block:
                out.append(r"\midrule")
            block = key
            out.append(" & ".join(line) + r" \\")
        return "\n".join([*out, r"\bottomrule", r"\end{tabular}"])

    def accuracy(e: Entry | None) -> str:
        if e is None or not e.found:
            return "--"
        mean = f"{100 * e.accuracy:.2f}"
        text = (rf"\textbf{{{mean}}}" if e.best else mean) + rf" $\pm$ {100 * e.ci95:.2f}"
        return text + (dagger if e.significant else "")

    def delta(e: Entry | None) -> str:
        if e is None or e.delta is None:
            return "--"
        text = f"${100 * e.delta:+.2f}$ $\\pm$ {100 * e.delta_ci95:.2f}"
        return text + (dagger if e.significant else "")

    accs, diffs = _lines(rows, columns, by_key, several, reference, accuracy, delta, tex_escape)
    text = tabular(accs)
    if diffs:
        text += (
            f"\n\n% Paired over the same episodes: accuracy points minus {reference} "
            "(mean +/- CI95); dagger where the CI95 excludes zero.\n"
        )
        text += tabular(diffs)
    return text + "\n"


def describe_grid(record: Mapping[str, Any], ascii_only: bool = False) -> str:
    """One line on the protocol, the episode counts and what the marks mean (``ascii_only``:
    for a LaTeX comment)."""
    counts = ", ".join(f"{k}-shot {n}" for k, n in record["episodes"].items())
    pm, dagger = ("+/-", "dagger") if ascii_only else ("±", DAGGER)
    text = (
        f"{record['way']}-way, {record['query']} queries, seed {record['seed']}, episodes per "
        f"cell {counts}; backbone {', '.join(record['backbones'])}. Accuracy in % (mean {pm} "
        "CI95 over the episodes); the best of each column in bold"
    )
    if record.get("reference"):
        text += f"; {dagger} where the paired difference from {record['reference']} excludes zero"
    return text + "."


def write_tables(
    output: str | Path, record: Mapping[str, Any], cells: Sequence[GridCell]
) -> tuple[str, list[Entry]]:
    """Write :data:`TABLE_FILES` of a grid into ``output``; the markdown and the entries."""
    from cdfsl.plumbing import write_bytes_atomic
    from cdfsl.results.plots import plot_accuracy_by_domain

    output = Path(output)
    reference = record.get("reference")
    found = entries(cells, reference)
    text = markdown(found, reference)
    files = {
        "results.md": f"{describe_grid(record)}\n\n{text}\n",
        "results.csv": csv_text(found, reference),
        "results.tex": f"% {describe_grid(record, ascii_only=True)}\n{latex(found, reference)}",
        "results.jsonl": "".join(
            json.dumps({k: None if _missing(v) else v for k, v in e.row().items()}) + "\n"
            for e in found
        ),
    }
    for name, content in files.items():
        write_bytes_atomic(output / name, content.encode())
    several = len(record["backbones"]) > 1
    bars = [
        {**e.row(), "domain": e.target,
         "method": f"{e.method} ({e.backbone})" if several else e.method}
        for e in found if e.target != AVERAGE and e.found
    ]  # fmt: skip
    if bars:
        plot_accuracy_by_domain(bars, output / "accuracy.png")
    return text, found


def run_table(
    grid: Grid,
    progress: bool = True,
    workers: int = 1,
    threads: int | None = None,
    shard: Shard | None = None,
) -> str | None:
    """Run every cell of ``grid`` (:func:`run_grid`) and write its tables into its output; the
    markdown tables, or None where this process writes none (a static shard, whose tables
    ``cdfsl merge`` writes, or a torchrun rank other than 0)."""
    cells = run_grid(grid, progress, workers, threads, shard)
    if cells is None:
        return None
    return write_tables(grid.output, grid.record(), cells)[0]


def merge_table(output: str | Path, allow_partial: bool = False) -> str:
    """Merge the shards of every cell of the grid in ``output`` and write its tables."""
    cells = merge_grid(output, allow_partial)
    record, _ = recorded_cells(output)
    return write_tables(output, record, cells)[0]
