"""WEMoE and SMILE: routed experts reproduce their fine-tuned layers; zero-shot routing; bad targets."""

from __future__ import annotations

import copy

import pytest
import torch
from adaptive_fixtures import Encoder, MemoryPool
from fusion_adaptive.layers import SmileLinear, WeightEnsemblingMoE
from fusion_adaptive.smile import Smile
from fusion_adaptive.wemoe import WEMoE
from torch import nn

from fusion_core.errors import InputError


def fix_routes(model: nn.Module, expert: int, n: int) -> None:
    """Every router outputs the one-hot weight of ``expert`` for any input."""
    for layer in model.modules():
        if isinstance(layer, WeightEnsemblingMoE):
            last = layer.router.net[-1]
            with torch.no_grad():
                last.weight.zero_()
                last.bias.copy_(torch.nn.functional.one_hot(torch.tensor(expert), n).to(last.bias.dtype))


def test_wemoe_with_a_fixed_one_hot_route_reproduces_that_fine_tuned_model(world):
    model = WEMoE(WEMoE.Config(steps=0, router_hidden=0)).run(world.pool(), world.ctx())
    assert sum(isinstance(m, WeightEnsemblingMoE) for m in model.modules()) == 2
    x = world.tasks["alpha"]["test"][0]
    for j, name in enumerate(world.models):
        fix_routes(model, j, len(world.models))
        with torch.no_grad():
            torch.testing.assert_close(model(x), world.models[name](x), rtol=1e-5, atol=1e-5)


def test_wemoe_defaults_are_fusionbenchs_and_routers_start_normal_001(world):
    cfg = WEMoE.Config()
    assert (cfg.lr, cfg.steps, cfg.batch_reduce, cfg.router_init, cfg.targets, cfg.entropy_eps) == (1e-4, 1000, True, "normal", "mlp", 1e-8)
    model = WEMoE(WEMoE.Config(steps=0)).run(world.pool(), world.ctx())
    weights = torch.cat([m.router.net[i].weight.flatten() for m in model.modules() if isinstance(m, WeightEnsemblingMoE) for i in (0, 2)])
    assert weights.numel() == 8 * 8 + 3 * 8 + 16 * 16 + 3 * 16  # fc1 and fc2 (no 'mlp' module here: every linear layer)
    assert 0.008 < float(weights.std()) < 0.012 and abs(float(weights.mean())) < 2e-3
    for m in model.modules():
        if isinstance(m, WeightEnsemblingMoE):
            assert torch.all(m.router.net[0].bias == 0) and torch.all(m.router.net[2].bias == 0.3)


def test_wemoe_batch_reduce_routes_the_whole_batch_with_its_mean_weight(world):
    model = WEMoE(WEMoE.Config(steps=0, router_hidden=0, router_init="zero_last")).run(world.pool(), world.ctx())
    layer = model.fc1
    x = world.tasks["alpha"]["test"][0][:6]
    with torch.no_grad():
        last = layer.router.net[-1]
        last.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        w = layer.routing_weights(x).mean(dim=0)
        merged = layer.merged_parameters(w)
        expected = torch.nn.functional.linear(x, merged["weight"], merged["bias"])
        torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
        layer.batch_reduce = False  # per sample: each row with its own weights
        per_sample = torch.stack([torch.nn.functional.linear(x[i], *layer.merged_parameters(layer.routing_weights(x[i : i + 1])[0]).values())
                                  for i in range(6)])
        torch.testing.assert_close(layer(x), per_sample, rtol=1e-5, atol=1e-5)


def test_wemoe_before_training_is_task_arithmetic_with_init_lambda(world):
    model = WEMoE(WEMoE.Config(steps=0, init_lambda=0.3, router_init="zero_last")).run(world.pool(), world.ctx())
    merged = copy.deepcopy(world.base)
    with torch.no_grad():
        for name, p in merged.named_parameters():
            p += 0.3 * sum(dict(m.named_parameters())[name] - p for m in world.models.values())
        x = world.tasks["beta"]["test"][0]
        torch.testing.assert_close(model(x), merged(x), rtol=1e-5, atol=1e-5)


class Wrapped(nn.Module):
    """An encoder inside a block, so that WEMoE upscales a non-linear module (the vmap path)."""

    def __init__(self, inner: Encoder) -> None:
        super().__init__()
        self.block = inner

    def forward(self, x):
        return self.block(x)


def test_wemoe_on_a_whole_mlp_block_routes_per_sample(world):
    pool = MemoryPool(Wrapped(world.base), {n: Wrapped(m) for n, m in world.models.items()})
    model = WEMoE(WEMoE.Config(steps=0, target_modules=["block"], router_hidden=4)).run(pool, world.ctx())
    assert isinstance(model.block, WeightEnsemblingMoE) and not model.block.linear
    x = world.tasks["gamma"]["test"][0][:10]
    fix_routes(model, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), world.models["gamma"](x), rtol=1e-5, atol=1e-5)
        # per-sample routes: sample 0 → expert 0, the rest → expert 1
        layer = model.block
        weights = torch.zeros(10, 3)
        weights[0, 0], weights[1:, 1] = 1.0, 1.0
        out = layer._generic_forward(x, weights, (), {})
        torch.testing.assert_close(out[0], world.models["alpha"](x[:1])[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1:], world.models["beta"](x[1:]), rtol=1e-5, atol=1e-5)


def test_wemoe_training_lowers_entropy_trains_only_routers_and_is_deterministic(world):
    ctx = world.ctx()
    a = WEMoE(WEMoE.Config(steps=15, lr=0.01)).run(world.pool(), ctx)
    info = ctx.extras["wemoe"]
    assert info["loss_last"] < info["loss_first"] and info["upscaled"] == ["fc1", "fc2"]
    assert ctx.extras["transductive"]["method"] == "wemoe"
    b = WEMoE(WEMoE.Config(steps=15, lr=0.01)).run(world.pool(), world.ctx())
    x = world.tasks["alpha"]["test"][0]
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    # the base weights inside the routed layers were not trained
    torch.testing.assert_close(a.fc1.base.weight, world.base.fc1.weight)


def test_wemoe_target_that_matches_nothing_lists_the_available_modules(world):
    with pytest.raises(InputError, match=r"target_modules pattern 'encoder\.mlp\*' matches none of the model's modules; available: fc1, act, fc2"):
        WEMoE(WEMoE.Config(target_modules=["encoder.mlp*"])).run(world.pool(), world.ctx())


def test_smile_single_expert_full_rank_reproduces_the_fine_tuned_model(world):
    pool = MemoryPool(world.base, {"beta": world.models["beta"]})
    model = Smile(Smile.Config(rank=None, top_k=1)).run(pool, world.ctx())
    assert isinstance(model.fc1, SmileLinear) and isinstance(model.fc2, SmileLinear)
    x = world.tasks["beta"]["test"][0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), world.models["beta"](x), rtol=1e-5, atol=1e-5)


def test_smile_routes_each_input_to_the_expert_whose_subspace_it_lies_in():
    torch.manual_seed(0)
    base = nn.Linear(6, 4).double()
    experts = {}
    for i in range(3):
        m = copy.deepcopy(base)
        with torch.no_grad():  # τᵢ = uᵢ eᵢᵀ (input direction i), plus a bias change
            m.weight[:, i] += torch.randn(4, dtype=torch.float64) * (i + 1)
            m.bias += i + 1.0
        experts[f"e{i}"] = m
    model = Smile(Smile.Config(rank=1, gate_k=1, top_k=1)).run(MemoryPool(base, experts), _ctx())
    x = torch.eye(6, dtype=torch.float64)[:3] * 2.0  # row j lies in expert j's input subspace
    with torch.no_grad():
        weights = model.routing_weights(x)
        assert torch.equal(weights, torch.eye(3, dtype=torch.float64))
        for j in range(3):
            torch.testing.assert_close(model(x[j : j + 1]), experts[f"e{j}"](x[j : j + 1]))


def _ctx():
    from fusion_core.run_context import RunContext

    return RunContext(show_progress=False)


def test_smile_top_k_above_the_number_of_experts_is_refused(world):
    with pytest.raises(InputError, match=r"top_k=4 but the pool has only 3 model\(s\)"):
        Smile(Smile.Config(top_k=4)).run(world.pool(), world.ctx())


def test_smile_target_that_is_not_a_linear_layer_lists_linear_layers(world):
    with pytest.raises(InputError, match=r"pattern 'act' matches none of the model's linear layers; available: fc1, fc2"):
        Smile(Smile.Config(target_modules=["act"])).run(world.pool(), world.ctx())


@pytest.mark.parametrize("shape", [(12, 12), (20, 7), (7, 20)])
def test_smile_gram_factors_equal_the_lapack_svd(shape):
    from fusion_adaptive.smile import low_rank_factors

    delta = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    for rank in (3, None):
        fast, exact = low_rank_factors(delta, rank, 2, "gram"), low_rank_factors(delta, rank, 2, "lapack")
        assert [t.shape for t in fast] == [t.shape for t in exact]
        torch.testing.assert_close(fast[0] @ fast[1].T, exact[0] @ exact[1].T, rtol=0, atol=1e-5)  # U_k S_k V_kᵀ
        torch.testing.assert_close(fast[2] @ fast[2].T, exact[2] @ exact[2].T, rtol=0, atol=1e-5)  # the gate's projector
    full = low_rank_factors(delta, None, 1, "gram")
    torch.testing.assert_close(full[0] @ full[1].T, delta, rtol=0, atol=1e-5)


def test_smile_gram_factors_decline_a_rank_deficient_spectrum():
    from fusion_adaptive.smile import gram_factors, low_rank_factors

    g = torch.Generator().manual_seed(4)
    delta = torch.randn(9, 2, generator=g) @ torch.randn(2, 6, generator=g)  # rank 2
    assert gram_factors(delta, 2) is not None and gram_factors(delta, 4) is None
    assert gram_factors(torch.zeros(5, 3), 1) is None
    us, v, gate = low_rank_factors(delta, 4, 1, "gram")  # falls back to LAPACK: still exact
    torch.testing.assert_close(us @ v.T, delta, rtol=0, atol=1e-5)
