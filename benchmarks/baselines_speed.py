"""Episodes per second of each frozen-feature baseline, with the episode features cached, beside
one LoRAFineTune episode; micro-clip on one micro-world target.

    OMP_NUM_THREADS=1 python benchmarks/baselines_speed.py
    OMP_NUM_THREADS=1 python benchmarks/baselines_speed.py --domain chestx-like --episodes 800

Each baseline is timed twice through the evaluator's own path (``run_episodes`` in the
evaluator's own groups, rows not written): with the clean cached features only (no augmented
views: 800 episodes), and at the reference's defaults, whose augmented support views are encoded
per episode (timed on ``--view_episodes`` episodes and extrapolated to ``--episodes``). The
cache is built first and its time reported apart. LoRAFineTune runs the demo's schedule
(T = 10·K, two views, fp32).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

import torch

from cdfsl.data.sources import DataConfig, build_dataset
from cdfsl.engine import FitConfig, episodes_per_step
from cdfsl.fewshot.episodic import EpisodeProtocol, EpisodicEvaluator
from cdfsl.lora import LoRAConfig
from cdfsl.methods import (
    CLAP,
    LinearProbe,
    LoRAFineTune,
    LPPlusPlus,
    TipAdapter,
    TipAdapterF,
    ZeroShotLinearProbe,
)

#: (label, class, arguments with the cached clean features only, at the reference's defaults)
BASELINES: list[tuple[str, Any, dict[str, Any], dict[str, Any] | None]] = [
    ("LinearProbe", LinearProbe, {}, None),
    ("TipAdapter", TipAdapter, {"augment_epochs": 0}, {}),
    ("TipAdapterF", TipAdapterF, {"augment_epochs": 0}, {}),
    ("LPPlusPlus", LPPlusPlus, {"augment_passes": 0}, {}),
    ("CLAP", CLAP, {"augment_passes": 0}, {}),
    ("ZeroShotLinearProbe", ZeroShotLinearProbe, {"augment_passes": 0}, {}),
]


def _time(evaluator: EpisodicEvaluator, episodes: int) -> float:
    # Groups as the evaluator makes them (episodes_per_step null: its automatic E).
    group = episodes_per_step(evaluator.method, evaluator.protocol.n_way, evaluator.fit)
    start = time.perf_counter()
    for first in range(0, episodes, group):
        evaluator.run_episodes(list(range(first, min(first + group, episodes))))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="isic-like")
    parser.add_argument("--images_per_class", type=int, default=40)
    parser.add_argument("--episodes", type=int, default=800)
    parser.add_argument("--view_episodes", type=int, default=16)
    parser.add_argument("--way", type=int, default=5)
    parser.add_argument("--shot", type=int, default=1)
    parser.add_argument("--query", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    data = DataConfig(
        source="micro", options={"domain": args.domain, "images_per_class": args.images_per_class}
    )
    dataset = build_dataset(data)
    protocol = EpisodeProtocol(args.way, args.shot, args.query, args.episodes, 0)
    fit = FitConfig(steps_per_shot=10, precision="32-true", accelerator="cpu")
    print(
        f"micro-clip, {args.domain} ({len(dataset)} images), {args.way}-way {args.shot}-shot "
        f"{args.query}-query, {torch.get_num_threads()} thread(s)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CDFSL_FEATURE_CACHE"] = os.path.join(tmp, "cache")

        def evaluator(method: Any) -> EpisodicEvaluator:
            return EpisodicEvaluator(method, dataset, protocol, tmp, fit, progress=False)

        first = evaluator(LinearProbe(backbone="micro-clip"))
        start = time.perf_counter()
        first.run_episodes([0])
        print(f"feature cache built (every image of {args.episodes} episodes, once): "
              f"{time.perf_counter() - start:.2f} s")  # fmt: skip
        header = (
            f"| method | configuration | episodes | seconds | episodes/s | s per {args.episodes} |"
        )
        print(f"\n{header}\n|---|---|---|---|---|---|")
        for label, cls, cached, reference in BASELINES:
            for name, kwargs, count in (
                ("cached features only", cached, args.episodes),
                ("reference defaults (views per episode)", reference, args.view_episodes),
            ):
                if kwargs is None:
                    continue
                runner = evaluator(cls(backbone="micro-clip", **kwargs))
                runner.run_episodes([0])  # warm: reads the cache entry, builds the text cache
                seconds = _time(runner, count)
                shown = ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "defaults"
                rate, total = count / seconds, args.episodes * seconds / count
                cells = [label, f"{name}: {shown}", count, f"{seconds:.2f}", f"{rate:.1f}"]
                print("| " + " | ".join(map(str, cells)) + f" | {total:.1f} |")
        lora = LoRAFineTune(
            backbone="micro-clip",
            lora=LoRAConfig(rank=16, alpha=8.0, dropout=0.25, targets=("q", "k", "v")),
            views=[{"name": "clean"}, {"name": "rjf", "rotation": 45.0, "jitter": 0.4,
                                       "hflip": True}],
        )  # fmt: skip
        runner = evaluator(lora)
        runner.run_episodes([0])
        seconds = _time(runner, 1, group=1)
        steps = fit.total_steps(args.shot)
        print(f"| LoRAFineTune | demo schedule: T = {steps}, two views, fp32 | 1 | {seconds:.2f} "
              f"| {1 / seconds:.2f} | {args.episodes * seconds:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
