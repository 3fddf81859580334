"""E-WEMoE: experts sparse exactly as configured, one shared router, WEMoE at sparsity 0, entropy training."""

from __future__ import annotations

import pytest
import torch
from adaptive_fixtures import World
from fusion_adaptive.ewemoe import EWEMoE, magnitude_sparsify
from fusion_adaptive.layers import WeightEnsemblingMoE
from fusion_adaptive.wemoe import WEMoE

from fusion_core.errors import InputError

N, D = 3, 8  # experts; every layer's input width (Encoder 8 → 8 → 8)


@pytest.fixture(scope="module")
def square() -> World:
    """The synthetic world with a hidden width equal to the input width, so one router fits both layers."""
    return World(hidden=D)


def fix_weights(model: torch.nn.Module, weights: list[float]) -> None:
    """Every router outputs ``weights`` whatever its input."""
    for layer in model.modules():
        if isinstance(layer, WeightEnsemblingMoE):
            last = layer.router.net[-1]
            with torch.no_grad():
                last.weight.zero_()
                last.bias.copy_(torch.tensor(weights))


def test_e_wemoe_defaults_are_fusionbenchs():
    cfg = EWEMoE.Config()
    assert (cfg.sparsity, cfg.shared_router, cfg.lr, cfg.steps, cfg.init_lambda, cfg.batch_reduce, cfg.router_init) == (
        0.9, True, 1e-4, 1000, 0.3, True, "normal")


def test_magnitude_sparsify_keeps_entries_above_the_interpolated_quantile():
    t = torch.tensor([0.5, -3.0, 0.1, 2.0, -1.0, 4.0, 0.2, -0.3, 1.5, 0.05])
    for ratio in (0.25, 0.5, 0.9, 0.95):
        expected = t * (t.abs() > torch.quantile(t.abs(), ratio))
        assert torch.equal(magnitude_sparsify(t, ratio), expected)
    # 10 distinct magnitudes: q = 0.9·9 = 8.1 → only the largest (|4.0|) stays
    assert torch.equal(magnitude_sparsify(t, 0.9), torch.tensor([0, 0, 0, 0, 0, 4.0, 0, 0, 0, 0]))
    assert magnitude_sparsify(t, 0.0) is t


def test_magnitude_threshold_equals_torch_quantile_with_ties():
    from fusion_adaptive.ewemoe import magnitude_threshold

    g = torch.Generator().manual_seed(0)
    for values in (torch.randint(0, 4, (37,), generator=g).float(), torch.rand(101, generator=g), torch.tensor([2.0, 2.0, 2.0])):
        for ratio in (0.0, 0.3, 0.5, 0.9, 0.99):
            assert torch.equal(magnitude_threshold(values, ratio), torch.quantile(values, ratio)), (values, ratio)


def test_experts_hold_the_task_vectors_sparsified_exactly_as_configured(square):
    ctx = square.ctx()
    model = EWEMoE(EWEMoE.Config(steps=0, sparsity=0.9)).run(square.pool(), ctx)
    base = dict(square.base.named_parameters())
    for module in ("fc1", "fc2"):
        layer = getattr(model, module)
        for p in ("weight", "bias"):
            stacked = layer.expert(p)
            for i, name in enumerate(square.models):
                tau = dict(square.models[name].named_parameters())[f"{module}.{p}"] - base[f"{module}.{p}"]
                tau = tau.detach()
                n = tau.numel()
                kept = stacked[i] != 0
                # distinct magnitudes: exactly n − 1 − ⌊0.9·(n − 1)⌋ entries stay (64 → 7, 8 → 1), the largest, unchanged
                assert int(kept.sum()) == n - 1 - int(0.9 * (n - 1))
                assert torch.equal(stacked[i][kept], tau[kept])
                assert float(tau.abs()[kept].min()) > float(tau.abs()[~kept].max())
    info = ctx.extras["e_wemoe"]
    assert info["expert_entries"] == N * (2 * (D * D + D)) and info["expert_entries_kept"] == N * 2 * (7 + 1)
    assert info["expert_bytes_sparse"] == info["expert_entries_kept"] * (4 + 8)


def test_shared_router_is_one_module_with_a_closed_form_parameter_count(square):
    ctx = square.ctx()
    model = EWEMoE(EWEMoE.Config(steps=0)).run(square.pool(), ctx)
    assert model.fc1.router is model.fc2.router
    router = D * D + D + D * N + N  # Linear(8, 8) → ReLU → Linear(8, 3)
    base = 2 * (D * D + D)
    info = ctx.extras["e_wemoe"]
    assert (info["routers"], info["router_parameters"]) == (1, router)
    assert sum(p.numel() for p in model.parameters()) == base + router  # the shared router's parameters counted once
    assert info["parameters_total"] == base + router + N * base
    assert info["memory_bytes"] == 4 * (base + router + N * base)
    per_layer = WEMoE(WEMoE.Config(steps=0)).run(square.pool(), square.ctx())
    assert sum(p.numel() for p in per_layer.parameters()) == base + 2 * router


def test_at_sparsity_0_with_fixed_router_weights_the_layers_equal_wemoes(square):
    e = EWEMoE(EWEMoE.Config(steps=0, sparsity=0.0)).run(square.pool(), square.ctx())
    w = WEMoE(WEMoE.Config(steps=0)).run(square.pool(), square.ctx())
    fix_weights(e, [0.2, 0.5, 0.3])
    fix_weights(w, [0.2, 0.5, 0.3])
    x = square.tasks["beta"]["test"][0]
    with torch.no_grad():
        for module in ("fc1", "fc2"):
            for p in ("weight", "bias"):
                assert torch.equal(getattr(e, module).expert(p), getattr(w, module).expert(p))
        assert torch.equal(e(x), w(x))


def test_training_lowers_entropy_moves_only_the_shared_router_and_is_deterministic(square):
    ctx = square.ctx()
    trained = EWEMoE(EWEMoE.Config(steps=15, lr=0.01)).run(square.pool(), ctx)
    info = ctx.extras["e_wemoe"]
    assert info["loss_last"] < info["loss_first"] and ctx.extras["transductive"]["method"] == "e_wemoe"
    start = EWEMoE(EWEMoE.Config(steps=0)).run(square.pool(), square.ctx())
    again = EWEMoE(EWEMoE.Config(steps=15, lr=0.01)).run(square.pool(), square.ctx())
    moved = {k: float((v - start.fc1.router.state_dict()[k]).abs().max()) for k, v in trained.fc1.router.state_dict().items()}
    assert min(moved.values()) > 0 and trained.fc2.router is trained.fc1.router
    for module in ("fc1", "fc2"):  # the sparse experts and the base layers are fixed; the same run gives the same router
        a, b = getattr(trained, module), getattr(start, module)
        assert all(torch.equal(a.expert(p), b.expert(p)) for p in ("weight", "bias"))
        assert torch.equal(a.base.weight, b.base.weight)
    assert all(torch.equal(v, again.fc1.router.state_dict()[k]) for k, v in trained.fc1.router.state_dict().items())


def test_shared_router_over_layers_of_different_widths_is_refused_with_the_fix(world):
    with pytest.raises(InputError, match=r"shared router needs upscaled modules with one input width, these have \[8, 16\]: "
                                         r"fc1 \(8\), fc2 \(16\); .*method.shared_router=false"):
        EWEMoE(EWEMoE.Config(steps=0)).run(world.pool(), world.ctx())
    model = EWEMoE(EWEMoE.Config(steps=0, shared_router=False)).run(world.pool(), world.ctx())
    assert model.fc1.router is not model.fc2.router
