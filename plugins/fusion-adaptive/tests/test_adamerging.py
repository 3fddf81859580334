"""AdaMerging: exact coefficient gradients, the task-arithmetic start, adaptation, no model copies, NaN stops."""

from __future__ import annotations

import pytest
import torch
from fusion_adaptive.adamerging import AdaMerging, entropy_objective, merge_parameters
from fusion_adaptive.common import AdaptationTask, float_params, task_vector
from torch import nn

from fusion_core.config import make_config
from fusion_core.errors import FuseError


def setup_objective(world64, layer_wise: bool):
    pool = world64.pool()
    base = world64.base
    base_params = float_params(base)
    vectors = [task_vector(pool, n, base_params, method="t", device="cpu") for n in pool.model_names]
    tasks = [AdaptationTask(n, world64.tasks[n]["head"], iter(()), "cpu") for n in pool.model_names]
    batches = [world64.tasks[n]["test"][0][:24] for n in pool.model_names]
    g = torch.Generator().manual_seed(5)
    width = len(base_params) if layer_wise else 1
    coefficients = (0.1 + 0.5 * torch.rand(len(vectors), width, generator=g, dtype=torch.float64)).requires_grad_(True)

    def objective(c):
        return entropy_objective(base, merge_parameters(base_params, vectors, c), tasks, batches)

    return objective, coefficients


@pytest.mark.parametrize("layer_wise", [False, True], ids=["task-wise", "layer-wise"])
def test_coefficient_gradients_match_central_finite_differences(world64, layer_wise):
    objective, c = setup_objective(world64, layer_wise)
    (grad,) = torch.autograd.grad(objective(c), c)
    eps = 1e-6
    with torch.no_grad():
        for index in [(0, 0), (1, c.shape[1] - 1), (2, c.shape[1] // 2)]:
            bump = torch.zeros_like(c)
            bump[index] = eps
            numeric = (objective(c + bump) - objective(c - bump)) / (2 * eps)
            assert float(grad[index]) == pytest.approx(float(numeric), rel=1e-5, abs=1e-9)
    assert grad.abs().sum() > 0


def test_zero_steps_is_task_arithmetic_with_the_initial_coefficient(world):
    out = AdaMerging(AdaMerging.Config(steps=0, init=0.3)).run(world.pool(), world.ctx())
    for key, base in world.base.state_dict().items():
        expected = base + 0.3 * sum(m.state_dict()[key] - base for m in world.models.values())
        torch.testing.assert_close(out[key], expected)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_adaptation_lowers_entropy_and_is_recorded_as_transductive(world, granularity):
    ctx = world.ctx()
    out = AdaMerging(AdaMerging.Config(steps=25, lr=0.02, granularity=granularity)).run(world.pool(), ctx)
    info = ctx.extras["adamerging"]
    assert info["steps"] == 25 and info["loss_last"] < info["loss_first"] - 0.05
    assert all(0.0 <= v <= 1.0 for v in info["coefficients"].values())
    assert ctx.extras["transductive"]["method"] == "adamerging" and ctx.extras["transductive"]["tasks"] == list(world.tasks)
    assert AdaMerging.capabilities.transductive and set(out) == set(world.base.state_dict())


def test_same_seed_same_result(world):
    a = AdaMerging(AdaMerging.Config(steps=5, lr=0.05)).run(world.pool(), world.ctx())
    b = AdaMerging(AdaMerging.Config(steps=5, lr=0.05)).run(world.pool(), world.ctx())
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("clamp", ["project", "forward", True])
def test_clamp_keeps_coefficients_in_unit_interval_even_with_a_huge_step(world, clamp):
    ctx = world.ctx()
    AdaMerging(make_config(AdaMerging.Config, {"steps": 3, "lr": 5.0, "granularity": "task", "clamp": clamp})).run(world.pool(), ctx)
    assert all(0.0 <= v <= 1.0 for v in ctx.extras["adamerging"]["coefficients"].values())


def test_adamerging_defaults_are_fusionbenchs():
    cfg = AdaMerging.Config()
    assert (cfg.steps, cfg.clamp, cfg.init, cfg.lr, cfg.granularity, cfg.entropy_eps) == (1000, "none", 0.3, 1e-3, "layer", 1e-8)


def test_adaptation_steps_construct_no_module_and_no_parameter(world, monkeypatch):
    """No deepcopy or rebuild of models per step: the pool hands out its modules, and the run creates none."""
    counts = {"modules": 0, "parameters": 0}
    module_init, param_new = nn.Module.__init__, nn.Parameter.__new__

    def counting_init(self, *args, **kwargs):
        counts["modules"] += 1
        module_init(self, *args, **kwargs)

    def counting_new(cls, *args, **kwargs):
        counts["parameters"] += 1
        return param_new(cls, *args, **kwargs)

    for steps in (2, 8):
        pool = world.pool(share=True)
        monkeypatch.setattr(nn.Module, "__init__", counting_init)
        monkeypatch.setattr(nn.Parameter, "__new__", counting_new)
        try:
            AdaMerging(AdaMerging.Config(steps=steps)).run(pool, world.ctx())
        finally:
            monkeypatch.undo()
        assert counts == {"modules": 0, "parameters": 0}, (steps, counts)
        assert pool.loads == 1 + len(world.models)
        for model in [world.base, *world.models.values()]:
            model.requires_grad_(True)  # the run froze the shared modules; undo for other tests


class NaNAfter(nn.Module):
    """A head that turns NaN after ``calls`` calls."""

    def __init__(self, head, calls):
        super().__init__()
        self.head, self.calls, self.seen = head, calls, 0

    def forward(self, x):
        self.seen += 1
        out = self.head(x)
        return out * float("nan") if self.seen > self.calls else out


def test_nan_loss_stops_with_the_step_and_no_output(world):
    taskpool = world.taskpool()
    taskpool.tasks = dict(taskpool.tasks)
    taskpool.tasks["beta"] = dict(taskpool.tasks["beta"], head=NaNAfter(world.tasks["beta"]["head"], calls=3))
    with pytest.raises(FuseError, match=r"adamerging.*loss became nan at step 3; stopped, and no model was output"):
        AdaMerging(AdaMerging.Config(steps=10)).run(world.pool(), world.ctx(taskpool))


def test_stacked_merge_equals_the_per_model_merge(world64):
    from fusion_adaptive.adamerging import merge_stacked, stack_task_vectors

    pool = world64.pool()
    base = float_params(world64.base)
    vectors = [task_vector(pool, n, base, method="t", device="cpu") for n in pool.model_names]
    coefficients = torch.rand(len(vectors), len(base), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = merge_parameters(base, vectors, coefficients)
    got = merge_stacked(base, stack_task_vectors([dict(v) for v in vectors], list(base)), coefficients)
    for key in base:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-12, atol=1e-12)
