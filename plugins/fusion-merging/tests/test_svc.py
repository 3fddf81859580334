"""Singular value calibration: the closed forms of γ, and the wrapper around a base method."""

from __future__ import annotations

import pytest
import torch
from fusion_merging.svc import SingularValueCalibration, calibrate

from fusion_core import ConfigError
from fusion_core.run_context import RunContext

torch.set_num_threads(1)


class StatePool:
    """What the merge engine and SVC read of a pool: names, a base, and a tensor reader per model."""

    has_base = True

    def __init__(self, base: dict, models: dict) -> None:
        self.base, self.models, self.model_names = base, models, list(models)

    def reader(self, name=None):
        from fusion_core import StateDictReader

        return StateDictReader(dict(self.base if name is None else self.models[name]), label=name or "base")


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_one_task_is_preserved():
    base, delta = _rand(6, 4), _rand(6, 4, seed=1)
    calibrated, gamma = calibrate(base, [base + delta], base + delta, alpha=0.1)
    assert torch.allclose(gamma, torch.ones(4, dtype=torch.float64), atol=1e-12)  # s_r = 1 along every direction
    assert torch.allclose(calibrated, base + delta, atol=1e-12)


def test_identical_tasks_added_k_times_are_divided_by_k():
    # ΔM = K·ΔW: s_r = K for every task → γ_r = K / (K·K) = 1/K, the over-accumulation undone exactly
    base, delta = _rand(5, 7), _rand(5, 7, seed=2)
    calibrated, gamma = calibrate(base, [base + delta] * 3, base + 3 * delta, alpha=0.1)
    assert torch.allclose(gamma, torch.full((5,), 1 / 3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(calibrated, base + delta, atol=1e-12)


def test_orthogonal_tasks_get_k_over_one_plus_alpha():
    # disjoint blocks: along a direction of task 1, s¹ = 1 and s² = 0 → γ = 2 / (1 + α)
    base = torch.zeros(6, 6, dtype=torch.float64)
    a, b = base.clone(), base.clone()
    a[:3, :3] = _rand(3, 3, seed=3)
    b[3:, 3:] = _rand(3, 3, seed=4)
    calibrated, gamma = calibrate(base, [a, b], a + b, alpha=0.25)
    assert torch.allclose(gamma, torch.full((6,), 2 / 1.25, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(calibrated, (a + b) * 2 / 1.25, atol=1e-10)


def _pool(n=3):
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(6, generator=g), "steps": torch.tensor([3])}
    models = {f"m{i}": {"w": base["w"] + torch.randn(6, 5, generator=g) * 0.1, "b": base["b"] + i, "steps": torch.tensor([3])}
              for i in range(n)}
    return StatePool(base, models)


def test_wraps_task_arithmetic_and_calibrates_only_matrices():
    pool = _pool()
    ctx = RunContext(show_progress=False)
    method = SingularValueCalibration(SingularValueCalibration.Config(base="task_arithmetic", base_config={"scaling_factor": 1.0}))
    out = method.run(pool, ctx)
    base, models = pool.base, list(pool.models.values())
    merged_w = base["w"] + sum(m["w"] - base["w"] for m in models)
    expected, _ = calibrate(base["w"], [m["w"] for m in models], merged_w, 0.1)
    assert torch.allclose(out["w"], expected, atol=1e-6)
    assert torch.allclose(out["b"], base["b"] + 3.0)  # 0 + 1 + 2: the base method's value, untouched
    assert torch.equal(out["steps"], torch.tensor([3]))
    extras = ctx.extras["svc"]
    assert extras["base"] == "task_arithmetic" and extras["calibrated_tensors"] == 1
    assert 0 < extras["gamma_min"] <= extras["gamma_max"]


def test_bad_base_methods_are_one_line_errors():
    with pytest.raises(ConfigError, match="did you mean .task_arithmetic"):
        SingularValueCalibration(SingularValueCalibration.Config(base="task_arithmetc")).check_inputs(2, True)
    with pytest.raises(ConfigError, match="outputs 'models'"):
        SingularValueCalibration(SingularValueCalibration.Config(base="tall_masks")).check_inputs(2, True)
    with pytest.raises(ConfigError, match="base_config"):
        SingularValueCalibration(SingularValueCalibration.Config(base_config={"scaling": 1})).check_inputs(2, True)
