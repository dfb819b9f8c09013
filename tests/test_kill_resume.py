"""Kill-anywhere resume: ``cdfsl eval`` SIGKILLed again and again, resumed each time, gives the
rows of an uninterrupted run, each episode once, and never a torn ``summary.json``.

Each run is a forked child of this process that runs ``cdfsl.cli.main(["eval", ...])``, what
the ``cdfsl`` script runs, without paying for the imports of torch and Lightning again. In the
child the result store's file writes go through a shim of ``os`` that writes each buffer in two
halves with a pause between them, and pauses before each rename: a kill aimed at a write lands
inside it, leaving half a row or half a temporary summary on disk. The child records the phase
it is in (training, row write, summary write, ...) in a file; after each kill the test reads
there where the kill landed, and prints the list (``pytest -s``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

import pytest
from imagegen import make_image_folder

# Imported before forking, so that the children start warm.
import cdfsl.fewshot.episodic
import cdfsl.methods  # noqa: F401
from cdfsl.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes/tiny/mind.yaml")
EPISODES = 10
PAUSE = 0.25  # seconds inside each write (between its halves) and before each rename
#: What each run does, in order: kill at a random moment, kill inside the n-th write of a kind
#: ("row write:2": in the second row this run writes), or let it finish ("complete").
PLAN = [
    "random", "row write:1", "random", "training:2", "row write:2", "random", "random", "random",
    "summary write:1", "summary rename:1", "random", "complete", "summary write:1", "complete",
]  # fmt: skip


def _kind(name: str) -> str:
    """What a write to file ``name`` is, for the phase record."""
    if name == "results.jsonl":
        return "row write"
    for target in ("summary.json", "results.jsonl", "run.json"):
        if name.startswith(f".{target}."):
            return {"summary.json": "summary write", "results.jsonl": "results rewrite"}.get(
                target, "run.json write"
            )
    return f"write {name}"


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _child(args: list[str], phase_path: Path, pause: float) -> int:
    """In the forked child: slow writes with phase records, then ``cdfsl eval``."""
    import torch

    from cdfsl import plumbing
    from cdfsl.fewshot import episodic
    from cdfsl.results import store

    torch.set_num_threads(1)
    phase_fd = os.open(phase_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    counts: dict[str, int] = {}

    def phase(kind: str) -> None:
        counts[kind] = counts.get(kind, 0) + 1
        os.pwrite(phase_fd, f"{kind}:{counts[kind]}".ljust(48).encode(), 0)

    class SlowOS:
        """``os`` for the store and cdfsl.plumbing: two-part writes and late renames, recorded."""

        def __init__(self) -> None:
            self.names: dict[int, str] = {}

        def __getattr__(self, name):
            return getattr(os, name)

        def open(self, path, flags, mode=0o777):
            fd = os.open(path, flags, mode)
            self.names[fd] = Path(path).name
            return fd

        def write(self, fd, data):
            phase(_kind(self.names.get(fd, "?")))
            half = len(data) // 2
            _write_all(fd, data[:half])
            time.sleep(pause)
            _write_all(fd, data[half:])
            phase("running")
            return len(data)

        def replace(self, src, dst):
            kind = _kind(f".{Path(dst).name}.")
            phase(kind.replace("write", "rename").replace("rewrite", "rename"))
            time.sleep(pause)
            os.replace(src, dst)
            phase("running")

    # The store opens its files; cdfsl.plumbing writes and renames them.
    store.os = plumbing.os = SlowOS()
    run_episodes = episodic.EpisodicEvaluator.run_episodes

    def training(self, indices, *args, **kwargs):
        phase("training")
        return run_episodes(self, indices, *args, **kwargs)

    episodic.EpisodicEvaluator.run_episodes = training
    phase("startup")
    code = main(args)
    phase("done")
    return code


def spawn(args: list[str], phase_path: Path, log_path: Path, pause: float) -> int:
    """Fork a child that runs ``cdfsl eval`` (see :func:`_child`); its pid."""
    phase_path.write_bytes(b"")  # no phase of an earlier child
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1), os.dup2(log, 2)
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        code = _child(args, phase_path, pause)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)


def read_phase(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace").strip()
    except FileNotFoundError:
        return ""


def wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def check_summary(out: Path) -> None:
    """summary.json is absent or a whole JSON object, never part of one."""
    path = out / "summary.json"
    if path.exists():
        assert isinstance(json.loads(path.read_text()), dict)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_rows(tmp_path):
    folder = make_image_folder(tmp_path / "data", {"Cat": 8, "Dog": 8, "Bird": 8}, size=16)
    args = [
        "eval", "--config", TINY, "--data.root", str(folder), "--episodes", str(EPISODES),
        "--steps", "2", "--precision", "32-true", "--episodes_per_step", "2",
        "--progress", "false",
    ]  # fmt: skip
    log = tmp_path / "children.log"
    ref, out = tmp_path / "reference", tmp_path / "killed"
    phase_path = tmp_path / "phase"

    start = time.monotonic()
    assert wait(spawn([*args, "--output", str(ref)], phase_path, log, 0.0)) == 0, log.read_text()
    reference_seconds = time.monotonic() - start

    rng = random.Random(14)
    landed: list[str] = []
    torn_rows = 0
    for step in PLAN:
        pid = spawn([*args, "--output", str(out)], phase_path, log, PAUSE)
        began = time.monotonic()
        deadline = began + 30 + 10 * reference_seconds
        if step == "complete":
            assert wait(pid) == 0, log.read_text()
            landed.append("(completed)")
            continue
        moment = began + rng.uniform(0.05, reference_seconds)
        finished = False
        while True:
            now = time.monotonic()
            assert now < deadline, f"{step}: no such moment came; {log.read_text()[-2000:]}"
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                finished = True  # it ended before the moment came: nothing to kill
                break
            if (step == "random" and now >= moment) or read_phase(phase_path) == step:
                break
            time.sleep(0.005)
        if finished:
            landed.append(f"(finished before {step})")
            continue
        os.kill(pid, signal.SIGKILL)
        assert wait(pid) == -signal.SIGKILL
        where = read_phase(phase_path)
        landed.append(where)
        check_summary(out)
        results = out / "results.jsonl"
        if where.startswith("row write") and results.exists():
            torn_rows += not results.read_bytes().endswith(b"\n")
    assert wait(spawn([*args, "--output", str(out)], phase_path, log, 0.0)) == 0
    print("\nkills landed in:", ", ".join(landed), f"({time.monotonic() - start:.0f} s)")

    kills = [w for w in landed if not w.startswith("(")]
    assert len(kills) >= 10, landed
    assert any(w.startswith("row write") for w in kills), landed
    assert any(w.startswith("summary write") for w in kills), landed
    assert torn_rows >= 1  # a kill left half a row on disk, and the resume cut it off

    check_summary(out)
    expected = [json.loads(line) for line in (ref / "results.jsonl").read_text().splitlines()]
    got = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [row["episode"] for row in got] == list(range(EPISODES))
    for row, twin in zip(expected, got, strict=True):
        row.pop("seconds"), twin.pop("seconds")
        terms, twin_terms = row.pop("terms"), twin.pop("terms")
        assert twin == row
        # Episodes regrouped by a resume train in other company: float rounding in the terms.
        assert twin_terms == pytest.approx(terms, rel=1e-4, abs=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    reference = json.loads((ref / "summary.json").read_text())
    assert summary["episodes_done"] == EPISODES
    assert summary["accuracy"] == pytest.approx(reference["accuracy"])
