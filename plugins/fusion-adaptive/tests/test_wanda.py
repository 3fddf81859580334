"""Wanda pruning against its closed form |W_ij|·‖X_j‖, exact sparsity, N:M blocks, block-by-block inputs."""

from __future__ import annotations

import pytest
import torch
from adaptive_fixtures import MemoryPool
from fusion_adaptive.wanda import WandaPruning, wanda_scores
from fusion_merging.pruning import unstructured_mask
from torch import nn

from fusion_core.errors import InputError
from fusion_core.run_context import RunContext

torch.set_num_threads(1)


def ctx():
    return RunContext(show_progress=False)


def run(base, model, xs, **config):
    data = {("t", "train"): [(x, torch.zeros(len(x), dtype=torch.long)) for x in xs]}
    pool = MemoryPool(base, {"t": model}, data)
    out = WandaPruning(WandaPruning.Config(**config)).run(pool, c := ctx()).shared
    return out, c


def test_scores_and_mask_match_the_closed_form_and_differ_from_magnitude():
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [-4.0, 3.0, -2.0, 1.0]]))
    # calibration rows: column norms ‖X_j‖ = [10, 1, 1, 0.1] (two batches, 3 rows in all)
    x1 = torch.tensor([[6.0, 1.0, 0.0, 0.0], [8.0, 0.0, 0.6, 0.0]])
    x2 = torch.tensor([[0.0, 0.0, 0.8, 0.1]])
    norms = torch.cat([x1, x2]).pow(2).sum(0).sqrt()
    torch.testing.assert_close(norms, torch.tensor([10.0, 1.0, 1.0, 0.1]))
    # scores: row 0 = [10, 2, 3, 0.4] → prune cols 3, 1; row 1 = [40, 3, 2, 0.1] → prune cols 3, 2
    torch.testing.assert_close(wanda_scores(layer.weight, norms), torch.tensor([[10.0, 2.0, 3.0, 0.4], [40.0, 3.0, 2.0, 0.1]]))
    out, c = run(layer, layer, [x1, x2], include="weight$")
    expected = torch.tensor([[1.0, 0.0, 3.0, 0.0], [-4.0, 3.0, 0.0, 0.0]])
    assert torch.equal(out["weight"], expected)  # magnitude would have pruned cols 0, 1 of row 0
    assert c.extras["wanda_pruning"]["sparsity"] == {"": 0.5}


def test_n_m_pattern_block_by_block_and_exact_unstructured_sparsity():
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(16, 6)
    x = torch.randn(40, 16, generator=g) * torch.linspace(0.1, 3.0, 16)
    out, _ = run(layer, layer, [x], include="weight$", prune_type="semistructured", n=2, m=4)
    w = out["weight"]
    assert torch.equal((w.reshape(6, 4, 4) == 0).sum(-1), torch.full((6, 4), 2))
    assert torch.equal(out["bias"], layer.bias.detach())  # biases are never pruned
    scores = wanda_scores(layer.weight.detach(), x.pow(2).sum(0).sqrt()).reshape(6, 4, 4)
    pruned = (w == 0).reshape(6, 4, 4)
    assert bool((torch.where(pruned, scores, 0).amax(-1) <= torch.where(~pruned, scores, torch.inf).amin(-1)).all())
    for ratio in (0.25, 0.6):
        out, _ = run(layer, layer, [x], include="weight$", sparsity_ratio=ratio)
        assert torch.equal((out["weight"] == 0).sum(1), torch.full((6,), int(16 * ratio)))


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("sequential", [True, False])
def test_blocks_are_scored_on_inputs_through_the_pruned_blocks_before_them(sequential):
    torch.manual_seed(1)
    model = Stack()
    x = torch.randn(30, 6)
    out, _ = run(model, model, [x], sequential=sequential)  # default include: weights inside numbered blocks
    w0, b0, w1 = model.layers[0].weight.detach(), model.layers[0].bias.detach(), model.layers[1].weight.detach()
    p0 = w0.masked_fill(unstructured_mask(wanda_scores(w0, x.pow(2).sum(0).sqrt()), 0.5), 0)
    hidden = x @ (p0 if sequential else w0).t() + b0
    p1 = w1.masked_fill(unstructured_mask(wanda_scores(w1, hidden.pow(2).sum(0).sqrt()), 0.5), 0)
    assert torch.equal(out["layers.0.weight"], p0)
    torch.testing.assert_close(out["layers.1.weight"], p1, rtol=0, atol=0)


def test_a_pool_without_a_base_prunes_its_only_model_and_refuses_several():
    method = WandaPruning(WandaPruning.Config())
    method.check_inputs(1, False)
    method.check_inputs(3, True)
    with pytest.raises(InputError, match="prunes one model"):
        method.check_inputs(2, False)
    layer = nn.Linear(4, 2)
    x = torch.randn(5, 4)
    out, _ = run(None, layer, [x], include="weight$")
    assert int((out["weight"] == 0).sum()) == 4
    with pytest.raises(InputError, match="no linear layer matches"):
        run(None, layer, [x])
