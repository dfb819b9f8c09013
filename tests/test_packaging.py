"""The wheel carries the recipes and micro-clip, and an installed cdfsl finds them by name.

The wheel is built once per session (``pip wheel --no-build-isolation``, a few seconds) and
unpacked into a folder that stands in for site-packages, which is what ``pip install`` does with
a pure-Python wheel; ``.ci/run`` installs it for real into a separate venv and runs the demo.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cdfsl.assets import find_recipe, list_recipes, recipes_dir
from cdfsl.cli import main
from cdfsl.errors import CdfslError

ROOT = Path(__file__).resolve().parents[1]
MICRO_CLIP = ("MODEL_CARD.md", "open_clip_config.json", "open_clip_model.safetensors")


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("building the wheel needs setuptools in this environment")
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"pip could not build the wheel here: {done.stderr.strip()[-300:]}")
    (built,) = out.glob("cdfsl-*.whl")
    return built


@pytest.fixture(scope="session")
def site_packages(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site-packages")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    return target


def test_wheel_holds_every_recipe_and_micro_clip(wheel) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "recipes").rglob("*.yaml"))
    assert recipes
    for recipe in recipes:
        assert f"cdfsl/_shipped/{recipe}" in names
    for name in MICRO_CLIP:
        assert f"cdfsl/_shipped/assets/micro-clip/{name}" in names
    assert "cdfsl/commands/recipes.py" in names
    assert not any("__pycache__" in n or n.startswith(("tests/", "recipes/")) for n in names)


INSTALLED = """
import contextlib, io, json
import cdfsl
from jsonargparse import Namespace
from cdfsl.assets import assets_dir, find_recipe, list_recipes, recipes_dir
from cdfsl.commands import recipes
listing = io.StringIO()
with contextlib.redirect_stdout(listing):
    code = recipes.run(Namespace(name=None))
print(json.dumps({
    "package": cdfsl.__file__, "recipes": str(recipes_dir()), "assets": str(assets_dir()),
    "demo": str(find_recipe("micro/demo")), "names": list_recipes(),
    "listing": listing.getvalue().splitlines(), "code": code,
}))
"""


def test_an_installed_cdfsl_finds_its_files_from_any_directory(site_packages, tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("CDFSL_RECIPES", "CDFSL_ASSETS")}
    env.update(PYTHONPATH=str(site_packages), OMP_NUM_THREADS="1")
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", INSTALLED], cwd=empty, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    shipped = site_packages / "cdfsl" / "_shipped"
    assert found["package"] == str(site_packages / "cdfsl" / "__init__.py")
    assert found["recipes"] == str(shipped / "recipes")
    assert found["assets"] == str(shipped / "assets")
    assert found["demo"] == str(shipped / "recipes" / "micro" / "demo.yaml")
    assert found["names"] == list_recipes()  # the same recipes as the source tree
    assert found["code"] is None
    assert any(line.startswith("micro/demo ") for line in found["listing"])
    assert found["listing"][-1].startswith(f"{len(found['names'])} recipes in {shipped}")
    for name in MICRO_CLIP:
        assert (shipped / "assets" / "micro-clip" / name).is_file()
    assert not list(empty.iterdir())


def test_environment_variables_override_the_shipped_folders(monkeypatch, tmp_path) -> None:
    from cdfsl.assets import assets_dir

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "only.yaml").write_text("way: 3\n")
    monkeypatch.setenv("CDFSL_RECIPES", str(tmp_path))
    monkeypatch.setenv("CDFSL_ASSETS", str(tmp_path / "assets"))
    assert recipes_dir() == tmp_path
    assert assets_dir() == tmp_path / "assets"
    assert list_recipes() == ["mine/only"]
    assert find_recipe("mine/only") == tmp_path / "mine" / "only.yaml"


def test_a_recipe_is_found_by_name_with_or_without_suffix_or_by_path(tmp_path) -> None:
    demo = recipes_dir() / "micro" / "demo.yaml"
    assert find_recipe("micro/demo") == demo
    assert find_recipe("micro/demo.yaml") == demo
    assert find_recipe(str(demo)) == demo
    mine = tmp_path / "mine.yaml"
    mine.write_text("way: 3\n")
    assert find_recipe(mine) == mine
    assert {"micro/demo", "tiny/mind", "rail/micro", "rd_mldg/micro"} <= set(list_recipes())
    with pytest.raises(CdfslError, match=r"recipe 'micro/dem' is neither a file nor one of"):
        find_recipe("micro/dem")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("cdfsl: error: ")
    assert "\n" not in err
    return err


@pytest.mark.parametrize("command", ["eval", "demo", "rail", "reason", "fit"])
def test_an_unknown_recipe_name_is_one_error_line(capsys, command) -> None:
    with pytest.raises(SystemExit) as stop:
        main([command, "--config", "micro/no-such-recipe"])
    assert stop.value.code == 2
    assert "'micro/no-such-recipe'" in one_error_line(capsys)


def test_the_demo_without_a_recipe_or_methods_is_one_error_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("CDFSL_RECIPES", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--output", str(tmp_path / "run")]) == 2
    assert "does not exist" in one_error_line(capsys)
    monkeypatch.delenv("CDFSL_RECIPES")
    assert main(["demo", "--methods", "[]", "--output", str(tmp_path / "run")]) == 2
    assert "no methods to run" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_recipes_command_lists_names_and_prints_a_path(capsys) -> None:
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == list_recipes()
    assert main(["recipes", "tiny/mind"]) == 0
    assert capsys.readouterr().out.strip() == str(recipes_dir() / "tiny" / "mind.yaml")
    assert main(["recipes", "tiny/none"]) == 2
    one_error_line(capsys)


def test_a_recipe_name_feeds_the_parser_like_its_path() -> None:
    from cdfsl.cli import build_parser

    parser, _ = build_parser()
    by_name = parser.parse_args(["eval", "--config", "tiny/mind", "--data.root", "x"])
    by_path = parser.parse_args(
        ["eval", "--config", str(recipes_dir() / "tiny" / "mind.yaml"), "--data.root", "x"]
    )
    assert by_name.eval.method == by_path.eval.method
    assert json.dumps(by_name.eval.as_dict(), default=str) == json.dumps(
        by_path.eval.as_dict(), default=str
    )
