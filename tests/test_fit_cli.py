"""``cdfsl fit`` on LightningCLI: Trainer options as flags and recipe keys; eval's training."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from imagegen import make_image_folder

from cdfsl.cli import build_parser, main
from cdfsl.commands import _run_args
from cdfsl.engine import FitConfig, fit_episode
from cdfsl.lora import lora_state_dict

FLAGS = [
    "--config", "tiny/mind", "--precision", "32-true", "--progress", "false",
    "--accelerator", "cpu",  # compared bit for bit with a CPU fit_episode: pin the device
]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("fit") / "data", {"a": 2, "b": 3}, size=20)


def fit(tmp_path: Path, folder: Path, *flags: str, name: str = "out") -> Path:
    out = tmp_path / name
    assert main(["fit", *FLAGS, "--data.root", str(folder), "--output", str(out), *flags]) == 0
    return out


def adapters(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter.safetensors"))


def test_fit_trains_what_the_episode_trainer_trains(tmp_path, folder):
    """The LightningCLI path and eval's fit_episode give the same adapters, bit for bit."""
    out = fit(tmp_path, folder, "--steps", "3")
    cfg = build_parser()[0].parse_args(["eval", *FLAGS, "--data.root", str(folder)]).eval
    _, dataset = _run_args.dataset(cfg)
    method = _run_args.method(cfg)
    to_tensor = method.to_tensor()
    images = torch.stack([to_tensor(dataset.load(i)) for i in range(len(dataset))])
    method.reset(cfg.seed)
    method.set_classes(dataset.class_names)
    untrained = {k: v.clone() for k, v in lora_state_dict(method.backbone.lora_root()).items()}
    on_cpu = FitConfig(precision="32-true", accelerator="cpu")
    fit_episode(method, images, torch.tensor(dataset.targets), 3, on_cpu)
    expected = lora_state_dict(method.backbone.lora_root())
    saved = adapters(out)
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    assert any(not torch.equal(saved[k], untrained[k]) for k in saved)  # it did train
    assert json.loads((out / "classes.json").read_text()) == ["a", "b"]


def test_trainer_options_are_flags(tmp_path, folder):
    # T = steps_per_shot · (fewest images per class) = 2 · 2 unless max_steps says otherwise.
    probe = tmp_path / "probe.json"
    callbacks = f"[{{class_path: fitprobe.Probe, init_args: {{path: {probe}}}}}]"
    fit(
        tmp_path,
        folder,
        "--steps",
        "null",
        "--steps_per_shot",
        "2",
        "--trainer.callbacks",
        callbacks,
    )
    assert json.loads(probe.read_text()) == {"batches": 4, "steps": 4, "precision": "32-true"}
    fit(tmp_path, folder, "--trainer.callbacks", callbacks, "--trainer.max_steps", "3",
        "--trainer.precision", "bf16-mixed")  # fmt: skip
    assert json.loads(probe.read_text()) == {"batches": 3, "steps": 3, "precision": "bf16-mixed"}


def test_a_logger_flag_logs_every_step_and_the_hyperparameters(tmp_path, folder):
    logs = tmp_path / "logs"
    fit(tmp_path, folder, "--steps", "3", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir", str(logs), "--trainer.log_every_n_steps", "1")  # fmt: skip
    version = logs / "lightning_logs" / "version_0"
    with open(version / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert all(float(r["train/loss"]) > 0 for r in rows)
    hparams = yaml.safe_load((version / "hparams.yaml").read_text())
    assert hparams["lora"]["rank"] == 4 and hparams["views"][0]["name"] == "clean"


def test_the_saved_config_reruns_the_same_fit(tmp_path, folder):
    first = fit(tmp_path, folder, "--steps", "2", "--trainer.gradient_clip_val", "0.5")
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert saved["trainer"]["gradient_clip_val"] == 0.5 and saved["steps"] == 2
    second = tmp_path / "again"
    argv = ["fit", "--config", str(first / "config.yaml"), "--output", str(second)]
    assert main(argv) == 0
    one, two = adapters(first), adapters(second)
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_a_bad_trainer_option_is_one_line(capsys, folder):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *FLAGS, "--data.root", str(folder), "--trainer.max_stepz", "3"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("cdfsl: error:") and "max_stepz" in err and len(err.splitlines()) == 1


def test_fit_trains_on_one_device_unless_asked(folder):
    """Lightning's default (every visible GPU, a distributed sampler) would split the T steps
    over ranks and stop each short; one support set trains on one device, all T steps on each
    rank when several are asked for."""
    cfg = build_parser()[0].parse_args(["fit", *FLAGS, "--data.root", str(folder)]).fit
    assert cfg.trainer.devices == 1
    assert cfg.trainer.use_distributed_sampler is False
    cfg = (
        build_parser()[0]
        .parse_args(["fit", *FLAGS, "--data.root", str(folder), "--trainer.devices", "2"])
        .fit
    )
    assert str(cfg.trainer.devices) == "2"  # Lightning types devices as int | str


def test_fit_on_two_devices_trains_what_one_trains(tmp_path, folder):
    """Asked for two devices (CPU ranks under DDP), every rank runs all T steps on the whole
    set with the same seeded draws: the saved adapters are the one-device adapters, bit for bit,
    and one rank writes and prints them."""
    import subprocess
    import sys

    one = fit(tmp_path, folder, "--steps", "2", name="one")
    two = tmp_path / "two"
    cmd = [
        sys.executable, "-m", "cdfsl.cli", "fit", *FLAGS, "--data.root", str(folder),
        "--output", str(two), "--steps", "2", "--trainer.devices", "2",
        "--trainer.strategy", "ddp",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("adapters:") == 1
    expected, saved = adapters(one), adapters(two)
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)


@pytest.mark.parametrize(
    ("flags", "tf32", "deterministic"),
    [([], False, False), (["--tf32", "true", "--deterministic", "true"], True, True)],
)
def test_fit_trains_under_the_numerics_asked_for(
    tmp_path, folder, monkeypatch, flags, tf32, deterministic
):
    """``--tf32`` and ``--deterministic`` hold while ``cdfsl fit`` trains, as in ``cdfsl eval``;
    TF32 is off otherwise, and both are restored afterwards."""
    import lightning as L

    seen = {}
    original = L.Trainer.fit

    def spy(trainer, *args, **kwargs):
        seen["tf32"] = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        seen["deterministic"] = torch.are_deterministic_algorithms_enabled()
        return original(trainer, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", spy)
    before = torch.backends.cuda.matmul.allow_tf32, torch.are_deterministic_algorithms_enabled()
    try:
        fit(tmp_path, folder, "--steps", "1", *flags)
        assert seen == {"tf32": (tf32, tf32), "deterministic": deterministic}
        assert torch.backends.cuda.matmul.allow_tf32 == before[0]
    finally:
        torch.use_deterministic_algorithms(before[1])
