"""OPCM (continual merging) and DOGE (projective gradient descent) against their closed forms."""

from __future__ import annotations

import copy

import pytest
import torch
from adaptive_fixtures import MemoryPool
from fusion_adaptive.doge import DOGE, delta_loss, optimize_delta, shared_projection, top_fraction_masks
from fusion_adaptive.opcm import OPCM, project_out
from torch import nn

from fusion_core.run_context import RunContext


def block_pool(blocks, scales, same=False):
    """A bias-free Linear(6, 6); task vector i lives in its own rows × columns block (orthogonal row/column spaces)."""
    torch.manual_seed(1)
    base = nn.Linear(6, 6, bias=False).double()
    g = torch.Generator().manual_seed(2)
    models, vectors = {}, []
    for i, (rows, scale) in enumerate(zip(blocks, scales, strict=True)):
        tv = torch.zeros(6, 6, dtype=torch.float64)
        tv[rows[0] : rows[-1] + 1, rows[0] : rows[-1] + 1] = torch.randn(len(rows), len(rows), generator=g, dtype=torch.float64) * scale
        if same and vectors:
            tv = vectors[0].clone()
        m = copy.deepcopy(base)
        with torch.no_grad():
            m.weight += tv
        models[f"t{i}"], vectors = m, vectors + [tv]
    return MemoryPool(base, models), base, vectors


def test_opcm_with_orthogonal_task_vectors_is_their_rescaled_sum():
    pool, base, tvs = block_pool([[0, 1], [2, 3], [4, 5]], [1.0, 3.0, 0.5])
    out = OPCM().run(pool, RunContext(show_progress=False))
    total = sum(tvs)
    scale = sum(float(t.norm()) for t in tvs) / 3 / float(total.norm())
    torch.testing.assert_close(out["weight"], base.weight.detach() + scale * total, rtol=1e-10, atol=1e-12)


def test_opcm_drops_a_task_vector_equal_to_the_merged_one():
    pool, base, tvs = block_pool([[0, 1, 2], [0, 1, 2]], [1.0, 1.0], same=True)
    ctx = RunContext(show_progress=False)
    out = OPCM().run(pool, ctx)
    torch.testing.assert_close(out["weight"], base.weight.detach() + tvs[0], rtol=1e-10, atol=1e-12)
    assert [s["lambda"] for s in ctx.extras["opcm"]["steps"]] == pytest.approx([1.0, 1.0])


def test_project_out_removes_the_protected_block_and_the_diagonal_only():
    merged = torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=torch.float64))
    task = torch.arange(16, dtype=torch.float64).reshape(4, 4) + 1
    cleaned = project_out(task, merged, alpha=0.6)  # shares 4/7 ≤ 0.6 < 6/7: the top 1×1 block is protected
    expected = task.clone()
    expected[0, 0] = expected[1, 1] = expected[2, 2] = 0.0  # the diagonal within the rank of merged (3)
    torch.testing.assert_close(cleaned, expected)


def test_opcm_evaluates_after_each_step_on_the_tasks_seen(world):
    taskpool = world.taskpool()
    ctx = world.ctx(taskpool)
    OPCM(OPCM.Config(shuffle=False)).run(world.pool(), ctx)
    assert taskpool.calls == [["alpha"], ["alpha", "beta"], ["alpha", "beta", "gamma"]]
    steps = ctx.extras["opcm"]["steps"]
    assert [s["model"] for s in steps] == ["alpha", "beta", "gamma"] and steps[0]["lambda"] == pytest.approx(1.0)
    assert set(steps[2]["results"]) == {"alpha", "beta", "gamma"}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in steps[2]["results"].values())


def test_opcm_shuffle_is_seeded(world):
    orders = [OPCM(OPCM.Config(shuffle=True, evaluate_every_step=False)).order(list("abcdefg"), seed) for seed in (0, 0, 1)]
    assert orders[0] == orders[1] and sorted(orders[0]) == list("abcdefg") and orders[0] != orders[2]


def test_doge_without_steps_and_masks_is_adaptive_task_arithmetic(world):
    out = DOGE(DOGE.Config(steps=0, keep=100.0, lamda=0.07, other_scaling=0.3)).run(world.pool(), world.ctx())
    base = world.base.state_dict()
    for key in base:
        tvs = [m.state_dict()[key] - base[key] for m in world.models.values()]
        if key.endswith("weight"):
            expected = base[key] + sum(0.07 / t.norm() * t for t in tvs)
        else:
            expected = base[key] + 0.3 * sum(tvs)
        torch.testing.assert_close(out[key], expected)


def test_doge_delta_lowers_its_loss_and_a_full_shared_subspace_freezes_it():
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    scales = 0.07 / vectors.flatten(1).norm(dim=1)
    projection = shared_projection(vectors, subspace=1)  # 2 tasks × 2 directions span all of R⁴
    torch.testing.assert_close(projection, torch.eye(4, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    frozen, _ = optimize_delta(vectors, scales, projection, steps=20, lr=0.01, reproject=True)
    assert frozen.abs().max() < 1e-12  # round-off only (Adam moves 0.01 per step otherwise)
    partial = shared_projection(vectors, subspace=4)  # one shared direction
    free, history = optimize_delta(vectors, scales, partial, steps=300, lr=1.0, reproject=True)
    assert float(torch.trace(partial)) == pytest.approx(1.0)
    assert (partial @ free).abs().max() < 1e-9 and free.abs().max() > 1.0  # moved, but only off the shared subspace
    assert delta_loss(vectors, scales, free) < 0.5 * delta_loss(vectors, scales, torch.zeros_like(free))
    assert history[-1] < history[0]


def test_shared_projection_is_an_orthogonal_projector_of_the_expected_rank():
    vectors = torch.randn(3, 12, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p = shared_projection(vectors, subspace=6)  # r = 12 → 12 // 6 = 2 directions
    torch.testing.assert_close(p @ p, p, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(p, p.t())
    assert round(float(torch.trace(p))) == 2


def test_top_fraction_masks_keep_the_largest_entries_over_all_tensors():
    a, b = torch.tensor([1.0, -9.0, 3.0, 0.5]), torch.tensor([[8.0, -2.0], [0.1, 7.0]])
    ma, mb = top_fraction_masks([a, b], keep=37.5)  # FusionBench: |t| >= the (8 - 3)-th smallest (3): 9, 8, 7 and 3
    assert ma.tolist() == [False, True, True, False] and mb.tolist() == [[True, False], [False, True]]
