"""RankOne-MoE: rank-one factors, the task-arithmetic closed form at a constant router, soft top-k, per-sample routing, training."""

from __future__ import annotations

import pytest
import torch
from fusion_adaptive.layers import RankOneMoE, soft_top_k
from fusion_adaptive.rankone_moe import RankOneMoEMethod, rank_one_factors

from fusion_core.adapters import forward


def test_factors_rebuild_each_task_vector_and_pad_beyond_its_rank():
    g = torch.Generator().manual_seed(0)
    stacked = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    u, sv = rank_one_factors(stacked, 4)  # rank 3 < 4: one zero component each
    assert u.shape == (2, 4, 5) and sv.shape == (2, 4, 3)
    assert not u[:, 3].any() and not sv[:, 3].any()
    torch.testing.assert_close(torch.einsum("nko,nki->noi", u, sv), stacked)
    u1, sv1 = rank_one_factors(stacked, 1)
    s = torch.linalg.svdvals(stacked[0])
    assert float(torch.linalg.matrix_norm(stacked[0] - torch.outer(u1[0, 0], sv1[0, 0]), ord=2)) == pytest.approx(float(s[1]))  # Eckart–Young


def test_soft_top_k_closed_form():
    w = torch.tensor([0.5, 0.1, 0.4, 0.2])
    out = soft_top_k(w, 2)  # threshold 0.4
    expected = w * torch.sigmoid(100 * (w - 0.4))
    torch.testing.assert_close(out, expected)
    assert out[1] < 1e-5 and out[0] == pytest.approx(0.5, abs=1e-4)  # 0.5·sigmoid(10)


def constant_router(model, value: float) -> None:
    for layer in model.modules():
        if isinstance(layer, RankOneMoE):
            last = layer.router.net[-1]
            with torch.no_grad():
                last.weight.zero_()
                last.bias.fill_(value)


def test_a_constant_router_with_full_rank_is_task_arithmetic(world):
    cfg = RankOneMoEMethod.Config(steps=0, rank_k=8, init_lambda=0.3)  # fc1 (16×8), fc2 (8×16): rank ≤ 8
    moe = RankOneMoEMethod(cfg).run(world.pool(), world.ctx())
    constant_router(moe, 0.3)
    base = world.base.state_dict()
    ta = type(world.base)()
    ta.load_state_dict({k: v + 0.3 * sum(m.state_dict()[k] - v for m in world.models.values()) for k, v in base.items()})
    x = world.tasks["alpha"]["test"][0][:10]
    with torch.no_grad():
        torch.testing.assert_close(forward(moe, x), ta(x), rtol=1e-5, atol=1e-5)
    layer = moe.fc1
    assert layer.factor_names == ["weight"] and layer.fixed_names == ["bias"] and layer.router.net[-1].out_features == 3 * 8


def test_per_sample_routing_equals_a_loop_over_samples(world):
    moe = RankOneMoEMethod(RankOneMoEMethod.Config(steps=0, rank_k=2, batch_reduce=False, init_lambda=0.3)).run(world.pool(), world.ctx())
    for p in moe.fc1.router.parameters():
        with torch.no_grad():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype) * 0.5)  # routers are float32
    x = world.tasks["beta"]["test"][0][:6]
    with torch.no_grad():
        batched = moe.fc1(x)
        single = torch.cat([moe.fc1(x[i : i + 1]) for i in range(6)])
        torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)
        weights = moe.fc1.routing_weights(x[:1])[0]
        merged = moe.fc1.merged_parameters(weights)
        torch.testing.assert_close(single[:1], torch.nn.functional.linear(x[:1], merged["weight"], merged["bias"]), rtol=1e-5, atol=1e-6)


def test_training_lowers_entropy_and_moves_only_the_routers(world):
    ctx = world.ctx()
    moe = RankOneMoEMethod(RankOneMoEMethod.Config(steps=15, lr=0.01, rank_k=4)).run(world.pool(), ctx)
    info = ctx.extras["rankone_moe"]
    assert info["loss_last"] < info["loss_first"] and ctx.extras["transductive"]["method"] == "rankone_moe"
    start = RankOneMoEMethod(RankOneMoEMethod.Config(steps=0, rank_k=4)).run(world.pool(), world.ctx())
    assert torch.equal(moe.fc1.base.weight, start.fc1.base.weight)
    assert all(torch.equal(a, b) for a, b in zip(moe.fc1.buffers(), start.fc1.buffers(), strict=True))
    assert float((moe.fc1.router.net[-1].bias - start.fc1.router.net[-1].bias).abs().max()) > 0
    assert info["router_parameters"] == (8 * 12 + 12) + (16 * 12 + 12)  # linear routers: fc1 8 → 3·4, fc2 16 → 3·4
