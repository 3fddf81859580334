"""RegMean, RegMean++ and Fisher merging against their closed forms."""

from __future__ import annotations

import torch
from adaptive_fixtures import MemoryPool
from fusion_adaptive.fisher import FisherMerging, batch_fisher, diagonal_fisher, fisher_weighted_average, fisher_weights
from fusion_adaptive.regmean import RegMean, RegMeanPlusPlus
from torch import nn

from fusion_core.run_context import RunContext


def linear_pool(n_models=3, rows=40, d_in=5, d_out=4, seed=0, equal_rows=True):
    g = torch.Generator().manual_seed(seed)
    models, data, xs = {}, {}, {}
    for i in range(n_models):
        layer = nn.Linear(d_in, d_out).double()
        with torch.no_grad():
            layer.weight.copy_(torch.randn(d_out, d_in, generator=g, dtype=torch.float64))
            layer.bias.copy_(torch.randn(d_out, generator=g, dtype=torch.float64))
        n = rows if equal_rows else rows + 10 * i
        x = torch.randn(n, d_in, generator=g, dtype=torch.float64) * (1 + i)
        name = f"m{i}"
        models[name], xs[name] = layer, x
        data[(name, "train")] = [(x[:15], torch.zeros(15, dtype=torch.long)), (x[15:], torch.zeros(n - 15, dtype=torch.long))]
    return MemoryPool(None, models, data), models, xs


def ctx():
    return RunContext(show_progress=False)


def test_regmean_single_linear_layer_equals_least_squares_over_the_union_of_inputs():
    pool, models, xs = linear_pool()
    out = RegMean(RegMean.Config(reduce_non_diagonal_ratio=1.0, bias="regression", num_batches=None)).run(pool, ctx())
    # least squares over the stacked inputs [x, 1] → the stacked targets of every model
    a = torch.cat([torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) for x in xs.values()])
    b = torch.cat([models[n](xs[n]).detach() for n in xs])
    solution = torch.linalg.lstsq(a, b).solution  # (in + 1, out)
    torch.testing.assert_close(out["weight"], solution[:-1].t(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out["bias"], solution[-1], rtol=1e-9, atol=1e-9)


def test_regmean_with_averaged_bias_solves_the_weight_alone_and_averages_the_bias():
    pool, models, xs = linear_pool(seed=1)
    out = RegMean(RegMean.Config(reduce_non_diagonal_ratio=1.0, bias="average", num_batches=None)).run(pool, ctx())
    a = torch.cat(list(xs.values()))
    b = torch.cat([xs[n] @ models[n].weight.detach().t() for n in xs])
    torch.testing.assert_close(out["weight"], torch.linalg.lstsq(a, b).solution.t(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out["bias"], torch.stack([m.bias.detach() for m in models.values()]).mean(0))


def test_regmean_diagonal_only_is_a_per_input_feature_weighted_average():
    pool, models, xs = linear_pool(seed=2, equal_rows=False)
    out = RegMean(RegMean.Config(reduce_non_diagonal_ratio=0.0, num_batches=None)).run(pool, ctx())
    diag = {n: (x * x).mean(0) for n, x in xs.items()}  # (in,) per model: mean squared input
    num = sum(models[n].weight.detach() * diag[n] for n in xs)
    den = sum(diag.values())
    torch.testing.assert_close(out["weight"], num / den, rtol=1e-9, atol=1e-9)


def test_regmean_plusplus_first_layer_as_regmean_then_grams_through_the_merged_layer(world64):
    pool = world64.pool()
    config = dict(reduce_non_diagonal_ratio=1.0, num_batches=None)
    plain = RegMean(RegMean.Config(**config)).run(pool, ctx())
    plus = RegMeanPlusPlus(RegMeanPlusPlus.Config(**config)).run(pool, ctx())
    torch.testing.assert_close(plus["fc1.weight"], plain["fc1.weight"], rtol=1e-9, atol=1e-10)
    # fc2: each model's Gram on relu(merged fc1(x_i)), closed form
    w1, b1 = plus["fc1.weight"], plus["fc1.bias"]
    gram_sum, rhs = 0, 0
    for name, task in world64.tasks.items():
        h = torch.relu(task["train"][0] @ w1.t() + b1)
        g = h.t() @ h / len(h)
        gram_sum = gram_sum + g
        rhs = rhs + g @ world64.models[name].fc2.weight.detach().t()
    torch.testing.assert_close(plus["fc2.weight"], torch.linalg.solve(gram_sum, rhs).t(), rtol=1e-7, atol=1e-9)
    assert not torch.allclose(plus["fc2.weight"], plain["fc2.weight"], atol=1e-6)
    mean_b2 = torch.stack([m.fc2.bias.detach() for m in world64.models.values()]).mean(0)
    torch.testing.assert_close(plus["fc2.bias"], mean_b2)


def test_fisher_weighted_average_with_equal_fishers_is_the_simple_average():
    g = torch.Generator().manual_seed(0)
    params = [{"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)} for _ in range(3)]
    fisher = {"w": torch.rand(4, 3, generator=g) + 0.1, "b": torch.rand(3, generator=g)}
    merged = fisher_weighted_average(params, [fisher] * 3, min_fisher=1e-6)
    for key in ("w", "b"):
        torch.testing.assert_close(merged[key], sum(p[key] for p in params) / 3)
    # zero Fisher everywhere and ε = 0: the simple average, not 0/0
    zero = {k: torch.zeros_like(v) for k, v in fisher.items()}
    torch.testing.assert_close(fisher_weighted_average(params, [zero] * 3)["w"], sum(p["w"] for p in params) / 3)


def test_diagonal_fisher_equals_mean_squared_per_example_gradients(world64):
    model = world64.models["alpha"]
    head = world64.tasks["alpha"]["head"]
    x, y = world64.tasks["alpha"]["train"]
    x, y = x[:20], y[:20]
    params = {k: v.detach() for k, v in model.named_parameters()}
    fisher, count, mode = diagonal_fisher(model, params, [(x[:12], y[:12]), (x[12:], y[12:])], head)
    assert count == 20 and mode == "vmap"
    expected = {k: torch.zeros_like(v) for k, v in params.items()}
    for j in range(20):
        model.zero_grad()
        logp = torch.log_softmax(head(model(x[j : j + 1])), dim=1)[0, y[j]]
        logp.backward()
        for k, p in model.named_parameters():
            expected[k] += p.grad.detach() ** 2 / 20
    model.zero_grad()
    for k in params:
        torch.testing.assert_close(fisher[k], expected[k], rtol=1e-9, atol=1e-12)


def test_batch_fisher_squares_the_gradient_of_each_batch_sum_of_sqrt_p_log_p_without_labels(world64):
    model = world64.models["alpha"]
    head = world64.tasks["alpha"]["head"]
    x, _ = world64.tasks["alpha"]["train"]
    params = {k: v.detach() for k, v in model.named_parameters()}
    batches = [x[:12], x[12:20], x[20:32]]
    fisher, count = batch_fisher(model, params, batches, head, max_examples=20)  # 12 < 20, 20 >= 20: two batches
    assert count == 20
    expected = {k: torch.zeros_like(v) for k, v in params.items()}
    for xb in batches[:2]:
        model.zero_grad()
        p = torch.softmax(head(model(xb)), dim=-1)
        (p.detach().sqrt() * torch.log(p)).sum().backward()
        for k, q in model.named_parameters():
            expected[k] += q.grad.detach() ** 2
    model.zero_grad()
    for k in params:
        torch.testing.assert_close(fisher[k], expected[k] / 20, rtol=1e-9, atol=1e-14)


def test_fusionbench_normalisation_weighs_each_model_by_the_inverse_norm_of_its_fisher():
    f1 = {"w": torch.tensor([3.0, 4.0], dtype=torch.float64)}  # norm 5
    f2 = {"w": torch.tensor([0.0, 1.0], dtype=torch.float64)}  # norm 1
    eps = 1e-6
    w1, w2 = fisher_weights(f1, "fusionbench", eps)["w"], fisher_weights(f2, "fusionbench", eps)["w"]
    torch.testing.assert_close(w1, (f1["w"] + eps) / (5 + eps))
    torch.testing.assert_close(w2, (f2["w"] + eps) / (1 + eps))
    torch.testing.assert_close(fisher_weights(f1, "divide", eps)["w"], f1["w"] / 5 + eps)
    torch.testing.assert_close(fisher_weights(f1, "none", eps)["w"], f1["w"] + eps)


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 3).double()
        self.unused = nn.Linear(2, 2).double()

    def forward(self, x):
        return self.used(x)


def test_fisher_merging_uses_fisher_weights_and_averages_parameters_without_gradient():
    torch.manual_seed(3)
    models = {"a": WithUnused(), "b": WithUnused()}
    g = torch.Generator().manual_seed(1)
    data = {(n, "train"): [(torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g))] for n in models}
    pool = MemoryPool(None, models, data)
    out = FisherMerging(FisherMerging.Config(estimator="empirical", normalize=False, min_fisher=0.0, num_batches=None)).run(pool, ctx())
    torch.testing.assert_close(out["unused.weight"], (models["a"].unused.weight + models["b"].unused.weight).detach() / 2)
    fishers, params = [], []
    for n, m in models.items():
        p = {k: v.detach() for k, v in m.named_parameters() if k.startswith("used")}
        f, _, _ = diagonal_fisher(m, p, data[(n, "train")], None)
        fishers.append(f)
        params.append(p)
    expected = fisher_weighted_average(params, fishers)
    torch.testing.assert_close(out["used.weight"], expected["used.weight"])
    assert not torch.allclose(out["used.weight"], (params[0]["used.weight"] + params[1]["used.weight"]) / 2)


def test_fisher_merging_of_identical_models_returns_that_model(world):
    pool = MemoryPool(world.base, {"alpha": world.models["alpha"], "alpha2": world.models["alpha"]},
                      {("alpha", "train"): world.data()[("alpha", "train")], ("alpha2", "train"): world.data()[("beta", "train")]})
    tp = world.taskpool()
    tp.tasks = dict(tp.tasks, alpha2=tp.tasks["beta"])
    out = FisherMerging(FisherMerging.Config(num_batches=2)).run(pool, world.ctx(tp))
    for k, v in world.models["alpha"].state_dict().items():
        torch.testing.assert_close(out[k], v, rtol=1e-6, atol=1e-7)


def test_gram_collector_shares_the_product_of_one_input_fed_to_several_layers_and_sees_in_place_changes():
    from fusion_adaptive.regmean import GramCollector

    class Fan(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = (torch.nn.Linear(4, 3) for _ in range(3))

        def forward(self, x):
            q = self.q(x)
            k = self.k(x)
            x.mul_(2.0)  # an in-place change: v must see the new values
            return q + k + self.v(x)

    model = Fan()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    with GramCollector({"q": model.q, "k": model.k, "v": model.v}, with_bias=False, dtype=torch.float32) as grams, torch.no_grad():
        model(x.clone())
    torch.testing.assert_close(grams.mean_gram("q"), x.T @ x / 5)
    assert grams.grams["k"] is grams.grams["q"]  # one product for the two layers
    torch.testing.assert_close(grams.mean_gram("v"), 4 * x.T @ x / 5)
    with GramCollector({"q": model.q, "k": model.k, "v": model.v}, with_bias=False, dtype=torch.float32) as grams, torch.inference_mode():
        model(x.clone())  # no version counter: nothing shared, still right
    assert grams.grams["k"] is not grams.grams["q"]
    torch.testing.assert_close(grams.mean_gram("v"), 4 * x.T @ x / 5)
