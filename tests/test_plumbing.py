"""cdfsl.plumbing against hand-computed values and round trips."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from jsonargparse import Namespace

from cdfsl.errors import CdfslError
from cdfsl.plumbing import (
    plain_json,
    resolve_device,
    save_torch_atomic,
    warmup_cosine,
    write_json_atomic,
    write_jsonl_atomic,
)


def test_warmup_cosine_by_hand():
    # total 10, warm-up 2: steps 0, 1 at 1/2, 2/2; step 2 starts the cosine at 1; step 6 is
    # halfway ((6 - 2)/8 = 1/2: cos(π/2) = 0 -> 1/2); step 10 and later hold the floor.
    assert [warmup_cosine(s, 10, 2) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert math.isclose(warmup_cosine(6, 10, 2), 0.5)
    assert math.isclose(warmup_cosine(10, 10, 2), 0.0, abs_tol=1e-12)
    assert math.isclose(warmup_cosine(12, 10, 2, floor=0.02), 0.02)
    assert math.isclose(warmup_cosine(6, 10, 2, floor=0.02), 0.02 + 0.98 * 0.5)


@dataclass
class _Point:
    x: int
    label: tuple[str, ...]


def test_plain_json_turns_configs_into_json_values():
    value = {"a": Namespace(b=(1, 2), c=_Point(3, ("u",))), 4: None, "d": {1.5}}
    assert plain_json(value) == {
        "a": {"b": [1, 2], "c": {"x": 3, "label": ["u"]}}, "4": None, "d": repr({1.5}),
    }  # fmt: skip


def test_atomic_writes_round_trip_and_leave_no_temporary(tmp_path):
    write_json_atomic(tmp_path / "a" / "x.json", {"b": 1, "a": [2]})
    assert (tmp_path / "a" / "x.json").read_text() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'
    write_jsonl_atomic(tmp_path / "rows.jsonl", [{"é": 1}, [2]])
    lines = (tmp_path / "rows.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"é": 1}, [2]] and "é" in lines[0]
    save_torch_atomic({"t": torch.arange(3)}, tmp_path / "t.pt")
    assert torch.equal(torch.load(tmp_path / "t.pt")["t"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.rglob("*") if p.name.startswith(".")) == []


def test_a_failed_torch_save_leaves_the_old_file(tmp_path, monkeypatch):
    save_torch_atomic([1], tmp_path / "t.pt")

    def boom(obj, path):
        path.write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_torch_atomic([2], tmp_path / "t.pt")
    assert torch.load(tmp_path / "t.pt") == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["t.pt"]


def test_resolve_device_names_and_refusals():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        for name in ("cuda", "gpu", "cuda:1"):
            with pytest.raises(CdfslError, match=f"device '{name}' requested but CUDA is absent"):
                resolve_device(name)
    else:
        assert resolve_device("gpu", 0) == torch.device("cuda", 0)


def test_plain_json_writes_non_finite_numbers_as_null():
    assert plain_json({"a": float("nan"), "b": [float("inf"), 1.5]}) == {
        "a": None,
        "b": [None, 1.5],
    }


def test_quiet_loggers_raise_the_level_below_a_prefix_and_restore_it():
    import logging

    from cdfsl.plumbing import quiet_loggers

    child = logging.getLogger("cdfsl-test.quiet.child")
    child.setLevel(logging.DEBUG)
    with quiet_loggers(("cdfsl-test.quiet",), logging.ERROR):
        assert child.level == logging.ERROR
        assert logging.getLogger("cdfsl-test.quiet").level == logging.ERROR
    assert child.level == logging.DEBUG
