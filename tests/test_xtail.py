"""X-TAIL: metrics on hand-written matrices, the runner end to end, resume after a kill, CLI."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from cdfsl.backbones.base import Preprocess
from cdfsl.cli import build_parser, main
from cdfsl.commands.rail import config_from
from cdfsl.continual import xtail
from cdfsl.continual.rail import PrimalRegressor
from cdfsl.continual.xtail import (
    DomainConfig,
    FineTuneConfig,
    FramedImages,
    PrimalConfig,
    XTailConfig,
    XTailRun,
    few_shot_indices,
    xtail_metrics,
)
from cdfsl.data.episodes import UniformDraws
from cdfsl.errors import CdfslError
from cdfsl.lora import LoRAConfig

ROOT = Path(__file__).resolve().parents[1]

# a[t][k]: row t = after learning domain t, column k = domain tested.
HAND = [
    [0.50, 0.20, 0.10],
    [0.40, 0.80, 0.50],
    [0.30, 0.70, 0.90],
]


def test_metrics_on_a_hand_written_matrix():
    m = xtail_metrics(HAND)
    # Transfer: column 2 -> a[0][1] = 0.2; column 3 -> mean(a[0][2], a[1][2]) = 0.3
    assert m["transfer"] == pytest.approx((0.2 + 0.3) / 2)
    # Average: column means 0.4, 1.7/3, 0.5
    assert m["average"] == pytest.approx((0.4 + 1.7 / 3 + 0.5) / 3)
    assert m["last"] == pytest.approx((0.3 + 0.7 + 0.9) / 3)


def test_transfer_reads_only_entries_above_the_diagonal():
    base = xtail_metrics(HAND)["transfer"]
    for t, k in ((0, 0), (1, 1), (2, 2), (1, 0), (2, 0), (2, 1)):  # diagonal and below
        changed = np.array(HAND)
        changed[t, k] = 0.0
        assert xtail_metrics(changed)["transfer"] == pytest.approx(base)
    for t, k in ((0, 1), (0, 2), (1, 2)):  # above
        changed = np.array(HAND)
        changed[t, k] += 0.3
        assert xtail_metrics(changed)["transfer"] != pytest.approx(base)


def test_metrics_of_one_domain_and_bad_shapes():
    m = xtail_metrics([[0.7]])
    assert math.isnan(m["transfer"]) and m["average"] == m["last"] == pytest.approx(0.7)
    with pytest.raises(CdfslError, match=r"expected \(K, K\)"):
        xtail_metrics([[0.1, 0.2]])


def test_few_shot_indices_are_seeded_per_class_and_draw_small_classes_with_replacement():
    targets = [0] * 10 + [1] * 3 + [2] * 8
    picked = few_shot_indices(targets, 4, seed=3)
    assert np.bincount([targets[i] for i in picked]).tolist() == [4, 4, 4]
    assert picked == sorted(picked)
    # Four draws from class 1's three images must repeat one (pigeonhole); the others are
    # drawn without replacement.
    assert len(set(i for i in picked if targets[i] == 1)) < 4
    assert len(set(i for i in picked if targets[i] != 1)) == 8
    assert picked == few_shot_indices(targets, 4, seed=3) != few_shot_indices(targets, 4, seed=4)
    assert few_shot_indices(targets, None, 0) == list(range(21))
    # Pinned: the draws come from PCG64's raw stream, stable across numpy versions.
    assert picked == [0, 2, 6, 8, 10, 10, 11, 11, 15, 16, 18, 20]


def test_keep_all_keeps_small_classes_whole():
    targets = [0] * 10 + [1] * 3 + [2] * 8
    picked = few_shot_indices(targets, 4, seed=3, small_classes="keep_all")
    assert np.bincount([targets[i] for i in picked]).tolist() == [4, 3, 4]
    assert [i for i in picked if targets[i] == 1] == [10, 11, 12]
    with pytest.raises(CdfslError, match=r"small_classes='twice': expected one of"):
        few_shot_indices(targets, 4, 0, small_classes="twice")


def test_shot_draws_are_uniform_as_random_sample_and_random_choices():
    # The reference: random.sample(items, 4) (each of 10 items in with probability 4/10) and
    # random.choices(items, k=4) (each draw any of 3 items with probability 1/3).
    targets = [0] * 10 + [1] * 3
    seeds = 3000
    inclusion, draws = np.zeros(10), np.zeros(3)
    for seed in range(seeds):
        picked = few_shot_indices(targets, 4, seed)
        inclusion += np.bincount([i for i in picked if i < 10], minlength=10)
        draws += np.bincount([i - 10 for i in picked if i >= 10], minlength=3)
    assert inclusion.max() <= 1 * seeds and draws.sum() == 4 * seeds
    p, n = 0.4, seeds  # five binomial standard errors
    assert np.abs(inclusion / n - p).max() < 5 * (p * (1 - p) / n) ** 0.5
    p, n = 1 / 3, 4 * seeds
    assert np.abs(draws / n - p).max() < 5 * (p * (1 - p) / n) ** 0.5


# -- class names and framing: the reference's defaults ---------------------------------------
def test_defaults_are_the_references_choices():
    cfg = XTailConfig()
    assert (cfg.small_classes, cfg.class_name_style) == ("with_replacement", "rail_reference")
    assert (cfg.train_preprocess, tuple(cfg.train_crop_scale), cfg.test_preprocess) == (
        "random_resized_crop", (0.9, 1.0), "short_side_crop",
    )  # fmt: skip
    assert cfg.primal.random_init == "uniform_fan_in"


def test_reference_class_names_for_mnist_and_eurosat():
    from torchvision.datasets import MNIST

    digits = [str(d) for d in range(10)]
    # primal_RAIL.py prompts "a photo of a {}." over torchvision's MNIST classes wrapped as
    # 'number: "{}"' (scenario_datasets/collections.py).
    expected = ['number: "' + name + '"' for name in MNIST.classes]
    assert xtail.prompt_names("rail_reference", {"source": "mnist"}, digits) == expected
    assert expected[0] == 'number: "0 - zero"'
    eurosat = ["Annual Crop Land", "Sea or Lake"]
    assert xtail.prompt_names("rail_reference", {"source": "eurosat-fsl"}, eurosat) == [
        "Annual Crop Land satellite location", "Sea or Lake satellite location",
    ]  # fmt: skip
    assert xtail.prompt_names("rail_reference", {"source": "dtd"}, ["banded"]) == ["banded"]
    assert xtail.prompt_names("dataset", {"source": "mnist"}, digits) == digits
    with pytest.raises(CdfslError, match="class_name_style='fancy'"):
        xtail.prompt_names("fancy", {}, digits)


def _preprocess(size: int) -> Preprocess:
    return Preprocess((size, size), (0.5,) * 3, (0.5,) * 3, "bicubic")


def _striped(width: int, height: int) -> Image.Image:
    """Column x holds grey level 8·x: a crop's columns say where it came from."""
    row = (8 * np.arange(width)).astype(np.uint8)
    return Image.fromarray(np.repeat(np.tile(row, (height, 1))[..., None], 3, axis=2))


def test_test_images_are_framed_as_clip_preprocess_short_side_then_centre_crop():
    # 30 x 10 to 10 x 10: the short side is already 10, so no resampling: the centre crop is
    # columns 10..19.
    framed = FramedImages(_List([_striped(30, 10)]), xtail.framing("short_side_crop"),
                          _preprocess(10), seed=0)  # fmt: skip
    pixels = np.asarray(framed.load(0))
    assert pixels.shape == (10, 10, 3)
    assert (pixels[:, :, 0] == 8 * np.arange(10, 20)).all()
    # The backbone's own to_tensor() then leaves the framed image as it is.
    raw = _striped(30, 10)
    direct = _preprocess(10).to_tensor("short_side_crop")(raw)
    assert torch.equal(_preprocess(10).to_tensor()(framed.load(0)), direct)


class _List:
    """A LabelledImages of PIL images, one class each."""

    def __init__(self, images):
        self.images = images
        self.targets = list(range(len(images)))
        self.class_names = [f"c{i}" for i in range(len(images))]

    def __len__(self):
        return len(self.images)

    def load(self, i):
        return self.images[i]

    def sample_id(self, i):
        return f"img/{i}"


def test_random_resized_crop_falls_back_to_the_centred_crop_as_torchvision():
    # 100 x 10: no box of area >= 900 fits with aspect <= 4/3, so all ten tries fail and the
    # crop is the widest centred one of aspect 4/3: h = 10, w = round(40/3) = 13, left
    # (100 - 13) // 2 = 43; standing up, aspect 3/4: h = round(40/3) = 13, top 43.
    crop = xtail.RandomResizedCropFraming((0.9, 1.0))
    assert crop.box(100, 10, UniformDraws(0, 0)) == (0, 43, 10, 13)
    assert crop.box(10, 100, UniformDraws(0, 0)) == (43, 0, 13, 10)


def test_random_resized_crop_draws_as_torchvisions_get_params():
    # Same distribution as torchvision's own RandomResizedCrop(scale=(0.9, 1)) on a 320 x 300
    # image: the means of area fraction, log aspect and offsets agree within sampling error.
    from torchvision.transforms import RandomResizedCrop

    width, height, n = 320, 300, 3000
    crop = xtail.RandomResizedCropFraming((0.9, 1.0))
    ours = np.array([crop.box(width, height, UniformDraws(5, i)) for i in range(n)], float)
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    theirs = np.array(
        [RandomResizedCrop.get_params(image, [0.9, 1.0], [3 / 4, 4 / 3]) for _ in range(n)],
        float,
    )

    def stats(boxes):
        top, left, h, w = boxes.T
        return [h * w / (width * height), np.log(w / h), top, left]

    for a, b in zip(stats(ours), stats(theirs), strict=True):
        se = np.sqrt(a.var() / n + b.var() / n)
        assert abs(a.mean() - b.mean()) < 5 * se + 1e-12
    h, w = ours[:, 2], ours[:, 3]
    assert (h * w >= 0.9 * width * height - width - height).all()
    assert (np.abs(np.log(w / h)) <= np.log(4 / 3) + 0.02).all()


def test_random_resized_crop_is_a_pure_function_of_seed_and_index():
    image = _striped(40, 30)
    frame = xtail.framing("random_resized_crop", (0.5, 1.0))
    data = _List([image, image])
    a, b = (
        FramedImages(data, frame, _preprocess(16), 7),
        FramedImages(data, frame, _preprocess(16), 7),
    )
    assert a.load(0).tobytes() == b.load(0).tobytes()
    assert a.load(0).size == (16, 16)
    assert a.load(0).tobytes() != a.load(1).tobytes()  # same image, another crop
    assert a.load(0).tobytes() != FramedImages(data, frame, _preprocess(16), 8).load(0).tobytes()
    # The image is the box's crop resized, exactly.
    top, left, h, w = frame.box(40, 30, UniformDraws(7, 0))
    expected = v2.functional.resized_crop(
        v2.functional.pil_to_tensor(image), top, left, h, w, [16, 16],
        v2.InterpolationMode.BICUBIC, antialias=True,
    )  # fmt: skip
    assert np.array_equal(np.asarray(a.load(0)), expected.permute(1, 2, 0).numpy())


def test_framing_names_are_checked():
    with pytest.raises(CdfslError, match=r"preprocess 'crop': expected one of"):
        xtail.framing("crop")
    with pytest.raises(CdfslError, match="train_crop_scale"):
        xtail.framing("random_resized_crop", (0.9, 1.2))


def _micro(domain: str, per_class: int, seed: int) -> dict:
    return {
        "class_path": "cdfsl.data.micro_world.MicroWorld",
        "init_args": {"domain": domain, "images_per_class": per_class, "seed": seed},
    }


def _config(tmp_path: Path, methods: list[str], **overrides) -> XTailConfig:
    domains = [
        DomainConfig(d, _micro(d, 3, 0), _micro(d, 2, 1))
        for d in ("crop-like", "isic-like", "chestx-like")
    ]
    fields = {
        "domains": domains, "backbone": "tiny-clip", "pretrained": None, "shots": 2,
        "methods": methods, "primal": PrimalConfig(hidden=96, block_size=5),
        "finetune": FineTuneConfig(steps=1, lora=LoRAConfig(rank=2), accelerator="cpu"),
        "output": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"),
        "device": "cpu", "progress": False, **overrides,
    }  # fmt: skip
    return XTailConfig(**fields)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xtail")
    runner = XTailRun(_config(tmp, list(xtail.METHODS)))
    return tmp, runner, runner.run()


def test_run_writes_every_method_matrix_metrics_and_heatmaps(full_run):
    tmp, _, results = full_run
    out = tmp / "out"
    assert list(results) == ["zero-shot", "finetune", "primal", "dual"]
    names = ["crop-like", "isic-like", "chestx-like"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["domains"] == names and summary["classes"] == {
        "crop-like": 8, "isic-like": 7, "chestx-like": 8,
    }  # fmt: skip
    assert summary["train_images"] == dict.fromkeys(names, 2 * 8) | {"isic-like": 14}
    for name, res in results.items():
        matrix = np.array(res["matrix"])
        assert matrix.shape == (3, 3) and ((matrix >= 0) & (matrix <= 1)).all()
        assert res["metrics"] == pytest.approx(xtail_metrics(matrix))
        saved = json.loads((out / name / "matrix.json").read_text())
        assert saved["matrix"] == res["matrix"]
        rows = [json.loads(x) for x in (out / name / "steps.jsonl").read_text().splitlines()]
        assert [r["learned"] for r in rows] == names
        assert (out / name / "matrix.png").stat().st_size > 0
    assert (out / "xtail.png").read_bytes()[:4] == b"\x89PNG"
    assert "Dual-RAIL" in (out / "summary.md").read_text()
    # The frozen model learns nothing: every row of zero-shot is the same.
    zs = np.array(results["zero-shot"]["matrix"])
    assert (zs == zs[0]).all()


def test_rail_on_unseen_domains_is_never_below_zero_shot(full_run):
    # Fusion keeps zero-shot's prediction whenever it names an unseen class, and a zero-shot
    # prediction of a seen class is wrong on an unseen domain: RAIL can only gain there.
    _, _, results = full_run
    zs = np.array(results["zero-shot"]["matrix"])
    for name in ("primal", "dual"):
        a = np.array(results[name]["matrix"])
        above = np.triu_indices(3, k=1)
        assert (a[above] >= zs[above] - 1e-12).all()


def test_primal_rail_after_the_sequence_is_the_joint_solution(full_run):
    _, runner, _ = full_run
    state = torch.load(runner.output / "primal" / "state.pt", weights_only=True)
    learned = PrimalRegressor.from_state_dict(state["state"])
    feats = torch.cat([d.train_feats.features for d in runner.domains])
    labels = torch.cat([d.train_feats.labels + d.offset for d in runner.domains])
    phi = torch.relu(feats.double() @ learned.projection)
    y = torch.nn.functional.one_hot(labels, 23).double()
    joint = torch.linalg.solve(phi.T @ phi + 0.1 * torch.eye(96, dtype=torch.float64), phi.T @ y)
    assert torch.allclose(learned.weights, joint, atol=1e-9)


class Killed(Exception):
    """Stands for a kill: it escapes the runner as SIGKILL would stop it."""


def test_resume_after_a_kill_loses_only_the_current_step(tmp_path, monkeypatch):
    reference = XTailRun(_config(tmp_path / "ref", ["primal", "dual"])).run()
    calls, killed = [], []
    real_learn = xtail._RailLearner.learn

    def dies_in_step_2(self, step):
        calls.append((self.name, step))
        if (self.name, step) == ("dual", 2) and not killed:
            killed.append(step)
            raise Killed
        real_learn(self, step)

    monkeypatch.setattr(xtail._RailLearner, "learn", dies_in_step_2)
    with pytest.raises(Killed):
        XTailRun(_config(tmp_path / "run", ["primal", "dual"])).run()
    # A kill between writing the state and appending its row: the row comes from the state.
    steps = tmp_path / "run" / "out" / "primal" / "steps.jsonl"
    steps.write_text("".join(steps.read_text().splitlines(keepends=True)[:2]))
    calls.clear()
    resumed = XTailRun(_config(tmp_path / "run", ["primal", "dual"])).run()
    assert calls == [("dual", 2)]  # primal untouched, dual redoes only the step it died in
    for name in ("primal", "dual"):
        assert resumed[name]["matrix"] == reference[name]["matrix"]


def test_a_changed_configuration_is_refused(tmp_path):
    XTailRun(_config(tmp_path, ["primal"])).run()
    with pytest.raises(CdfslError, match="changed: primal"):
        XTailRun(_config(tmp_path, ["primal"], primal=PrimalConfig(hidden=50))).run()
    with pytest.raises(CdfslError, match=r"changed: .*shots"):
        XTailRun(_config(tmp_path, ["zero-shot"], shots=1)).run()


def test_runs_recorded_before_the_reference_options_are_refused(tmp_path):
    XTailRun(_config(tmp_path, ["primal"])).run()
    run_json = tmp_path / "out" / "run.json"
    old = json.loads(run_json.read_text())
    for key in ("small_classes", "class_name_style", "class_names", "train_preprocess",
                "train_crop_scale", "test_preprocess"):  # fmt: skip
        del old[key]
    run_json.write_text(json.dumps(old))
    with pytest.raises(CdfslError, match=r"changed: .*test_preprocess.*train_preprocess"):
        XTailRun(_config(tmp_path, ["primal"])).run()
    method_json = tmp_path / "out" / "primal" / "run.json"
    old = json.loads(method_json.read_text())
    del old["primal"]["random_init"]
    method_json.write_text(json.dumps(old))
    run_json.unlink()
    with pytest.raises(CdfslError, match="changed: primal"):
        XTailRun(_config(tmp_path, ["primal"])).run()


def test_squash_framing_gives_the_earlier_features(tmp_path):
    from cdfsl.features import encode_images

    runner = XTailRun(
        _config(tmp_path, ["zero-shot"], train_preprocess="squash", test_preprocess="squash",
                small_classes="keep_all")
    )  # fmt: skip
    runner._prepare()
    d = runner.domains[0]
    raw_test = xtail.build_split(_micro("crop-like", 2, 1))
    assert torch.equal(
        d.test_feats.features, encode_images(runner.backbone, raw_test, progress=False)
    )


def _write_mnist(folder: Path, prefix: str, per_digit: int) -> None:
    """The two IDX files of one MNIST split: ``per_digit`` 28x28 images of each digit."""
    import struct

    labels = np.arange(10 * per_digit) % 10
    images = (np.arange(labels.size * 28 * 28).reshape(-1, 28, 28) * 7 % 251).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for name, magic, array in (("images-idx3-ubyte", 0x803, images),
                               ("labels-idx1-ubyte", 0x801, labels.astype(np.uint8))):  # fmt: skip
        header = struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape)
        (folder / f"{prefix}-{name}").write_bytes(header + array.tobytes())


def test_a_run_prompts_mnist_and_eurosat_with_the_references_names(tmp_path):
    from layouts import make_split_file_dataset

    from cdfsl.data.fsl import SPLIT_FILE_DATASETS

    eurosat = next(r for r in SPLIT_FILE_DATASETS if r.name == "eurosat-fsl")
    make_split_file_dataset(tmp_path / "data", eurosat, classes=("Annual Crop Land", "River"),
                            per_split=(1, 1, 2))  # fmt: skip
    _write_mnist(tmp_path / "data" / "mnist", "train", 2)
    _write_mnist(tmp_path / "data" / "mnist", "t10k", 1)
    domains = [
        DomainConfig(name, {"source": source, "options": {"split": "train"}},
                     {"source": source, "options": {"split": "test"}})
        for name, source in (("eurosat", "eurosat-fsl"), ("mnist", "mnist"))
    ]  # fmt: skip
    runner = XTailRun(_config(tmp_path, ["zero-shot"], domains=domains, shots=2,
                              data_root=str(tmp_path / "data")))  # fmt: skip
    runner._prepare()
    # cdfsl reads the split's "River" as "river"; CLIP's tokenizer lower-cases both.
    assert runner.union_names[:3] == [
        "Annual Crop Land satellite location",
        "river satellite location",
        'number: "0 - zero"',
    ]
    assert runner.union_names[-1] == 'number: "9 - nine"'
    # EuroSAT's one training image per class is drawn twice (shots=2, with replacement), each
    # draw cropped afresh.
    train = runner.domains[0].train
    assert len(train) == 4 and len({train.sample_id(i) for i in range(4)}) == 2
    feats = runner.domains[0].train_feats.features
    assert not torch.equal(feats[0], feats[1])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"methods": ["magic"]}, "expected a non-empty subset"),
        ({"domains": []}, "no domains given"),
    ],
)
def test_bad_configs_name_the_input(tmp_path, overrides, message):
    rest = {k: v for k, v in overrides.items() if k != "methods"}  # the parameter stays whole
    with pytest.raises(CdfslError, match=message):
        XTailRun(_config(tmp_path, overrides.get("methods", ["primal"]), **rest))


def test_split_specs_are_checked():
    with pytest.raises(CdfslError, match=r"class_path 'cdfsl\.nowhere\.Thing'"):
        xtail.build_split({"class_path": "cdfsl.nowhere.Thing"})
    with pytest.raises(CdfslError, match=r"split keys \['rooot'\] unknown"):
        xtail.build_split({"source": "folder", "rooot": "x"})


def test_recipes_parse_with_the_papers_settings():
    parser = build_parser()[0]
    order = config_from(
        parser.parse_args(["rail", "--config", str(ROOT / "recipes/rail/order-i.yaml")]).rail
    )
    assert [d.name for d in order.domains] == [
        "fgvc_aircraft", "caltech101", "dtd", "eurosat", "oxford_flowers", "food101", "mnist",
        "oxford_pets", "stanford_cars", "sun397",
    ]  # fmt: skip
    assert (order.shots, order.backbone, order.beta) == (16, "clip-vit-b16", 0.8)
    assert (order.primal.hidden, order.primal.reg, order.dual.gamma, order.dual.reg) == (
        15000, 0.1, 0.1, 1e-3,
    )  # fmt: skip
    assert all(d.test["options"] == {"split": "test"} for d in order.domains)
    micro = config_from(
        parser.parse_args(["rail", "--config", str(ROOT / "recipes/rail/micro.yaml")]).rail
    )
    assert micro.backbone == "micro-clip" and len(micro.domains) == 5
    assert micro.methods == ["zero-shot", "finetune", "primal", "dual"]


def test_cli_prints_matrix_and_metrics(tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    domains = [
        {"name": d, "train": _micro(d, 3, 0), "test": _micro(d, 2, 1)}
        for d in ("crop-like", "isic-like")
    ]
    recipe.write_text(json.dumps({"domains": domains, "backbone": "tiny-clip"}))
    code = main(
        ["rail", "--config", str(recipe), "--pretrained", "null", "--methods", "[zero-shot,primal]",
         "--primal.hidden", "32", "--output", str(tmp_path / "out"), "--cache_dir",
         str(tmp_path / "cache"), "--progress", "false", "--device", "cpu"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "| after \\ on | crop-like | isic-like |" in out
    assert "| Primal-RAIL |" in out and "Transfer" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["methods"]) == {"zero-shot", "primal"}


# -- adding a method: one class ----------------------------------------------------------------
@xtail.LEARNERS.add
class NearestMeanLearner(xtail.XTailLearner):
    """A new X-TAIL method in one class: each learned class's mean training feature; a test
    image takes the class of the most similar mean, among the classes learned so far."""

    name = "nearest-mean"
    title = "Nearest class mean"

    def __init__(self, context):
        super().__init__(context)
        classes, dim = context.text_feats.shape
        self.means = torch.zeros(classes, dim)
        self.seen = torch.zeros(classes, dtype=torch.bool)

    def learn(self, step):
        d = self.context.domains[step]
        feats, labels = d.train_feats.features.float(), d.train_feats.labels
        for c in labels.unique().tolist():
            self.means[d.offset + c] = feats[labels == c].mean(dim=0)
        self.seen[d.offset : d.end] = True

    def predict(self, domain):
        feats = self.context.domains[domain].test_feats.features.float()
        scores = feats @ self.means.T
        scores[:, ~self.seen] = -math.inf
        return scores.argmax(dim=1)

    def state(self):
        return {"means": self.means, "seen": self.seen}

    def load_state(self, state):
        self.means, self.seen = state["means"], state["seen"]


def test_a_new_learner_is_one_registered_class(tmp_path, monkeypatch):
    assert xtail.LEARNERS["nearest-mean"] is NearestMeanLearner
    assert "nearest-mean" not in xtail.METHODS  # the built-ins, a recipe's default
    results = XTailRun(_config(tmp_path, ["nearest-mean", "zero-shot"])).run()
    assert list(results) == ["zero-shot", "nearest-mean"]  # registration order
    a = np.array(results["nearest-mean"]["matrix"])
    # Only learned classes are predicted: a domain not learned yet (t < k) scores 0.
    assert a.shape == (3, 3) and (a[np.triu_indices(3, k=1)] == 0).all()
    assert results["nearest-mean"]["update_seconds_mean"] is not None
    assert results["zero-shot"]["update_seconds_mean"] is None  # ZeroShotLearner.learns
    out = tmp_path / "out"
    assert "| Nearest class mean |" in (out / "summary.md").read_text()
    assert json.loads((out / "nearest-mean" / "run.json").read_text()) == {"method": "nearest-mean"}
    # Killed in step 1 and rerun, it continues from its saved state at step 0.
    learned, killed = [], []
    real_learn = NearestMeanLearner.learn

    def dies_in_step_1(self, step):
        learned.append(step)
        if step == 1 and not killed:
            killed.append(step)
            raise Killed
        real_learn(self, step)

    monkeypatch.setattr(NearestMeanLearner, "learn", dies_in_step_1)
    with pytest.raises(Killed):
        XTailRun(_config(tmp_path / "again", ["nearest-mean"])).run()
    learned.clear()
    resumed = XTailRun(_config(tmp_path / "again", ["nearest-mean"])).run()
    assert learned == [1, 2]
    assert resumed["nearest-mean"]["matrix"] == results["nearest-mean"]["matrix"]


def test_learner_names_and_titles_are_checked():
    class Untitled(xtail.XTailLearner):
        name = "untitled"

    with pytest.raises(CdfslError, match="no name or title"):
        xtail.LEARNERS.add(Untitled)

    class Twin(xtail.XTailLearner):
        name, title = "primal", "Another primal"

    with pytest.raises(CdfslError, match="'primal' is taken by PrimalRailLearner"):
        xtail.LEARNERS.add(Twin)
    assert xtail.LEARNERS["primal"] is xtail.PrimalRailLearner


def test_method_result_is_computed_from_the_step_rows_alone():
    rows = [
        {"accuracy": dict(zip("abc", row, strict=True)), "update_seconds": s,
         "update_peak_rss_mb": p, "update_extra_rss_mb": e, "state_mb": 1.5}
        for row, s, p, e in zip(HAND, (1.0, 2.0, 3.0), (10, 30, 20), (1, 3, 2), strict=True)
    ]  # fmt: skip
    res = xtail.method_result("primal", rows, ["a", "b", "c"])
    assert res["matrix"] == HAND and res["metrics"] == xtail_metrics(HAND)
    assert (res["update_seconds_mean"], res["update_peak_rss_mb_max"]) == (2.0, 30)
    assert (res["update_extra_rss_mb_max"], res["state_mb"]) == (3, 1.5)
    frozen = xtail.method_result("zero-shot", rows, ["a", "b", "c"], learns=False)
    assert frozen["update_seconds_mean"] is frozen["update_peak_rss_mb_max"] is None
    fig = xtail.plot_matrices({"primal": HAND, "zero-shot": HAND}, ["a", "b", "c"])
    assert [ax.get_title().split("\n")[0] for ax in fig.axes[:2]] == ["Primal-RAIL", "Zero-shot"]


class CopyOfZeroShot(xtail.ZeroShotLearner):
    """A learner defined outside cdfsl and never registered by hand."""

    name, title = "zero-shot-copy", "Zero-shot (named by class_path)"


def test_a_recipe_names_an_unregistered_learner_by_its_class_path(tmp_path):
    runner = XTailRun(_config(tmp_path, [f"{__name__}.CopyOfZeroShot", "zero-shot"]))
    assert xtail.LEARNERS["zero-shot-copy"] is CopyOfZeroShot
    results = runner.run()
    assert list(results) == ["zero-shot", "zero-shot-copy"]
    assert results["zero-shot-copy"]["matrix"] == results["zero-shot"]["matrix"]
    assert (tmp_path / "out" / "zero-shot-copy" / "steps.jsonl").exists()
    with pytest.raises(CdfslError, match=r"class_path 'cdfsl\.nowhere\.Learner'"):
        XTailRun(_config(tmp_path, ["cdfsl.nowhere.Learner"]))
    with pytest.raises(CdfslError, match="expected an XTailLearner subclass"):
        XTailRun(_config(tmp_path, ["cdfsl.continual.xtail.XTailConfig"]))


def test_zero_shot_probabilities_are_softmax_of_the_scaled_cosines_over_the_union():
    """RAIL's reference: softmax(100 · f·t) over every class of the sequence; cdfsl takes the
    backbone's own temperature (100 for OpenAI CLIP), checked here against a hand softmax."""
    from cdfsl.continual.xtail.config import XTailConfig
    from cdfsl.continual.xtail.learners import LearnerContext, ZeroShotLearner

    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    feats = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    context = LearnerContext(XTailConfig(), [], ["a", "b", "c"], text, 100.0, torch.device("cpu"))
    probs = ZeroShotLearner(context).zero_shot_probs(feats)
    cos = [[0.8, 0.6, 0.96], [0.0, 1.0, 0.8]]
    for row, expected in zip(probs.tolist(), cos, strict=True):
        exps = [math.exp(100 * c - 100 * max(expected)) for c in expected]
        assert row == pytest.approx([e / sum(exps) for e in exps], rel=1e-5, abs=1e-12)


# -- mutation follow-up (issue 23): crop boxes as torchvision draws them, framing names and
# identity, the metrics' dtype and order of means, the tables and heatmap titles -----------------


class _TorchOnTheStream:
    """The few ``torch`` calls of torchvision's ``RandomResizedCrop.get_params``, answered from a
    ``UniformDraws`` stream in float64: uniform_(a, b) = a + (b - a)·U with U = below(2^53)·2^-53,
    randint(0, n) = below(n). torchvision's own loop and fallback then give the expected box."""

    class _Value:
        def __init__(self, value: float) -> None:
            self.value = value

        def item(self) -> float:
            return self.value

    def __init__(self, draws: UniformDraws) -> None:
        self.draws = draws

    def tensor(self, values):
        return list(values)

    def log(self, values):
        return [math.log(v) for v in values]

    def empty(self, _):
        stream = self

        class _Empty:
            def uniform_(self, low: float, high: float):
                u = stream.draws.below(1 << 53) * 2.0**-53
                return stream._Value(float(low) + (float(high) - float(low)) * u)

        return _Empty()

    def exp(self, value):
        return self._Value(math.exp(value.value))

    def randint(self, low: int, high: int, size):
        assert low == 0
        return self._Value(self.draws.below(high))


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.05, 1.0), (0.2, 0.3), (0.25, 0.35)])
def test_random_resized_crop_box_is_torchvisions_get_params_on_the_stream(scale, monkeypatch):
    import torchvision.transforms.transforms as tv

    crop = xtail.RandomResizedCropFraming(scale)
    # Sizes where every try fits, where few do (13 x 10: an eleventh try would often succeed),
    # where none does, and 1-3 px images where w or h rounds to 0, 1 or the full side.
    sizes = [(320, 300), (13, 10), (10, 13), (100, 10), (3, 2), (2, 2), (1, 1)]
    for width, height in sizes:
        for seed in range(40):
            monkeypatch.setattr(tv, "torch", _TorchOnTheStream(UniformDraws(seed, 1)))
            image = torch.zeros(3, height, width)
            expected = tv.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3])
            assert crop.box(width, height, UniformDraws(seed, 1)) == expected, (width, height)


def test_framing_scale_bounds_and_unknown_name_message():
    import re

    from cdfsl.backbones.base import GEOMETRIES

    assert xtail.framing("random_resized_crop", (0.5, 0.5)).scale == (0.5, 0.5)  # low == high
    with pytest.raises(CdfslError, match=re.escape("train_crop_scale=[0.0, 1.0]: expected 0 <")):
        xtail.framing("random_resized_crop", (0.0, 1.0))
    names = sorted(["random_resized_crop", *GEOMETRIES])
    message = (
        f"preprocess 'crop': expected one of {names} (the reference: random_resized_crop for "
        "training features, short_side_crop for test images)"
    )
    with pytest.raises(CdfslError, match=f"^{re.escape(message)}$"):
        xtail.framing("crop")


def test_framed_images_identity_names_what_the_pixels_depend_on():
    framed = FramedImages(_List([_striped(12, 12)]), xtail.framing("short_side_crop"),
                          _preprocess(10), seed=3)  # fmt: skip
    assert framed.identity() == {
        "framing": "GeometryFraming(geometry='short_side_crop')",
        "size": [10, 10],
        "interpolation": "bicubic",
        "seed": 3,
    }


def test_metrics_of_a_float32_matrix_are_computed_in_float64():
    a = np.array(HAND, dtype=np.float32).astype(np.float64).tolist()  # the float32 values, exact
    m = xtail_metrics(np.array(HAND, dtype=np.float32))
    assert m["transfer"] == pytest.approx((a[0][1] + (a[0][2] + a[1][2]) / 2) / 2, rel=1e-15)
    columns = [(a[0][k] + a[1][k] + a[2][k]) / 3 for k in range(3)]
    assert m["average"] == pytest.approx(sum(columns) / 3, rel=1e-15)
    assert m["last"] == pytest.approx(sum(a[2]) / 3, rel=1e-15)


def test_average_is_the_mean_of_the_column_means_bit_for_bit():
    # The mean over k of the mean over t, in that order: the overall mean (or the mean of the
    # row means) differs in the last bit for this matrix.
    a = [[0.64, 0.27, 0.04], [0.02, 0.81, 0.91], [0.61, 0.73, 0.54]]
    columns = [(a[0][k] + a[1][k] + a[2][k]) / 3 for k in range(3)]
    assert xtail_metrics(a)["average"] == (columns[0] + columns[1] + columns[2]) / 3


def test_metrics_of_one_domain_raise_no_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" for the absent transfer
        assert math.isnan(xtail_metrics([[0.7]])["transfer"])


def test_matrix_table_in_percent_with_dashes_and_partial_rows():
    from cdfsl.continual.xtail.metrics import format_matrix

    assert format_matrix([[0.5, None], [math.nan, 0.123]], ["a", "b"]) == (
        "| after \\ on | a | b |\n|---|---:|---:|\n| a | 50.0 | - |\n| b | - | 12.3 |"
    )
    # A run in progress: fewer rows than domains.
    assert format_matrix([[0.25, 1.0]], ["a", "b"]) == (
        "| after \\ on | a | b |\n|---|---:|---:|\n| a | 25.0 | 100.0 |"
    )


def test_summary_table_with_and_without_timings():
    from cdfsl.continual.xtail.metrics import format_summary

    results = {
        "mine": {
            "metrics": {"transfer": math.nan, "average": 0.5, "last": 0.25},
            "update_seconds_mean": 1.234,
            "update_peak_rss_mb_max": 1024.4,
            "update_extra_rss_mb_max": 12.6,
        },
        "primal": {"metrics": {"transfer": 0.125, "average": 0.75, "last": 1.0}},
    }
    assert format_summary(results) == (
        "| method | Transfer | Average | Last | s / domain update | update peak RSS (MB) "
        "| update extra RSS (MB) |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
        "| mine | - | 50.0 | 25.0 | 1.23 | 1024 | 13 |\n"
        "| Primal-RAIL | 12.5 | 75.0 | 100.0 | - | - | - |"
    )


def test_heatmap_titles_carry_the_metrics():
    import matplotlib

    matplotlib.use("Agg")
    from cdfsl.continual.xtail.metrics import plot_matrices

    figure = plot_matrices({"mine": HAND}, ["a", "b", "c"])
    # Transfer 0.25, Average (0.4 + 1.7/3 + 0.5)/3 = 0.4889, Last 1.9/3 = 0.6333.
    assert [ax.get_title() for ax in figure.axes if ax.get_title()] == [
        "mine\nT 25.0  A 48.9  L 63.3"
    ]
