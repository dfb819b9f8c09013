"""Many episodes per training step: a row is a function of (seed, index, configuration) alone."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cdfsl.data.folder import ImageFolder
from cdfsl.data.views import ViewSpec
from cdfsl.engine import FitConfig
from cdfsl.errors import CdfslError
from cdfsl.fewshot.episodic import EpisodeProtocol, EpisodicEvaluator
from cdfsl.lora import LoRAConfig, lora_state_dict
from cdfsl.methods import LoRAFineTune, Mind, ZeroShot

# T = 6: step 0 SVL, steps 1-2 SVL + RA, steps 3-5 CE only; dropout and two views on, so every
# per-episode random stream (views, SVL prototypes, LoRA dropout) is exercised.
FIT = FitConfig(steps=6, precision="32-true", accelerator="cpu")
VIEWS = (ViewSpec("clean"), ViewSpec("rotate_jitter_flip", rotation=45.0, jitter=0.4, hflip=True))
EPISODES = 8


def build(cls, **kwargs):
    if cls is ZeroShot:
        return cls(backbone="tiny-clip", pretrained=None)
    return cls(
        backbone="tiny-clip", pretrained=None, views=VIEWS, lora=LoRAConfig(rank=4), **kwargs
    )


def rows_by_groups(
    method, folder, tmp_path, groups: list[list[int]], fit: FitConfig = FIT
) -> dict[int, dict]:
    protocol = EpisodeProtocol(n_way=3, k_shot=1, n_query=5, episodes=EPISODES, seed=0)
    evaluator = EpisodicEvaluator(method, ImageFolder(folder), protocol, tmp_path, fit)
    return {row["episode"]: row for group in groups for row in evaluator.run_episodes(group)}


def assert_same_rows(reference: dict[int, dict], other: dict[int, dict]) -> None:
    assert sorted(reference) == sorted(other)
    for index, row in reference.items():
        twin = other[index]
        for key in ("seed", "classes", "support_ids", "query_ids", "accuracy", "steps"):
            assert twin[key] == row[key], (index, key)
        assert twin["terms"].keys() == row["terms"].keys()
        for term, value in row["terms"].items():
            assert twin["terms"][term] == pytest.approx(value, rel=1e-4, abs=1e-5), (index, term)


@pytest.mark.parametrize("cls", [ZeroShot, LoRAFineTune, Mind])
def test_rows_do_not_depend_on_how_episodes_are_grouped(cls, four_class_folder, tmp_path):
    method = build(cls)
    alone = rows_by_groups(method, four_class_folder, tmp_path, [[i] for i in range(EPISODES)])
    # E = 3 (a short last group), E = 8, and E = 8 in reverse order (every position changes).
    threes = [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert_same_rows(alone, rows_by_groups(method, four_class_folder, tmp_path, threes))
    eight = [list(range(EPISODES))]
    assert_same_rows(alone, rows_by_groups(method, four_class_folder, tmp_path, eight))
    backwards = [list(reversed(range(EPISODES)))]
    assert_same_rows(alone, rows_by_groups(method, four_class_folder, tmp_path, backwards))
    if cls is not ZeroShot:
        # Training changed the predictions: the test compares trained episodes, not zero-shot.
        zero = rows_by_groups(build(ZeroShot), four_class_folder, tmp_path, eight)
        assert any(zero[i]["accuracy"] != alone[i]["accuracy"] for i in alone) or any(
            alone[i]["terms"]["loss"] != alone[0]["terms"]["loss"] for i in alone
        )


def test_the_explicit_attention_kernel_trains_and_scores_rows_independent_of_grouping(
    four_class_folder, tmp_path, attention_calls
):
    # The kernel a CPU runs under bf16 ("auto"), asked for in fp32 so that rows compare exactly.
    fit = replace(FIT, attention="explicit")
    called = attention_calls
    method = build(Mind)
    alone = rows_by_groups(method, four_class_folder, tmp_path / "a", [[i] for i in range(3)], fit)
    assert set(called) == {"explicit"}  # training and scoring
    backwards = rows_by_groups(method, four_class_folder, tmp_path / "b", [[2, 1, 0]], fit)
    assert_same_rows(alone, backwards)
    assert {m.attention_kernel for m in method.modules() if hasattr(m, "attention_kernel")} == {
        "auto"
    }  # the fit's setting lasts the fit
    called.clear()
    sdpa = rows_by_groups(method, four_class_folder, tmp_path / "c", [[0, 1, 2]])
    assert set(called) == {"sdpa"}
    # The run records the kernel, and only where it is not SDPA, as runs before the setting.
    protocol = EpisodeProtocol(n_way=3, k_shot=1, n_query=5, episodes=EPISODES, seed=0)
    recorded = {
        name: EpisodicEvaluator(method, ImageFolder(four_class_folder), protocol, tmp_path, f)
        ._fingerprint()["fit"]
        for name, f in (("explicit", fit), ("sdpa", FIT))
    }  # fmt: skip
    assert recorded["explicit"]["attention"] == "explicit" and "attention" not in recorded["sdpa"]
    # Same rows to rounding: the terms agree, whatever an argmax tie does to an accuracy.
    for index, row in alone.items():
        for term, value in row["terms"].items():
            assert sdpa[index]["terms"][term] == pytest.approx(value, rel=1e-4, abs=1e-5)


def test_per_episode_views_hold_for_every_grouping(four_class_folder, tmp_path):
    method = build(Mind, view_sampling="per_episode")
    alone = rows_by_groups(method, four_class_folder, tmp_path, [[i] for i in range(3)])
    assert_same_rows(alone, rows_by_groups(method, four_class_folder, tmp_path, [[2, 0, 1]]))
    per_step = rows_by_groups(
        build(Mind, view_sampling="per_step"), four_class_folder, tmp_path, [[0, 1, 2]]
    )
    assert any(per_step[i]["terms"]["loss"] != alone[i]["terms"]["loss"] for i in alone)


@pytest.mark.parametrize("lora_init", ["shared", "per_episode"])
def test_each_adapter_set_gets_only_its_own_gradient(four_class_folder, tmp_path, lora_init):
    """Set e after a grouped run equals the adapters episode e trains alone."""
    method = build(LoRAFineTune, lora_init=lora_init)
    rows_by_groups(method, four_class_folder, tmp_path, [[4]])
    alone = lora_state_dict(method.backbone.lora_root())
    rows_by_groups(method, four_class_folder, tmp_path, [[1, 4, 6]])
    together = lora_state_dict(method.backbone.lora_root(), adapter_index=1)
    for key, value in alone.items():
        torch.testing.assert_close(together[key], value, rtol=1e-4, atol=1e-6)


def test_start_episodes_needs_one_way(tmp_path):
    method = build(LoRAFineTune)
    with pytest.raises(CdfslError, match="one size"):
        method.start_episodes([0, 1], [["a", "b"], ["a", "b", "c"]])
    with pytest.raises(CdfslError, match="one class list per seed"):
        method.start_episodes([0, 1], [["a", "b"]])
    method.start_episodes([0, 1], [["a", "b"], ["c", "d"]])
    with pytest.raises(CdfslError, match="2 episodes"):
        _ = method.text_feats
    method.set_classes(["x", "y"])  # back to one episode
    assert method.text_feats.shape[0] == 2


def test_16_mixed_trains_one_episode_per_step(four_class_folder, tmp_path):
    """One GradScaler over E episodes would couple them: 16-mixed chooses E = 1 and refuses more."""
    from cdfsl.engine import episodes_per_step, fit_episode

    method = build(LoRAFineTune)
    fp16 = FitConfig(steps=2, precision="16-mixed", accelerator="cpu")
    assert episodes_per_step(method, 3, fp16) == 1
    assert episodes_per_step(method, 3, FitConfig(precision="32-true", accelerator="cpu")) > 1
    four = FitConfig(steps=2, precision="16-mixed", accelerator="cpu", episodes_per_step=4)
    with pytest.raises(CdfslError, match=r"16-mixed' with 4 episodes per step.*bf16-mixed"):
        episodes_per_step(method, 3, four)
    method.start_episodes([0, 1], [["a", "b"], ["c", "d"]])
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    with pytest.raises(CdfslError, match="16-mixed' with 2 episodes per step"):
        fit_episode(method, images, labels, 2, fp16)


def test_automatic_episodes_per_step_after_a_multi_episode_group(four_class_folder, tmp_path):
    """The memory probe forwards images through adapters that may still hold E > 1 sets (the
    demo reuses its methods across cells): it must not need a batch of one."""
    from cdfsl.engine import episodes_per_step

    method = build(Mind)
    protocol = EpisodeProtocol(n_way=3, k_shot=1, n_query=5, episodes=EPISODES, seed=0)
    auto = FitConfig(steps=2, precision="32-true", accelerator="cpu", episodes_per_step=None)
    alone = episodes_per_step(method, 3, auto)
    rows_by_groups(method, four_class_folder, tmp_path, [[0, 1, 2, 3]])  # adapters hold 4 sets
    assert episodes_per_step(method, 3, auto) == alone
    evaluator = EpisodicEvaluator(method, ImageFolder(four_class_folder), protocol, tmp_path, auto)
    rows = evaluator.run_episodes([4, 5])
    assert [row["episode"] for row in rows] == [4, 5]


@pytest.mark.parametrize("tf32", [False, True])
def test_fit_sets_tf32_and_determinism_as_asked_and_restores_them(tf32):
    """torch lets cuDNN use TF32 by default: ``32-true`` is fp32 only with TF32 off."""
    import lightning as L

    from cdfsl.engine import fit_episode

    seen: list[tuple[bool, bool, bool]] = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                torch.are_deterministic_algorithms_enabled(),
            ))  # fmt: skip

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    method = build(LoRAFineTune)
    method.set_classes(["a", "b"])
    fit = FitConfig(steps=2, precision="32-true", accelerator="cpu", tf32=tf32, deterministic=True)
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    fit_episode(method, images, labels, 2, fit, callbacks=[Probe()])
    assert seen == [(tf32, tf32, True)] * 2
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    torch.use_deterministic_algorithms(False)  # Lightning leaves it set


def test_16_mixed_rows_are_the_rows_of_one_episode_at_a_time(four_class_folder, tmp_path):
    """Under 16-mixed the automatic E is 1, and a run of three episodes gives each episode the
    row it gets alone. (On a CPU Lightning 2.6 trains '16-mixed' as bf16-mixed, with a warning,
    and cdfsl scores the queries the same way; fp16 with a GradScaler is the CUDA path.)"""
    from cdfsl.results import ResultStore

    method = build(Mind)
    protocol = EpisodeProtocol(n_way=3, k_shot=1, n_query=5, episodes=3, seed=0)
    fp16 = FitConfig(steps=4, precision="16-mixed", accelerator="cpu")
    folder = ImageFolder(four_class_folder)
    EpisodicEvaluator(method, folder, protocol, tmp_path / "run", fp16, progress=False).run()
    rows = {row["episode"]: row for row in ResultStore(tmp_path / "run" / "results.jsonl").rows()}
    assert sorted(rows) == [0, 1, 2]
    assert all(row.get("status", "ok") == "ok" for row in rows.values())
    alone = EpisodicEvaluator(method, folder, protocol, tmp_path / "alone", fp16)
    assert_same_rows({1: alone.run_episodes([1])[0]}, {1: rows[1]})


# Ops that make the host wait for a GPU: a scalar read (item, bool, float, int), and ops whose
# output size depends on the data (boolean indexing goes through nonzero).
SYNC_OPS = {
    "_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive",
    "masked_select", "bincount", "repeat_interleave",
}  # fmt: skip


class SyncCounter:
    """Counts the sync ops dispatched inside the engine's fit, except AdamW's reads of its step
    counters: those live on the CPU on every device (``capturable=False``), so they never wait
    for a GPU."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, fit):
        import traceback

        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.__name__.split(".")[0] in SYNC_OPS:
                    # The frame that issued the op (Lightning runs the whole training step inside
                    # optimizer.step's closure, so only the innermost frame tells).
                    frames = traceback.extract_stack()[:-1]
                    caller = next(f for f in reversed(frames) if "/torch/_" not in f.filename)
                    if "torch/optim/" not in caller.filename:
                        counter.count += 1
                return func(*args, **(kwargs or {}))

        def counted(*args, **kwargs):
            with Mode():
                return fit(*args, **kwargs)

        return counted


@pytest.mark.parametrize(
    ("cls", "extra"), [(Mind, {}), (LoRAFineTune, {}), (Mind, {"support": "shared"})]
)
def test_a_training_step_makes_no_host_sync(cls, extra, four_class_folder, tmp_path, monkeypatch):
    """The step's metrics (alignment terms), the class coverage check and the non-finite guard
    read nothing back from the device: a longer fit adds no sync. (On a GPU each would stall the
    queue once per episode per step.)"""
    from cdfsl.engine import fit as engine_fit

    counts = []
    for steps in (2, 6):
        counter = SyncCounter()
        monkeypatch.setattr(engine_fit, "_fit", counter(engine_fit.__dict__["_fit"]))
        method = build(cls, **extra)
        fit = FitConfig(steps=steps, precision="32-true", accelerator="cpu", episodes_per_step=2)
        protocol = EpisodeProtocol(n_way=3, k_shot=1, n_query=5, episodes=2, seed=0)
        folder = ImageFolder(four_class_folder)
        EpisodicEvaluator(method, folder, protocol, tmp_path / f"{steps}", fit).run()
        monkeypatch.undo()
        counts.append(counter.count)
    assert counts[0] == counts[1], f"{counts[1] - counts[0]} syncs in 4 more steps"


def test_the_model_stays_on_its_device_between_groups(four_class_folder, tmp_path, monkeypatch):
    """Lightning's teardown would move the whole model to the CPU after every group's fit, and
    scoring would move it back: on a GPU, two copies of the backbone per group."""
    method = build(Mind)
    moves = []
    monkeypatch.setattr(method, "cpu", lambda: moves.append("cpu") or method)
    rows_by_groups(method, four_class_folder, tmp_path, [[0, 1], [2, 3]])
    assert moves == []


def test_automatic_episodes_per_step_counts_precision_mind_and_shared_ranks(monkeypatch):
    """E from memory: 16-bit activations take half the bytes, Mind forwards its clean support
    once more beside the views, and local ranks on one device split its free memory."""
    from cdfsl.engine import capacity, episodes_per_step

    support, views = 3, len(VIEWS)
    fine_tune, mind = build(LoRAFineTune), build(Mind)
    elements = capacity._projected_elements(fine_tune, torch.device("cpu"))
    one_fp32_episode = support * views * 16 * 4 * elements  # 16 saved fp32 activations each
    # Free memory for exactly 3 fp32 LoRA-CE episodes in its usable half.
    monkeypatch.setattr(capacity, "_free_bytes", lambda device: 2 * 3 * one_fp32_episode)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)

    def auto(method, precision):
        fit = FitConfig(precision=precision, accelerator="cpu", episodes_per_step=None)
        return episodes_per_step(method, support, fit)

    assert auto(fine_tune, "32-true") == 3
    assert auto(fine_tune, "bf16-mixed") == 6
    # Mind: (views + 1) x support images an episode: 3·views // (views + 1) = 2 episodes.
    assert auto(mind, "32-true") == (3 * views) // (views + 1) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert auto(fine_tune, "32-true") == 1
    assert auto(fine_tune, "bf16-mixed") == 3


def test_frozen_weights_cast_once_change_no_row(four_class_folder, tmp_path, monkeypatch):
    """Under bf16 autocast the frozen linear and convolution weights are held in bf16 for the
    fit and the scoring (autocast would cast each again at every call): the rows are the rows
    of per-call casting, bit for bit, and the fp32 weights come back unchanged."""
    from contextlib import contextmanager

    from torch.utils._python_dispatch import TorchDispatchMode

    from cdfsl.engine import fit as engine_fit
    from cdfsl.engine import predict as engine_predict

    bf16 = FitConfig(steps=3, precision="bf16-mixed", accelerator="cpu", episodes_per_step=2)
    protocol = EpisodeProtocol(n_way=3, k_shot=1, n_query=5, episodes=2, seed=0)
    folder = ImageFolder(four_class_folder)

    class Casts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and out.dtype == torch.bfloat16:
                Casts.count += 1
            return out

    def run(name):
        method = build(Mind)
        before = {k: v.clone() for k, v in method.state_dict().items()}
        Casts.count = 0
        with Casts():
            rows = EpisodicEvaluator(method, folder, protocol, tmp_path / name, bf16).run_episodes(
                [0, 1]
            )
        after = method.state_dict()
        frozen = [k for k, p in method.named_parameters() if not p.requires_grad]
        assert all(
            after[k].dtype == torch.float32 and torch.equal(after[k], before[k]) for k in frozen
        )
        return rows, Casts.count

    once, once_casts = run("once")

    @contextmanager
    def per_call(root, dtype):
        yield

    monkeypatch.setattr(engine_fit, "frozen_weights_in", per_call)
    monkeypatch.setattr(engine_predict, "frozen_weights_in", per_call)
    every, every_casts = run("every")
    for a, b in zip(once, every, strict=True):
        assert a["accuracy"] == b["accuracy"] and a["terms"] == b["terms"]
    # Per-call casting casts each frozen weight in every forward of every step and scoring.
    method = build(Mind)
    weights = sum(
        1
        for m in method.backbone.lora_root().modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    )
    assert every_casts - once_casts >= weights * bf16.steps


def test_the_next_group_loads_while_this_one_trains(four_class_folder, tmp_path, monkeypatch):
    """run() reads group g+1's images in a thread while group g trains; the rows are those of
    groups run one after another."""
    import threading

    from cdfsl.fewshot import episodic

    method = build(LoRAFineTune)
    protocol = EpisodeProtocol(n_way=3, k_shot=1, n_query=5, episodes=4, seed=0)
    fit = FitConfig(steps=2, precision="32-true", accelerator="cpu", episodes_per_step=2)
    folder = ImageFolder(four_class_folder)
    plain = EpisodicEvaluator(method, folder, protocol, tmp_path / "plain", fit)
    alone = {r["episode"]: r for g in ([0, 1], [2, 3]) for r in plain.run_episodes(g)}

    second_loaded = threading.Event()
    load_group = EpisodicEvaluator.load_group

    def watched_load(self, indices):
        episodes = load_group(self, indices)
        if list(indices) == [2, 3]:
            second_loaded.set()
        return episodes

    overlapped = []
    fit_episode = episodic.fit_episode

    def watched_fit(method, images, labels, *args, **kwargs):
        # Group [0, 1] trains only once group [2, 3] has been read beside it.
        overlapped.append(second_loaded.wait(timeout=20))
        return fit_episode(method, images, labels, *args, **kwargs)

    monkeypatch.setattr(EpisodicEvaluator, "load_group", watched_load)
    monkeypatch.setattr(episodic, "fit_episode", watched_fit)
    evaluator = EpisodicEvaluator(method, folder, protocol, tmp_path / "run", fit, progress=False)
    evaluator.run()
    assert overlapped == [True, True]
    from cdfsl.results import ResultStore

    rows = {r["episode"]: r for r in ResultStore(tmp_path / "run" / "results.jsonl").rows()}
    assert_same_rows(alone, rows)


# -- mutation follow-up (issue 23): capacity's inputs and the failure record ----------------------


def test_projected_elements_are_the_lora_inputs_of_one_image():
    """tiny-clip: 2 blocks of (16 patches + CLS) x width 64 feed the q/k/v projection; the
    count is per image whatever the adapter sets, and 0 without LoRA."""
    from cdfsl.engine import capacity

    method = build(LoRAFineTune)
    assert capacity._projected_elements(method, torch.device("cpu")) == 2 * (16 + 1) * 64
    method.start_episodes([0, 1, 2], [["a", "b"]] * 3)
    assert capacity._projected_elements(method, torch.device("cpu")) == 2 * (16 + 1) * 64
    assert capacity._projected_elements(build(ZeroShot), torch.device("cpu")) == 0

    siglip = LoRAFineTune(backbone="tiny-siglip", pretrained=None, lora=LoRAConfig(rank=4))
    trunk = siglip.backbone.lora_root().trunk  # open_clip's TimmModel holds the timm ViT
    tokens = trunk.patch_embed.num_patches + trunk.num_prefix_tokens
    expected = len(trunk.blocks) * tokens * trunk.embed_dim  # timm layout: one fused qkv Linear
    assert capacity._projected_elements(siglip, torch.device("cpu")) == expected


def test_ranks_sharing_a_device_come_from_the_launcher(monkeypatch):
    from cdfsl.engine import capacity

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert capacity._ranks_sharing(cpu) == 1
    for value, expected in (("4", 4), ("0", 1), ("junk", 1)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", value)
        assert capacity._ranks_sharing(cpu) == expected, value
    # On CUDA the local ranks spread over the visible GPUs: ceil(ranks / GPUs) share one.
    for ranks, gpus, expected in (("4", 2, 2), ("3", 2, 2), ("2", 4, 1), ("3", 0, 3)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
        monkeypatch.setattr(torch.cuda, "device_count", lambda gpus=gpus: gpus)
        assert capacity._ranks_sharing(cuda) == expected, (ranks, gpus)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert capacity._ranks_sharing(cuda) == 1


def test_free_bytes_read_available_memory(monkeypatch, tmp_path):
    """CPU: MemAvailable of /proc/meminfo (kB), 4 GiB where there is none; CUDA: the free bytes
    of mem_get_info (not the total)."""
    import builtins
    from pathlib import Path

    from cdfsl.engine import capacity

    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines())
        available = int(fields["MemAvailable"].split()[0]) * 1024
        assert capacity._free_bytes(torch.device("cpu")) == pytest.approx(available, rel=0.1)
    fake = tmp_path / "meminfo"
    fake.write_text("MemTotal:       9999 kB\nMemFree:  1 kB\nMemAvailable:    2048 kB\n")
    real_open = builtins.open

    def reading(target):
        def fake_open(path, *args, **kwargs):
            if str(path) == "/proc/meminfo":
                return real_open(target, *args, **kwargs)
            return real_open(path, *args, **kwargs)

        return fake_open

    monkeypatch.setattr(builtins, "open", reading(fake))
    assert capacity._free_bytes(torch.device("cpu")) == 2048 * 1024
    monkeypatch.setattr(builtins, "open", reading(tmp_path / "absent"))
    assert capacity._free_bytes(torch.device("cpu")) == 4 * 2**30
    monkeypatch.setattr(builtins, "open", real_open)

    asked = []

    def mem_get_info(device):
        asked.append(device)
        return (3 * 2**30, 80 * 2**30)

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    cuda = torch.device("cuda", 1)
    assert capacity._free_bytes(cuda) == 3 * 2**30 and asked == [cuda]


def test_a_failure_record_names_the_first_non_finite_term_before_the_loss():
    from cdfsl.engine.fit import failure_record

    nan, inf = float("nan"), float("inf")
    cases = [
        ({"loss": nan, "svl": 1.0, "ra": inf}, "ra", ["loss", "ra"]),
        ({"loss": nan, "ce": 2.0}, "loss", ["loss"]),
        ({"ce": nan, "loss": nan, "ra": nan}, "ce", ["ce", "loss", "ra"]),
        ({"loss": 1.0, "ce": 2.0}, "loss", []),
    ]
    for terms, term, bad in cases:
        record = failure_record(7.0, terms)
        assert record["step"] == 7 and isinstance(record["step"], int)
        assert record["term"] == term and record["non_finite"] == bad
        assert record["terms"] == {k: (None if k in bad else v) for k, v in terms.items()}


def test_fit_config_steps_and_precision_refusals():
    from cdfsl.engine.fit import FitConfig as Fit

    assert Fit(steps_per_shot=250).total_steps(5) == 1250
    assert Fit(steps=1, steps_per_shot=250).total_steps(5) == 1  # given steps win, 1 is enough
    assert Fit(steps_per_shot=1).total_steps(1) == 1
    for fit in (Fit(steps=0), Fit(steps_per_shot=0)):
        with pytest.raises(CdfslError) as err:
            fit.total_steps(5)
        assert str(err.value) == "steps must be >= 1, got 0; set --steps or --steps_per_shot"
    with pytest.raises(CdfslError) as err:
        Fit(precision="bf16-true")
    assert str(err.value) == (
        "precision='bf16-true': expected one of 32-true, 16-mixed, bf16-mixed (the LoRA weights "
        "stay fp32; a '*-true' low precision would cast them); fix --precision"
    )


class _GuardedEpisodes(torch.nn.Module):
    """What NonFiniteGuard reads of a method: E episodes' losses and their adapter sets."""

    def __init__(self, losses_by_step: list[list[float]]):
        from types import SimpleNamespace

        from cdfsl.lora import LoRALinear, qkv_slices

        super().__init__()
        self.proj = LoRALinear(
            torch.nn.Linear(4, 12), qkv_slices(4), LoRAConfig(rank=2, num_adapters=2)
        )
        self.losses_by_step, self.step = losses_by_step, 0
        self.episodes = [SimpleNamespace(terms={}) for _ in losses_by_step[0]]

    def begin_step(self) -> None:
        for episode, loss in zip(self.episodes, self.losses_by_step[self.step], strict=True):
            episode.terms = {"loss": torch.tensor(loss), "ce": torch.tensor(loss)}
        for p in (self.proj.q.lora_A, self.proj.q.lora_B):
            p.grad = torch.ones_like(p)
        self.step += 1

    def terms_snapshot(self) -> list[dict[str, float]]:
        return [{k: float(v) for k, v in e.terms.items()} for e in self.episodes]

    def episode_terms(self, index: int, snapshot: list[dict[str, float]]) -> dict[str, float]:
        return snapshot


def test_a_failed_episode_stays_failed_when_its_loss_turns_finite_again():
    """Episode 0's loss is NaN at step 1 only: its gradients stay zeroed at every later step,
    its record names step 1, episode 1 trains throughout, and a reused guard starts clean."""
    from types import SimpleNamespace

    from cdfsl.engine.fit import NonFiniteGuard

    nan = float("nan")
    module = _GuardedEpisodes([[1.0, 1.0], [nan, 2.0], [0.5, 0.5], [0.4, 0.4]])
    guard, trainer = NonFiniteGuard(), SimpleNamespace(global_step=0, should_stop=False)
    guard.all_failed, guard.failures = True, {5: {}}  # left over from an earlier fit
    guard.on_train_start(trainer, module)
    assert guard.failures == {} and guard.all_failed is False
    zeroed = []
    for step in range(4):
        trainer.global_step = step
        module.begin_step()
        guard.on_before_optimizer_step(trainer, module, None)
        grad = module.proj.q.lora_A.grad
        zeroed.append([bool(torch.count_nonzero(grad[e]) == 0) for e in range(2)])
    guard.on_train_end(trainer, module)
    assert zeroed == [[False, False], [True, False], [True, False], [True, False]]
    assert list(guard.failures) == [0] and guard.failures[0]["step"] == 1
    assert guard.failures[0]["term"] == "ce" and not guard.all_failed and not trainer.should_stop


def test_episodes_per_step_bounds_and_what_forces_one(monkeypatch):
    from cdfsl.data.views import ViewSpec
    from cdfsl.engine import capacity, episodes_per_step

    method = build(LoRAFineTune)
    one = FitConfig(precision="32-true", accelerator="cpu", episodes_per_step=1)
    assert episodes_per_step(method, 3, one) == 1
    with pytest.raises(CdfslError) as err:
        episodes_per_step(method, 3, FitConfig(accelerator="cpu", episodes_per_step=0))
    assert str(err.value) == (
        "episodes_per_step=0: expected an integer >= 1, or null to choose from memory"
    )
    monkeypatch.setattr(capacity, "_free_bytes", lambda device: 1 << 50)  # memory is no limit
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    auto = FitConfig(precision="32-true", accelerator="cpu", episodes_per_step=None)
    assert episodes_per_step(method, 3, auto) == 8  # the CPU cap
    batched = FitConfig(precision="32-true", accelerator="cpu", batch_size=2)
    assert episodes_per_step(method, 3, batched) == 1  # mini-batched support: one at a time
    # One view (the clean one) is one forward of the support set an episode: free memory for
    # exactly 3 such episodes gives 3.
    single = LoRAFineTune(
        backbone="tiny-clip", pretrained=None, views=(ViewSpec("clean"),), lora=LoRAConfig(rank=4)
    )
    elements = capacity._projected_elements(single, torch.device("cpu"))
    monkeypatch.setattr(capacity, "_free_bytes", lambda device: 2 * 3 * (3 * 16 * 4 * elements))
    assert episodes_per_step(single, 3, auto) == 3


def test_the_slow_bf16_warning_names_the_precision_and_the_fix(monkeypatch):
    """bf16 on a CPU without bf16 units warns, in full; fp32, CUDA, or a CPU
    with the units do not."""
    import warnings

    from cdfsl.engine import fit as engine_fit

    monkeypatch.setattr(engine_fit, "cpu_has_bf16", lambda: False)
    with pytest.warns(UserWarning) as caught:
        engine_fit.warn_if_slow_bf16("bf16-mixed", "cpu")
    assert [str(w.message) for w in caught] == [
        "precision 'bf16-mixed' on a CPU without bf16 matrix units (no amx_bf16 or avx512_bf16 "
        "flag): bf16 matmuls run 10-80x slower than fp32 here; pass --precision 32-true"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine_fit.warn_if_slow_bf16("32-true", "cpu")
        engine_fit.warn_if_slow_bf16("bf16-mixed", "cuda")
        monkeypatch.setattr(engine_fit, "cpu_has_bf16", lambda: True)
        engine_fit.warn_if_slow_bf16("bf16-mixed", "cpu")


# -- mutation follow-up (issue 23), second round: the engine's device and Trainer wiring ---------


def test_a_gpu_fingerprint_names_its_model(monkeypatch):
    from cdfsl.engine.fit import device_fingerprint

    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: asked.append(d) or "Fake H100")
    cuda = torch.device("cuda", 1)
    assert device_fingerprint(cuda) == {"type": "cuda", "name": "Fake H100"} and asked == [cuda]
    assert device_fingerprint(torch.device("cpu")) == {"type": "cpu"}


def test_a_launcher_rank_trains_on_its_own_gpu(monkeypatch):
    """Under a launcher (LOCAL_RANK set) the device is cuda:cuda_index(); without, the name's."""
    from cdfsl.engine import fit as engine_fit

    monkeypatch.setattr(engine_fit, "cuda_index", lambda: 3)
    monkeypatch.setattr(engine_fit, "resolve_device", lambda name, index: (name, index))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert FitConfig(accelerator="gpu").device() == ("gpu", None)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert FitConfig(accelerator="gpu").device() == ("gpu", 3)


def test_gpu_finite_flags_travel_without_blocking_and_are_read_after_their_event(monkeypatch):
    from cdfsl.engine.fit import _StepCheck

    calls: list[tuple] = []

    class FakeEvent:
        def record(self):
            calls.append(("record",))

        def synchronize(self):
            calls.append(("synchronize",))

    class OnGpu:
        device = torch.device("cuda", 0)

        def to(self, *args, **kwargs):
            calls.append(("to", args, kwargs))
            return torch.tensor([True, False])

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    check = _StepCheck.taken(4.0, OnGpu(), ["snapshot"])
    assert check.step == 4 and isinstance(check.step, int) and check.snapshot == ["snapshot"]
    assert calls == [("to", ("cpu",), {"non_blocking": True}), ("record",)]
    assert check.finite() == [True, False] and calls[-1] == ("synchronize",)


def test_16_mixed_on_a_cpu_is_bf16_autocast():
    from cdfsl.engine.fit import autocast_dtype

    assert autocast_dtype("16-mixed", "cpu") is torch.bfloat16  # as Lightning does, warning
    assert autocast_dtype("16-mixed", "cuda") is torch.float16
    assert autocast_dtype("bf16-mixed", "cuda") is torch.bfloat16
    assert autocast_dtype("32-true", "cpu") is None


def test_16_mixed_refuses_several_episodes_per_step_in_full():
    from cdfsl.engine import episodes_per_step

    fit = FitConfig(precision="16-mixed", accelerator="cpu", episodes_per_step=2)
    with pytest.raises(CdfslError) as err:
        episodes_per_step(build(LoRAFineTune), 3, fit)
    assert str(err.value) == (
        "precision '16-mixed' with 2 episodes per step: one GradScaler would cover every episode "
        "(an overflow in one skips the step of all); expected one episode per step under "
        "16-mixed; set --episodes_per_step 1 (or null), or use --precision bf16-mixed"
    )


def test_episode_seeds_follow_their_documented_derivation():
    """Stored rows record their seeds and resume by them: the derivation stays the docstring's
    (word 0 of SeedSequence([seed, index, 1]), low 31 bits)."""
    import numpy as np

    from cdfsl.engine import episode_seed

    for seed, index in ((0, 0), (0, 1), (7, 3), (2**40, 12345)):
        words = np.random.SeedSequence([seed, index, 1]).generate_state(4)
        assert episode_seed(seed, index) == int(words[0]) & 0x7FFFFFFF


def test_support_batches_of_one_and_of_the_whole_set():
    from cdfsl.engine.fit import _SupportBatches, support_loader

    images, labels = torch.arange(6).float().view(6, 1, 1, 1), torch.arange(6)
    ones = [lab.tolist() for _, lab in support_loader(images, labels, 12, 1, seed=0)]
    assert all(len(b) == 1 for b in ones) and sorted(b[0] for b in ones[:6]) == list(range(6))
    # Batch 5 of 10: every pass, the first and each reshuffled one, is two batches of all ten.
    ten = torch.arange(10)
    fives = [lab.tolist() for _, lab in support_loader(ten.float(), ten, 6, 5, seed=3)]
    for k in range(0, 6, 2):
        assert sorted(fives[k] + fives[k + 1]) == list(range(10)), fives
    # A batch as large as the set is the whole set in its order, as batch_size None.
    whole = _SupportBatches(images, labels, 3, 6, seed=0)
    assert whole.index is None and all(torch.equal(lab, labels) for _, lab in whole)
    with pytest.raises(IndexError, match=r"^step 3 of 3$"):
        whole[3]
    with pytest.raises(CdfslError) as err:
        support_loader(images, labels, 3, 0, seed=0)
    assert str(err.value) == "batch_size must be >= 1 or null, got 0"


def _caller() -> str:
    """Where a warning meant for fit_episode's caller points: this file; under mutmut, whose
    trampoline stands one frame between the caller and the engine, the trampoline."""
    import sys

    trampoline = sys.modules.get("mutmut.mutation.trampoline")
    return __file__ if trampoline is None else trampoline.__file__


def _spy_fit(monkeypatch):
    """Replace the Trainer part of fit_episode with a record of what it was handed."""
    from cdfsl.engine import fit as engine_fit

    seen: dict = {}

    def fake_fit(method, loader, steps, fit, device, callbacks):
        seen.update(loader=loader, device=device, sampling=method.view_sampling, steps=steps)

    monkeypatch.setattr(engine_fit, "_fit", fake_fit)
    return seen


def test_fit_episode_hands_the_trainer_the_support_on_its_device_in_the_methods_order(monkeypatch):
    from cdfsl.engine import fit_episode
    from cdfsl.engine.fit import _SupportBatches

    seen = _spy_fit(monkeypatch)
    method = build(LoRAFineTune, seed=7)
    images, labels = torch.rand(6, 3, 32, 32), torch.tensor([0, 0, 1, 1, 2, 2])
    monkeypatch.setattr(FitConfig, "device", lambda self: torch.device("meta"))
    fit = FitConfig(steps=5, precision="32-true", batch_size=2)
    with pytest.warns(UserWarning):
        fit_episode(method, images, labels, 5, fit)
    batches = seen["loader"].dataset
    assert seen["device"] == torch.device("meta") and seen["steps"] == 5
    assert batches.images.device.type == "meta" and batches.labels.device.type == "meta"
    # The batches are drawn from the method's seed (7), not from a constant.
    ids = torch.arange(6)

    def order(seed):
        return [i.tolist() for i in _SupportBatches(ids, ids, 5, 2, seed=seed).index]

    assert [i.tolist() for i in batches.index] == order(7) != order(0)


def test_per_episode_views_turn_per_step_only_while_a_mini_batched_fit_runs(monkeypatch):
    import warnings

    from cdfsl.engine import fit as engine_fit
    from cdfsl.engine import fit_episode

    seen = _spy_fit(monkeypatch)
    method = build(LoRAFineTune, view_sampling="per_episode")
    images, labels = torch.rand(6, 3, 32, 32), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.warns(UserWarning) as caught:
        fit_episode(method, images, labels, 3, FitConfig(steps=3, accelerator="cpu", batch_size=2))
    ours = [w for w in caught if "view_sampling" in str(w.message)]
    assert [str(w.message) for w in ours] == [
        "view_sampling per_episode with batch_size=2 of 6 support images: every step holds "
        "other images, so their views are drawn per_step for this fit (as CLIP-LoRA's loop "
        "does); set view_sampling: per_step to say so"
    ]
    assert ours[0].filename == _caller()  # points at the caller, not at the engine
    assert seen["sampling"] == "per_step" and method.view_sampling == "per_episode"
    # A batch of the whole support set is the paper's full-batch step: nothing to say.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_episode(
            method,
            images,
            labels,
            3,
            FitConfig(steps=3, precision="32-true", accelerator="cpu", batch_size=6),
        )
    assert seen["sampling"] == "per_episode"
    # The slow-bf16 warning too points at whoever called fit_episode.
    monkeypatch.setattr(engine_fit, "cpu_has_bf16", lambda: False)
    with pytest.warns(UserWarning, match="without bf16 matrix units") as caught:
        fit_episode(method, images, labels, 3, FitConfig(steps=3, accelerator="cpu"))
    assert [w.filename for w in caught if "bf16" in str(w.message)] == [_caller()]


def test_mini_batched_support_refuses_two_episodes_in_full(monkeypatch):
    from cdfsl.engine import fit_episode

    _spy_fit(monkeypatch)
    method = build(LoRAFineTune)
    method.start_episodes([0, 1], [["a", "b"]] * 2)
    fit = FitConfig(steps=3, precision="32-true", accelerator="cpu", batch_size=2)
    with pytest.raises(CdfslError) as err:
        fit_episode(method, torch.rand(4, 3, 32, 32), torch.tensor([0, 0, 1, 1]), 3, fit)
    assert str(err.value) == (
        "batch_size=2 with 2 episodes per step: expected one episode per step for mini-batched "
        "support sets; set episodes_per_step to 1 (or null)"
    )


def test_a_fit_writes_and_prints_nothing_and_passes_its_numerics_on(
    tmp_path, monkeypatch, capfd
):  # fmt: skip
    """No checkpoint, log, progress bar or model summary; TF32/determinism and the autocast
    dtype (16-mixed on a CPU: bf16) reach the Trainer's surroundings."""
    from cdfsl.engine import fit as engine_fit
    from cdfsl.engine import fit_episode

    asked: list = []
    real_numerics, real_frozen = engine_fit.cuda_numerics, engine_fit.frozen_weights_in
    monkeypatch.setattr(
        engine_fit, "cuda_numerics", lambda *a: asked.append(("numerics", *a)) or real_numerics(*a)
    )
    monkeypatch.setattr(
        engine_fit,
        "frozen_weights_in",
        lambda r, d: asked.append(("dtype", d)) or real_frozen(r, d),
    )
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    method = build(LoRAFineTune, class_names=["a", "b", "c"])
    images, labels = torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 2])
    fit = FitConfig(steps=2, precision="32-true", accelerator="cpu", tf32=True, deterministic=True)
    fit_episode(method, images, labels, 2, fit)
    assert ("numerics", True, True, "cpu") in asked and ("dtype", None) in asked
    half = FitConfig(steps=1, precision="16-mixed", accelerator="cpu")
    fit_episode(method, images, labels, 1, half)
    assert ("dtype", torch.bfloat16) in asked
    assert list(tmp_path.iterdir()) == []
    out, err = capfd.readouterr()
    assert out == "" and "it/s" not in err and "Trainable params" not in out + err


def test_a_fit_whose_episodes_all_fail_ends_early_without_an_interruption(monkeypatch):
    from cdfsl.engine import fit_episode
    from cdfsl.engine.fit import NonFiniteGuard

    method = build(LoRAFineTune, class_names=["a", "b", "c"])
    monkeypatch.setattr(
        method, "loss_terms",
        lambda *a: {"loss": torch.tensor(float("nan"), requires_grad=True) * 1.0},
    )  # fmt: skip
    guard, stops = NonFiniteGuard(), []
    assert guard.failures == {} and guard.all_failed is False  # before any fit
    monkeypatch.setattr(guard, "on_train_end", lambda t, m: stops.append(t.global_step))
    images, labels = torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 2])
    fit_episode(method, images, labels, 6, FIT, [guard])
    assert guard.all_failed and stops and stops[0] < 6


def test_check_finished_needs_every_step_and_no_interruption():
    from types import SimpleNamespace

    from cdfsl.engine.fit import check_finished

    check_finished(SimpleNamespace(interrupted=False, global_step=5), 5)
    for interrupted, step in ((True, 5), (False, 4), (True, 4)):
        with pytest.raises(KeyboardInterrupt):
            check_finished(SimpleNamespace(interrupted=interrupted, global_step=step), 5)


def test_the_guard_stops_the_trainer_once_every_episode_failed():
    from types import SimpleNamespace

    from cdfsl.engine.fit import NonFiniteGuard

    nan = float("nan")
    module = _GuardedEpisodes([[1.0, 1.0], [nan, nan], [nan, nan], [nan, nan]])
    guard, trainer = NonFiniteGuard(), SimpleNamespace(global_step=0, should_stop=False)
    guard.on_train_start(trainer, module)
    for step in range(3):
        trainer.global_step = step
        module.begin_step()
        guard.on_before_optimizer_step(trainer, module, None)
        # Step 1's flags are read at step 2: then every episode has failed.
        assert trainer.should_stop is (step == 2) and guard.all_failed is (step == 2)


def test_an_unknown_device_type_trains_one_episode_at_a_time(monkeypatch):
    from cdfsl.engine import episodes_per_step

    monkeypatch.setattr(FitConfig, "device", lambda self: torch.device("mps"))
    assert episodes_per_step(build(ZeroShot), 3, FitConfig(precision="32-true")) == 1


def test_projected_elements_are_counted_on_the_device_asked_for(monkeypatch):
    """The backbone goes to the device and the probe image is made there (meta stands in for a
    GPU: the forward itself runs on the CPU)."""
    from cdfsl.engine import capacity

    method = build(LoRAFineTune)
    backbone, seen = method.backbone, []
    real_encode = backbone.encode_image
    monkeypatch.setattr(backbone, "to", lambda device: seen.append(("to", device)) or backbone)
    monkeypatch.setattr(
        backbone, "encode_image", lambda x: seen.append(("image", x.device)) or real_encode(
            torch.zeros(x.shape))
    )  # fmt: skip
    meta = torch.device("meta")
    count = capacity._projected_elements(method, meta)
    assert seen == [("to", meta), ("image", meta)]
    assert count == 2 * (16 + 1) * 64 and isinstance(count, int)


def test_automatic_episodes_on_a_cpu_keep_a_steps_images_under_the_cap(monkeypatch):
    """Memory no limit: E = 256 // (support images x (views + Mind's clean forward)), in [1, 8]."""
    from cdfsl.engine import capacity, episodes_per_step

    monkeypatch.setattr(capacity, "_free_bytes", lambda device: 1 << 50)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    auto = FitConfig(precision="32-true", accelerator="cpu", episodes_per_step=None)
    mind = build(Mind)  # two views and the separate clean support: 3 forwards of the support
    assert episodes_per_step(mind, 5, auto) == 8  # 15 images an episode: the cap of 8
    assert episodes_per_step(mind, 25, auto) == 256 // 75 == 3
    assert episodes_per_step(mind, 100, auto) == 1  # 300 images: one episode all the same
    monkeypatch.setattr(FitConfig, "device", lambda self: torch.device("cuda"))
    monkeypatch.setattr(capacity, "_projected_elements", lambda method, device: 1)
    assert episodes_per_step(mind, 100, auto) == 32  # the cap is the CPU's


def test_compiled_steps_give_the_eager_rows_for_every_grouping(four_class_folder, tmp_path):
    """Training through torch.compile (inductor, LoRA dropout on): every grouping and position
    gives the rows of eager training, accuracies equal and terms to rounding."""
    from torch._dynamo.utils import counters

    method = build(Mind)
    eager = rows_by_groups(method, four_class_folder, tmp_path / "e", [list(range(EPISODES))])
    fit = replace(FIT, compile="inductor")
    graphs = counters["stats"]["unique_graphs"]
    # E = 1, 3 (reversed: every position moves) and 8 (reversed).
    groups = [[0], [1], [4, 3, 2], list(reversed(range(EPISODES)))]
    compiled = {}
    for i, group in enumerate(groups):
        compiled |= rows_by_groups(method, four_class_folder, tmp_path / f"c{i}", [group], fit)
        assert_same_rows({j: eager[j] for j in group}, {j: compiled[j] for j in group})
    assert counters["stats"]["unique_graphs"] > graphs  # it did compile
    assert method.step_features is None  # the compiled forward lasts the fit
