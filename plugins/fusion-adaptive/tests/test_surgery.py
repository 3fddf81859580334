"""Representation surgery: the module's start, what it learns, and each task's own model."""

from __future__ import annotations

import math

import torch
from fusion_adaptive.surgery import RepresentationSurgery, representation, surgery_module

T = torch.tensor


def _surgery(world, **fields):
    config = {"base": "task_arithmetic", "base_config": {"scaling_factor": 0.3}, "surgery_steps": 0, **fields}
    ctx = world.ctx()
    return RepresentationSurgery(RepresentationSurgery.Config(**config)).run(world.pool(), ctx), ctx


def test_representation_reads_tensors_pooled_outputs_and_logits():
    z = T([[1.0, 2.0]])
    assert representation(z) is z
    assert representation({"pooler_output": z, "last_hidden_state": T([0.0])}) is z
    assert representation({"logits": z}) is z


def test_module_starts_as_the_identity_correction():
    module = surgery_module(6, 3, torch.Generator().manual_seed(0))
    assert module[0].weight.shape == (3, 6) and module[2].weight.shape == (6, 3)
    assert float(module[0].weight.detach().abs().max()) <= 1 / math.sqrt(6)
    assert torch.equal(module[2].weight, torch.zeros(6, 3))
    assert torch.equal(module(torch.randn(4, 6)), torch.zeros(4, 6))


def test_without_steps_every_task_scores_the_merged_model(world):
    output, _ = _surgery(world)
    x = world.tasks["alpha"]["test"][0]
    merged = world.pool().model_from_state_dict(output.shared)
    # no step: the modules were never built, each task gets the merged model itself
    assert torch.equal(output.model_for("alpha")(x), merged(x))


def test_surgery_pulls_each_representation_toward_its_expert(world):
    output, ctx = _surgery(world, surgery_steps=60, lr=1e-2)
    extras = ctx.extras["surgery"]
    for task in world.tasks:
        assert extras["l1_last"][task] < 0.8 * extras["l1_first"][task], task
    x = world.tasks["beta"]["test"][0]
    merged = world.pool().model_from_state_dict(output.shared)
    model = output.model_for("beta")
    with torch.no_grad():
        z = merged(x)
        correction = model.correction
        assert torch.allclose(model(x), z - correction[2](torch.relu(correction[0](z))), atol=1e-6)
        expert = world.models["beta"](x)
        assert (model(x) - expert).abs().mean() < (z - expert).abs().mean()
    assert ctx.extras["transductive"]["tasks"] == list(world.tasks)
    assert output.model_for("not-a-task") is output.shared  # a task without a module: the merged model
