"""Episodes: determinism across processes, episode structure, DataLoader use, error messages."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from imagegen import make_image_folder
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cdfsl.data import (
    Episode,
    EpisodeIndices,
    EpisodeSampler,
    ImageFolder,
    LabelledImages,
    load_episode,
)
from cdfsl.errors import DataError

# 8 classes of 20, 30, ..., 90 images, interleaved so class membership is not contiguous.
TARGETS = [c for i in range(90) for c in range(8) if i < 20 + 10 * c]


def _sampler(**overrides: int) -> EpisodeSampler:
    args = dict(n_way=5, k_shot=2, n_query=3, num_episodes=50, seed=0) | overrides
    return EpisodeSampler(TARGETS, **args)


def test_same_arguments_same_episodes() -> None:
    first, second = _sampler(), _sampler()
    assert [first.episode(i) for i in range(50)] == [second.episode(i) for i in range(50)]
    assert list(first) == list(second)


def test_episode_does_not_depend_on_num_episodes() -> None:
    assert _sampler(num_episodes=3).episode(2) == _sampler(num_episodes=400).episode(2)


def test_pinned_episode_guards_against_silent_changes() -> None:
    # Result files of earlier runs are keyed by episode number: if this changes, they are stale.
    episode = EpisodeSampler([0, 1, 2, 0, 1, 2, 0, 1, 2, 3], 2, 1, 1, 10, seed=1).episode(4)
    assert episode == EpisodeIndices(
        index=4,
        class_ids=(1, 0),
        support=(7, 6),
        support_labels=(0, 1),
        query=(1, 3),
        query_labels=(0, 1),
    )


def test_fresh_process_gives_the_same_episode() -> None:
    code = (
        "import json, sys; from cdfsl.data import EpisodeSampler; "
        f"s = EpisodeSampler({TARGETS!r}, 5, 2, 3, 50, seed=11); "
        "e = s.episode(17); "
        "print(json.dumps([e.class_ids, e.support, e.query]))"
    )
    # Different hash seeds in the child make any use of Python's salted hash() visible.
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            cwd=Path(__file__).resolve().parents[1],
        ).stdout
        for hash_seed in ("1", "2")
    }
    here = _sampler(seed=11).episode(17)
    assert outputs == {json.dumps([here.class_ids, here.support, here.query]) + "\n"}


def test_different_index_or_seed_gives_different_episodes() -> None:
    sampler = _sampler()
    episodes = {sampler.episode(i) for i in range(50)}
    assert len({(e.class_ids, e.support, e.query) for e in episodes}) == 50
    assert _sampler(seed=1).episode(0) != _sampler(seed=0).episode(0)


def test_episode_structure() -> None:
    sampler = _sampler(num_episodes=100)
    for i in range(100):
        episode = sampler.episode(i)
        assert episode.index == i
        assert len(set(episode.class_ids)) == 5
        assert len(episode.support) == len(set(episode.support)) == 10
        assert len(episode.query) == len(set(episode.query)) == 15
        assert not set(episode.support) & set(episode.query)
        assert episode.support_labels == (0, 0, 1, 1, 2, 2, 3, 3, 4, 4)
        assert Counter(episode.query_labels) == dict.fromkeys(range(5), 3)
        # Relabelling: label l is dataset class class_ids[l], for every support and query image.
        for index, label in zip(
            episode.support + episode.query,
            episode.support_labels + episode.query_labels,
            strict=True,
        ):
            assert TARGETS[index] == episode.class_ids[label]


def test_only_classes_with_enough_images_are_used() -> None:
    # Classes 0..2 have 20, 30, 40 images; with 2 + 39 needed only classes 3..7 qualify.
    sampler = _sampler(n_query=39)
    assert sampler.eligible_classes == (3, 4, 5, 6, 7)
    used = {c for i in range(50) for c in sampler.episode(i).class_ids}
    assert used == {3, 4, 5, 6, 7}


def test_all_classes_and_images_get_drawn() -> None:
    sampler = _sampler(n_way=2, k_shot=1, n_query=1, num_episodes=2000)
    drawn = Counter(c for i in range(2000) for c in sampler.episode(i).class_ids)
    # 4000 draws over 8 classes: each about 500; a biased draw would skew this far more.
    assert set(drawn) == set(range(8))
    assert all(400 < n < 600 for n in drawn.values())


class _IndexDataset(Dataset):
    def __len__(self) -> int:
        return len(TARGETS)

    def __getitem__(self, index: int) -> tuple[int, int]:
        return index, TARGETS[index]


def test_sampler_serves_as_dataloader_batch_sampler() -> None:
    sampler = _sampler(num_episodes=4)
    loader = DataLoader(_IndexDataset(), batch_sampler=sampler)
    batches = list(loader)

    assert len(loader) == len(sampler) == 4
    for i, (indices, targets) in enumerate(batches):
        episode = sampler.episode(i)
        assert indices.tolist() == [*episode.support, *episode.query]
        assert targets.tolist() == [TARGETS[j] for j in indices.tolist()]


def _error(targets: list[int], **overrides: object) -> str:
    args = dict(n_way=5, k_shot=2, n_query=3, num_episodes=10) | overrides
    with pytest.raises(DataError) as err:
        EpisodeSampler(targets, **args)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_error_way_larger_than_classes() -> None:
    message = _error([0, 1, 2, 3, 4] * 10, n_way=7)
    assert message.startswith("way 7 but the dataset has 5 classes; lower --way")


def test_error_too_few_classes_with_enough_images() -> None:
    targets = [0] * 10 + [1] * 3 + [2] * 4 + [3] * 10
    message = _error(targets, n_way=3, class_names=["a", "b", "c", "d"])
    assert "need 5 images in each of 3 classes" in message
    assert "only 2 of 4 classes" in message
    assert "'b' (3), 'c' (4)" in message
    assert "--shot" in message
    assert "class 1 (3), class 2 (4)" in _error(targets, n_way=3)


@pytest.mark.parametrize("name", ["n_way", "k_shot", "n_query", "num_episodes"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_error_non_positive_arguments(name: str, value: object) -> None:
    message = _error(TARGETS, **{name: value})
    assert f"{name}={value}" in message
    assert "positive integer" in message


def test_error_bad_seed_and_targets() -> None:
    assert "seed=-1" in _error(TARGETS, seed=-1)
    assert "class indices" in _error([0.5, 1.0] * 20)


def test_episode_index_out_of_range() -> None:
    with pytest.raises(IndexError, match="episode 50"):
        _sampler().episode(50)


def test_accepts_numpy_and_tensor_targets() -> None:
    import numpy as np

    expected = _sampler().episode(3)
    for targets in (np.array(TARGETS), torch.tensor(TARGETS)):
        assert EpisodeSampler(targets, 5, 2, 3, 50).episode(3) == expected


def _to_tensor(image: Image.Image) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as tvf

    return tvf.to_dtype(tvf.pil_to_tensor(image.resize((8, 8))), torch.float32, scale=True)


def test_load_episode_from_an_image_folder(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"AnnualCrop": 4, "Forest": 5, "SeaLake": 6}, size=12)
    dataset = ImageFolder(tmp_path)
    assert isinstance(dataset, LabelledImages)
    sampler = EpisodeSampler(dataset.targets, 2, 1, 2, 5, seed=3)
    indices = sampler.episode(1)

    episode = load_episode(dataset, indices, _to_tensor)

    assert isinstance(episode, Episode)
    assert episode.index == 1
    assert episode.support_images.shape == (2, 3, 8, 8)
    assert episode.query_images.shape == (4, 3, 8, 8)
    assert episode.support_labels.tolist() == [0, 1]
    assert episode.query_labels.tolist() == [0, 0, 1, 1]
    assert episode.support_labels.dtype == episode.query_labels.dtype == torch.long
    assert episode.class_names == [dataset.class_names[c] for c in indices.class_ids]
    assert episode.support_ids == tuple(dataset.sample_id(i) for i in indices.support)
    assert episode.query_ids == tuple(dataset.sample_id(i) for i in indices.query)
    # Each support image is the one named by its id, and its folder is its label's class.
    for image, sample_id, label in zip(
        episode.support_images, episode.support_ids, episode.support_labels.tolist(), strict=True
    ):
        assert sample_id.split("/")[0] == dataset.classes[indices.class_ids[label]]
        index = indices.support[episode.support_ids.index(sample_id)]
        assert torch.equal(image, _to_tensor(dataset.load(index)))


def test_load_episode_without_to_tensor_reads_no_image(tmp_path: Path, monkeypatch) -> None:
    """to_tensor None (frozen-feature methods): empty image tensors, no image opened, and the
    labels, names and ids of the episode loaded with images."""
    make_image_folder(tmp_path, {"AnnualCrop": 4, "Forest": 5, "SeaLake": 6}, size=12)
    dataset = ImageFolder(tmp_path)
    indices = EpisodeSampler(dataset.targets, 2, 1, 2, 5, seed=3).episode(1)
    loaded = load_episode(dataset, indices, _to_tensor)

    def refuse(index: int) -> None:
        raise AssertionError(f"image {index} was read")

    monkeypatch.setattr(dataset, "load", refuse)
    bare = load_episode(dataset, indices, None)
    for images in (bare.support_images, bare.query_images):
        assert images.shape == (0,) and images.dtype == torch.float32
    for field in ("support_labels", "query_labels"):
        assert torch.equal(getattr(bare, field), getattr(loaded, field))
    for field in ("class_names", "support_ids", "query_ids", "index"):
        assert getattr(bare, field) == getattr(loaded, field)


def test_load_episode_refuses_mixed_sizes(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"a": 3, "b": 3}, size=12)
    Image.new("RGB", (20, 10)).save(tmp_path / "a" / "a_0.png")  # a different size
    dataset = ImageFolder(tmp_path)
    indices = EpisodeIndices(0, (0, 1), (0, 3), (0, 1), (1, 4), (0, 1))

    def no_resize(image: Image.Image) -> torch.Tensor:
        return torch.zeros(3, image.height, image.width)

    with pytest.raises(DataError, match="make to_tensor resize") as err:
        load_episode(dataset, indices, no_resize)
    assert "a/a_0.png" in str(err.value)


# -- mutation follow-up (issue 23): the rejection bound, boundaries, full messages ----------------


def _raw(seed: int, index: int, count: int) -> list[int]:
    """The first ``count`` raw 64-bit outputs of the episode's PCG64 (numpy's stable stream)."""
    import numpy as np

    return [int(v) for v in np.random.default_rng([seed, index]).bit_generator.random_raw(count)]


def _below_by_hand(raw: list[int], n: int) -> int:
    # Unbiased: accept v < 2^64 - (2^64 mod n), the largest multiple of n <= 2^64; else redraw.
    limit = 2**64 - 2**64 % n
    return next(v for v in raw if v < limit) % n


def test_uniform_draws_reject_the_top_partial_block() -> None:
    from cdfsl.data.episodes import UniformDraws

    # n = 3·2^62: 2^64 mod n = 2^62, so draws >= 3·2^62 (a quarter) are rejected, and those in
    # [2^63, 3·2^62) accepted (where 2^65 mod n = 2^63 would wrongly reject them).
    n = 3 * 2**62
    firsts = set()
    for seed in range(40):
        raw = _raw(seed, 0, 64)
        assert UniformDraws(seed, 0).below(n) == _below_by_hand(raw, n), seed
        firsts.add(raw[0] >= n if raw[0] >= 2**63 else None)
    assert firsts >= {True, False}  # both kinds of first draw were met


def test_uniform_draws_reject_a_draw_equal_to_the_bound() -> None:
    from cdfsl.data.episodes import UniformDraws

    # With n = v, the first raw draw (v > 2^63), the bound 2^64 - (2^64 mod n) is v itself:
    # v is rejected (v < bound fails) and the next draw below v is returned, not v % v = 0.
    seed = next(s for s in range(100) if _raw(s, 3, 1)[0] > 2**63)
    raw = _raw(seed, 3, 64)
    n = raw[0]
    assert 2**64 - 2**64 % n == n
    expected = next(v for v in raw[1:] if v < n)
    assert UniformDraws(seed, 3).below(n) == expected != 0


@pytest.mark.parametrize("seed", [True, 1.5, "3"])
def test_error_seed_must_be_an_integer(seed: object) -> None:
    assert _error(TARGETS, seed=seed) == f"seed={seed!r}; expected an integer >= 0; fix --seed"


def test_error_targets_message() -> None:
    assert _error([[0, 1]] * 20) == (
        "targets of shape (20, 2) and dtype int64; expected a flat sequence of class indices "
        ">= 0; pass dataset.targets"
    )


def test_empty_targets_have_no_classes() -> None:
    assert _error([]) == "way 5 but the dataset has 0 classes; lower --way to at most 0"


def test_class_ids_are_compared_as_integers() -> None:
    # 2^53 and 2^53 + 1 are one float64 but two int64 class ids.
    sampler = EpisodeSampler([2**53, 2**53 + 1] * 4, n_way=2, k_shot=1, n_query=1, num_episodes=1)
    assert sampler.eligible_classes == (2**53, 2**53 + 1)


def test_way_may_equal_the_class_count_and_a_class_may_have_exactly_enough_images() -> None:
    # 8 classes; class 0 has exactly k + q = 2 images.
    targets = [0, 0] + [c for c in range(1, 8) for _ in range(3)]
    sampler = EpisodeSampler(targets, n_way=8, k_shot=1, n_query=1, num_episodes=3)
    assert sampler.eligible_classes == tuple(range(8))
    assert sorted(sampler.episode(0).class_ids) == list(range(8))


def test_error_lists_only_short_classes_and_at_most_eight() -> None:
    # Class 0 has exactly the 5 needed (not short); classes 1..8 have 4 each: eight short.
    eight = [0] * 5 + [c for c in range(1, 9) for _ in range(4)]
    shown = ", ".join(f"class {c} (4)" for c in range(1, 9))
    assert _error(eight, n_way=2) == (
        "2-way 2-shot episodes with 3 queries need 5 images in each of 2 classes, but only 1 of "
        f"9 classes have that many; short: {shown}; lower --shot, --query or --way, or add images"
    )
    nine = eight + [9] * 4
    assert _error(nine, n_way=2) == (
        "2-way 2-shot episodes with 3 queries need 5 images in each of 2 classes, but only 1 of "
        f"10 classes have that many; short: {shown} and 1 more; lower --shot, --query or --way, "
        "or add images"
    )


def test_load_episode_labels_are_int64_and_names_can_be_given(tmp_path: Path) -> None:
    import numpy as np

    make_image_folder(tmp_path, {"a": 2, "b": 2}, size=8)
    dataset = ImageFolder(tmp_path)
    # Labels as numpy int32 (a manifest read by another tool): still int64 tensors.
    label = np.int32
    indices = EpisodeIndices(0, (0, 1), (0, 2), (label(0), label(1)), (1, 3), (label(0), label(1)))
    episode = load_episode(dataset, indices, _to_tensor, class_names=["first", "second"])
    assert episode.support_labels.dtype == episode.query_labels.dtype == torch.int64
    assert episode.support_labels.tolist() == episode.query_labels.tolist() == [0, 1]
    assert episode.class_names == ["first", "second"]


def test_load_episode_mixed_sizes_message_names_both_images(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"a": 3, "b": 3}, size=12)
    Image.new("RGB", (20, 10)).save(tmp_path / "a" / "a_0.png")  # the first image is the odd one
    dataset = ImageFolder(tmp_path)
    indices = EpisodeIndices(0, (0, 1), (0, 1), (0, 0), (3, 4), (1, 1))

    def no_resize(image: Image.Image) -> torch.Tensor:
        return torch.zeros(3, image.height, image.width)

    message = (
        "to_tensor gave shape (3, 10, 20) for a/a_0.png but (3, 12, 12) for a/a_1.jpg; expected "
        "one (3, H, W) shape for every image; make to_tensor resize to a fixed size"
    )
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        load_episode(dataset, indices, no_resize)
