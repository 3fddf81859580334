"""The task-arithmetic family through the core: YAML-style configs, and the merge engine
(chunking of element-wise kernels, per-tensor seeding of random ones)."""

from __future__ import annotations

import pytest
import torch
from fusion_merging import basic, task_arithmetic
from fusion_merging.task_arithmetic import Dare, Della, TaskArithmetic, Ties

from fusion_core.config import describe_fields, make_config
from fusion_core.engine.kernel import KernelContext
from fusion_core.engine.stream import MergeOptions, merge_readers
from fusion_core.errors import ConfigError

torch.set_num_threads(1)

ALL = basic.METHODS + task_arithmetic.METHODS


def state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(64, 16, generator=gen),
        "layer.0.weight": torch.randn(32, 16, generator=gen),
        "layer.0.bias": torch.randn(32, generator=gen),
        "scale": torch.randn((), generator=gen),
    }


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
def test_every_config_loads_from_yaml_values_and_describes_its_fields(cls):
    config = make_config(cls.Config, {}, where=cls.name)
    assert config == cls.Config()
    rows = describe_fields(cls.Config)
    assert all(row["help"] for row in rows)


def test_yaml_values_are_converted_and_validated():
    config = make_config(Ties.Config, {"density": 1, "weights": [1, 2], "sign_election": "count"}, where="ties")
    assert config.density == 1.0 and config.weights == [1.0, 2.0]
    with pytest.raises(ConfigError, match=r"^ties: density must be in \[0.0, 1.0\], got 2.0$"):
        make_config(Ties.Config, {"density": 2}, where="ties")
    with pytest.raises(ConfigError, match="ties.sign_election: expected 'sum' | 'weighted_sum' | 'count'"):
        make_config(Ties.Config, {"sign_election": "majority"}, where="ties")
    with pytest.raises(ConfigError, match="della: keep probabilities must lie in"):
        make_config(Della.Config, {"density": 0.1}, where="della")


def test_engine_matches_direct_kernel_calls_for_a_random_method():
    base, models = state(0), [state(1), state(2)]
    method = Dare(Dare.Config(density=0.3, variant="ties"))
    merged = merge_readers(method, base, models, MergeOptions(seed=11, notify=lambda _: None))
    for name, tensor in base.items():
        direct = method.kernel(name, tensor, [m[name] for m in models], KernelContext(name=name, seed=11))
        assert torch.equal(merged[name], direct), name
    again = merge_readers(method, base, models, MergeOptions(seed=11, notify=lambda _: None))
    assert all(torch.equal(merged[k], again[k]) for k in merged)


def test_engine_chunks_elementwise_task_arithmetic_without_changing_it():
    base, models = state(0), [state(1), state(2), state(3)]
    method = TaskArithmetic(TaskArithmetic.Config(scaling_factor=0.3, weights=[1.0, -0.5, 2.0]))
    whole = merge_readers(method, base, models, MergeOptions(notify=lambda _: None))
    chunked = merge_readers(method, base, models, MergeOptions(chunk_bytes=1024, notify=lambda _: None))
    for name, tensor in base.items():
        expected = tensor + 0.3 * ((models[0][name] - tensor) - 0.5 * (models[1][name] - tensor) + 2.0 * (models[2][name] - tensor))
        torch.testing.assert_close(whole[name], expected)
        assert torch.equal(chunked[name], whole[name]), name
