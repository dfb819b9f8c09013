import json
from pathlib import Path

import pytest
from imagegen import make_image_folder

from cdfsl.assets import find_recipe
from cdfsl.cli import build_parser, main
from recipes import RECIPES, command_of

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes/tiny/mind.yaml")


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_recipe_parses_with_its_command(recipe):
    command = command_of(recipe)
    parser, modules = build_parser()
    if command not in modules:
        pytest.skip(f"cdfsl {command} is not part of this checkout yet")
    args = ["--way", "3", "--shot", "2", "--steps", "7", "--episodes", "4"]
    cfg = parser.parse_args(
        [command, "--config", str(recipe), *(args if command == "eval" else [])]
    )
    if command == "eval":
        assert (cfg.eval.way, cfg.eval.shot, cfg.eval.steps, cfg.eval.episodes) == (3, 2, 7, 4)
        assert cfg.eval.method.class_path.startswith("cdfsl.methods.")


def test_spec_recipes_carry_the_papers_settings():
    cfg = build_parser()[0].parse_args(
        ["eval", "--config", str(ROOT / "recipes/clip-vit-b16/mind.yaml"), "--shot", "5"]
    )
    args = cfg.eval.method.init_args
    assert args.backbone == "clip-vit-b16"
    assert (args.lora.rank, args.lora.alpha, args.lora.dropout) == (16, 8.0, 0.25)
    assert (args.lr, args.weight_decay, args.svl_weight, args.ra_weight) == (2e-4, 1e-2, 0.1, 3.0)
    assert len(args.views) == 5
    assert (cfg.eval.way, cfg.eval.shot, cfg.eval.query, cfg.eval.episodes) == (5, 5, 15, 400)
    assert cfg.eval.steps_per_shot == 250


GPU_RECIPES = [
    f"{family}/{method}"
    for family in ("clip-vit-b16", "cdfsl", "pe-core-b16", "siglip-vit-b16")
    for method in ("mind", "lora-ce")
]


@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_paper_recipes_run_the_reference_entry_points_pipeline(recipe):
    """What the Mind reference's main.py runs: its episodic loader's squash framing (bilinear),
    nearest rotation, PIL jitter, one LoRA init for all episodes, fp16 autocast + GradScaler."""
    cfg = build_parser()[0].parse_args(["eval", "--config", recipe])
    args = cfg.eval.method.init_args
    assert (args.view_sampling, args.geometry, args.resize_interpolation) == (
        "per_episode", "squash", "bilinear",
    )  # fmt: skip
    assert (args.rotation_interpolation, args.color_jitter, args.lora_init) == (
        "nearest", "pil_uint8", "shared",
    )  # fmt: skip
    assert cfg.eval.precision == "16-mixed"
    if recipe.endswith("/mind"):
        assert args.support == "separate"
    text = find_recipe(recipe).read_text()
    assert "shared/" not in text and "specs" not in text  # users have no such folder


# The spec's protocol per CDFSL target and shot, written out: T = 250·K steps (125·K for
# ChestX, as the paper's code), 800 episodes at 1 shot and 400 at 5.
CDFSL_PROTOCOL = {
    (target, shot): (125 if target == "chestx" else 250, {1: 800, 5: 400}[shot])
    for target in ("chestx", "crop-disease", "eurosat", "isic2018")
    for shot in (1, 5)
}


@pytest.mark.parametrize("method", ["mind", "lora-ce"])
@pytest.mark.parametrize(("target", "shot"), sorted(CDFSL_PROTOCOL))
def test_one_cdfsl_recipe_per_method_gives_every_targets_settings(method, target, shot):
    """``cdfsl/mind`` with ``--data.source T --shot K`` is what its 8 copies per method were."""
    cfg = build_parser()[0].parse_args(
        ["eval", "--config", f"cdfsl/{method}", "--data.source", target, "--shot", str(shot)]
    )
    steps_per_shot, episodes = CDFSL_PROTOCOL[target, shot]
    assert (cfg.eval.steps_per_shot, cfg.eval.episodes) == (steps_per_shot, episodes)
    assert cfg.eval.output == f"runs/cdfsl/{target}/{method}-{shot}shot"
    assert cfg.eval.method.init_args.backbone == "clip-vit-b16"
    # An explicit flag still wins over the recipe's per-target value.
    cfg = build_parser()[0].parse_args(
        ["eval", "--config", f"cdfsl/{method}", "--data.source", target, "--steps_per_shot", "9"]
    )
    assert cfg.eval.steps_per_shot == 9


def test_a_shot_the_recipe_has_no_episode_count_for_is_one_line(capsys):
    code, _, err = run(capsys, "eval", "--config", "cdfsl/mind", "--shot", "3", "--print_config")
    assert code == 2
    assert err.strip() == (
        "cdfsl: error: the recipe's episodes has no value for 3 (it has one for 1, 5); "
        "give --episodes explicitly"
    )


def test_eval_on_any_folder_writes_rows_and_summary(capsys, tmp_path):
    folder = make_image_folder(tmp_path / "data", {"Cat": 7, "Dog": 7, "Bird": 7}, size=20)
    (folder / "Cat" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="notes.txt"):
        code, stdout, _ = run(
            capsys, "eval", "--config", TINY, "--data.root", str(folder), "--output", str(out),
            "--episodes", "2", "--steps", "2", "--progress", "false",
        )  # fmt: skip
    assert code == 0
    assert "| Mind | tiny-clip | data | 3 | 1 | 5 | 2 |" in stdout
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in rows] == [0, 1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["episodes_done"] == 2 and "ci95" in summary


@pytest.mark.parametrize(
    ("classes", "extra", "expected"),
    [
        ({"a": 7, "b": 7}, [], "way 3 but the dataset has 2 classes; lower --way"),
        ({"a": 7, "b": 7, "c": 3}, [], "--shot, --query or --way"),
        (None, [], "does not exist"),
    ],
)
def test_bad_input_is_one_line_nonzero_and_writes_nothing(
    capsys, tmp_path, classes, extra, expected
):
    root = tmp_path / "data"
    if classes is not None:
        make_image_folder(root, classes)
    out = tmp_path / "out"
    code, _, err = run(
        capsys, "eval", "--config", TINY, "--data.root", str(root), "--output", str(out), *extra
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cdfsl: error:") and expected in lines[0]
    assert not out.exists()


def test_corrupt_image_is_named(capsys, tmp_path):
    root = make_image_folder(tmp_path / "data", {"a": 6, "b": 6, "c": 6})
    for image in (root / "a").iterdir():
        image.write_bytes(b"not really an image")
    code, _, err = run(
        capsys, "eval", "--config", TINY, "--data.root", str(root), "--output", str(tmp_path / "o"),
        "--way", "3", "--progress", "false",
    )  # fmt: skip
    assert code == 2 and "a/a_" in err and err.count("\n") == 1


def test_fit_saves_adapters_that_load_back(capsys, tmp_path):
    root = make_image_folder(tmp_path / "data", {"a": 2, "b": 2})
    out = tmp_path / "fit"
    code, _, _ = run(
        capsys, "fit", "--config", TINY, "--data.root", str(root), "--output", str(out),
        "--steps", "2",
    )  # fmt: skip
    assert code == 0
    assert json.loads((out / "classes.json").read_text()) == ["a", "b"]
    from cdfsl.lora import LoRAConfig, load_lora
    from cdfsl.methods import Mind

    method = Mind(backbone="tiny-clip", pretrained=None, lora=LoRAConfig(rank=4, alpha=8.0))
    load_lora(method.backbone.lora_root(), out / "adapter.safetensors")


def test_backbones_lists_the_registry(capsys):
    code, out, _ = run(capsys, "backbones")
    assert code == 0
    lines = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert lines["tiny-clip"][-1] == "yes" and lines["tiny-clip"][-2] == "32"
    assert lines["clip-vit-b16"][-2] == "224"


def test_a_closed_pipe_ends_quietly(monkeypatch, capsys):
    """``cdfsl recipes | head``: the reader leaves early; no traceback, SIGPIPE's status."""

    class ClosedPipe:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            pass

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main(["recipes"]) == 141
    assert capsys.readouterr().err == ""


def test_top_level_help_speaks_to_users(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # help wraps to the terminal's width
    assert stop.value.code == 0
    assert "cdfsl demo" in out and "cdfsl recipes" in out and "--print_config" in out
    assert "cdfsl/commands" not in out and ":class:" not in out  # not the module layout


def test_a_new_few_shot_method_is_one_file_named_by_class_path(capsys, tmp_path, monkeypatch):
    """A method of one's own: a FewShotMethod subclass in one file, named in the recipe (or as a
    flag) by its class_path, evaluated end to end with every option of the base."""
    (tmp_path / "my_methods.py").write_text(
        "import torch.nn.functional as F\n"
        "from cdfsl.methods import LoRAFineTune\n\n\n"
        "class SmoothedCE(LoRAFineTune):\n"
        "    def loss_terms(self, feats, labels, view_ids, episode):\n"
        "        logits = self.scale * feats @ episode.text_feats.T\n"
        "        loss = F.cross_entropy(logits, labels, label_smoothing=0.1)\n"
        "        return {'loss': loss, 'smoothed_ce': loss}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = make_image_folder(tmp_path / "data", {"Cat": 6, "Dog": 6, "Bird": 6}, size=20)
    out = tmp_path / "out"
    code, stdout, _ = run(
        capsys, "eval", "--config", "tiny/lora-ce", "--method.class_path", "my_methods.SmoothedCE",
        "--data.root", str(folder), "--output", str(out), "--episodes", "2", "--steps", "2",
        "--progress", "false", "--precision", "32-true", "--accelerator", "cpu",
    )  # fmt: skip
    assert code == 0 and "| SmoothedCE |" in stdout
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in rows] == [0, 1]
    assert all("smoothed_ce" in r["terms"] for r in rows)
