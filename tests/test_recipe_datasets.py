"""Every recipe under recipes/ builds every dataset it names, on miniature replicas.

Parsing a recipe is not enough: ``order-i.yaml`` once named the ``eurosat`` layout (one split,
``all``) for a train/test domain and failed at the fourth domain of a real run. Here each
recipe goes through its own command's parser and then through the same code the command builds
its data with (``cdfsl eval``: ``_run_args.dataset``; ``cdfsl rail``: ``xtail.domain_splits``;
``cdfsl reason``: ``build_fold`` of every fold; ``cdfsl table`` and ``cdfsl demo``:
``grid.target_dataset`` of every target), with ``--data.root`` / ``--data_root`` / ``--roots``
pointed at replicas of the real layouts (``tests/layouts.py``, ``tests/imagegen.py``). A wrong
source, split, option or domain name fails here.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from imagegen import make_image_folder
from layouts import (
    make_chestx,
    make_crop_disease,
    make_domainbed,
    make_eurosat,
    make_fgvc_aircraft,
    make_isic2018,
    make_split_file_dataset,
)

from cdfsl.cli import build_parser
from cdfsl.data.domainbed import DOMAINBED_DATASETS
from cdfsl.data.fsl import SPLIT_FILE_DATASETS
from cdfsl.errors import DataError
from recipes import RECIPES, command_of

ROOT = Path(__file__).resolve().parents[1]


def write_mnist(root: Path, per_digit: int = 2) -> Path:
    """MNIST's four IDX files in ``root/mnist``: ``per_digit`` 28x28 images of each digit."""
    folder = root / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    labels = (np.arange(10 * per_digit) % 10).astype(np.uint8)
    images = (np.arange(labels.size * 28 * 28).reshape(-1, 28, 28) * 7 % 251).astype(np.uint8)
    for prefix in ("train", "t10k"):
        for name, magic, array in (("images-idx3-ubyte", 0x803, images),
                                   ("labels-idx1-ubyte", 0x801, labels)):  # fmt: skip
            sizes = b"".join(struct.pack(">I", n) for n in array.shape)
            (folder / f"{prefix}-{name}").write_bytes(
                struct.pack(">I", magic) + sizes + array.tobytes()
            )
    return root


def _coop_root(root: Path) -> Path:
    """One data root holding every CoOp dataset, FGVC-Aircraft and MNIST (X-TAIL Order-I)."""
    for row in SPLIT_FILE_DATASETS:
        make_split_file_dataset(root, row, per_split=(2, 1, 1))
    make_fgvc_aircraft(root, per_split=1)
    return write_mnist(root)


REPLICAS: dict[str, Callable[[Path], Path]] = {
    "folder": lambda root: make_image_folder(root, {"red_fox": 2, "blue_jay": 2, "oak": 2}, 8),
    "eurosat": make_eurosat,
    "isic2018": make_isic2018,
    "crop-disease": make_crop_disease,
    "chestx": make_chestx,
    "coop": _coop_root,
    **{
        d.name: (lambda root, d=d: make_domainbed(root, d, per_class=1)) for d in DOMAINBED_DATASETS
    },
}
"""A replica builder per ``--data.root`` the recipes need: root -> the folder to pass."""


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> Callable[[str], Path]:
    """``replica(name)``: the data root of replica ``name``, written once per module."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = REPLICAS[name](tmp_path_factory.mktemp(name.replace("-", "_")))
        return built[name]

    return get


@functools.cache
def _parser():
    return build_parser()[0]


def _parse(command: str, recipe: Path, *flags: str):
    return _parser().parse_args([command, "--config", str(recipe), *flags])[command]


def _readable(dataset) -> None:
    """The dataset has images and its first and last ones load."""
    assert len(dataset) > 0 and len(dataset.class_names) >= 2
    for i in (0, len(dataset) - 1):
        assert dataset.load(i).size[0] > 0


def _build_eval(recipe: Path, replica, *flags: str) -> None:
    from cdfsl.commands import _run_args
    from cdfsl.data.layout import prompt_template

    cfg = _parse("eval", recipe, *flags)
    if cfg.data.source != "micro":  # the micro world is generated, it has no root
        cfg.data.root = str(replica(cfg.data.source))  # as --data.root
    _, dataset = _run_args.dataset(cfg)
    _readable(dataset)
    assert "{}" in prompt_template(cfg.method.init_args.template, dataset)


def _build_rail(recipe: Path, replica) -> None:
    from cdfsl.commands.rail import config_from
    from cdfsl.continual.xtail import domain_splits

    config = config_from(_parse("rail", recipe, "--data_root", str(replica("coop"))))
    splits = domain_splits(config)
    assert [s.name for s in splits] == [d.name for d in config.domains]
    for split in splits:
        _readable(split.train)
        _readable(split.test)


def _build_reason(recipe: Path, replica) -> None:
    from cdfsl.commands.reason import config_from
    from cdfsl.reasoning.experiment import build_fold, dataset_domains

    cfg = _parse("reason", recipe)
    if cfg.data.kind == "domainbed":
        cfg.data.root = str(replica(cfg.data.dataset))  # as --data.root
    config = config_from(cfg)
    domains = config.held_out or dataset_domains(config.data)
    for domain in domains:
        fold = build_fold(config.data, domain)
        _readable(fold.train)
        _readable(fold.test)


def _build_table(recipe: Path, replica, command: str = "table") -> None:
    # As cdfsl.fewshot.grid builds a cell's data: each target's dataset, a replica of its
    # layout as its root (the micro world is generated, it has no root).
    from cdfsl.commands import _table_args
    from cdfsl.data.layout import check_episode_supply, prompt_template
    from cdfsl.fewshot.grid import target_dataset

    cfg = _parse(command, recipe)
    targets = _table_args.targets(cfg)
    roots = {t.name: str(replica(t.source)) for t in targets if t.source != "micro"}
    cfg.roots = roots
    grid = _table_args.grid(cfg)
    assert [t.name for t in grid.targets] == [t.name for t in targets]
    for target in grid.targets:
        assert target.root == roots.get(target.name, target.root)
        dataset = target_dataset(target)
        _readable(dataset)
        for spec in grid.methods:
            template = spec.get("init_args", {}).get("template", "a photo of a {}.")
            assert "{}" in prompt_template(template, dataset)
        if target.source == "micro":  # generated at full size: the recipe's episodes fit
            assert check_episode_supply(dataset, grid.way, max(grid.shots), grid.query) == []


BUILDERS = {
    "eval": _build_eval, "rail": _build_rail, "reason": _build_reason, "table": _build_table,
    "demo": functools.partial(_build_table, command="demo"),
}  # fmt: skip


def test_every_recipe_names_a_command_that_builds_its_data():
    assert {command_of(p) for p in RECIPES} <= set(BUILDERS)
    assert len(RECIPES) > 15  # the glob found the recipes


@pytest.mark.parametrize(
    "recipe", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES]
)
def test_recipe_builds_every_dataset_it_names(recipe, replica):
    BUILDERS[command_of(recipe)](recipe, replica)


@pytest.mark.parametrize("target", ["chestx", "crop-disease", "eurosat", "isic2018"])
@pytest.mark.parametrize("method", ["mind", "lora-ce"])
def test_cdfsl_recipes_build_each_target(method, target, replica):
    # One recipe per method serves the four targets through --data.source.
    _build_eval(ROOT / f"recipes/cdfsl/{method}.yaml", replica, "--data.source", target)


def test_a_recipe_naming_a_one_split_layout_for_a_split_fails(tmp_path, replica):
    # The bug this file guards against: Order-I's EuroSAT from the `eurosat` layout.
    recipe = (ROOT / "recipes/rail/order-i.yaml").read_text()
    broken = tmp_path / "order-i.yaml"
    broken.write_text(recipe.replace("source: eurosat-fsl", "source: eurosat"))
    with pytest.raises(DataError, match="eurosat"):
        _build_rail(broken, replica)
