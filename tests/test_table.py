"""``cdfsl table``: a results grid's numbers, its md/csv/tex files, resume, shards and errors.

The numbers are checked against a derivation written here from the rows alone (mean, CI95 =
1.96·s/√n with the sample standard deviation, paired differences over common episodes); a
small real grid (micro-clip, ZeroShot and the frozen LinearProbe, two micro-world domains) is
run whole, killed twice and resumed, and as two shards merged: the same tables, byte for byte.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import statistics
import time
from pathlib import Path

import pytest
import yaml
from test_kill_resume import read_phase, spawn, wait

from cdfsl.cli import main
from cdfsl.fewshot.grid import Grid, GridCell
from cdfsl.fewshot.table import AVERAGE, csv_text, entries, latex, markdown

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "assets" / "micro-clip" / "open_clip_model.safetensors"
needs_micro_clip = pytest.mark.skipif(not SHIPPED.is_file(), reason="micro-clip not shipped")
Z = statistics.NormalDist().inv_cdf(0.975)
TABLES = ("results.md", "results.csv", "results.tex", "results.jsonl")


def ci95(values: list[float]) -> float:
    return Z * statistics.stdev(values) / math.sqrt(len(values))


# Rows by (target, method): episode -> accuracy; None is a failed episode (no accuracy).
ROWS = {
    ("t1", "A"): {0: 0.5, 1: 0.6, 2: 0.4, 3: 0.8, 4: 0.0},  # episode 4: beyond the count
    ("t1", "B"): {0: 0.6, 1: 0.4, 2: 0.7, 3: None},  # 3 failed: out of its mean and the pairs
    ("t1", "C_x"): {0: 0.7, 1: 0.8, 2: 0.6, 3: 1.0},  # A + 0.2 on every episode
    ("t2", "A"): {0: 0.5, 1: 0.5, 2: 0.5, 3: None},  # 3 failed: B and C_x pair over 0-2
    ("t2", "B"): {0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5},  # ties A: both best, B - A is 0 ± 0, no †
    ("t2", "C_x"): {0: 0.2, 1: 0.3, 2: 0.4, 3: 0.1},
}
METHODS, TARGETS = ["A", "B", "C_x"], ["t1", "t2"]


def hand_cells(tmp_path: Path) -> list[GridCell]:
    cells = []
    for method in METHODS:
        for target in TARGETS:
            folder = tmp_path / target / method
            folder.mkdir(parents=True)
            lines = [
                {"episode": e, "status": "ok", "accuracy": a}
                if a is not None
                else {"episode": e, "status": "failed", "failure": {"step": 1, "term": "ce"}}
                for e, a in ROWS[target, method].items()
            ]
            (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
            cells.append(GridCell("bb", target, 1, method, 4, folder))
    return cells


def expected() -> dict[tuple[str, str], dict]:
    """Every entry derived by hand: accuracy, ci95, delta, delta_ci95, significant, best."""
    out: dict[tuple[str, str], dict] = {}
    for (target, method), rows in ROWS.items():
        ok = {e: a for e, a in rows.items() if a is not None and e < 4}
        entry = {"accuracy": statistics.mean(ok.values()), "ci95": ci95(list(ok.values()))}
        if method != "A":
            base = {e: a for e, a in ROWS[target, "A"].items() if a is not None and e < 4}
            diffs = [ok[e] - base[e] for e in sorted(set(ok) & set(base))]
            entry |= {"delta": statistics.mean(diffs), "delta_ci95": ci95(diffs)}
        out[target, method] = entry
    for method in METHODS:
        row = [out[t, method] for t in TARGETS]
        out[AVERAGE, method] = {
            "accuracy": sum(e["accuracy"] for e in row) / 2,
            "ci95": math.sqrt(sum(e["ci95"] ** 2 for e in row)) / 2,
        }
        if method != "A":
            out[AVERAGE, method] |= {
                "delta": sum(e["delta"] for e in row) / 2,
                "delta_ci95": math.sqrt(sum(e["delta_ci95"] ** 2 for e in row)) / 2,
            }
    return out


def test_table_numbers_match_a_derivation_by_hand(tmp_path):
    found = {(e.target, e.method): e for e in entries(hand_cells(tmp_path), "A")}
    want = expected()
    assert set(found) == set(want)
    for key, w in want.items():
        e = found[key]
        assert e.accuracy == pytest.approx(w["accuracy"], abs=1e-9), key
        assert e.ci95 == pytest.approx(w["ci95"], abs=1e-9), key
        if "delta" in w:
            assert e.delta == pytest.approx(w["delta"], abs=1e-9), key
            assert e.delta_ci95 == pytest.approx(w["delta_ci95"], abs=1e-9), key
        else:
            assert e.delta is None, key
    assert found["t1", "B"].episodes == 3 and found["t1", "B"].pairs == 3
    assert found["t2", "C_x"].episodes == 4 and found["t2", "C_x"].pairs == 3
    assert found["t1", "A"].episodes == 4  # the row beyond the episode count is not counted
    # The dagger: only where |delta| > its CI95.
    significant = {k for k, e in found.items() if e.significant}
    assert significant == {
        k for k, w in want.items() if "delta" in w and abs(w["delta"]) > w["delta_ci95"]
    }
    assert significant == {("t1", "C_x"), ("t2", "C_x")}
    # Best per column, ties at the two decimals shown all marked.
    best = {k for k, e in found.items() if e.best}
    assert best == {("t1", "C_x"), ("t2", "A"), ("t2", "B"), (AVERAGE, "A")}


def _pm(entry: dict, best: bool = False, dagger: bool = False) -> str:
    text = f"{100 * entry['accuracy']:.2f} ± {100 * entry['ci95']:.2f}"
    return (f"**{text}**" if best else text) + ("†" if dagger else "")


def _delta(entry: dict, dagger: bool) -> str:
    return f"{100 * entry['delta']:+.2f} ± {100 * entry['delta_ci95']:.2f}" + "†" * dagger


def test_markdown_csv_and_latex_show_the_entries(tmp_path):
    found = entries(hand_cells(tmp_path), "A")
    w = expected()
    md = markdown(found, "A")
    accuracy_table, _, paired_table = md.partition("Paired over the same episodes")
    lines = [line for line in accuracy_table.splitlines() if line]
    assert lines[:2] == ["| shot | method | t1 | t2 | average |", "|---|---|---|---|---|"]
    assert lines[2:] == [
        f"| 1 | A | {_pm(w['t1', 'A'])} | {_pm(w['t2', 'A'], best=True)} | "
        f"{_pm(w[AVERAGE, 'A'], best=True)} |",
        f"| 1 | B | {_pm(w['t1', 'B'])} | {_pm(w['t2', 'B'], best=True)} | "
        f"{_pm(w[AVERAGE, 'B'])} |",
        f"| 1 | C_x | {_pm(w['t1', 'C_x'], True, True)} | {_pm(w['t2', 'C_x'], dagger=True)} | "
        f"{_pm(w[AVERAGE, 'C_x'])} |",
    ]
    assert "| 1 | A | 57.50 ± " in lines[2] and "| **50.00 ± 0.00** |" in lines[3]  # the tie
    diffs = [line for line in paired_table.splitlines() if line.startswith("| 1 |")]
    assert diffs == [
        f"| 1 | B - A | {_delta(w['t1', 'B'], False)} | {_delta(w['t2', 'B'], False)} | "
        f"{_delta(w[AVERAGE, 'B'], False)} |",
        f"| 1 | C_x - A | {_delta(w['t1', 'C_x'], True)} | {_delta(w['t2', 'C_x'], True)} | "
        f"{_delta(w[AVERAGE, 'C_x'], False)} |",
    ]
    assert diffs[1].startswith("| 1 | C_x - A | +20.00 ± 0.00† | -20.00 ± 11.32† |")

    rows = list(csv.DictReader(io.StringIO(csv_text(found, "A"))))
    assert [(r["target"], r["method"]) for r in rows] == [
        *((t, m) for m in METHODS for t in TARGETS),
        *((AVERAGE, m) for m in METHODS),
    ]
    by_key = {(r["target"], r["method"]): r for r in rows}
    assert float(by_key["t2", "C_x"]["delta"]) == pytest.approx(w["t2", "C_x"]["delta"])
    assert by_key["t2", "C_x"]["significant"] == "True" and by_key["t2", "C_x"]["reference"] == "A"
    assert by_key["t1", "A"]["delta"] == "" and by_key["t1", "A"]["reference"] == ""
    assert by_key["t2", "B"]["best"] == by_key["t2", "A"]["best"] == "True"

    tex = latex(found, "A")
    assert tex.count(r"\begin{tabular}{llccc}") == 2 and tex.count(r"\end{tabular}") == 2
    for rule, count in ((r"\toprule", 2), (r"\midrule", 2), (r"\bottomrule", 2)):
        assert tex.count(rule) == count, rule
    assert r"Shot & Method & t1 & t2 & Average \\" in tex
    c1 = w["t1", "C_x"]
    assert (
        rf"1 & C\_x & \textbf{{{100 * c1['accuracy']:.2f}}} $\pm$ {100 * c1['ci95']:.2f}$^\dagger$"
        in tex
    )
    assert r"1 & B & " in tex and r"\textbf{50.00} $\pm$ 0.00 & " in tex
    assert tex.count(r"\textbf{") == 4 and tex.count(r"$^\dagger$") == 4  # 2 means, 2 deltas
    assert r"1 & C\_x - A & $+20.00$ $\pm$ 0.00$^\dagger$ & $-20.00$ $\pm$ 11.32$^\dagger$" in tex


def test_best_marks_every_mean_tied_at_the_two_decimals_shown():
    from cdfsl.fewshot.table import Entry, mark_best

    means = {"A": 0.5, "B": 0.500004, "C": 0.49996, "D": 0.4999}  # 50.00, 50.00, 50.00, 49.99
    marked = mark_best([Entry("bb", 1, m, "t", a, 0.0, 4) for m, a in means.items()])
    assert [e.best for e in marked] == [True, True, True, False]


def test_a_cell_without_rows_shows_a_dash_and_no_average(tmp_path):
    cells = hand_cells(tmp_path)
    (cells[0].folder / "results.jsonl").unlink()  # A on t1: a partial merge
    found = {(e.target, e.method): e for e in entries(cells, "A")}
    assert not found["t1", "A"].found and not found[AVERAGE, "A"].found
    assert found["t1", "B"].delta is None and not found["t1", "A"].best
    md = markdown(list(found.values()), "A")
    assert "| 1 | A | – | **50.00 ± 0.00** | – |" in md
    assert "| 1 | B - A | – | +0.00 ± 0.00 | – |" in md  # zero ± zero: no dagger
    assert "nan" not in md and "nan" not in latex(list(found.values()), "A")


# A small real grid: two micro-world domains, ZeroShot and the frozen-feature LinearProbe.
GRID = {
    "backbones": ["micro-clip"], "domains": ["isic-like", "chestx-like"], "images_per_class": 8,
    "shots": [1], "way": 3, "query": 4, "episodes": 4, "precision": "32-true",
    "accelerator": "cpu", "progress": False, "reference": "ZeroShot",
    "methods": [{"class_path": "cdfsl.methods.ZeroShot"},
                {"class_path": "cdfsl.methods.LinearProbe"}],
}  # fmt: skip


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    """The recipe, and the tables of one uninterrupted run of it (by file name)."""
    root = tmp_path_factory.mktemp("grid")
    before = os.environ.get("CDFSL_FEATURE_CACHE")
    os.environ["CDFSL_FEATURE_CACHE"] = str(root / "cache")  # forked children inherit it
    recipe = root / "grid.yaml"
    recipe.write_text(yaml.safe_dump(GRID))
    out = root / "whole"
    assert main(["table", "--config", str(recipe), "--output", str(out)]) == 0
    yield recipe, {name: (out / name).read_bytes() for name in TABLES}
    if before is None:
        os.environ.pop("CDFSL_FEATURE_CACHE")
    else:
        os.environ["CDFSL_FEATURE_CACHE"] = before


def _tables(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in TABLES}


@needs_micro_clip
def test_the_real_grid_tables_hold_both_methods_and_their_paired_difference(grid_run, capsys):
    _, whole = grid_run
    md = whole["results.md"].decode()
    assert md.startswith("3-way, 4 queries, seed 0, episodes per cell 1-shot 4; backbone micro")
    assert "| shot | method | isic-like | chestx-like | average |" in md
    assert "| 1 | ZeroShot |" in md and "| 1 | LinearProbe - ZeroShot |" in md
    rows = list(csv.DictReader(io.StringIO(whole["results.csv"].decode())))
    assert len(rows) == 6 and {r["episodes"] for r in rows if r["target"] != AVERAGE} == {"4"}
    assert {r["pairs"] for r in rows if r["method"] == "LinearProbe"} == {"4"}
    capsys.readouterr()


@needs_micro_clip
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_grid_killed_twice_and_resumed_writes_the_same_tables(grid_run, tmp_path, capsys):
    recipe, whole = grid_run
    out = tmp_path / "killed"
    args = ["table", "--config", str(recipe), "--output", str(out)]
    phase, log = tmp_path / "phase", tmp_path / "children.log"
    first = out / "micro-clip" / "isic-like" / "1shot" / "ZeroShot" / "results.jsonl"
    # Inside the second row write of the first cell (ZeroShot, isic-like), then inside the
    # ninth row write of the resumed run: the first frozen-feature cell's second episode.
    for moment in ("row write:2", "row write:9"):
        pid = spawn(args, phase, log, 0.05)
        deadline = time.monotonic() + 120
        while read_phase(phase) != moment:
            assert os.waitpid(pid, os.WNOHANG) == (0, 0), f"ended early: {log.read_text()}"
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.002)
        os.kill(pid, signal.SIGKILL)
        assert wait(pid) == -signal.SIGKILL
        if moment == "row write:2":  # one whole row and half of the next on disk
            data = first.read_bytes()
            assert data.count(b"\n") == 1 and not data.endswith(b"\n")
        assert not (out / "results.md").exists()
    linear = out / "micro-clip" / "isic-like" / "1shot" / "LinearProbe" / "results.jsonl"
    assert linear.read_bytes().count(b"\n") == 1  # killed inside its second row
    assert main(args) == 0
    assert _tables(out) == whole
    capsys.readouterr()


@needs_micro_clip
def test_two_shards_merged_write_the_tables_of_one_run(grid_run, tmp_path, capsys):
    recipe, whole = grid_run
    out = tmp_path / "sharded"
    args = ["table", "--config", str(recipe), "--output", str(out)]
    assert main([*args, "--shard", "0/2", "--progress", "true"]) == 0
    captured = capsys.readouterr()
    assert "once all 2 shards are done: cdfsl merge" in captured.out
    # One bar for the whole grid: its 4 cells, 2 of each cell's 4 episodes.
    assert "4 cells on shard 0/2" in captured.err and "8/8" in captured.err
    assert not (out / "results.md").exists()
    assert main(["merge", str(out)]) == 2  # shard 1/2 has not run
    err = capsys.readouterr().err
    assert "4 of 4 cells" in err and "lacks 1, 3" in err and "--allow_partial" in err
    assert main([*args, "--shard", "1/2"]) == 0
    assert main(["merge", str(out)]) == 0
    assert _tables(out) == whole
    assert not list(out.rglob("shards"))
    assert main(["merge", str(out)]) == 0  # merged already: the same tables again
    assert _tables(out) == whole
    capsys.readouterr()


def test_print_config_of_the_paper_grid_shows_the_whole_grid(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["table", "--config", "cdfsl/table", "--print_config"])
    assert stop.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert [m["class_path"].rsplit(".", 1)[-1] for m in printed["methods"]] == [
        "ZeroShot", "LoRAFineTune", "Mind", "LinearProbe", "ZeroShotLinearProbe", "TipAdapter",
        "TipAdapterF", "LPPlusPlus", "CLAP",
    ]  # fmt: skip
    targets = {t["name"]: t for t in printed["targets"]}
    assert list(targets) == ["crop-disease", "eurosat", "isic2018", "chestx"]
    assert {t["source"] for t in targets.values()} == set(targets)
    assert targets["chestx"]["steps_per_shot"] == 125 and printed["steps_per_shot"] == 250
    assert printed["shots"] == [1, 5] and printed["backbones"] == ["clip-vit-b16"]
    assert {int(k): v for k, v in printed["episodes"].items()} == {1: 800, 5: 400}
    assert printed["reference"] == "LoRAFineTune" and printed["way"] == 5
    assert printed["query"] == 15


ZS = "{class_path: cdfsl.methods.ZeroShot}"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--reference", "Nope"], "reference 'Nope' is not one of the methods"),
        (["--methods", f"[{ZS}, {ZS}]"], "name ZeroShot more than once"),
        (["--shots", "[1, 5]", "--episodes", "{1: 4}"], "has no count for shot(s) [5]"),
        (["--methods", "[{class_path: cdfsl.methods.ZeroShot, init_arg: {}}]"], "keys init_arg"),
        (["--roots", "{nowhere: /x}"], "roots names nowhere, which no target is"),
        (["--targets", "[{name: t, source: folder}]"], "both targets (1) and domains"),
        (["--targets", "[{name: t, source: folder}]", "--domains", "null"], "'t' (source folder)"),
        (["--domains", "[mars-like]"], "['mars-like'] are not micro-world domains"),
        (
            ["--targets", "[{name: t, source: nosuch, root: /x}]", "--domains", "null"],
            "target 't' has source 'nosuch'; expected one of ",
        ),
        (["--shard", "2/2"], "shard 2/2; expected K/N with 0 <= K < N"),
        (  # fails only when built: every method is built once before anything is written
            [
                "--backbones",
                "[tiny-clip]",
                "--methods",
                f"[{ZS}, {{class_path: cdfsl.methods.LinearProbe, init_args: {{c: -1}}}}]",
            ],
            "method 'LinearProbe' on backbone tiny-clip: c=-1",
        ),
    ],
    ids=[
        "reference",
        "duplicate",
        "episodes",
        "spec",
        "roots",
        "both",
        "root",
        "domain",
        "source",
        "shard",
        "build",
    ],
)
def test_bad_input_is_one_line_naming_the_key_and_the_fix(capsys, tmp_path, flags, message):
    recipe = tmp_path / "grid.yaml"
    recipe.write_text(yaml.safe_dump(GRID))
    out = tmp_path / "out"
    assert main(["table", "--config", str(recipe), *flags, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cdfsl: error: ") and err.count("\n") == 1, err
    assert message in err and "fix" in err, err
    assert not out.exists()


def test_named_rows_let_one_class_appear_twice(tmp_path):
    from cdfsl.engine import FitConfig
    from cdfsl.fewshot.grid import Target

    probe = "cdfsl.methods.LinearProbe"
    specs = ({"class_path": probe, "name": "LP"},
             {"class_path": probe, "name": "LP-C1", "init_args": {"c": 1.0}})  # fmt: skip
    target = Target("t", "micro", options={"domain": "isic-like"})
    grid = Grid(
        specs, (target,), (1,), ("tiny-clip",), {1: 2}, FitConfig(), tmp_path, reference="LP"
    )
    assert grid.names == ["LP", "LP-C1"]
    assert [c.folder.name for c in grid.cells()] == ["LP", "LP-C1"]
