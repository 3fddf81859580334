"""Continual merging (task arithmetic, TIES, weight average, DOP) against closed forms, and the step protocol."""

from __future__ import annotations

import pytest
import torch
from adaptive_fixtures import MemoryPool
from fusion_adaptive.continual import ContinualTaskArithmetic, ContinualTies, ContinualWeightAverage, ties_pair, trim_whole
from fusion_adaptive.dop import DOP, min_norm_pair, principal_factors, projected_loss


def params_of(model):
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_continual_task_arithmetic_is_base_plus_lambda_sum_and_reports_every_step(world):
    taskpool = world.taskpool()
    ctx = world.ctx(taskpool)
    out = ContinualTaskArithmetic(ContinualTaskArithmetic.Config(scaling_factor=0.4, shuffle=False)).run(world.pool(), ctx)
    base = params_of(world.base)
    for key, value in base.items():
        expected = value + 0.4 * sum(params_of(m)[key] - value for m in world.models.values())
        torch.testing.assert_close(out[key], expected)
    assert taskpool.calls == [["alpha"], ["alpha", "beta"], ["alpha", "beta", "gamma"]]
    steps = ctx.extras["continual_task_arithmetic"]["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    for s in steps:
        accs = [r["accuracy"] for r in s["results"].values()]
        assert s["average"] == pytest.approx(sum(accs) / len(accs))


def test_continual_weight_average_is_the_running_mean_and_needs_no_base(world):
    pool = MemoryPool(None, world.models)
    out = ContinualWeightAverage(ContinualWeightAverage.Config(shuffle=True, evaluate_every_step=False)).run(pool, world.ctx())
    for key in params_of(world.base):
        torch.testing.assert_close(out[key], sum(params_of(m)[key] for m in world.models.values()) / 3)


def test_the_order_is_seeded_and_the_first_step_is_the_first_model(world):
    cfg = ContinualWeightAverage.Config(shuffle=True)
    orders = []
    for seed in (0, 0, 1, 2, 3):
        ctx = world.ctx(seed=seed)
        ContinualWeightAverage(cfg).run(world.pool(), ctx)
        steps = ctx.extras["continual_weight_average"]["steps"]
        orders.append(ctx.extras["continual_weight_average"]["order"])
        assert list(steps[0]["results"]) == [orders[-1][0]]  # scored on the first model's task only
    assert orders[0] == orders[1] and len({tuple(o) for o in orders}) > 1
    same = DOP(DOP.Config(order_seed=2)).order(list(world.models), seed=7)  # one order per seed, whatever the method
    assert same == orders[3] == ContinualTaskArithmetic(ContinualTaskArithmetic.Config(order_seed=2)).order(list(world.models), 0)


def test_whole_vector_trim_keeps_ties_at_the_threshold():
    v = torch.tensor([3.0, -1.0, 0.5, 2.0, 1.0])
    # keep 2 of 5: |v| ≥ the (5 − 2) = 3rd smallest |v|, 1.0, which both ±1 entries equal: four are kept
    assert trim_whole(v, 0.4).tolist() == [3.0, -1.0, 0.0, 2.0, 1.0]
    assert trim_whole(v, 0.2).tolist() == [3.0, 0.0, 0.0, 2.0, 0.0]  # the 4th smallest, 2.0
    assert trim_whole(v, 1.0).tolist() == v.tolist()


def test_ties_pair_by_hand():
    merged, task = torch.tensor([3.0, -1.0, 0.5, 2.0]), torch.tensor([1.0, 2.0, -0.1, -5.0])
    # trimmed to [3, -1, 0, 2] and [1, 2, 0, -5]; signs of the sum +, +, 0 (→ majority +), −
    assert ties_pair(merged, task, 0.5, "sum").tolist() == [4.0, 2.0, 0.0, -5.0]
    assert ties_pair(merged, task, 0.5, "mean").tolist() == [2.0, 2.0, 0.0, -5.0]
    assert ties_pair(merged, task, 0.5, "max").tolist() == [3.0, 2.0, 0.0, -5.0]


def test_continual_ties_first_step_is_lambda_tau_and_then_adds_lambda_ties(world64):
    names = list(world64.models)[:2]
    pool = MemoryPool(world64.base, {n: world64.models[n] for n in names})
    out = ContinualTies(ContinualTies.Config(scaling_factor=0.5, density=1.0, shuffle=False, evaluate_every_step=False)).run(pool, world64.ctx())
    base = params_of(world64.base)
    t1, t2 = ({k: params_of(world64.models[n])[k] - base[k] for k in base} for n in names)
    for key in base:  # no trim: TIES(m, τ) keeps per entry the entries agreeing with the sign of m + τ, summed
        m, t = 0.5 * t1[key], t2[key]
        sign = torch.sign(m + t)
        agreeing = [torch.where(torch.sign(x) == sign, x, torch.zeros_like(x)) for x in (m, t)]
        torch.testing.assert_close(out[key], base[key] + m + 0.5 * (agreeing[0] + agreeing[1]))


# --------------------------------------------------------------------------- DOP


def test_principal_factors_cut_at_the_cumulative_share():
    delta = torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64))  # shares 2/3, 8/9, 1
    for epsilon, rank in ((0.5, 0), (0.8, 1), (0.88, 1), (0.9, 2), (0.99999, 2)):
        us, vs = principal_factors(delta, epsilon)
        assert us.shape == (3, rank) and vs.shape == (3, rank)
    us, vs = principal_factors(delta, 0.9)
    torch.testing.assert_close(us.abs(), torch.tensor([[3.0, 0], [0, 1.0], [0, 0]], dtype=torch.float64))


def test_projected_loss_gradient_is_the_autograd_gradient():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    us, vs = torch.randn(5, 2, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    for space in ("uv", "u", "v"):
        loss, grad = projected_loss(delta.detach(), us, vs, space)
        reference = (((us.t() @ delta) ** 2).sum() if space != "v" else 0) + (((delta @ vs) ** 2).sum() if space != "u" else 0)
        (auto,) = torch.autograd.grad(reference, delta)
        torch.testing.assert_close(loss, reference.detach())
        torch.testing.assert_close(grad, auto)


def test_min_norm_pair_closed_forms():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    assert min_norm_pair(e1, e2) == pytest.approx((0.8, 0.2))  # argmin_c c² + 4(1 − c)²
    assert min_norm_pair(e1, 2 * e1) == pytest.approx((0.999, 0.001))  # g1 inside the direction of g2: all on g1
    assert min_norm_pair(2 * e1, e1) == pytest.approx((0.001, 0.999))


def opposite_pair():
    """W₀, W₁ = W₀ + τ, W₂ = W₀ − τ with τ = U diag(3, 2, 1) Vᵀ: L₁ and L₂ share their projections and singular values."""
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(4, 3, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    tau = u @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ v.t()
    return w0, w0 + tau, w0 - tau, tau, u[:, :2], v[:, :2]


def test_dop_with_fixed_weights_converges_to_the_weighted_mean_within_the_kept_subspaces():
    # α L₁ + (1 − α) L₂ = Q(W − W₀ − (2α − 1) τ) + const, Q seeing W through U₂ᵀ· and ·V₂ only (shares 1/2, 5/6, 1:
    # svd_epsilon 0.9 keeps two directions): the optimum is W₀ + (2α − 1) τ within those subspaces (Adam's per-entry
    # steps may drift in Q's null space, the directions neither model uses)
    w0, w1, w2, tau, u2, v2 = opposite_pair()
    merged = DOP(DOP.Config(mgda=False, alpha=0.8, lr=1e-3, num_steps=6000, svd_epsilon=0.9)).optimize(w0, w1, w2)
    torch.testing.assert_close(u2.t() @ (merged - w0), 0.6 * u2.t() @ tau, atol=1e-3, rtol=0)
    torch.testing.assert_close((merged - w0) @ v2, 0.6 * tau @ v2, atol=1e-3, rtol=0)
    assert DOP(DOP.Config(num_steps=0)).optimize(w0, w1, w2).equal((w1 + w2) / 2)


def test_dop_leaves_a_layer_where_the_models_agree_unchanged():
    w0, w1, *_ = opposite_pair()
    for mgda in (True, False):
        assert DOP(DOP.Config(mgda=mgda, num_steps=50, lr=0.1)).optimize(w0, w1, w1.clone()).equal(w1)


def test_dop_run_first_step_is_the_first_model_then_averages_what_it_does_not_optimise(world):
    names = list(world.models)[:2]
    pool = MemoryPool(world.base, {n: world.models[n] for n in names})
    ctx = world.ctx()
    out = DOP(DOP.Config(shuffle=False, num_steps=3)).run(pool, ctx)
    first, second = (params_of(world.models[n]) for n in names)
    for key in ("fc1.bias", "fc2.bias"):
        torch.testing.assert_close(out[key], (first[key] + second[key]) / 2)
    for key in ("fc1.weight", "fc2.weight"):
        assert not torch.allclose(out[key], (first[key] + second[key]) / 2)
        # three Adam steps of lr 1e-4 move each entry by at most 3e-4 from the mean
        assert (out[key] - (first[key] + second[key]) / 2).abs().max() <= 3e-4 + 1e-7
    steps = ctx.extras["dop"]["steps"]
    assert [s["layers_optimized"] for s in steps] == [0, 2]
    single = DOP(DOP.Config(shuffle=False)).run(MemoryPool(world.base, {names[0]: world.models[names[0]]}), world.ctx())
    for key, value in first.items():
        assert single[key].equal(value)


def test_dop_optimises_half_precision_layers_in_float32(world):
    import copy

    names = list(world.models)[:2]
    half = {n: copy.deepcopy(world.models[n]).to(torch.bfloat16) for n in names}
    base = copy.deepcopy(world.base).to(torch.bfloat16)
    out = DOP(DOP.Config(shuffle=False, num_steps=3, evaluate_every_step=False)).run(MemoryPool(base, half), world.ctx())
    full = DOP(DOP.Config(shuffle=False, num_steps=3, evaluate_every_step=False)).run(
        MemoryPool(base.float(), {n: m.float() for n, m in half.items()}), world.ctx())
    assert out["fc1.weight"].dtype == torch.bfloat16
    assert torch.equal(out["fc1.weight"], full["fc1.weight"].to(torch.bfloat16))  # the same float32 optimisation, rounded once
