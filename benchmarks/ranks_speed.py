"""Episodes per hour of ``cdfsl eval`` on one rank and under torchrun on N ranks, one run.

    python benchmarks/ranks_speed.py                     # 1 vs 2 ranks, one thread each
    python benchmarks/ranks_speed.py --ranks 4 --episodes 32 --steps 20

Mind on micro-clip (micro-world chestx-like, 5-way 1-shot, LoRA r16, the five default views,
fp32). Each command is timed whole (start-up, loading, training, merge), as a user would wait
for it; the merged rows of both runs are checked to hold the same episodes and accuracies.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def rows(output: Path) -> dict[int, float]:
    lines = (output / "results.jsonl").read_text().splitlines()
    return {row["episode"]: row["accuracy"] for row in map(json.loads, lines)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cdfsl = str(Path(sys.executable).with_name("cdfsl"))
    cli = [
        cdfsl, "eval", "--config", str(ROOT / "recipes/tiny/mind.yaml"),
        "--method.init_args.backbone", "micro-clip", "--method.init_args.pretrained", "default",
        "--method.init_args.lora", json.dumps({"rank": 16, "alpha": 8.0, "dropout": 0.25}),
        "--data.source", "micro", "--data.options", '{"domain": "chestx-like"}',
        "--way", "5", "--shot", "1", "--episodes", str(args.episodes),
        "--steps", str(args.steps), "--precision", "32-true", "--progress", "false",
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        one = Path(tmp) / "one"
        many = Path(tmp) / "many"
        t_one = run([*cli, "--output", str(one)], env)
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        t_many = run([*torchrun, f"--nproc_per_node={args.ranks}", "--no-python", *cli,
                      "--output", str(many)], env)  # fmt: skip
        same = rows(one) == rows(many)
    eph = [3600 * args.episodes / t for t in (t_one, t_many)]
    print(
        f"{args.episodes} episodes, T={args.steps}: 1 rank {t_one:.1f} s ({eph[0]:.0f} episodes/"
        f"hour), {args.ranks} ranks {t_many:.1f} s ({eph[1]:.0f} episodes/hour): "
        f"{eph[1] / eph[0]:.2f}x; same rows: {same}"
    )


if __name__ == "__main__":
    main()
