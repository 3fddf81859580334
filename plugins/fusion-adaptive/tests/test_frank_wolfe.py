"""Frank-Wolfe merging (hard): the example stream, the oracle's alignment, the start and one step by hand."""

from __future__ import annotations

import pytest
import torch
from fusion_adaptive.frank_wolfe import FrankWolfeMerging, alignment, take

T = torch.tensor


def test_take_splits_batches_and_continues_where_it_stopped():
    stream = iter([(T([1, 2, 3]), T([0, 1, 2])), (T([4, 5]), T([3, 4])), (T([6]), T([5]))])
    buffer: list = []
    first = take(stream, 2, buffer)
    assert [y.tolist() for _, y in first] == [[0, 1]]
    second = take(stream, 3, buffer)
    assert [y.tolist() for _, y in second] == [[2], [3, 4]]
    assert [x.tolist() for x, _ in take(stream, 1, buffer)] == [[6]]


def test_alignment_is_the_cosine():
    assert alignment(T([3.0, 4.0]), T([4.0, -3.0])) == 0.0
    assert alignment(T([1.0, 1.0]), T([-2.0, -2.0])) == pytest.approx(-1.0)
    assert alignment(T([0.0, 0.0]), T([1.0, 2.0])) == 0.0  # no gradient: no preference (FusionBench: NaN)


def _taus(world):
    base = dict(world.base.named_parameters())
    return base, {n: {k: v.detach() - base[k].detach() for k, v in m.named_parameters()} for n, m in world.models.items()}


def test_no_iteration_is_the_start(world64):
    base, taus = _taus(world64)
    out = FrankWolfeMerging(FrankWolfeMerging.Config(max_iters=0, scaling_factor=0.4)).run(world64.pool(), world64.ctx())
    for k, b in base.items():
        assert torch.allclose(out[k], b + 0.4 * sum(t[k] for t in taus.values()), atol=1e-12)
    out = FrankWolfeMerging(FrankWolfeMerging.Config(max_iters=0, init="base", merge_fn="ties")).run(world64.pool(), world64.ctx())
    assert all(torch.equal(out[k], b) for k, b in base.items())


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_one_step_by_hand(world64, granularity):
    base, taus = _taus(world64)
    names = list(taus)
    start = {k: b.detach() + 0.3 * sum(taus[n][k] for n in names) for k, b in base.items()}
    model = world64.pool().load_model(None)
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(start[k])
    model.zero_grad()
    for n in names:  # the first 40 training examples of each task
        x, y = world64.tasks[n]["train"]
        loss = torch.nn.functional.cross_entropy(world64.tasks[n]["head"](model(x[:40])), y[:40], reduction="sum") / (40 * len(names))
        loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    candidates = {n: {k: v.detach() for k, v in world64.models[n].named_parameters()} for n in names} | {"initial": start}
    gamma = 0.1 * 2 / 2 * 0.3
    ctx = world64.ctx()
    out = FrankWolfeMerging(FrankWolfeMerging.Config(max_iters=1, dataset_size=40, granularity=granularity)).run(world64.pool(), ctx)
    if granularity == "task":
        scores = {c: sum(float(torch.nn.functional.cosine_similarity(grads[k].flatten(), w[k].flatten(), dim=0)) for k in grads)
                  for c, w in candidates.items()}
        pick = min(scores, key=scores.get)
        assert ctx.extras["fw_merging"]["chosen"] == [pick]
        picks = {k: pick for k in grads}
    else:
        picks = {k: min(candidates, key=lambda c: float(torch.nn.functional.cosine_similarity(
            grads[k].flatten(), candidates[c][k].flatten(), dim=0))) for k in grads}
    for k in grads:
        assert torch.allclose(out[k], start[k] + gamma * (candidates[picks[k]][k] - start[k]), atol=1e-10), k


def _ties_by_hand(vectors: list[dict], density: float) -> dict:
    """FusionBench's TIES over the whole model: trim each flattened vector to its top-density magnitudes (≥ the
    (d − ⌊d·density⌋)-th smallest), elect the sign of the sum (zero: the sign of Σ signs), sum the agreeing entries."""
    keys = list(vectors[0])
    flats = [torch.cat([v[k].reshape(-1) for k in keys]) for v in vectors]
    d = flats[0].numel()
    trimmed = []
    for f in flats:
        kth = f.abs().kthvalue(d - int(d * density)).values
        trimmed.append(torch.where(f.abs() >= kth, f, torch.zeros_like(f)))
    total = sum(trimmed)
    sign = torch.sign(total)
    sign[sign == 0] = 1.0 if float(torch.sign(total).sum()) > 0 else -1.0
    merged = sum(torch.where(torch.sign(t) == sign, t, torch.zeros_like(t)) for t in trimmed)
    out, at = {}, 0
    for k in keys:
        out[k] = merged[at : at + vectors[0][k].numel()].reshape(vectors[0][k].shape)
        at += vectors[0][k].numel()
    return out


def test_ties_start_and_step_by_hand(world64):
    # merge_fn ties (FusionBench fw_hard merge_fn: ties): start θ₀ + λ·TIES(τ_i), step θ + γλ·TIES(θ_c − θ)
    base, taus = _taus(world64)
    base = {k: b.detach() for k, b in base.items()}
    tied = _ties_by_hand(list(taus.values()), 0.2)
    start = {k: base[k] + 0.3 * tied[k] for k in base}
    kept = sum(int((tied[k] != 0).sum()) for k in tied) / sum(v.numel() for v in tied.values())
    assert 0.2 < kept < 0.6  # trimmed, and more than one model's 20 % survives the union
    out = FrankWolfeMerging(FrankWolfeMerging.Config(max_iters=0, merge_fn="ties")).run(world64.pool(), world64.ctx())
    for k in base:
        assert torch.allclose(out[k], start[k], atol=1e-12), k

    ctx = world64.ctx()
    out = FrankWolfeMerging(FrankWolfeMerging.Config(max_iters=1, dataset_size=40, merge_fn="ties")).run(world64.pool(), ctx)
    (pick,) = ctx.extras["fw_merging"]["chosen"]
    target = start if pick == "initial" else {k: v.detach() for k, v in world64.models[pick].named_parameters()}
    step = _ties_by_hand([{k: target[k] - start[k] for k in start}], 0.2)
    gamma = 0.1 * 2 / 2 * 0.3
    moved = sum(int((out[k] != start[k]).sum()) for k in out) / sum(v.numel() for v in out.values())
    if pick != "initial":
        assert 0.15 < moved <= 0.21  # one candidate: only its trimmed difference moves θ
    for k in start:
        assert torch.allclose(out[k], start[k] + gamma * step[k], atol=1e-12), k


def test_soft_first_iteration_without_adaptation_is_task_arithmetic(world64):
    # task granularity: the N tasks pick N different models, merged around θ = θ₀ with every coefficient 0.3
    from fusion_adaptive.frank_wolfe import FrankWolfeSoftMerging

    base, taus = _taus(world64)
    ctx = world64.ctx()
    out = FrankWolfeSoftMerging(FrankWolfeSoftMerging.Config(max_iters=1, ada_iters=0, dataset_size=20)).run(world64.pool(), ctx)
    (picked,) = ctx.extras["fw_soft"]["chosen"]
    assert sorted(picked) == sorted(taus)
    for k, b in base.items():
        assert torch.allclose(out[k], b + 0.3 * sum(t[k] for t in taus.values()), atol=1e-12)
    assert ctx.extras["transductive"]["tasks"] == list(taus)


def test_soft_task_arithmetic_steps_by_hand_without_test_inputs(world64):
    # merge_fn task_arithmetic (FusionBench fw_soft's other merge_fn): iteration 0 adds λ·Σ(θ_i − θ) of the N distinct picks
    # (task arithmetic from the base); iteration t ≥ 1 adds λ·step_size·2/(t+2)·Σ(θ_i − θ); no unlabelled test input is read
    from fusion_adaptive.frank_wolfe import FrankWolfeSoftMerging

    base, taus = _taus(world64)
    ctx = world64.ctx(taskpool=world64.taskpool(unlabelled=False))
    config = dict(dataset_size=20, merge_fn="task_arithmetic", scaling_factor=0.4, step_size=0.2)
    first = FrankWolfeSoftMerging(FrankWolfeSoftMerging.Config(max_iters=1, **config)).run(world64.pool(), ctx)
    for k, b in base.items():
        assert torch.allclose(first[k], b + 0.4 * sum(t[k] for t in taus.values()), atol=1e-12)
    assert "transductive" not in ctx.extras
    two = FrankWolfeSoftMerging(FrankWolfeSoftMerging.Config(max_iters=2, **config)).run(world64.pool(), ctx := world64.ctx())
    picks = ctx.extras["fw_soft"]["chosen"][1]
    assert sorted(picks) == sorted(taus)  # task granularity: every model once per iteration
    models = {n: dict(m.named_parameters()) for n, m in world64.models.items()}
    for k in base:
        expected = first[k] + 0.4 * 0.2 * 2 / 3 * sum(models[n][k].detach() - first[k] for n in picks)
        assert torch.allclose(two[k], expected, atol=1e-12)


def test_soft_without_iterations_is_the_base(world64):
    from fusion_adaptive.frank_wolfe import FrankWolfeSoftMerging

    base, _ = _taus(world64)
    out = FrankWolfeSoftMerging(FrankWolfeSoftMerging.Config(max_iters=0)).run(world64.pool(), world64.ctx())
    assert all(torch.equal(out[k], b) for k, b in base.items())


def test_prepared_sparse_embeddings_let_gradients_reach_merge_coefficients():
    # the mini benchmark's EmbeddingBag(sparse=True): a sparse gradient cannot flow back through θ₀ + λ·τ
    from fusion_adaptive.adamerging import merge_stacked
    from fusion_adaptive.common import prepare

    from fusion_core.adapters import functional_forward

    model = prepare(torch.nn.EmbeddingBag(10, 4, mode="mean", sparse=True), "cpu")
    assert model.sparse is False
    base = {"weight": model.weight.detach()}
    stacked = {"weight": torch.randn(2, 10, 4)}
    coefficients = torch.full((2, 1), 0.3, requires_grad=True)
    out = functional_forward(model, merge_stacked(base, stacked, coefficients), T([[1, 2], [3, 4]]))
    out.sum().backward()
    assert coefficients.grad is not None and torch.isfinite(coefficients.grad).all()
