"""Pruning on a pool of fine-tuned models: ``target: base`` (FusionBench's one model) and ``target: each`` (every
fine-tuned model pruned, each scored on its own task), for magnitude, random, Wanda and SparseGPT."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from adaptive_fixtures import MemoryPool

from fusion_core.errors import InputError
from fusion_core.plugins import get_plugin_manager
from fusion_core.registry import build_registry

torch.set_num_threads(1)

METHODS = ["magnitude_pruning", "random_pruning", "wanda_pruning", "sparsegpt_pruning"]
LINEAR = ("fc1.weight", "fc2.weight")


def method(name: str, **config):
    cls = build_registry(get_plugin_manager()).get("method", name).cls
    return cls(cls.Config(include="weight$", **config))


def zeros_per_row(weight: torch.Tensor) -> torch.Tensor:
    return (weight == 0).sum(dim=1)


@pytest.mark.parametrize("name", METHODS)
def test_each_prunes_every_fine_tuned_model_to_the_exact_sparsity(world, name):
    ctx = world.ctx()
    out = method(name, target="each").run(world.pool(), ctx)
    names = list(world.models)
    assert out.tasks == names and out.shared is out.model_for(names[0])
    for task, model in world.models.items():
        own, source = out.model_for(task), model.state_dict()
        for key in LINEAR:
            rows, cols = source[key].shape
            kept = own[key] != 0
            if name == "sparsegpt_pruning":  # its mask is chosen per block of columns (exactly half of each), and it updates the rest
                assert int((~kept).sum()) == rows * cols // 2
            else:  # exactly ⌊in·0.5⌋ per row, the kept weights untouched
                assert torch.equal(zeros_per_row(own[key]), torch.full((rows,), cols // 2))
                assert torch.equal(own[key][kept], source[key][kept])
            assert not torch.equal(own[key], method(name).run(world.pool(), world.ctx()).shared[key])  # not the pruned base
        for key in ("fc1.bias", "fc2.bias"):
            assert torch.equal(own[key], source[key])
    per_model = ctx.extras[name]["per_model"]
    assert list(per_model) == names and all(m["mean_sparsity"] == 0.5 and m["layers_pruned"] == 2 for m in per_model.values())


@pytest.mark.parametrize("name", ["magnitude_pruning", "wanda_pruning"])
def test_each_model_is_pruned_as_a_pool_of_it_alone_would_prune_it(world, name):
    # magnitude: the kernel on that model; Wanda: calibrated on that model's own task data only
    out = method(name, target="each").run(world.pool(), world.ctx())
    for task, model in world.models.items():
        alone = MemoryPool(None, {task: model}, {(task, "train"): world.data()[(task, "train")]})
        expected = method(name).run(alone, world.ctx()).shared
        assert all(torch.equal(out.model_for(task)[k], expected[k]) for k in expected)


def test_random_pruning_each_zeroes_the_same_positions_in_every_model_and_another_seed_others(world):
    def zero_positions(seed):
        out = method("random_pruning", target="each").run(world.pool(), world.ctx(seed=seed))
        return [{key: out.model_for(task)[key] == 0 for key in LINEAR} for task in world.models]

    first, *others = zero_positions(0)
    assert all(torch.equal(first[k], other[k]) for other in others for k in LINEAR)  # one mask (seed, tensor name)
    assert not torch.equal(first["fc1.weight"], zero_positions(1)[0]["fc1.weight"])


def test_base_prunes_the_pretrained_model_and_scores_every_task_with_it(world):
    out = method("magnitude_pruning").run(world.pool(), world.ctx())
    assert out.tasks == []
    base = world.base.state_dict()
    for task in world.models:
        pruned = out.model_for(task)
        assert pruned is out.shared
        for key in LINEAR:
            rows, cols = base[key].shape
            kept = pruned[key] != 0
            assert torch.equal(zeros_per_row(pruned[key]), torch.full((rows,), cols // 2))
            assert torch.equal(pruned[key][kept], base[key][kept])  # the base's weights: the fine-tunes are not pruned


def test_the_run_program_scores_each_pruned_model_on_its_own_task(world):
    from fusion_core.program import _evaluate

    ctx = world.ctx()
    parts = SimpleNamespace(method=method("magnitude_pruning", target="each"), pool=world.pool(), taskpool=world.taskpool())
    output = parts.method.run(parts.pool, ctx)
    _, results = _evaluate({"merged": output}, parts, ctx, evaluate_inputs=True)
    assert set(results["merged"]) == set(world.models)
    for task in world.models:  # "individual at 50 % sparsity": task t with model t pruned
        expected = world.taskpool().evaluate(parts.pool.model_from_state_dict(output.model_for(task)), tasks=[task])[task]
        assert results["merged"][task] == expected
    assert set(results["individual"]) == set(world.models)


def test_targets_check_the_model_counts_and_a_merge_refuses_each():
    for name in METHODS:
        each, base = method(name, target="each"), method(name)
        assert type(each).capabilities.output == "per_task"  # the run program scores model_for(task) on each task
        each.check_inputs(3, False)
        each.check_inputs(2, True)
        with pytest.raises(InputError, match="target: each prunes every fine-tuned model"):
            each.check_inputs(0, True)
        with pytest.raises(InputError, match="prunes one model"):
            base.check_inputs(2, False)
    from fusion_core.engine.kernel import KernelContext

    w = torch.randn(4, 8)
    with pytest.raises(InputError, match="a merge writes one model"):
        method("magnitude_pruning", target="each").kernel("fc1.weight", w, [w], KernelContext(name="fc1.weight", seed=0))
