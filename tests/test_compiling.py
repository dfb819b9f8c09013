"""The compiled training forward: the same dropout draws and rows as eager, and a clear
fallback where inductor cannot run."""

from __future__ import annotations

import warnings

import pytest
import torch

from cdfsl.compiling import (
    EAGER,
    _warn_fallback,
    compiled_features_in,
    inductor_missing,
    resolve_step_compiler,
)
from cdfsl.engine import FitConfig
from cdfsl.errors import CdfslError
from cdfsl.lora import DropoutStreams, LoRAAdapter, LoRAConfig

needs_cxx = pytest.mark.skipif(
    inductor_missing("cpu") is not None, reason="inductor needs a C++ compiler here"
)


@pytest.fixture
def no_cxx():
    """A machine whose only C++ compiler setting names a program that does not exist."""
    from torch._inductor import config
    from torch._inductor.cpp_builder import cpp_compiler_search

    cpp_compiler_search.cache_clear()
    _warn_fallback.cache_clear()
    with config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
        yield
    cpp_compiler_search.cache_clear()
    _warn_fallback.cache_clear()


@needs_cxx
def test_compiled_dropout_draws_the_eager_masks_element_for_element():
    """Three adapter calls in one compiled graph: every element's keep/drop and the call count
    equal eager's; a second graph call continues the stream (its count is graph state)."""
    config = LoRAConfig(rank=4, alpha=4.0, dropout=0.25, num_adapters=2)
    adapter = LoRAAdapter(16, 0, 16, config).train()
    with torch.no_grad():
        adapter.lora_A.copy_(torch.eye(4, 16).expand(2, 4, 16))
        adapter.lora_B.copy_(torch.eye(16, 4).expand(2, 16, 4))
    x = torch.ones(6, 5, 16)

    def three_calls(x):
        return torch.stack([adapter(x, batch_dim=0) for _ in range(3)])

    adapter.streams = DropoutStreams([5, 9])
    eager = [three_calls(x), three_calls(x)]
    adapter.streams = DropoutStreams([5, 9])
    compiled_fn = torch.compile(three_calls, backend="inductor", fullgraph=True)
    compiled = [compiled_fn(x), compiled_fn(x)]
    assert adapter.streams.calls == 6
    for want, got in zip(eager, compiled, strict=True):
        assert torch.equal(want == 0, got == 0)  # the same dropped elements
        torch.testing.assert_close(got, want)
    assert not torch.equal(eager[0] == 0, eager[1] == 0)  # the stream moved on


@pytest.mark.usefixtures("no_cxx")
def test_a_missing_compiler_falls_back_to_eager_with_one_clear_warning():
    assert "C++ compiler" in inductor_missing("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_step_compiler("inductor", "cpu") == EAGER  # silent unless asked
    with pytest.warns(UserWarning) as caught:
        assert resolve_step_compiler("inductor", "cpu", warn=True) == EAGER
        assert resolve_step_compiler("inductor", "cpu", warn=True) == EAGER
    assert len(caught) == 1
    assert str(caught[0].message) == (
        "compile='inductor' on cpu: this machine lacks a C++ compiler (install g++, or point "
        "the CXX environment variable at one); training runs eagerly (rows record "
        "compile='eager'); set --compile eager to silence this"
    )
    # The run records what ran: eager, which runs before the setting left out.
    assert "compile" not in FitConfig(accelerator="cpu", compile="inductor").record()
    # A fit gives the warning too, and trains eagerly.
    _warn_fallback.cache_clear()
    method = torch.nn.Module()
    method.image_features = lambda images: images
    with (
        pytest.warns(UserWarning, match="lacks a C"),
        compiled_features_in(method, "inductor", "cpu"),
    ):
        assert method.step_features is None


@needs_cxx
def test_runs_record_the_compiler_only_where_it_is_not_eager():
    assert FitConfig(accelerator="cpu", compile="inductor").record()["compile"] == "inductor"
    assert "compile" not in FitConfig(accelerator="cpu").record()
    method = torch.nn.Module()
    method.image_features = lambda images: images
    with compiled_features_in(method, "inductor", "cpu"):
        assert method.step_features is not None
    assert method.step_features is None


def test_an_unknown_compiler_is_refused_naming_the_choices():
    with pytest.raises(CdfslError) as err:
        FitConfig(compile="tvm")
    assert str(err.value) == (
        "compile='tvm': expected one of ['eager', 'inductor']; set compile to eager or inductor"
    )


def test_cuda_needs_triton(monkeypatch):
    import torch.utils._triton as triton_utils

    monkeypatch.setattr(triton_utils, "has_triton", lambda: False)
    assert inductor_missing("cuda") == "Triton (pip install triton)"
    assert resolve_step_compiler("inductor", "cuda") == EAGER
    monkeypatch.setattr(triton_utils, "has_triton", lambda: True)
    assert inductor_missing("cuda") is None
    assert resolve_step_compiler("inductor", "cuda") == "inductor"


@needs_cxx
def test_the_inductor_row_runs_image_features_through_inductor(monkeypatch):
    """step_features is image_features compiled by inductor: the same values, one graph
    handed to inductor's compile_fx."""
    import torch._inductor.compile_fx as compile_fx

    handed = []
    original = compile_fx.compile_fx

    def spy(*args, **kwargs):
        handed.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(compile_fx, "compile_fx", spy)
    torch._dynamo.reset()
    method = torch.nn.Module()
    method.image_features = lambda images: torch.nn.functional.normalize(images.square(), dim=-1)
    images = torch.randn(4, 8)
    with compiled_features_in(method, "inductor", "cpu"):
        got = method.step_features(images)
    assert len(handed) == 1
    torch.testing.assert_close(got, method.image_features(images))


@needs_cxx
def test_a_graph_break_between_dropout_calls_backpropagates_the_eager_gradients():
    """Two graphs, each drawing dropout: the first one's backward reads the count it was given
    (the count must not change under it), and the adapters' gradients are eager's."""
    config = LoRAConfig(rank=4, alpha=4.0, dropout=0.25, num_adapters=2)
    torch.manual_seed(0)
    adapter = LoRAAdapter(16, 0, 16, config).train()
    with torch.no_grad():
        adapter.lora_B.normal_()
    x = torch.randn(6, 5, 16, requires_grad=True)  # as a block's input: its mask is saved

    def two_graphs(x):
        first = adapter(x, batch_dim=0)
        torch._dynamo.graph_break()
        return (first * adapter(x, batch_dim=0)).sum()

    grads = []
    for fn in (two_graphs, torch.compile(two_graphs, backend="inductor")):
        adapter.streams = DropoutStreams([5, 9])
        adapter.zero_grad()
        fn(x).backward()
        grads.append(adapter.lora_A.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])
