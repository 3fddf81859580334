"""Trust-region task arithmetic: Ω, the global quantile, the |gradient| estimate, and the merge."""

from __future__ import annotations

import pytest
import torch
from fusion_adaptive.trust_region import TrustRegionTaskArithmetic, conflict, mean_abs_gradients, quantile_threshold

from fusion_core import InputError

T = torch.tensor


def test_conflict_is_the_sum_over_pairs_of_other_tasks():
    g = [T([1.0, 2.0]), T([3.0, 0.0]), T([0.5, 1.0])]
    m = [T([2.0, 1.0]), T([1.0, 4.0]), T([0.0, 2.0])]
    # entry 0: 1·(1 + 0) + 3·(2 + 0) + 0.5·(2 + 1) = 8.5;  entry 1: 2·(4 + 2) + 0 + 1·(1 + 4) = 17
    assert conflict(g, m).tolist() == [8.5, 17.0]


def test_quantile_threshold_is_fusionbenchs_index_over_all_tensors():
    values = [T([5.0, 1.0, 3.0]), T([[2.0, 4.0], [0.0, 6.0]])]  # sorted: 0 1 2 3 4 5 6 (7 values)
    assert float(quantile_threshold(values, 0.5)) == 3.0  # ⌊3.5⌋ = 3 → the 4th smallest
    assert float(quantile_threshold(values, 1.0)) == 6.0  # index clamped to size − 1
    assert float(quantile_threshold(values, 0.0)) == 0.0


def _ctx(world, **config):
    method = TrustRegionTaskArithmetic(TrustRegionTaskArithmetic.Config(**config))
    ctx = world.ctx()
    return method, ctx


def _taus(world):
    base = world.base.state_dict()
    return base, {n: {k: v - base[k] for k, v in m.state_dict().items()} for n, m in world.models.items()}


def test_zero_shot_merge_closed_form(world64):
    method, ctx = _ctx(world64, zero_shot=True, threshold_quantile=0.7, scaling_factor=0.5)
    out = method.run(world64.pool(with_data=False), ctx)
    base, taus = _taus(world64)
    names = list(taus)
    omegas = {k: conflict([taus[n][k].abs() for n in names], [taus[n][k].abs() for n in names]) for k in base}
    flat = torch.cat([o.reshape(-1) for o in omegas.values()]).sort().values
    threshold = flat[int(flat.numel() * 0.7)]
    kept = 0
    for k in base:
        mask = omegas[k] < threshold
        kept += int(mask.sum())
        assert torch.allclose(out[k], base[k] + 0.5 * sum(taus[n][k] for n in names) * mask, atol=1e-12), k
    extras = ctx.extras["trust_region_ta"]
    assert extras["kept_fraction"] == pytest.approx(kept / flat.numel())
    assert 0.69 < extras["kept_fraction"] <= 0.7


def test_quantile_zero_keeps_nothing_and_one_drops_only_the_largest(world64):
    base, taus = _taus(world64)
    out = TrustRegionTaskArithmetic(TrustRegionTaskArithmetic.Config(zero_shot=True, threshold_quantile=0.0)).run(
        world64.pool(with_data=False), world64.ctx())
    for k in base:
        assert torch.equal(out[k], base[k])
    ctx = world64.ctx()
    TrustRegionTaskArithmetic(TrustRegionTaskArithmetic.Config(zero_shot=True, threshold_quantile=1.0)).run(
        world64.pool(with_data=False), ctx)
    total = sum(v.numel() for v in base.values())
    assert ctx.extras["trust_region_ta"]["kept_fraction"] == pytest.approx((total - 1) / total)


def test_mean_abs_gradients_per_example(world64):
    name = "beta"
    head = world64.tasks[name]["head"]
    x, y = world64.tasks[name]["train"]
    model = world64.pool().load_model(None)
    got, count = mean_abs_gradients(model, [(x[:5], y[:5]), (x[5:10], y[5:10])], head, pool=world64.pool(), max_samples=7,
                                    device="cpu")
    assert count == 7
    expected = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for j in range(7):
        model.zero_grad()
        torch.nn.functional.cross_entropy(head(model(x[j : j + 1])), y[j : j + 1]).backward()
        for k, p in model.named_parameters():
            expected[k] += p.grad.abs()
    for k in expected:
        assert torch.allclose(got[k], expected[k] / 7, atol=1e-12), k


def test_gradient_mode_uses_the_base_gradients(world64):
    ctx = world64.ctx()
    method = TrustRegionTaskArithmetic(TrustRegionTaskArithmetic.Config(max_samples=16, threshold_quantile=0.8))
    out = method.run(world64.pool(), ctx)
    base, taus = _taus(world64)
    names = list(taus)
    sens = {}
    for n in names:
        batches = world64.data()[(n, "train")]
        sens[n], _ = mean_abs_gradients(world64.pool().load_model(None), batches, world64.tasks[n]["head"], pool=world64.pool(),
                                        max_samples=16, device="cpu")
    omegas = {k: conflict([sens[n][k] for n in names], [taus[n][k].abs() for n in names]) for k in base}
    threshold = quantile_threshold(omegas.values(), 0.8)
    for k in base:
        assert torch.allclose(out[k], base[k] + 0.3 * sum(taus[n][k] for n in names) * (omegas[k] < threshold), atol=1e-12)
    assert ctx.extras["trust_region_ta"]["examples"] == {n: 16 for n in names}


def test_gradient_mode_needs_training_data(world):
    method = TrustRegionTaskArithmetic(TrustRegionTaskArithmetic.Config())
    with pytest.raises(InputError, match="'train' split"):
        method.run(world.pool(with_data=False), world.ctx())


def test_a_list_of_lambdas_gives_one_model_each_from_one_mask(world64):
    # FusionBench's scaling_factor list: the mask once, then θ₀ + λ·mask ⊙ Σ τ per λ (λ = 0: the base itself)
    from fusion_core.adapters import inner_method

    pool = world64.pool(with_data=False)
    method = TrustRegionTaskArithmetic(TrustRegionTaskArithmetic.Config(zero_shot=True, scaling_factor=[0.0, 0.5, 1.25]))
    assert method.capabilities.output == "models" and TrustRegionTaskArithmetic.capabilities.output == "model"
    out = method.run(pool, world64.ctx())
    assert list(out) == ["0", "0.5", "1.25"]
    base = world64.base.state_dict()
    assert all(torch.equal(out["0"][k], base[k]) for k in base)
    for lam in (0.5, 1.25):
        single = TrustRegionTaskArithmetic(TrustRegionTaskArithmetic.Config(zero_shot=True, scaling_factor=lam)).run(pool, world64.ctx())
        assert all(torch.equal(out[f"{lam:g}"][k], single[k]) for k in base)
    assert not all(torch.equal(out["0.5"][k], out["1.25"][k]) for k in base)
    with pytest.raises(ValueError, match="distinct"):
        TrustRegionTaskArithmetic.Config(scaling_factor=[0.3, 0.30])
    with pytest.raises(ValueError, match="distinct"):
        TrustRegionTaskArithmetic.Config(scaling_factor=[])
    from fusion_core import ConfigError

    with pytest.raises(ConfigError, match="outputs 'models', not one model"):
        inner_method("surgery", "trust_region_ta", {"scaling_factor": [0.3, 0.5]})
    assert inner_method("surgery", "trust_region_ta", {"scaling_factor": 0.5}).capabilities.output == "model"
