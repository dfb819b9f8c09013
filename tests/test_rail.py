"""RAIL regressors against direct float64 solves, and the fusion rule on hand-computed cases.

Measured on these problems (float64 direct solve as reference, relative Frobenius error of W,
H=256): float64 recursive primal ~1e-13 with the default U(±1/sqrt(D)) layer, ~1e-12 with an
N(0, 1) layer; float32 recursive primal ~3e-6 (condition number of Phi^T Phi + lambda I ~3e3)
and ~1e-3 (~3e4) with N(0, 1). The tolerances below leave a margin over the N(0, 1) figures.
"""

import itertools

import pytest
import torch
from torch.nn import functional as F

from cdfsl.continual.rail import DualRegressor, PrimalRegressor, fuse, rbf_kernel
from cdfsl.errors import CdfslError

D, C, H = 24, 9, 256


def _problem(n: int = 240, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm float64 features around C class centres, and their labels."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(C, D, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, C, (n,), generator=g)
    noise = 0.6 * torch.randn(n, D, generator=g, dtype=torch.float64) / D**0.5
    return F.normalize(centres[labels] + noise, dim=1), labels


def _ridge(phi: torch.Tensor, labels: torch.Tensor, num_classes: int, reg: float) -> torch.Tensor:
    """The joint ridge solution (Phi^T Phi + reg I)^-1 Phi^T Y, solved directly in float64."""
    gram = phi.T @ phi + reg * torch.eye(phi.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram, phi.T @ F.one_hot(labels, num_classes).double())


def _feed(adapter, x, y, cuts, num_classes_at):
    """Update block by block: rows cuts[i]:cuts[i+1], label space as num_classes_at says."""
    for lo, hi in itertools.pairwise(cuts):
        adapter.update(x[lo:hi], y[lo:hi], num_classes_at(y[:hi]))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


# -- primal ----------------------------------------------------------------------------------
def test_hidden_layer_is_relu_of_a_seeded_random_projection():
    a, b = PrimalRegressor(D, H, seed=3), PrimalRegressor(D, H, seed=3)
    x, _ = _problem(5)
    assert a.projection.shape == (D, H) and torch.equal(a.projection, b.projection)
    assert not torch.equal(a.projection, PrimalRegressor(D, H, seed=4).projection)
    assert torch.equal(a.hidden_features(x), torch.clamp(x @ a.projection, min=0))
    # float32 and float64 adapters of one seed share the same random layer
    f32 = PrimalRegressor(D, H, seed=3, dtype="float32")
    assert torch.equal(f32.projection.double(), a.projection)
    normal = PrimalRegressor(D, H, seed=3, random_init="normal")
    assert not torch.equal(normal.projection, a.projection)
    again = PrimalRegressor(D, H, 0.1, 3, random_init="normal")
    assert torch.equal(normal.projection, again.projection)


def _preactivation_variance_check(random_init: str, unit_variance: float) -> None:
    """Pre-activations w·x of one fixed x over H iid units against Var = ||x||² · unit_variance.

    The sample variance of H iid draws has standard error about sqrt(2 / H) of the variance (a
    sum of 512 uniform terms is near-Gaussian); the tolerance is 5 of those.
    """
    d, h = 512, 40000
    x = torch.randn(1, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x = 1.7 * F.normalize(x, dim=1)  # ||x||² = 2.89, to see the norm enter
    pre = (x @ PrimalRegressor(d, h, seed=0, random_init=random_init).projection)[0]
    expected = float((x * x).sum()) * unit_variance
    assert float(pre.mean()) == pytest.approx(0.0, abs=5 * (expected / h) ** 0.5)
    assert float(pre.var()) == pytest.approx(expected, rel=5 * (2 / h) ** 0.5)


def test_default_random_layer_is_the_references_nn_linear_init():
    # nn.Linear(512, H, bias=False) draws U(-1/sqrt(512), 1/sqrt(512)); a uniform on (-b, b) has
    # variance b²/3, so Var(w·x) = ||x||² / (3 d) for x fixed.
    d = 512
    _preactivation_variance_check("uniform_fan_in", 1.0 / (3 * d))
    w = PrimalRegressor(d, 4000, seed=1).projection
    bound = d**-0.5
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.999 * bound
    assert PrimalRegressor(d, 8).random_init == "uniform_fan_in"


def test_normal_random_layer_has_unit_variance_weights():
    _preactivation_variance_check("normal", 1.0)


def test_old_primal_states_load_as_the_normal_layer_they_drew():
    state = PrimalRegressor(D, 16, seed=2, random_init="normal").state_dict()
    del state["config"]["random_init"]  # as saved before the option existed
    loaded = PrimalRegressor.from_state_dict(state)
    assert loaded.random_init == "normal" and torch.equal(loaded.projection, state["projection"])


@pytest.mark.parametrize(
    ("order", "cuts", "block_size"),
    [
        ("as-is", [0, 240], 1024),  # one call, one block
        ("as-is", [0, 40, 41, 130, 240], 1024),  # uneven calls, a single-row call
        ("as-is", [0, 240], 7),  # one call streamed in blocks of 7
        ("reversed", [0, 100, 240], 33),
        ("shuffled", [0, 60, 120, 180, 240], 16),
    ],
)
def test_recursive_primal_equals_joint_ridge(order, cuts, block_size):
    x, y = _problem()
    perm = {
        "as-is": torch.arange(240),
        "reversed": torch.arange(239, -1, -1),
        "shuffled": torch.randperm(240, generator=torch.Generator().manual_seed(1)),
    }[order]
    x, y = x[perm], y[perm]
    adapter = PrimalRegressor(D, H, reg=0.1, seed=0, block_size=block_size)
    # The label space grows as classes appear, so W is padded between updates.
    _feed(adapter, x, y, cuts, lambda seen: int(seen.max()) + 1)
    phi = torch.relu(x @ adapter.projection)
    joint = _ridge(phi, y, C, 0.1)
    assert adapter.num_classes == C
    assert _rel(adapter.weights, joint) < 1e-9
    gram = phi.T @ phi + 0.1 * torch.eye(H, dtype=torch.float64)
    assert _rel(adapter.inverse, torch.linalg.inv(gram)) < 1e-9
    assert torch.allclose(adapter.scores(x), phi @ joint, atol=1e-9)


def test_primal_pads_classes_learned_later_and_matches_joint_solution_at_each_step():
    x, y = _problem()
    first = y < 4  # step 1 knows classes 0..3 only, step 2 brings 4..8
    adapter = PrimalRegressor(D, H, seed=0, block_size=50)
    adapter.update(x[first], y[first], 4)
    phi = torch.relu(x @ adapter.projection)
    assert _rel(adapter.weights, _ridge(phi[first], y[first], 4, 0.1)) < 1e-9
    adapter.update(x[~first], y[~first], C)
    # Rows of step 1 carry zero targets for classes 4..8: the joint problem over all rows.
    x_all, y_all = torch.cat([x[first], x[~first]]), torch.cat([y[first], y[~first]])
    phi_all = torch.relu(x_all @ adapter.projection)
    assert _rel(adapter.weights, _ridge(phi_all, y_all, C, 0.1)) < 1e-9


def test_float32_primal_holds_the_identity_to_the_stated_tolerance():
    x, y = _problem(600)
    a32 = PrimalRegressor(D, H, seed=0, dtype=torch.float32, block_size=100, random_init="normal")
    a32.update(x.float(), y, C)
    phi = torch.relu(x @ a32.projection.double())
    joint = _ridge(phi, y, C, 0.1)
    assert a32.weights.dtype == torch.float32
    assert _rel(a32.weights, joint) < 5e-3  # measured ~1e-3 (see module docstring)
    scores = a32.scores(x.float()).double()
    assert (scores - phi @ joint).abs().max() < 2e-3
    assert torch.equal(scores.argmax(1), (phi @ joint).argmax(1))


def test_primal_state_dict_continues_exactly():
    x, y = _problem()
    a = PrimalRegressor(D, 64, seed=2, block_size=40)
    a.update(x[:100], y[:100], C)
    b = PrimalRegressor.from_state_dict(a.state_dict())
    a.update(x[100:], y[100:], C)
    b.update(x[100:], y[100:], C)
    assert torch.equal(a.weights, b.weights) and torch.equal(a.inverse, b.inverse)
    assert a.state_bytes() == (D * 64 + 64 * 64 + 64 * C) * 8


def test_primal_errors_name_the_input():
    x, y = _problem(10)
    adapter = PrimalRegressor(D, 16)
    with pytest.raises(CdfslError, match=r"random_init='xavier': expected one of"):
        PrimalRegressor(D, 16, random_init="xavier")
    with pytest.raises(CdfslError, match=r"features of shape \(10, 23\)"):
        adapter.update(x[:, :-1], y, C)
    with pytest.raises(CdfslError, match="labels in"):
        adapter.update(x, y, 2)
    adapter.update(x, y, C)
    with pytest.raises(CdfslError, match="num_classes=3: expected >= 9"):
        adapter.update(x, y % 3, 3)
    with pytest.raises(CdfslError, match="reg"):
        PrimalRegressor(D, 16, reg=0.0)


# -- dual ------------------------------------------------------------------------------------
def _fresh_kernel_solve(x, y, num_classes, gamma, reg):
    """alpha and (K + reg I)^-1 from scratch, the kernel from torch.cdist."""
    kernel = torch.exp(-gamma * torch.cdist(x, x) ** 2)
    a = kernel + reg * torch.eye(len(x), dtype=torch.float64)
    return torch.linalg.solve(a, F.one_hot(y, num_classes).double()), torch.linalg.inv(a)


def test_rbf_kernel_matches_its_definition():
    x, _ = _problem(7)
    z, _ = _problem(5, seed=1)
    expected = torch.exp(-0.3 * ((x[:, None, :] - z[None, :, :]) ** 2).sum(-1))
    assert torch.allclose(rbf_kernel(x, z, 0.3), expected, atol=1e-12)


@pytest.mark.parametrize(
    ("cuts", "block_size"),
    [([0, 240], 1024), ([0, 240], 1), ([0, 17, 18, 150, 240], 1024), ([0, 90, 240], 25)],
)
def test_incremental_dual_equals_fresh_kernel_solve(cuts, block_size):
    x, y = _problem()
    adapter = DualRegressor(gamma=0.1, reg=1e-3, block_size=block_size)
    _feed(adapter, x, y, cuts, lambda seen: int(seen.max()) + 1)
    alpha, inverse = _fresh_kernel_solve(x, y, C, 0.1, 1e-3)
    assert adapter.num_stored == 240 and torch.equal(adapter.memory, x)
    assert _rel(adapter.inverse, inverse) < 1e-8
    assert _rel(adapter.alpha, alpha) < 1e-8
    queries, _ = _problem(30, seed=5)
    expected = torch.exp(-0.1 * torch.cdist(queries, x) ** 2) @ alpha
    assert torch.allclose(adapter.scores(queries), expected, atol=1e-8 * expected.abs().max())


def test_dual_growing_label_space_and_state_round_trip():
    x, y = _problem()
    first = y < 5
    adapter = DualRegressor(gamma=0.5, reg=1e-2, block_size=64)
    assert adapter.scores(x[:3]).shape == (3, 0)
    adapter.update(x[first], y[first], 5)
    copy = DualRegressor.from_state_dict(adapter.state_dict())
    for a in (adapter, copy):
        a.update(x[~first], y[~first], C)
    order = torch.cat([x[first], x[~first]]), torch.cat([y[first], y[~first]])
    alpha, _ = _fresh_kernel_solve(*order, C, 0.5, 1e-2)
    assert _rel(adapter.alpha, alpha) < 1e-8
    assert torch.equal(adapter.alpha, copy.alpha) and torch.equal(adapter.inverse, copy.inverse)
    n = adapter.num_stored
    assert adapter.state_bytes() == (n * D + n * n + n * C) * 8


# -- fusion ----------------------------------------------------------------------------------
def test_fuse_mixes_adapter_scores_when_zero_shot_picks_a_seen_class():
    p = torch.tensor([[0.6, 0.3, 0.1]])
    seen = torch.tensor([True, False, False])
    scores = torch.tensor([[0.1, 0.9, 0.9]])  # unseen columns are ignored
    # 0.2·p + 0.8·[0.1, 0, 0]
    assert torch.allclose(fuse(p, scores, seen, beta=0.8), torch.tensor([[0.2, 0.06, 0.02]]))


def test_fuse_keeps_zero_shot_when_it_picks_an_unseen_class():
    p = torch.tensor([[0.2, 0.7, 0.1]])
    seen = torch.tensor([True, False, False])
    assert torch.equal(fuse(p, torch.tensor([[9.0, 0.0, 0.0]]), seen), p)


def test_fuse_can_move_the_prediction_between_seen_classes_only():
    p = torch.tensor([[0.5, 0.4, 0.1], [0.1, 0.1, 0.8]])
    seen = torch.tensor([True, True, False])
    scores = torch.tensor([[0.0, 1.0, 5.0], [1.0, 0.0, 0.0]])
    fused = fuse(p, scores, seen, beta=0.8)
    assert torch.allclose(fused[0], torch.tensor([0.1, 0.88, 0.02]))
    assert torch.equal(fused[1], p[1])  # row 2 takes its argmax (class 2) as unseen
    assert fused.argmax(1).tolist() == [1, 2]
    assert torch.equal(fuse(p, scores, seen, beta=0.0), p)
    assert torch.allclose(fuse(p, scores, seen, beta=1.0)[0], torch.tensor([0.0, 1.0, 0.0]))


def test_fuse_errors_name_the_input():
    p = torch.full((2, 3), 1 / 3)
    with pytest.raises(CdfslError, match="pad regressor scores"):
        fuse(p, torch.zeros(2, 2), torch.ones(3, dtype=torch.bool))
    with pytest.raises(CdfslError, match="seen_class_mask"):
        fuse(p, torch.zeros(2, 3), torch.ones(2, dtype=torch.bool))
    with pytest.raises(CdfslError, match="beta"):
        fuse(p, torch.zeros(2, 3), torch.ones(3, dtype=torch.bool), beta=1.5)


# -- mutation follow-up (issue 23): messages, dtypes and devices of the state, defaults ----------
def _message(text: str) -> str:
    import re

    return f"^{re.escape(text)}$"


def test_feature_and_label_shape_messages_in_full():
    tail = "; pass one feature row per sample, from the backbone the regressor learned with"
    with pytest.raises(
        CdfslError, match=_message("features of shape (2, 3): expected (N, 4)" + tail)
    ):
        PrimalRegressor(4, 8).scores(torch.zeros(2, 3))
    with pytest.raises(
        CdfslError, match=_message("features of shape (3,): expected (N, D)" + tail)
    ):
        DualRegressor().scores(torch.zeros(3))  # nothing stored: any D
    message = "labels of shape (3,): expected (2,), one class index per feature row"
    with pytest.raises(CdfslError, match=_message(message)):
        PrimalRegressor(4, 8).update(torch.zeros(2, 4), torch.zeros(3, dtype=torch.long), 2)


def test_primal_hidden_features_take_the_regressors_dtype_and_device():
    x = torch.rand(3, 4, generator=torch.Generator().manual_seed(0))  # float32
    adapter = PrimalRegressor(4, 8)
    expected = (x.double() @ adapter.projection).clamp_min(0.0)
    phi = adapter.hidden_features(x)
    assert phi.dtype == torch.float64
    assert torch.equal(phi, expected)
    elsewhere = PrimalRegressor(4, 8, device="meta")  # stands in for a GPU: CPU x moves there
    assert elsewhere.hidden_features(x).device.type == "meta"


def test_state_bytes_before_any_update_count_layer_and_weights_only():
    assert PrimalRegressor(4, 8).state_bytes() == 4 * 8 * 8  # W is (8, 0), M not yet allocated


def test_state_dicts_name_their_kind_and_load_into_the_configured_dtype_and_device():
    x, y = _problem(30)
    for cls, make in (
        (PrimalRegressor, lambda: PrimalRegressor(D, 16)),
        (DualRegressor, DualRegressor),
    ):
        adapter = make()
        adapter.update(x, y, C)
        state = adapter.state_dict()
        assert state["kind"] == ("primal" if cls is PrimalRegressor else "dual")
        expected = adapter.scores(x[:5])
        # A float64 state read as float32: every tensor converted, scores within float32 error.
        state["config"]["dtype"] = "float32"
        single = cls.from_state_dict(state)
        tensors = [v for v in vars(single).values() if isinstance(v, torch.Tensor)]
        assert tensors and all(t.dtype == torch.float32 for t in tensors)
        assert torch.allclose(single.scores(x[:5]).double(), expected, atol=1e-4)
        moved = cls.from_state_dict(state, device="meta")
        assert moved.device.type == "meta"
        assert all(
            v.device.type == "meta" for v in vars(moved).values() if isinstance(v, torch.Tensor)
        )


def test_dual_defaults_bounds_and_fresh_state():
    adapter = DualRegressor()
    assert (adapter.gamma, adapter.reg, adapter.block_size) == (0.1, 1e-3, 1024)
    state = adapter.state_dict()
    for key in ("memory", "inverse", "alpha"):
        assert state[key].shape == (0, 0) and state[key].dtype == torch.float64, key
    assert adapter.num_classes == adapter.num_stored == 0
    on_meta = DualRegressor(device="meta")
    assert on_meta.device.type == "meta"
    assert all(getattr(on_meta, k).device.type == "meta" for k in ("memory", "inverse", "alpha"))
    for gamma, reg in ((0.0, 1e-3), (0.1, 0.0)):
        message = f"DualRegressor(gamma={gamma}, reg={reg}): expected both > 0"
        with pytest.raises(CdfslError, match=_message(message)):
            DualRegressor(gamma, reg)
    message = "DualRegressor block_size=0: expected an integer >= 1"
    with pytest.raises(CdfslError, match=_message(message)):
        DualRegressor(block_size=0)


def test_fuse_mask_of_any_dtype_and_device_keeps_the_probabilities_dtype():
    p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])  # float32
    scores = torch.tensor([[0.1, 0.9, 0.9], [0.5, 0.5, 0.5]], dtype=torch.float64)
    fused = fuse(p, scores, torch.tensor([1, 0, 0]), beta=0.8)  # an int mask
    assert fused.dtype == torch.float32
    # Row 0 picks seen class 0: 0.2·p + 0.8·[0.1, 0, 0]; row 1 picks unseen class 1: p.
    assert torch.allclose(fused, torch.tensor([[0.2, 0.06, 0.02], [0.2, 0.7, 0.1]]))
    on_meta = fuse(p.to("meta"), scores.to("meta"), torch.tensor([True, False, False]))
    assert on_meta.device.type == "meta" and on_meta.shape == (2, 3)


def test_fuse_messages_in_full():
    p = torch.full((2, 3), 1 / 3)
    message = (
        "fuse got zero_shot_probs (2, 3) and regressor_scores (2, 2): expected both (B, C); pad "
        "regressor scores with zero columns for classes the regressor has not learned"
    )
    with pytest.raises(CdfslError, match=_message(message)):
        fuse(p, torch.zeros(2, 2), torch.ones(3, dtype=torch.bool))
    message = "seen_class_mask of shape (2,): expected (3,), one flag per class of the sequence"
    with pytest.raises(CdfslError, match=_message(message)):
        fuse(p, torch.zeros(2, 3), torch.ones(2, dtype=torch.bool))


def test_primal_defaults_bounds_and_fresh_state():
    adapter = PrimalRegressor(2)
    config = (adapter.hidden, adapter.reg, adapter.seed, adapter.block_size, adapter.random_init)
    assert config == (15000, 0.1, 0, 1024, "uniform_fan_in")
    assert adapter.dtype == torch.float64 and adapter.num_classes == 0
    assert adapter.weights.shape == (15000, 0) and adapter.inverse is None
    assert PrimalRegressor(1, 1, block_size=1).projection.shape == (1, 1)  # 1 is positive
    for in_dim, hidden, block_size in ((0, 4, 4), (4, 0, 4), (4, 4, 0)):
        message = (
            f"PrimalRegressor(in_dim={in_dim}, hidden={hidden}, block_size={block_size}): "
            "expected positive integers"
        )
        with pytest.raises(CdfslError, match=_message(message)):
            PrimalRegressor(in_dim, hidden, block_size=block_size)
    on_meta = PrimalRegressor(4, 8, device="meta")
    assert on_meta.device.type == on_meta.projection.device.type == "meta"
    assert on_meta.weights.device.type == "meta"


def test_random_layer_is_drawn_in_float32_whatever_the_default_dtype():
    bound = 4**-0.5
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        uniform = PrimalRegressor(4, 8, seed=3).projection
        normal = PrimalRegressor(4, 8, seed=3, random_init="normal").projection
    finally:
        torch.set_default_dtype(before)
    draw = torch.rand(4, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    assert torch.equal(uniform, (draw * (2 * bound) - bound).double())
    gauss = torch.randn(4, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    assert torch.equal(normal, gauss.double())


def test_label_range_and_class_count_messages_in_full():
    x = torch.zeros(3, 4)
    adapter = PrimalRegressor(4, 8)
    message = (
        "labels in [0, 2]: expected 0 <= label < num_classes=2; raise num_classes to cover the "
        "new classes"
    )
    with pytest.raises(CdfslError, match=_message(message)):
        adapter.update(x, torch.tensor([0, 1, 2]), 2)  # label == num_classes is out of range
    adapter.update(x, torch.tensor([0, 1, 2]), 3)
    message = (
        "num_classes=2: expected >= 3 (classes already learned); pass the size of the label "
        "space seen so far, which only grows"
    )
    with pytest.raises(CdfslError, match=_message(message)):
        adapter.update(x, torch.tensor([0, 1, 1]), 2)
