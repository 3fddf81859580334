"""SparseGPT against closed forms: the OBS update of one pruned weight, magnitude pruning under a diagonal Hessian,
exact sparsity (unstructured and N:M), lower reconstruction error than zeroing alone, block-by-block calibration."""

from __future__ import annotations

import torch
from adaptive_fixtures import MemoryPool
from fusion_adaptive.sparsegpt import SparseGPTPruning, block_mask, sparsegpt_weight
from torch import nn

from fusion_core.run_context import RunContext

torch.set_num_threads(1)


def prune(w, x, **kw):
    settings = {"prune_type": "unstructured", "sparsity": 0.5, "n": 2, "m": 4, **kw}
    return sparsegpt_weight(w, x.t() @ x, **settings)


def test_one_pruned_weight_gets_the_optimal_brain_surgeon_update():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    w = torch.tensor([[0.01, 1.0, -2.0, 0.5]], dtype=torch.float64)  # column 0 has by far the lowest saliency
    got = prune(w, x, prune_type="semistructured", n=1, m=4)
    h = x.t() @ x
    h = h + 0.01 * torch.diagonal(h).mean() * torch.eye(4, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    expected = w - w[0, 0] * hinv[0:1] / hinv[0, 0]  # δ = −w_q H⁻¹[q, :] / H⁻¹[q, q]: zero at q, the others compensate
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert got[0, 0] == 0


def test_a_diagonal_hessian_makes_it_magnitude_pruning_per_block():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)
    x = torch.eye(12, dtype=torch.float64) * 3.0  # XᵀX = 9 I: no weight compensates another
    got = prune(w, x, blocksize=4, sparsity=0.5)
    expected = w.clone()
    for start in range(0, 12, 4):
        block = expected[:, start : start + 4]
        block[block_mask(block.abs(), 0.5, True)] = 0  # 10 smallest |w| of each 5×4 block
    torch.testing.assert_close(got, expected)


def test_exact_sparsity_unstructured_and_n_m():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 40, generator=g)
    x = torch.randn(200, 40, generator=g) * torch.linspace(0.2, 2.0, 40)
    for sparsity in (0.3, 0.5, 0.75):
        got = prune(w, x, sparsity=sparsity, blocksize=16)  # blocks 16, 16, 8 columns
        assert int((got == 0).sum()) == sum(int(6 * width * sparsity) for width in (16, 16, 8))
    got = prune(w, x, prune_type="semistructured", n=2, m=4)
    assert torch.equal((got.reshape(6, 10, 4) == 0).sum(-1), torch.full((6, 10), 2))
    reference = prune(w, x, sparsity=0.5, blocksize=16, exact=False)  # the reference rule: ≤ the k-th, one more per block
    assert int((reference == 0).sum()) == 3 * 1 + sum(int(6 * width * 0.5) for width in (16, 16, 8))


def test_the_updates_lower_the_reconstruction_error_of_the_same_mask():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 24, generator=g, dtype=torch.float64)
    mix = torch.randn(24, 24, generator=g, dtype=torch.float64)
    x = torch.randn(300, 24, generator=g, dtype=torch.float64) @ mix  # correlated inputs: compensation pays
    for kw in ({"sparsity": 0.5}, {"prune_type": "semistructured"}):
        got = prune(w, x, **kw)
        zeroed = w.masked_fill(got == 0, 0)
        error = float((x @ (got - w).t()).norm())
        assert error < 0.8 * float((x @ (zeroed - w).t()).norm())


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def test_the_method_calibrates_each_block_on_inputs_through_the_pruned_blocks_before_it():
    torch.manual_seed(4)
    model = Stack().double()
    x = torch.randn(50, 8, dtype=torch.float64) * torch.linspace(0.3, 2.0, 8, dtype=torch.float64)
    pool = MemoryPool(model, {"t": model}, {("t", "train"): [(x[:25], None), (x[25:], None)]})
    ctx = RunContext(show_progress=False)
    out = SparseGPTPruning(SparseGPTPruning.Config(prune_type="semistructured")).run(pool, ctx).shared
    w0 = sparsegpt_weight(model.layers[0].weight.detach(), x.t() @ x, prune_type="semistructured", sparsity=0.5, n=2, m=4)
    torch.testing.assert_close(out["layers.0.weight"], w0)
    h1 = torch.relu(x @ w0.t() + model.layers[0].bias.detach())  # the second block sees the pruned first one
    w1 = sparsegpt_weight(model.layers[1].weight.detach(), h1.t() @ h1, prune_type="semistructured", sparsity=0.5, n=2, m=4)
    torch.testing.assert_close(out["layers.1.weight"], w1)
    assert out["layers.0.bias"].equal(model.layers[0].bias.detach())
    assert ctx.extras["sparsegpt_pruning"]["sparsity"] == {"layers.0": 0.5, "layers.1": 0.5}
