"""Seconds per episode for each method, measured in one run on this machine.

    python benchmarks/episode_speed.py                      # tiny-clip, 3 episodes each
    python benchmarks/episode_speed.py --backbone ViT-B-16 --steps 3 --way 5 --shot 1

A random-initialised backbone times the same computation as its pretrained weights would.
Results are printed as seconds per episode and as ratios to LoRAFineTune within this run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from imagegen import make_image_folder

from cdfsl.data.folder import ImageFolder
from cdfsl.engine import FitConfig
from cdfsl.fewshot.episodic import EpisodeProtocol, EpisodicEvaluator
from cdfsl.lora import LoRAConfig
from cdfsl.methods import LoRAFineTune, Mind, ZeroShot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tiny-clip")
    parser.add_argument("--way", type=int, default=3)
    parser.add_argument("--shot", type=int, default=1)
    parser.add_argument("--query", type=int, default=5)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--precision", default="bf16-mixed")
    args = parser.parse_args()
    torch.manual_seed(0)
    fit = FitConfig(steps=args.steps, precision=args.precision, accelerator="auto")
    protocol = EpisodeProtocol(args.way, args.shot, args.query, args.episodes, seed=0)
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        classes = {f"class_{c}": args.shot + args.query for c in range(args.way)}
        dataset = ImageFolder(make_image_folder(Path(tmp) / "data", classes, size=64))
        for cls in (ZeroShot, LoRAFineTune, Mind):
            method = cls(backbone=args.backbone, pretrained=None, lora=LoRAConfig())
            evaluator = EpisodicEvaluator(
                method, dataset, protocol, Path(tmp) / cls.__name__, fit, progress=False
            )
            evaluator.run_episode(0)  # warm-up: first-call allocations and kernel selection
            start = time.perf_counter()
            for index in range(args.episodes):
                evaluator.run_episode(index)
            times[cls.__name__] = (time.perf_counter() - start) / args.episodes
    print(
        f"backbone={args.backbone} {args.way}-way {args.shot}-shot {args.query} queries, "
        f"T={args.steps} steps, {args.precision}, device={fit.device()}, "
        f"threads={torch.get_num_threads()}"
    )
    for name, seconds in times.items():
        ratio = seconds / times["LoRAFineTune"]
        print(f"{name:<14} {seconds:8.3f} s/episode   {ratio:5.2f}x LoRAFineTune")


if __name__ == "__main__":
    main()
