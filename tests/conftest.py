import logging
from pathlib import Path

import pytest
from imagegen import make_image_folder

# Libraries log through the root logger, whose first use would otherwise attach a handler to
# whatever stream pytest is capturing at that moment, and later tests would write to it closed.
logging.root.addHandler(logging.NullHandler())


@pytest.fixture
def attention_calls(monkeypatch) -> list[str]:
    """The names of the attention kernels called, in order (each still computes its attention)."""
    from dataclasses import replace

    from cdfsl.attention import ATTENTION_KERNELS

    called: list[str] = []
    for name in ATTENTION_KERNELS:
        entry = ATTENTION_KERNELS[name]

        def spy(*args, name=name, fn=entry.fn):
            called.append(name)
            return fn(*args)

        monkeypatch.setitem(ATTENTION_KERNELS._entries, name, replace(entry, fn=spy))
    return called


@pytest.fixture(scope="session")
def four_class_folder(tmp_path_factory) -> Path:
    """Four classes of 12 small images each: enough for 3-way 1-shot 5-query episodes."""
    root = tmp_path_factory.mktemp("folder")
    return make_image_folder(root, {"red_fox": 12, "blue_jay": 12, "gray_wolf": 12, "Oak": 12})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
