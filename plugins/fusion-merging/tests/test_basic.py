"""Golden tests for simple_average, weighted_average and linear_interpolation."""

from __future__ import annotations

import attrs
import pytest
import torch
from fusion_merging import basic
from fusion_merging.basic import LinearInterpolation, SimpleAverage, WeightedAverage

from fusion_core.engine.kernel import KernelContext
from fusion_core.errors import InputError

torch.set_num_threads(1)


def merge(cls, tensors, base=None, name="layer.weight", **config):
    return cls(cls.Config(**config)).kernel(name, base, list(tensors), KernelContext(name=name, seed=0))


def t(*values):
    return torch.tensor(values)


def test_simple_average_of_two_is_the_mean():
    assert torch.equal(merge(SimpleAverage, [t(1.0, 2.0), t(3.0, 6.0)]), t(2.0, 4.0))


def test_simple_average_of_three_ignores_a_base():
    out = merge(SimpleAverage, [t(1.0, -3.0), t(2.0, 0.0), t(6.0, 6.0)], base=t(100.0, 100.0))
    assert torch.equal(out, t(3.0, 1.0))


def test_simple_average_does_not_modify_its_inputs():
    a, b = t(1.0, 2.0), t(3.0, 4.0)
    merge(SimpleAverage, [a, b])
    assert torch.equal(a, t(1.0, 2.0)) and torch.equal(b, t(3.0, 4.0))


def test_weighted_average_normalized():
    # (1·[4, 8] + 3·[0, 4]) / 4 = [1, 5]
    assert torch.equal(merge(WeightedAverage, [t(4.0, 8.0), t(0.0, 4.0)], weights=[1.0, 3.0]), t(1.0, 5.0))


def test_weighted_average_unnormalized_is_the_weighted_sum():
    out = merge(WeightedAverage, [t(4.0, 8.0), t(0.0, 4.0)], weights=[1.0, 3.0], normalize=False)
    assert torch.equal(out, t(4.0, 20.0))


def test_weighted_average_negative_weights_extrapolate():
    # (2·a − b) / (2 − 1)
    out = merge(WeightedAverage, [t(4.0, 8.0), t(0.0, 4.0)], weights=[2.0, -1.0])
    assert torch.equal(out, t(8.0, 12.0))


def test_weighted_average_default_weights_equal_the_mean():
    assert torch.equal(merge(WeightedAverage, [t(1.0, 2.0), t(3.0, 6.0)]), t(2.0, 4.0))


def test_weighted_average_zero_weight_sum_is_a_clear_error():
    with pytest.raises(ValueError, match="sum to 0.*normalize=false"):
        WeightedAverage.Config(weights=[1.0, -1.0])
    # without normalize a zero sum is fine: a − b
    out = merge(WeightedAverage, [t(4.0, 8.0), t(1.0, 4.0)], weights=[1.0, -1.0], normalize=False)
    assert torch.equal(out, t(3.0, 4.0))


def test_weighted_average_weights_must_match_the_model_count():
    with pytest.raises(InputError, match="weights has 3 value"):
        merge(WeightedAverage, [t(1.0), t(2.0)], weights=[1.0, 2.0, 3.0])
    with pytest.raises(InputError, match="weights has 3 value"):
        WeightedAverage(WeightedAverage.Config(weights=[1.0, 2.0, 3.0])).check_inputs(2, has_base=False)


def test_linear_interpolation_golden():
    # 0.75·[0, 4] + 0.25·[8, 0] = [2, 3]
    assert torch.equal(merge(LinearInterpolation, [t(0.0, 4.0), t(8.0, 0.0)], t=0.25), t(2.0, 3.0))


def test_linear_interpolation_ends_are_exact():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    assert torch.equal(merge(LinearInterpolation, [a, b], t=0.0), a)
    assert torch.equal(merge(LinearInterpolation, [a, b], t=1.0), b)
    torch.testing.assert_close(merge(LinearInterpolation, [a, b]), (a + b) / 2)


def test_linear_interpolation_takes_exactly_two_models():
    method = LinearInterpolation()
    method.check_inputs(2, has_base=False)
    for n in (1, 3):
        with pytest.raises(InputError):
            method.check_inputs(n, has_base=False)
    with pytest.raises(InputError, match="exactly 2"):
        merge(LinearInterpolation, [t(1.0), t(2.0), t(3.0)])


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_linear_interpolation_t_out_of_range_names_the_field(value):
    with pytest.raises(ValueError, match=r"^t must be in \[0.0, 1.0\]"):
        LinearInterpolation.Config(t=value)


@pytest.mark.parametrize("shape", [(), (3,), (2, 3, 4)])
def test_basic_methods_keep_any_shape_and_dtype(shape):
    a = torch.full(shape, 2.0, dtype=torch.bfloat16)
    b = torch.full(shape, 4.0, dtype=torch.bfloat16)
    for cls, expected in [(SimpleAverage, 3.0), (WeightedAverage, 3.0), (LinearInterpolation, 3.0)]:
        out = merge(cls, [a, b])
        assert out.shape == torch.Size(shape) and out.dtype == torch.bfloat16
        assert torch.equal(out, torch.full(shape, expected, dtype=torch.bfloat16))


def test_basic_methods_are_described():
    assert basic.METHODS == [SimpleAverage, WeightedAverage, LinearInterpolation]
    for cls in basic.METHODS:
        assert cls.name and cls.summary and cls.reference_url.startswith("https://")
        assert not cls.capabilities.needs_base and not cls.capabilities.random
        assert cls.elementwise
        for field in attrs.fields(cls.Config):
            assert field.metadata["help"]
        cls().check_inputs(2, has_base=False)  # no base needed
