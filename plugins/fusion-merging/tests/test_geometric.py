"""Golden tests for the geometric kernels: expected values are closed forms written out here."""

from __future__ import annotations

import math

import pytest
import torch
from fusion_merging.geometric import METHODS, ExPO, Karcher, ModelStock, MultiSlerp, NuSlerp, Slerp

from fusion_core.config import make_config
from fusion_core.engine.kernel import KernelContext
from fusion_core.errors import ConfigError, InputError

torch.set_num_threads(1)

D = torch.float64


# Model Stock's closed forms below are mergekit's mean-cosine convention, pinned explicitly
# (FusionBench's mean-angle default is tested in test_conventions.py and tests/parity).
PINNED = {ModelStock: {"convention": "mergekit"}}


def run(cls, base, tensors, **cfg):
    method = cls(cls.Config(**{**PINNED.get(cls, {}), **cfg}))
    return method.kernel("w", base, list(tensors), KernelContext(name="w", seed=0))


def vec(*xs, dtype=D):
    return torch.tensor(xs, dtype=dtype)


def assert_close(actual, expected, tol=1e-10):
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("cls", METHODS)
def test_methods_describe_themselves(cls):
    assert cls.name and cls.summary and "\n" not in cls.summary
    assert cls.reference_url.startswith("https://")
    for field in __import__("attrs").fields(cls.Config):
        assert field.metadata["help"]
    cls.Config()  # every field has a default


def test_method_names():
    assert [c.name for c in METHODS] == ["slerp", "nuslerp", "multislerp", "karcher", "model_stock", "expo"]


# --------------------------------------------------------------------------- SLERP


@pytest.mark.parametrize("t", [0.1, 0.25, 0.5, 0.9])
def test_slerp_quarter_circle_with_norms(t):
    a, b = vec(1.0, 0.0), vec(0.0, 3.0)
    # θ = π/2: sin((1-t)π/2)·a + sin(tπ/2)·b, unnormalised
    expected = vec(math.cos(t * math.pi / 2), 3.0 * math.sin(t * math.pi / 2))
    assert_close(run(Slerp, a, [b], t=t), expected)
    assert_close(run(Slerp, None, [a, b], t=t), expected)


def test_slerp_general_angle_matrix_is_flattened():
    phi = 1.2
    a = vec(2.0, 0.0, 0.0, 0.0).reshape(2, 2)
    b = vec(math.cos(phi), math.sin(phi), 0.0, 0.0).reshape(2, 2)
    t = 0.3
    expected = (math.sin((1 - t) * phi) / math.sin(phi)) * a + (math.sin(t * phi) / math.sin(phi)) * b
    out = run(Slerp, a, [b], t=t)
    assert out.shape == (2, 2)
    assert_close(out, expected)


def test_slerp_endpoints_are_exact():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    assert torch.equal(run(Slerp, a, [b], t=0.0), a)
    assert torch.equal(run(Slerp, a, [b], t=1.0), b)
    assert torch.equal(run(Slerp, None, [a, b], t=0.0), a)


def test_slerp_antiparallel_is_linear_and_exactly_zero_at_half():
    a = vec(1.5, -2.0, 0.25)
    out = run(Slerp, a, [-a], t=0.5)
    assert torch.equal(out, torch.zeros(3, dtype=D))
    assert_close(run(Slerp, a, [-a], t=0.25), 0.5 * a)


def test_slerp_near_parallel_uses_lerp():
    a, b = vec(1.0, 0.0), vec(2.0, 0.02)  # cos ≈ 0.99995 > 0.9995
    assert_close(run(Slerp, a, [b], t=0.3), 0.7 * a + 0.3 * b)


def test_slerp_zero_vector_gives_linear_interpolation():
    # documented choice: no direction → lerp, t·b (mergekit would give sin(tπ/2)·b)
    b = vec(0.0, 4.0, 3.0)
    out = run(Slerp, torch.zeros(3, dtype=D), [b], t=0.3)
    assert_close(out, 0.3 * b)
    assert not torch.allclose(out, math.sin(0.3 * math.pi / 2) * b)
    assert_close(run(Slerp, b, [torch.zeros(3, dtype=D)], t=0.3), 0.7 * b)


def test_slerp_half_precision_input_computes_in_float32():
    a = vec(1.0, 0.0, dtype=torch.float16)
    b = vec(0.0, 1.0, dtype=torch.float16)
    out = run(Slerp, a, [b], t=0.5)
    assert out.dtype == torch.float32
    assert_close(out.double(), vec(math.sqrt(0.5), math.sqrt(0.5)), tol=1e-6)


def test_slerp_input_count_and_t_range():
    a = vec(1.0, 0.0)
    with pytest.raises(InputError, match="exactly 1 fine-tuned"):
        run(Slerp, a, [a, a])
    with pytest.raises(InputError, match="exactly 2"):
        run(Slerp, None, [a])
    with pytest.raises(ConfigError, match=r"t must be in \[0.0, 1.0\]"):
        make_config(Slerp.Config, {"t": 1.5})


# --------------------------------------------------------------------------- NuSLERP


def test_nuslerp_t_from_weights():
    a, b = vec(1.0, 0.0), vec(0.0, 1.0)
    t = 3.0 / 4.0
    assert_close(run(NuSlerp, None, [a, b], weights=[1.0, 3.0]), vec(math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)))
    assert_close(run(NuSlerp, None, [a, b], weights=[1.0, 0.0]), a)
    # equal weights and the default both mean t = 0.5
    half = vec(math.sqrt(0.5), math.sqrt(0.5))
    assert_close(run(NuSlerp, None, [a, b]), half)
    assert_close(run(NuSlerp, None, [a, b], weights=[2.0, 2.0]), half)


def test_nuslerp_weights_summing_to_zero_mean_half():
    a, b = vec(1.0, 0.0), vec(0.0, 1.0)
    assert NuSlerp(NuSlerp.Config(weights=[1.0, -1.0])).interpolation_factor() == 0.5
    assert_close(run(NuSlerp, None, [a, b], weights=[1.0, -1.0]), vec(math.sqrt(0.5), math.sqrt(0.5)))


def test_nuslerp_with_base_interpolates_task_vectors():
    base = vec(10.0, -1.0)
    t1, t2 = vec(2.0, 0.0), vec(0.0, 2.0)
    out = run(NuSlerp, base, [base + t1, base + t2], weights=[1.0, 1.0])
    assert_close(out, base + vec(2 * math.sqrt(0.5), 2 * math.sqrt(0.5)))


def test_nuslerp_row_and_column_wise():
    t = 0.5
    a = vec(1.0, 0.0, 1.0, 0.0).reshape(2, 2)
    b = vec(0.0, 1.0, 1.0, 0.0).reshape(2, 2)
    # rows: row 0 is (1,0)->(0,1), orthogonal; row 1 is (1,0)->(1,0), identical
    rows = run(NuSlerp, None, [a, b], flatten=False, row_wise=True)
    assert_close(rows, vec(math.sqrt(0.5), math.sqrt(0.5), 1.0, 0.0).reshape(2, 2))
    # columns: col 0 is (1,1)->(0,1) at 45°, col 1 is (0,0)->(1,0) (zero → lerp)
    cols = run(NuSlerp, None, [a, b], flatten=False, row_wise=False)
    phi = math.pi / 4
    col0 = (math.sin((1 - t) * phi) / math.sin(phi)) * vec(1.0, 1.0) + (math.sin(t * phi) / math.sin(phi)) * vec(0.0, 1.0)
    expected = torch.stack([col0, vec(0.5, 0.0)], dim=1)
    assert_close(cols, expected)
    # flattened differs from both
    flat = run(NuSlerp, None, [a, b])
    assert not torch.allclose(flat, rows) and not torch.allclose(flat, cols)


def test_nuslerp_needs_two_models_and_matching_weights():
    a = vec(1.0, 0.0)
    method = NuSlerp(NuSlerp.Config())
    with pytest.raises(InputError, match="at least 2"):
        method.check_inputs(1, False)
    with pytest.raises(InputError, match="at most 2"):
        method.check_inputs(3, True)
    with pytest.raises(InputError, match="weights has 3"):
        run(NuSlerp, None, [a, a], weights=[1.0, 1.0, 1.0])


# --------------------------------------------------------------------------- Multi-SLERP


def test_multislerp_orthogonal_pair():
    # u = e1, e2; m̂ = (1,1)/√2; scale = 0.5·1 + 0.5·3
    out = run(MultiSlerp, None, [vec(1.0, 0.0), vec(0.0, 3.0)])
    assert_close(out, 2.0 * vec(math.sqrt(0.5), math.sqrt(0.5)), tol=1e-7)


def test_multislerp_weighted_three_with_base():
    base = vec(1.0, 1.0, 1.0)
    xs = [vec(2.0, 0.0, 0.0), vec(0.0, 1.0, 0.0), vec(0.0, 0.0, 4.0)]
    w = [1.0, 2.0, 1.0]
    wn = [x / 4.0 for x in w]
    direction = vec(*wn) / math.sqrt(sum(x * x for x in wn))
    scale = wn[0] * 2 + wn[1] * 1 + wn[2] * 4
    out = run(MultiSlerp, base, [base + x for x in xs], weights=w)
    assert_close(out, base + scale * direction, tol=1e-7)


def test_multislerp_cancelling_pair_falls_back_to_linear():
    x = vec(1.0, -2.0, 0.5)
    assert torch.equal(run(MultiSlerp, None, [x, -x]), torch.zeros(3, dtype=D))
    # with unequal raw weights but normalisation off: linear Σ wᵢxᵢ
    assert_close(run(MultiSlerp, None, [x, -x], weights=[1.0, 1.0], normalize_weights=False), torch.zeros(3, dtype=D))


def test_multislerp_cancelling_three_raises():
    x = vec(1.0, 0.0)
    with pytest.raises(InputError, match="cancel out in tensor 'w'"):
        run(MultiSlerp, None, [x, -x, torch.zeros(2, dtype=D)])


def test_multislerp_rejects_zero_sum_weights_when_normalising():
    with pytest.raises(ConfigError, match="weights sum to 0"):
        make_config(MultiSlerp.Config, {"weights": [1.0, -1.0]})
    make_config(MultiSlerp.Config, {"weights": [1.0, -1.0], "normalize_weights": False})


# --------------------------------------------------------------------------- Karcher


def test_karcher_equal_inputs_return_the_input():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, generator=g, dtype=D)
    assert_close(run(Karcher, None, [x, x, x]), x, tol=1e-12)


def test_karcher_two_points_is_geodesic_midpoint():
    phi = 2.0
    a, b = vec(2.0, 0.0), vec(4.0 * math.cos(phi), 4.0 * math.sin(phi))
    assert_close(run(Karcher, None, [a, b]), 3.0 * vec(math.cos(phi / 2), math.sin(phi / 2)))


def test_karcher_on_a_great_circle_is_the_mean_angle():
    # for points on one arc the intrinsic mean angle is the arithmetic mean (0.5), unlike the
    # normalised chordal mean atan2(Σ sin, Σ cos)
    angles = [0.0, 0.3, 1.2]
    xs = [vec(math.cos(a), math.sin(a), 0.0) for a in angles]
    out = run(Karcher, None, xs)
    assert_close(out, vec(math.cos(0.5), math.sin(0.5), 0.0), tol=1e-9)
    chordal = math.atan2(sum(map(math.sin, angles)), sum(map(math.cos, angles)))
    assert abs(chordal - 0.5) > 1e-2


def test_karcher_general_points_satisfy_first_order_condition():
    g = torch.Generator().manual_seed(7)
    base_dir = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0], dtype=D)
    xs = [base_dir + 0.6 * torch.randn(5, generator=g, dtype=D) for _ in range(4)]
    out = run(Karcher, None, xs, max_iter=50, tol=1e-12)
    mu = out / out.norm()
    logs = []
    for x in xs:
        u = x / x.norm()
        theta = math.acos(float(u @ mu))
        logs.append(theta / math.sin(theta) * (u - math.cos(theta) * mu))
    assert float(torch.stack(logs).mean(0).norm()) < 1e-10
    assert math.isclose(float(out.norm()), float(sum(x.norm() for x in xs) / 4), rel_tol=1e-12)
    # one step is not yet converged
    one = run(Karcher, None, xs, max_iter=1, tol=1e-12)
    assert float((one - out).norm()) > 1e-8


def test_karcher_zero_inputs_count_only_in_scale():
    out = run(Karcher, None, [vec(2.0, 0.0), vec(0.0, 2.0), torch.zeros(2, dtype=D)])
    assert_close(out, (4.0 / 3.0) * vec(math.sqrt(0.5), math.sqrt(0.5)))
    assert torch.equal(run(Karcher, None, [torch.zeros(2, dtype=D)] * 2), torch.zeros(2, dtype=D))


def test_karcher_ignores_base():
    a, b = vec(1.0, 0.0), vec(0.0, 1.0)
    assert_close(run(Karcher, vec(100.0, 5.0), [a, b]), run(Karcher, None, [a, b]), tol=0)


# --------------------------------------------------------------------------- Model Stock


def test_model_stock_two_models_closed_form():
    base = vec(1.0, 2.0, 3.0)
    t1, t2 = vec(1.0, 0.0, 0.0), vec(1.0, 1.0, 0.0)
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    mean = base + (t1 + t2) / 2
    out = run(ModelStock, base, [base + t1, base + t2])
    assert_close(out, t * mean + (1 - t) * base)


def test_model_stock_three_models_pairwise_mean():
    base = torch.zeros(3, dtype=D)
    xs = [vec(1.0, 0.0, 0.0), vec(0.0, 2.0, 0.0), vec(1.0, 1.0, 0.0)]
    c = (0.0 + 1 / math.sqrt(2) + 1 / math.sqrt(2)) / 3
    t = 3 * c / (1 + 2 * c)
    out = run(ModelStock, base, xs)
    assert_close(out, t * (sum(xs) / 3))


def test_model_stock_identical_finetunes():
    base = vec(1.0, -1.0)
    assert torch.equal(run(ModelStock, base, [base.clone(), base.clone()]), base)
    # identical non-zero task vectors: cos = 1, t = 1, the fine-tune itself
    x = vec(3.0, 4.0)
    assert_close(run(ModelStock, base, [x, x, x]), x)


def test_model_stock_negative_cos_extrapolates_and_singular_ratio_returns_base():
    base = torch.zeros(2, dtype=D)
    a, b = vec(1.0, 0.0), vec(-0.5, math.sqrt(3) / 2)  # cos = -0.5, t = 2(-.5)/(1-.5) = -2
    assert_close(run(ModelStock, base, [a, b]), -2.0 * (a + b) / 2)
    # cos = -1 with N = 2: 1 + (N-1)cos = 0 → base
    base = vec(5.0, 5.0)
    assert torch.equal(run(ModelStock, base, [base + a, base - a]), base)


def test_model_stock_filter_wise():
    base = torch.zeros(2, 2, dtype=D)
    x1 = vec(1.0, 0.0, 1.0, 0.0).reshape(2, 2)
    x2 = vec(0.0, 1.0, 2.0, 0.0).reshape(2, 2)
    # row 0: cos 0 → t 0 → base row; row 1: cos 1 → t 1 → mean row
    out = run(ModelStock, base, [x1, x2], filter_wise=True)
    assert_close(out, vec(0.0, 0.0, 1.5, 0.0).reshape(2, 2))
    flat = run(ModelStock, base, [x1, x2])
    c = 2.0 / (math.sqrt(2) * math.sqrt(5))
    t = 2 * c / (1 + c)
    assert_close(flat, t * (x1 + x2) / 2)


def test_model_stock_needs_base_and_two_models():
    method = ModelStock(ModelStock.Config(convention="mergekit"))
    with pytest.raises(InputError, match="needs a base"):
        method.check_inputs(2, False)
    with pytest.raises(InputError, match="at least 2"):
        method.check_inputs(1, True)


# --------------------------------------------------------------------------- ExPO


def test_expo_single_and_multiple():
    base = vec(1.0, 2.0)
    ft = vec(2.0, 0.0)
    assert_close(run(ExPO, base, [ft], alpha=0.5), vec(2.5, -1.0))
    assert_close(run(ExPO, base, [ft], alpha=0.0), ft)
    other = vec(4.0, 4.0)
    mean = vec(3.0, 2.0)
    assert_close(run(ExPO, base, [ft, other], alpha=0.3), mean + 0.3 * (mean - base))
    with pytest.raises(ConfigError, match="alpha must be in"):
        make_config(ExPO.Config, {"alpha": -0.1})
    assert ExPO.elementwise and ExPO.capabilities.needs_base
