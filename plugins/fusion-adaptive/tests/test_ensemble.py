"""Ensembles: logits are the (weighted) mean of the members', or the most confident member's."""

from __future__ import annotations

import pytest
import torch
from fusion_adaptive.ensemble import MaxModelPredictor, SimpleEnsemble, WeightedEnsemble
from fusion_adaptive.layers import EnsembleModel
from torch import nn

from fusion_core.adapters import logits
from fusion_core.config import make_config
from fusion_core.errors import ConfigError, InputError


class Constant(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x):
        return self.out


def test_simple_ensemble_applies_the_head_once_to_the_mean_output_by_default_as_fusionbench(world):
    ensemble = SimpleEnsemble().run(world.pool(), world.ctx())
    x = world.tasks["alpha"]["test"][0]
    head = world.tasks["alpha"]["head"]
    nonlinear = lambda f: torch.tanh(head(f)) * 3  # noqa: E731 - a head that is not affine
    with torch.no_grad():
        members = [m(x) for m in world.models.values()]
        torch.testing.assert_close(logits(ensemble, x, nonlinear), nonlinear(sum(members) / 3))
        torch.testing.assert_close(ensemble(x), sum(members) / 3)  # as a plain module: the mean output


def test_simple_ensemble_with_combine_logits_averages_the_members_logits_through_the_head(world):
    method = SimpleEnsemble(make_config(SimpleEnsemble.Config, {"combine": "logits"}))
    ensemble = method.run(world.pool(), world.ctx())
    x = world.tasks["alpha"]["test"][0]
    head = world.tasks["alpha"]["head"]
    nonlinear = lambda f: torch.tanh(head(f)) * 3  # noqa: E731
    with torch.no_grad():
        members = [m(x) for m in world.models.values()]
        torch.testing.assert_close(logits(ensemble, x, nonlinear), sum(nonlinear(f) for f in members) / 3)


def test_max_model_predictor_default_is_the_elementwise_max_of_outputs_mappings_included():
    a = {"pooler_output": torch.tensor([[4.0, 0.0, -1.0]]), "extra": None}
    b = {"pooler_output": torch.tensor([[0.0, 1.0, -2.0]]), "extra": None}
    mode, combine_at = MaxModelPredictor().ensemble_mode()
    ensemble = EnsembleModel([Constant(a), Constant(b)], [0.5, 0.5], mode, combine_at=combine_at)
    out = ensemble(torch.zeros(1))
    assert set(out) == {"pooler_output"}
    torch.testing.assert_close(out["pooler_output"], torch.tensor([[4.0, 1.0, -1.0]]))
    head = lambda o: o["pooler_output"] * 2  # noqa: E731
    torch.testing.assert_close(logits(ensemble, torch.zeros(1), head), torch.tensor([[8.0, 2.0, -2.0]]))
    with pytest.raises(ValueError, match="needs combine_at='logits'"):
        EnsembleModel([Constant(a)], [1.0], "max_probability", combine_at="outputs")


def test_weighted_ensemble_normalises_the_weights(world):
    method = WeightedEnsemble(make_config(WeightedEnsemble.Config, {"weights": [1, 2, 1]}))
    ensemble = method.run(world.pool(), world.ctx())
    x = world.tasks["beta"]["test"][0]
    with torch.no_grad():
        outs = [m(x) for m in world.models.values()]
        torch.testing.assert_close(ensemble(x), 0.25 * outs[0] + 0.5 * outs[1] + 0.25 * outs[2])
    with pytest.raises(InputError, match=r"weights has 2 value\(s\) for 3 model\(s\)"):
        WeightedEnsemble(WeightedEnsemble.Config(weights=[1.0, 1.0])).check_inputs(3, True)
    with pytest.raises(ConfigError, match="sum to 0"):
        make_config(WeightedEnsemble.Config, {"weights": [1, -1]})


def test_max_model_predictor_takes_each_sample_from_its_most_confident_member():
    a = torch.tensor([[4.0, 0.0, 0.0], [0.1, 0.0, 0.2]])  # confident on sample 0
    b = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 5.0]])  # confident on sample 1
    ensemble = EnsembleModel([Constant(a), Constant(b)], [0.5, 0.5], "max_probability")
    torch.testing.assert_close(ensemble(torch.zeros(2)), torch.stack([a[0], b[1]]))


def test_ensembles_are_scored_by_the_task_pool_and_flagged_as_ensembles(world):
    taskpool = world.taskpool()
    ensemble = MaxModelPredictor(make_config(MaxModelPredictor.Config, {"rule": "max_probability"})).run(world.pool(), world.ctx(taskpool))
    results = taskpool.evaluate(ensemble)
    individual = {t: taskpool.evaluate(world.models[t], tasks=[t])[t]["accuracy"] for t in world.tasks}
    x = world.tasks["gamma"]["test"][0]
    with torch.no_grad():
        per = torch.stack([world.tasks["gamma"]["head"](m(x)) for m in world.models.values()])
        best = per.softmax(-1).amax(-1).argmax(0)
        expected = per[best, torch.arange(len(x))].argmax(-1)
    accuracy = float((expected == world.tasks["gamma"]["test"][1]).float().mean())
    assert results["gamma"]["accuracy"] == pytest.approx(accuracy)
    assert set(results) == set(individual)
    assert MaxModelPredictor.capabilities.output == "ensemble" and not MaxModelPredictor.capabilities.needs_base
