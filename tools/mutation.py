"""Mutation testing of the modules where cdfsl's numbers are made, with per-group test selection.

Each group (losses, lora, views, ...) names its source files and the test files that guard them.
For each group asked for, the script prepares ``.mutation/<group>/`` (links to the project and a
``pyproject.toml`` whose ``[tool.mutmut]`` mutates only the group's files and collects only its
tests) and runs ``mutmut run`` there; mutmut then runs, for each mutant, only the tests that
executed the mutated function, fastest first. Results stay in ``.mutation/<group>/mutants`` (a
rerun resumes; ``--fresh`` starts over). It prints, per module, the mutants, how many the tests
killed, how many survived, those listed as equivalent in ``tools/equivalent_mutants.toml`` (with
their reason), and the survival rate of the non-equivalent ones.

    pip install -e ".[dev,mutation]"
    python tools/mutation.py                 # every group
    python tools/mutation.py stats losses    # some
    python tools/mutation.py --survivors lora  # also list each surviving mutant
    (cd .mutation/lora && mutmut show <mutant>)   # its diff
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutation"
EQUIVALENT = Path(__file__).with_name("equivalent_mutants.toml")
LINKED = ("cdfsl", "tests", "recipes", "assets")

#: group -> (files mutated, test files that guard them).
GROUPS: dict[str, tuple[list[str], list[str]]] = {
    "stats": (["cdfsl/results/stats.py"], ["tests/test_stats.py"]),
    "losses": (
        ["cdfsl/fewshot/losses.py", "cdfsl/fewshot/alignment.py"],
        ["tests/test_losses.py", "tests/test_alignment.py"],
    ),
    "lora": (
        ["cdfsl/lora.py"],
        ["tests/test_lora.py", "tests/test_lora_layouts.py", "tests/test_attention.py"],
    ),
    "attention": (["cdfsl/attention.py"], ["tests/test_attention.py"]),
    "compiling": (["cdfsl/compiling.py"], ["tests/test_compiling.py"]),
    "views": (["cdfsl/data/views.py"], ["tests/test_views.py"]),
    "episodes": (["cdfsl/data/episodes.py"], ["tests/test_episodes.py", "tests/test_manifests.py"]),
    "methods": (
        [
            "cdfsl/fewshot/methods/base.py",
            "cdfsl/fewshot/methods/mind.py",
            "cdfsl/fewshot/methods/lora_ce.py",
        ],
        ["tests/test_methods.py"],
    ),
    "engine": (
        ["cdfsl/engine/fit.py", "cdfsl/engine/capacity.py", "cdfsl/engine/predict.py"],
        [
            "tests/test_engine.py",
            "tests/test_failed_episodes.py",
            "tests/test_evaluation.py",
            "tests/test_attention.py",
            "tests/test_compiling.py",
        ],
    ),
    "xtail": (
        ["cdfsl/continual/xtail/framing.py", "cdfsl/continual/xtail/metrics.py"],
        ["tests/test_xtail.py"],
    ),
    "rail": (["cdfsl/continual/rail.py"], ["tests/test_rail.py"]),
}

# mutmut's exit-code statuses, as `mutmut results --all true` prints them.
_LINE = re.compile(r"^\s*(?P<name>\S+?): (?P<status>.+)$")


def _prepare(group: str, fresh: bool) -> Path:
    """``.mutation/<group>``: links to the project and a pyproject.toml for this group."""
    files, tests = GROUPS[group]
    work = WORK / group
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        link = work / name
        if not link.exists():
            link.symlink_to(ROOT / name, target_is_directory=True)
    config = (ROOT / "pyproject.toml").read_text()
    config += "\n[tool.mutmut]\n"
    config += 'source_paths = ["cdfsl"]\n'
    config += f"only_mutate = {files!r}\n".replace("'", '"')
    config += f"pytest_add_cli_args_test_selection = {tests!r}\n".replace("'", '"')
    config += 'pytest_add_cli_args = ["-p", "no:warnings", "-q"]\n'
    # A mutant that makes training run 40x longer (T = 250 instead of a test's 6 steps) is
    # caught by its timeout; mutmut's default (30x the tests' time) spent 15 min on one.
    config += "timeout_multiplier = 3.0\n"
    config += 'also_copy = ["tests", "recipes", "assets", "pyproject.toml"]\n'
    (work / "pyproject.toml").write_text(config)
    return work


def _mutmut(work: Path, *args: str, capture: bool = False) -> str:
    exe = Path(sys.executable).with_name("mutmut")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [str(exe), *args], cwd=work, env=env, text=True, capture_output=capture, check=False
    )
    if done.returncode != 0:
        sys.exit(f"mutmut {' '.join(args)} failed in {work} (exit {done.returncode})")
    return done.stdout if capture else ""


def _statuses(work: Path) -> dict[str, str]:
    out = _mutmut(work, "results", "--all", "true", capture=True)
    found = {}
    for line in out.splitlines():
        match = _LINE.match(line)
        if match and "__mutmut_" in match["name"]:
            found[match["name"]] = match["status"].strip()
    return found


def _module(mutant: str) -> str:
    """``cdfsl.fewshot.losses.x_svl__mutmut_3`` -> ``cdfsl.fewshot.losses``."""
    return mutant.rsplit(".", 1)[0]


def _report(group: str, statuses: dict[str, str], equivalent: dict[str, str], show: bool) -> None:
    by_module: dict[str, Counter] = {}
    for name, status in statuses.items():
        counts = by_module.setdefault(_module(name), Counter())
        counts["mutants"] += 1
        if status == "survived" and name in equivalent:
            counts["equivalent"] += 1
        else:
            counts[status] += 1
    for module, counts in sorted(by_module.items()):
        judged = counts["mutants"] - counts["equivalent"]
        rate = counts["survived"] / judged if judged else 0.0
        other = {k: v for k, v in counts.items() if k not in _SHOWN}
        print(
            f"{group:9} {module:40} {counts['mutants']:5} {counts['killed']:6} "
            f"{counts['survived']:8} {counts['equivalent']:10} {100 * rate:7.1f}%"
            + (f"  {dict(other)}" if other else "")
        )
    # mutmut renumbers a function's mutants when the function changes: an entry that no longer
    # names a survivor names another mutant, or none, and must be checked by hand.
    for name, reason in sorted(equivalent.items()):
        if _module(name) in by_module and statuses.get(name) != "survived":
            print(f"    stale entry ({statuses.get(name, 'no such mutant')}): {name}  ({reason})")
    if show:
        for name, status in sorted(statuses.items()):
            if status == "survived":
                reason = equivalent.get(name)
                print(f"    {name}" + (f"  (equivalent: {reason})" if reason else ""))


_SHOWN = {"mutants", "killed", "survived", "equivalent"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("groups", nargs="*", help=f"of {', '.join(GROUPS)}; all when none given")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--fresh", action="store_true", help="forget earlier results")
    parser.add_argument("--report", action="store_true", help="only print the stored results")
    parser.add_argument("--survivors", action="store_true", help="list each surviving mutant")
    args = parser.parse_args(argv)
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown group(s) {unknown}: expected some of {', '.join(GROUPS)}")
    import tomllib  # Python 3.11+, as mutmut 3 needs

    equivalent = tomllib.loads(EQUIVALENT.read_text()) if EQUIVALENT.exists() else {}
    reasons = {name: reason for table in equivalent.values() for name, reason in table.items()}
    rows = []
    for group in args.groups or list(GROUPS):
        work = _prepare(group, args.fresh)
        start = time.monotonic()
        if not args.report:
            # mutmut maps each function to the tests that call it once, and does not always map
            # tests written since: forget the map so that every run selects with today's tests.
            (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
            _mutmut(work, "run", "--max-children", str(args.max_children))
            # mutmut keeps a verdict until the mutated function changes; survivors (and mutants
            # no test reached) are retried by name so that tests written since get their chance.
            survivors = [
                n for n, status in _statuses(work).items() if status in ("survived", "no tests")
            ]
            if survivors and not args.fresh:
                _mutmut(work, "run", "--max-children", str(args.max_children), *survivors)
        rows.append((group, _statuses(work), time.monotonic() - start))
    print(
        f"{'group':9} {'module':40} {'mutants':>5} {'killed':>6} {'survived':>8} "
        f"{'equivalent':>10} {'survival':>8}"
    )
    for group, statuses, _ in rows:
        _report(group, statuses, reasons, args.survivors)
    if not args.report:
        print("wall time: " + ", ".join(f"{g} {s / 60:.1f} min" for g, _, s in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
