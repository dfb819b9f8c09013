"""A random-initialised recipe is a reproducible run: two fresh processes give the same rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TIMINGS = {"seconds"}


def _rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def test_two_processes_of_a_random_init_recipe_write_the_same_rows(four_class_folder, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outputs = [tmp_path / "a", tmp_path / "b"]
    args = ["eval", "--config", "recipes/tiny/mind.yaml", "--data.root", str(four_class_folder)]
    args += ["--episodes", "2", "--steps", "2", "--precision", "32-true", "--progress", "false"]
    # Two interpreters at once: each draws its tiny-clip (pretrained: null) from the method seed.
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "cdfsl.cli", *args, "--output", str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for out in outputs
    ]
    logs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], logs
    first, second = (_rows(out / "results.jsonl") for out in outputs)
    assert len(first) == 2 and first == second
    run_a, run_b = (json.loads((out / "run.json").read_text()) for out in outputs)
    assert run_a == run_b and run_a["method_args"]["seed"] == 0
