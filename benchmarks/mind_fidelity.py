"""Mind − LoRAFineTune on the micro world under the reference's options and cdfsl's old ones.

The paper's 1-shot schedule (T = 250, the paper's five views, LoRA r16
a8 rsLoRA dropout .25 on q/k/v, AdamW 2e-4), micro-clip, 5-way 1-shot 15 queries, on the four
target domains. For views ``per_episode`` (the reference) and ``per_step`` (cdfsl's old default),
and Mind's clean support S ``separate`` (the reference) and ``shared``, it reports the paired
per-episode difference Mind − LoRAFineTune (same views) with its CI95, and the mechanism metric:
the gap shift, |modality gap at the last step − at step 0| of the support features (step 0 is
the zero-shot model, B = 0), for FT and FT+SVL+RA.

Rows are stored per (domain, configuration) under ``--output`` (committed, so a later session
resumes them); a rerun resumes and ``--episodes`` may grow between runs. Episodes advance in
rounds of ``--episodes_per_step`` over every (domain, configuration), so a run stopped at any
point leaves a balanced table. With ``--target_ci``, a (domain, pair) stops taking rounds once its
paired CI95 is at most the target over at least ``--min_episodes`` (sequential stopping: the
count it took is the table's episode column). Nothing is tuned on query accuracy.

Every (domain, configuration) folder holds ``run.json`` (engine version, method
arguments, steps, images per class); a run whose fingerprint differs is refused, so rows of other
defaults are never mixed. ``--compare DIR`` adds the per-episode contrast with the rows of
another set of defaults (same protocol seed, so episode i holds the same images in both), e.g.
the engine-3 and engine-2 rows kept in ``results/mind-fidelity-engine3`` and ``-engine2``.

    python benchmarks/mind_fidelity.py --episodes 64 --target_ci 1.5 --domains crop-like
    python benchmarks/mind_fidelity.py --report --compare benchmarks/results/mind-fidelity-engine3
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from cdfsl.data.micro_world import MicroWorld, list_domains
from cdfsl.engine import ENGINE_VERSION, FitConfig
from cdfsl.fewshot.episodic import EpisodeProtocol, EpisodicEvaluator
from cdfsl.lora import LoRAConfig
from cdfsl.methods import LoRAFineTune, Mind
from cdfsl.results.stats import mean_ci95
from cdfsl.results.store import ResultStore, check_run_config, plain_json

LORA = LoRAConfig(rank=16, alpha=8.0, dropout=0.25, targets=("q", "k", "v"), scaling="rslora")

#: name -> (class, init args beyond the shared recipe).
CONFIGS: dict[str, tuple[type, dict[str, Any]]] = {
    "ft/per_episode": (LoRAFineTune, {"view_sampling": "per_episode"}),
    "mind/per_episode/separate": (Mind, {"view_sampling": "per_episode", "support": "separate"}),
    "mind/per_episode/shared": (Mind, {"view_sampling": "per_episode", "support": "shared"}),
    "ft/per_step": (LoRAFineTune, {"view_sampling": "per_step"}),
    "mind/per_step/separate": (Mind, {"view_sampling": "per_step", "support": "separate"}),
    "mind/per_step/shared": (Mind, {"view_sampling": "per_step", "support": "shared"}),
}

#: The paired comparisons of the table: (Mind configuration, its LoRAFineTune baseline).
PAIRS = [
    ("mind/per_episode/separate", "ft/per_episode"),
    ("mind/per_episode/shared", "ft/per_episode"),
    ("mind/per_step/separate", "ft/per_step"),
    ("mind/per_step/shared", "ft/per_step"),
]

#: What each option changes, paired per episode: (Mind − LoRAFineTune) of one pair minus that of
#: another; the shared baseline cancels where both pairs use it.
CONTRASTS = [
    ("S shared − separate (views per_episode)", PAIRS[1], PAIRS[0]),
    ("views per_step − per_episode (S separate)", PAIRS[2], PAIRS[0]),
]


class GapEnds(L.Callback):
    """Each episode's modality gap at the first and the last training step."""

    def __init__(self) -> None:
        self.first: list[float] = []
        self.last: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        gaps = [pl_module.episode_terms(e)["modality_gap"] for e in range(len(pl_module.episodes))]
        if batch_idx == 0:
            self.first = gaps
        self.last = gaps


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    protocol = EpisodeProtocol(n_way=5, k_shot=1, n_query=15, episodes=args.episodes, seed=0)
    fit = FitConfig(
        steps=args.steps, precision="32-true", accelerator="cpu", episodes_per_step=args.group
    )
    methods = {}
    for name, (cls, extra) in CONFIGS.items():
        if args.configs and name not in args.configs:
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            methods[name] = cls(backbone="micro-clip", lora=LORA, **extra)
    domains = args.domains or [d for d in list_domains() if d != "source"]
    pairs = [pair for pair in PAIRS if set(pair) <= set(methods)]
    for start in range(0, args.episodes, args.group):
        chunk = list(range(start, min(start + args.group, args.episodes)))
        for domain in domains:
            dataset = MicroWorld(domain, images_per_class=args.images_per_class, seed=0)
            open_pairs = [p for p in pairs if not _settled(args, domain, p)]
            for name, method in methods.items():
                if not any(name in p for p in open_pairs):
                    continue
                store = ResultStore(_rows_path(args.output, domain, name))
                _check_fingerprint(store.path.parent, _fingerprint(args, method))
                todo = [i for i in chunk if i not in store.completed()]
                if not todo:
                    continue
                evaluator = EpisodicEvaluator(
                    method, dataset, protocol, store.path.parent, fit, progress=False
                )
                gaps = GapEnds()
                rows = evaluator.run_episodes(todo, callbacks=[gaps])
                for row, first, last in zip(rows, gaps.first, gaps.last, strict=True):
                    row["gap_first"], row["gap_last"] = first, last
                    store.append(row)
                print(f"{domain} {name} episodes {todo}: "
                      f"{[round(100 * r['accuracy'], 1) for r in rows]}", flush=True)  # fmt: skip


def _fingerprint(args: argparse.Namespace, method: Any) -> dict[str, Any]:
    return {
        "engine": ENGINE_VERSION,
        "method": type(method).__name__,
        "method_args": plain_json(dict(method.hparams)),
        "steps": args.steps,
        "images_per_class": args.images_per_class,
    }


def _check_fingerprint(folder: Path, fingerprint: dict[str, Any]) -> None:
    """Record ``fingerprint`` in ``folder/run.json``, or refuse when the rows there were made
    with other settings (``check_run_config``, as every evaluation output does)."""
    if (folder / "rows.jsonl").exists() and not (folder / "run.json").exists():
        raise SystemExit(f"{folder}: rows without run.json; move them aside first")
    folder.mkdir(parents=True, exist_ok=True)
    check_run_config(folder, fingerprint)


def _rows_path(output: Path, domain: str, name: str) -> Path:
    return output / domain / name.replace("/", "-") / "rows.jsonl"


def _rows(output: Path, domain: str, name: str) -> dict[int, dict]:
    """Episode -> row of one (domain, configuration); empty before its first row."""
    path = _rows_path(output, domain, name)
    return {r["episode"]: r for r in ResultStore(path).rows()} if path.exists() else {}


def _paired(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    """Episode -> a − b, on the episodes both hold."""
    return {e: a[e] - b[e] for e in sorted(set(a) & set(b))}


def _accuracy(rows: dict[int, dict]) -> dict[int, float]:
    return {e: 100 * r["accuracy"] for e, r in rows.items()}


def _gap_shift(rows: dict[int, dict]) -> dict[int, float]:
    return {e: abs(r["gap_last"] - r["gap_first"]) for e, r in rows.items()}


def _settled(args: argparse.Namespace, domain: str, pair: tuple[str, str]) -> bool:
    """Whether ``pair`` on ``domain`` already meets ``--target_ci``."""
    if args.target_ci is None:
        return False
    mind, base = (_accuracy(_rows(args.output, domain, name)) for name in pair)
    diff = list(_paired(mind, base).values())
    return len(diff) >= args.min_episodes and mean_ci95(diff)["ci95"] <= args.target_ci


def _ci_cell(diff: dict[int, float], digits: int, count: bool = True) -> str:
    """``mean ± CI95 (n)`` of paired differences; "–" under two episodes."""
    if len(diff) < 2:
        return "–"
    s = mean_ci95(list(diff.values()))
    return f"{s['mean']:+.{digits}f} ± {s['ci95']:.{digits}f}" + (
        f" ({len(diff)})" if count else ""
    )


def compare(output: Path, other: Path) -> str:
    """Per-episode contrast of ``output``'s rows with ``other``'s on the reference pair."""
    domains = [d for d in list_domains() if d != "source"]
    mind, base = PAIRS[0]
    lines = []
    for label, value in (
        ("LoRAFineTune", lambda out, d: _accuracy(_rows(out, d, base))),
        ("Mind", lambda out, d: _accuracy(_rows(out, d, mind))),
        ("Mind − LoRAFineTune", lambda out, d: _paired(
            _accuracy(_rows(out, d, mind)), _accuracy(_rows(out, d, base)))),
        ("gap shift, paired Mind − FT", lambda out, d: _paired(
            _gap_shift(_rows(out, d, mind)), _gap_shift(_rows(out, d, base)))),
    ):  # fmt: skip
        digits = 3 if label.startswith("gap") else 1
        cells = [_ci_cell(_paired(value(output, d), value(other, d)), digits) for d in domains]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    head = f"| {output.name} − {other.name}, per episode | " + " | ".join(domains) + " |"
    return "\n".join([head, "|---" * (len(domains) + 1) + "|", *lines])


def report(output: Path) -> str:
    """The markdown tables of what ``output`` holds (common episodes only)."""
    domains = [d for d in list_domains() if d != "source"]
    rows = {(d, n): _rows(output, d, n) for d in domains for n in CONFIGS}
    accuracy = {key: _accuracy(value) for key, value in rows.items()}
    gain = {(d, pair): _paired(accuracy[d, pair[0]], accuracy[d, pair[1]])
            for d in domains for pair in PAIRS}  # fmt: skip

    def table(head: str, lines: list[tuple[str, list[str]]]) -> list[str]:
        out = [f"| {head} | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
        return out + [f"| {name} | " + " | ".join(cells) + " |" for name, cells in lines]

    pair_lines = []
    for mind, base in PAIRS:
        cells = []
        for d in domains:
            common = gain[d, (mind, base)]
            cell = _ci_cell(common, 1)
            if cell != "–":
                ft = np.mean([accuracy[d, base][e] for e in common])
                mi = np.mean([accuracy[d, mind][e] for e in common])
                cell = f"{ft:.1f} / {mi:.1f} / {cell}"
            cells.append(cell)
        pair_lines.append((f"{mind} − {base}", cells))
    contrast_lines = [
        (name, [_ci_cell(_paired(gain[d, first], gain[d, second]), 1) for d in domains])
        for name, first, second in CONTRASTS
    ]
    shift = {key: _gap_shift(value) for key, value in rows.items()}
    gap_lines = [
        (name, [f"{np.mean(list(shift[d, name].values())):.3f}" if shift[d, name] else "–"
                for d in domains])
        for name in CONFIGS
    ] + [
        (f"paired {mind} − {base}",
         [_ci_cell(_paired(shift[d, mind], shift[d, base]), 3, count=False) for d in domains])
        for mind, base in PAIRS
    ]  # fmt: skip
    gap_title = "gap shift |gap(T) − gap(0)| of the support features, mean over episodes:"
    return "\n".join([
        *table("pair", pair_lines),
        "", "Paired contrasts, accuracy points (episodes):", "",
        *table("contrast", contrast_lines),
        "", gap_title, "",
        *table("configuration", gap_lines),
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).parent / "results" / "mind-fidelity"
    )
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--steps", type=int, default=250, help="T; the paper's 1-shot 250")
    parser.add_argument("--group", "--episodes_per_step", type=int, default=4)
    parser.add_argument("--images_per_class", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--domains", nargs="*", default=None, help="a subset (e.g. one per process); all if unset"
    )
    parser.add_argument(
        "--configs", nargs="*", choices=list(CONFIGS), default=None, help="a subset; all if unset"
    )
    parser.add_argument(
        "--target_ci", type=float, default=None, help="stop a (domain, pair) at this paired CI95"
    )
    parser.add_argument("--min_episodes", type=int, default=8)
    parser.add_argument("--report", action="store_true", help="only print the tables")
    parser.add_argument(
        "--compare", type=Path, default=None, help="rows of other defaults to contrast with"
    )
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if not args.report:
        args.output.mkdir(parents=True, exist_ok=True)
        with (args.output / "commands.jsonl").open("a") as log:
            log.write(json.dumps({**vars(args), "output": str(args.output)}) + "\n")
        run(args)
    table = report(args.output)
    if args.compare is not None:
        table += "\n\nPer-episode contrast with other defaults, points (episodes):\n\n"
        table += compare(args.output, args.compare)
    print(table)
    if args.output.is_dir():
        (args.output / "table.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
