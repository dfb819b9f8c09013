"""Every CdfslError raised while a recipe is parsed or its objects are built is one line.

Each subcommand gets mistakes a user makes (a misspelt backbone, weights that are not local, bad
LoRA, view or data settings, a missing folder); each must print one ``cdfsl: error:`` line on
stderr and exit 2, not jsonargparse's wrapping of the error in a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from layouts import make_split_file_dataset

from cdfsl.backbones import weights_available
from cdfsl.backbones.registry import resolve_entry
from cdfsl.cli import cdfsl_error_in, main
from cdfsl.data.fsl import SPLIT_FILE_DATASETS
from cdfsl.errors import CdfslError, DataError, WeightsError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes/tiny/mind.yaml")
CLIP = str(ROOT / "recipes/clip-vit-b16/mind.yaml")
RAIL = str(ROOT / "recipes/rail/micro.yaml")
REASON = str(ROOT / "recipes/rd_mldg/micro.yaml")
PACS_REASON = str(ROOT / "recipes/rd_mldg/pacs.yaml")
PETS = next(row for row in SPLIT_FILE_DATASETS if row.name == "oxford-pets")
SMALL = ["--way", "3", "--shot", "1", "--query", "5", "--progress", "false"]
BAD_BACKBONE = ["--method.init_args.backbone", "clip-vit-b99"]


@pytest.fixture(scope="module")
def pets(tmp_path_factory) -> Path:
    return make_split_file_dataset(tmp_path_factory.mktemp("pets"), PETS, per_split=(5, 3, 2))


def one_error_line(capsys, args: list[str]) -> str:
    try:
        code = main(args)
    except SystemExit as stop:  # a --config that names no file or recipe ends the parse
        code = stop.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("cdfsl: error: "), err
    return lines[0]


# (subcommand, arguments after it, text the line must hold); {folder}, {pets} and {out} are
# filled in per test.
# fmt: off
CASES = [
    ("eval", ["--config", TINY, *BAD_BACKBONE], "unknown backbone 'clip-vit-b99'"),
    ("eval", ["--config", "tiny/nosuch"], "tiny/nosuch"),
    ("eval", ["--config", TINY, "--method.init_args.lora.rank", "0"], "LoRAConfig.rank=0"),
    (
        "eval", ["--config", TINY, "--precision", "16-true"],
        "precision='16-true': expected one of 32-true, 16-mixed, bf16-mixed",
    ),
    ("demo", ["--precision", "bf16-true"], "precision='bf16-true': expected one of"),
    ("eval", ["--config", TINY, "--method.init_args.lora.dropout", "1.5"], "LoRAConfig.dropout"),
    (
        "eval", ["--config", TINY, "--method.init_args.views", "[{name: a, rotation: -1}]"],
        "view 'a': rotation=-1",
    ),
    (
        "eval", ["--config", CLIP, "--method.init_args.views", "[{name: a, spin: 1}]"],
        "unknown key(s) ['spin']",
    ),
    ("eval", ["--config", TINY, "--data.options", "{bogus: 1}"], "unknown option(s) bogus"),
    ("eval", ["--config", TINY, "--data.source", "nosuch"], "unknown dataset source 'nosuch'"),
    ("fit", ["--config", TINY, *BAD_BACKBONE], "unknown backbone 'clip-vit-b99'"),
    ("fit", ["--config", TINY, "--method.init_args.lora.rank", "0"], "LoRAConfig.rank=0"),
    (
        "allway", ["--config", TINY, "--data.source", "oxford-pets", "--data.root", "{pets}",
                   *BAD_BACKBONE, "--shots", "[1]", "--seeds", "[1]"],
        "unknown backbone 'clip-vit-b99'",
    ),
    (
        "allway", ["--config", TINY, "--data.source", "oxford-pets", "--data.root", "{pets}",
                   "--data.options", "{bogus: 1}"],
        "unknown option(s) bogus",
    ),
    # Two ranks: the methods are built before any rank starts.
    (
        "demo", ["--backbones", "[clip-vit-b99]", "--workers", "2"],
        "method 'ZeroShot' on backbone clip-vit-b99: unknown backbone 'clip-vit-b99'",
    ),
    (
        "demo", ["--methods", "[{class_path: cdfsl.methods.Mind, init_args: {lora: {rank: 0}}}]",
                 "--reference", "null"],
        "method 'Mind' on backbone micro-clip: LoRAConfig.rank=0",
    ),
    ("rail", ["--config", RAIL, "--backbone", "clip-vit-b99"], "unknown backbone 'clip-vit-b99'"),
    ("rail", ["--config", RAIL, "--finetune.lora.rank", "0"], "LoRAConfig.rank=0"),
    ("reason", ["--config", REASON, "--model.vision", "clip-vit-b99"], "vision tower"),
    ("reason", ["--config", PACS_REASON, "--data.root", "{out}"], "does not exist"),
    ("data", ["check", "folder", "{folder}", "--options", "{bogus: 1}"], "unknown option(s)"),
    ("data", ["check", "nosuch", "{folder}"], "unknown dataset source 'nosuch'"),
    ("merge", ["{out}"], "found no shard files"),
]
# fmt: on


@pytest.mark.parametrize(
    ("command", "args", "expected"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_a_bad_recipe_is_one_line_and_exit_2(
    capsys, tmp_path, four_class_folder, pets, command, args, expected
):
    filled = {"folder": str(four_class_folder), "pets": str(pets), "out": str(tmp_path / "out")}
    args = [filled.get(a[1:-1], a) if a.startswith("{") else a for a in args]
    extra = []
    if command in ("eval", "fit"):
        extra = ["--data.root", str(four_class_folder), *SMALL]
    if command in ("eval", "fit", "allway", "demo", "rail", "reason"):
        extra += ["--output", str(tmp_path / "run")]
    line = one_error_line(capsys, [command, *args, *extra])
    assert expected in line
    assert not (tmp_path / "run" / "results.jsonl").exists()


def _offline_env(home: Path) -> dict[str, str]:
    """An environment in which no pretrained weights are local and none may be downloaded."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "CDFSL_ALLOW"))}
    return {
        **env, "HOME": str(home), "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }  # fmt: skip


def test_missing_weights_are_one_line_from_the_installed_command(tmp_path, four_class_folder):
    """A paper recipe (``pretrained: default``) without local weights, as a new user runs it."""
    result = subprocess.run(
        [
            sys.executable, "-m", "cdfsl.cli", "eval", "--config", CLIP,
            "--data.root", str(four_class_folder), *SMALL, "--output", str(tmp_path / "run"),
        ],
        capture_output=True, text=True, env=_offline_env(tmp_path / "home"), timeout=300,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("cdfsl: error: weights for 'ViT-B-16'"), lines


@pytest.mark.skipif(
    weights_available(resolve_entry("clip-vit-b16")), reason="ViT-B-16 weights are local"
)
def test_missing_weights_are_one_line_in_fit(capsys, tmp_path, four_class_folder):
    line = one_error_line(capsys, [
        "fit", "--config", CLIP, "--data.root", str(four_class_folder), *SMALL,
        "--output", str(tmp_path / "run"),
    ])  # fmt: skip
    assert line.startswith("cdfsl: error: weights for 'ViT-B-16' tag 'openai'")


def test_the_error_is_found_through_causes_and_contexts():
    inner = WeightsError("weights missing")
    try:
        try:
            raise inner
        except WeightsError as err:
            raise ValueError("Does not validate against any of the Union subtypes") from err
    except ValueError as wrapped:
        try:
            raise RuntimeError("while handling") from None
        except RuntimeError as outer:
            outer.__context__ = wrapped
            assert cdfsl_error_in(outer) is inner
    assert cdfsl_error_in(ValueError("plain")) is None
    assert cdfsl_error_in(None) is None
    own = DataError("x")
    assert cdfsl_error_in(own) is own and isinstance(own, CdfslError)


def test_other_errors_keep_their_traceback(monkeypatch):
    import cdfsl.commands.backbones as backbones

    def broken(cfg):
        raise RuntimeError("a bug, not a user mistake")

    monkeypatch.setattr(backbones, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["backbones"])


# fmt: off
PARSE_MISTAKES = [
    (["eval", "--config", TINY, "--method.init_args.bakbone", "x"], "'bakbone' is not accepted"),
    (["eval", "--config", TINY, "--method.class_path", "cdfsl.methods.Nope"], "'Nope'"),
    (["eval", "--config", TINY, "--wya", "3"], "unrecognized arguments: --wya 3"),
    (["eval", "--config", TINY, "--way", "abc"], 'Parser key "way"'),
    (["rail", "--config", RAIL, "--finetune.lora.rank", "abc"], "finetune.lora.rank"),
    (["demo", "--shots", "abc"], 'Parser key "shots"'),
    (["data", "frob"], "frob"),
    (["evl"], "invalid choice: 'evl'"),
]
# fmt: on


@pytest.mark.parametrize(("args", "expected"), PARSE_MISTAKES, ids=lambda a: str(a)[:40])
def test_a_command_line_jsonargparse_refuses_is_one_line_too(capsys, args, expected):
    """Misspelt keys and values of the wrong type: jsonargparse's reason, without the wall."""
    line = one_error_line(capsys, args)
    assert expected in line and line.endswith("--help lists the options")
    assert "Given value" not in line and "NoneType" not in line
