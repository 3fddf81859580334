"""TIES and DARE through the engine's two-phase path: the merge of a large tensor, computed
from per-model statistics and then row block by row block, has the same bytes as the
whole-tensor kernel and as the reference formula (independent oracles written here: a
stable sort for the trim, ``ctx.rand_like`` for the DARE mask, the reference
``ties_merge``/``linear_merge``/``apply_rescale`` for the combination)."""

from __future__ import annotations

import itertools

import pytest
import torch
from fusion_merging import sparsify
from fusion_merging import task_arithmetic as ta
from fusion_merging.task_arithmetic import Dare, Della, MagnitudePrune, Ties

from fusion_core.engine.kernel import KernelContext
from fusion_core.engine.stream import MergeOptions, merge_readers

torch.set_num_threads(1)

BIG = "big.weight"  # 300 × 257 = 77 100 entries: above the sampled-selection size, rows of 257


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a float tensor as integers (so that −0 ≠ +0 and NaN == NaN)."""
    return t.contiguous().view({torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}[t.dtype])


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def pool(n_models: int, seed: int, quantized: bool) -> tuple[dict, list[dict]]:
    """A base and fine-tunes; ``quantized`` task vectors are multiples of 1/4 (massive ties)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {BIG: (300, 257), "small.weight": (24, 9), "bias": (31,), "scale": ()}
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    base[BIG][::7] = 0.0  # exact zeros, and −0 where a model adds −0 below
    base[BIG][1::7] = -0.0  # where a merged 0 must come out as +0 (−0 + +0), not −0
    models = []
    for _ in range(n_models):
        if quantized:
            m = {k: b + torch.randint(-4, 5, b.shape, generator=gen).float() * 0.25 for k, b in base.items()}
        else:
            m = {k: b + torch.randn(b.shape, generator=gen) * 0.01 for k, b in base.items()}
        m[BIG][::7] = -0.0
        models.append(m)
    return base, models


def oracle_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """τ kept at its k largest magnitudes, equal magnitudes in flat order (a stable sort)."""
    flat = tau.reshape(-1)
    k = sparsify.keep_count(density, flat.numel())
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(-flat.abs().double(), stable=True)[:k]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(tau.shape)


def oracle_ties(base, tensors, cfg) -> torch.Tensor:
    deltas = [oracle_trim(t - base, cfg.density) for t in tensors]
    weights = cfg.weights or [1.0] * len(tensors)
    return ta.add_scaled(base, ta.ties_merge(deltas, weights, cfg.sign_election, cfg.divisor), cfg.scaling_factor)


def oracle_combine(base, deltas, cfg) -> torch.Tensor:
    """θ₀ + λ·(ties_merge or linear_merge) of sparsified task vectors, by ``cfg.variant``."""
    weights = cfg.weights or [1.0] * len(deltas)
    if cfg.variant == "ties":
        merged = ta.ties_merge(deltas, weights, cfg.sign_election, cfg.divisor)
    else:
        merged = ta.linear_merge(deltas, weights, cfg.normalize)
    return ta.add_scaled(base, merged, cfg.scaling_factor)


def oracle_dare(name, base, tensors, cfg, seed) -> torch.Tensor:
    ctx = KernelContext(name=name, seed=seed)
    deltas = []
    for i, t in enumerate(tensors):
        tau = t - base
        keep = ctx.rand_like(tau, salt=str(i)) < cfg.density  # the documented mask
        deltas.append(sparsify.apply_rescale(cfg.rescale, tau, keep, cfg.density))
    return oracle_combine(base, deltas, cfg)


def engine(method, base, models, chunk_rows: int | None, seed: int = 0, dtype: str = "float32") -> dict:
    """``chunk_rows`` rows of BIG per work unit (two-phase path), or ``None``: whole tensors."""
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    chunk = 2**40 if chunk_rows is None else chunk_rows * 257 * itemsize * (len(models) + 1)
    options = MergeOptions(seed=seed, chunk_bytes=chunk, compute_dtype=dtype, prefetch=False, notify=lambda _: None)
    return merge_readers(method, base, models, options)


def test_quantized_pool_has_ties_at_the_threshold_that_need_a_cut():
    base, models = pool(2, 0, quantized=True)
    tau = (models[0][BIG] - base[BIG]).reshape(-1)
    selection = sparsify.magnitude_top_k(base[BIG], models[0][BIG], 0.2)
    assert selection.cut is not None  # more entries equal the threshold than fit in k
    assert int((tau.abs() >= selection.threshold).sum()) > selection.k
    assert int((tau.abs() > selection.threshold).sum()) < selection.k


TIES_CONFIGS = [
    dict(density=0.2, sign_election=s, divisor=v, weights=w, scaling_factor=0.7)
    for s, v, w in itertools.product(("sum", "weighted_sum", "count"), ("count", "weights", "none"), (None, [0.5, -1.5, 2.0]))
] + [
    dict(density=0.0),
    dict(density=1.0),
    dict(density=1.0, sign_election="weighted_sum", divisor="none", weights=[1.0, 2.0, -3.0]),
    dict(density=0.9, weights=[1.0, -1.0, 1.0], divisor="weights"),
]


@pytest.mark.parametrize("quantized", [True, False], ids=["ties", "distinct"])
@pytest.mark.parametrize("config", TIES_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_ties_chunked_equals_whole_equals_the_oracle(config, quantized):
    cfg = Ties.Config(convention="paper", **config)
    method = Ties(cfg)
    base, models = pool(3, 1, quantized)
    whole = engine(method, base, models, None)
    for rows in (1, 7, 64):
        chunked = engine(method, base, models, rows)
        for name in base:
            assert same_bytes(chunked[name], whole[name]), (rows, name)
    for name, b in base.items():
        assert same_bytes(whole[name], oracle_ties(b, [m[name] for m in models], cfg)), name


@pytest.mark.parametrize("sign_election", ["sum", "weighted_sum", "count"])
def test_ties_majority_zero_vote_chunked_equals_whole_equals_the_oracle(sign_election):
    """``zero_vote: majority`` with the per-tensor trim: the vote pass, then row blocks of any
    size; the oracle counts the elected signs of the whole model by hand."""
    weights = [0.5, -1.5, 2.0] if sign_election == "weighted_sum" else None
    cfg = Ties.Config(convention="paper", zero_vote="majority", sign_election=sign_election, weights=weights, divisor="none")
    base, models = pool(3, 1, quantized=True)
    whole = engine(Ties(cfg), base, models, None)
    for rows in (1, 7):
        chunked = engine(Ties(cfg), base, models, rows)
        assert all(same_bytes(chunked[k], whole[k]) for k in base), rows
    ws = weights or [1.0] * 3
    deltas = {k: [oracle_trim(m[k] - b, cfg.density) for m in models] for k, b in base.items()}
    plus = minus = 0
    for ds in deltas.values():
        votes = torch.zeros_like(ds[0])
        for w, d in zip(ws, ds, strict=True):
            votes += w * d if sign_election == "weighted_sum" else torch.sign(d) if sign_election == "count" else d
        plus, minus = plus + int((votes > 0).sum()), minus + int((votes < 0).sum())
    zero = 1.0 if plus > minus else -1.0
    assert zero == -1.0  # this pool's majority is −: the tie-break differs from + wherever votes cancel
    for k, b in base.items():
        expected = ta.add_scaled(b, ta.ties_merge(deltas[k], ws, sign_election, "none", zero), cfg.scaling_factor)
        assert same_bytes(whole[k], expected), k


@pytest.mark.parametrize(
    "variant, rescale, density, extra",
    [
        ("ties", "inverse_p", 0.3, {}),
        ("ties", "l1", 0.3, {"sign_election": "count", "divisor": "weights", "weights": [1.0, 0.5, 2.0]}),
        ("ties", "none", 0.7, {"sign_election": "weighted_sum", "weights": [2.0, -1.0, 0.25]}),
        ("linear", "inverse_p", 0.3, {}),
        ("linear", "l1", 0.5, {"weights": [1.0, 3.0, -0.5], "normalize": True}),
        ("linear", "none", 0.1, {}),
        ("linear", "inverse_p", 0.2, {"weights": [1.0, -1.0, 1.0]}),
        ("linear", "inverse_p", 0.0, {}),
        ("ties", "l1", 1.0, {}),
    ],
)
def test_dare_chunked_equals_whole_equals_the_oracle(variant, rescale, density, extra):
    cfg = Dare.Config(convention="paper", variant=variant, rescale=rescale, density=density, scaling_factor=-0.6, **extra)
    method = Dare(cfg)
    base, models = pool(3, 2, quantized=False)
    whole = engine(method, base, models, None, seed=9)
    for rows in (1, 7, 64):  # 7 rows of 257: blocks start at flat offsets that are not multiples of 8
        chunked = engine(method, base, models, rows, seed=9)
        for name in base:
            assert same_bytes(chunked[name], whole[name]), (rows, name)
    for name, b in base.items():
        assert same_bytes(whole[name], oracle_dare(name, b, [m[name] for m in models], cfg, seed=9)), name


@pytest.mark.parametrize("quantized", [True, False], ids=["ties", "distinct"])
@pytest.mark.parametrize(
    "fields", [{"density": 0.2}, {"density": [0.0, 0.5, 1.0], "weights": [1.0, -2.0, 0.5], "normalize": True}], ids=["one", "per-model"]
)
def test_magnitude_prune_chunked_equals_whole_equals_the_oracle(fields, quantized):
    cfg = MagnitudePrune.Config(scaling_factor=0.7, **fields)
    method = MagnitudePrune(cfg)
    base, models = pool(3, 4, quantized)
    whole = engine(method, base, models, None)
    for rows in (1, 7, 64):
        chunked = engine(method, base, models, rows)
        assert all(same_bytes(chunked[k], whole[k]) for k in base), rows
    densities = cfg.density if isinstance(cfg.density, list) else [cfg.density] * 3
    for name, b in base.items():
        deltas = [oracle_trim(m[name] - b, d) for m, d in zip(models, densities, strict=True)]
        merged = ta.linear_merge(deltas, cfg.weights or [1.0] * 3, cfg.normalize)
        assert same_bytes(whole[name], ta.add_scaled(b, merged, cfg.scaling_factor)), name


def oracle_della(name, base, tensors, cfg, seed) -> torch.Tensor:
    """DELLA on the whole tensor: stable-argsort ranks per row (or along dim 1), ``ctx.rand_like`` draws."""
    ctx = KernelContext(name=name, seed=seed)
    deltas = []
    for i, t in enumerate(tensors):
        tau = t - base
        d = cfg.density[i] if isinstance(cfg.density, list) else cfg.density
        e = cfg.epsilon[i] if isinstance(cfg.epsilon, list) else cfg.epsilon
        moved = tau.movedim(1, -1) if cfg.ranking == "dim1" and tau.dim() > 2 else tau
        rows = moved.reshape(moved.shape[0], -1) if moved.dim() >= 2 else moved.reshape(1, -1)
        if cfg.ranking == "dim1" and tau.dim() > 2:
            rows = moved.reshape(-1, moved.shape[-1])
        n = rows.shape[1]
        if n <= 1:
            probs = torch.full(tau.shape, float(d))
        else:
            ranks = torch.empty_like(rows, dtype=torch.int64)
            ranks.scatter_(1, torch.argsort(rows.abs(), dim=1, stable=True), torch.arange(n).expand(rows.shape).contiguous())
            probs = ((d - e) + (2.0 * e / (n - 1)) * ranks.to(torch.float32)).reshape(moved.shape)
            probs = probs.movedim(-1, 1) if moved is not tau else probs
        keep = ctx.rand_like(tau, salt=str(i)) < probs
        deltas.append(sparsify.apply_rescale(cfg.rescale, tau, keep, probs))
    return oracle_combine(base, deltas, cfg)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"variant": "linear", "rescale": "none"},
        {"rescale": "l1", "sign_election": "weighted_sum", "divisor": "weights", "weights": [1.0, 0.5, 2.0]},
        {"ranking": "dim1", "density": [0.5, 0.3, 0.6], "epsilon": [0.1, 0.2, 0.05]},
        {"variant": "linear", "weights": [1.0, -1.0, 0.5], "normalize": True},
    ],
    ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "defaults",
)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_della_row_blocks_equal_whole_equal_the_reference(fields, dtype):
    """The fused, row-blocked DELLA (ranks by key sorts, draws continued across blocks) has the
    bytes of the whole-tensor reference, whatever the engine's row blocks."""
    cfg = Della.Config(scaling_factor=0.7, **fields)
    method = Della(cfg)
    base, models = pool(3, 5, quantized=True)  # massive ties: ranks must break them by index
    base["cube"] = torch.randn(5, 6, 7, generator=torch.Generator().manual_seed(1))
    for m in models:
        m["cube"] = base["cube"] + torch.randint(-2, 3, (5, 6, 7)).float() * 0.5
    whole = engine(method, base, models, None, seed=11, dtype=dtype)
    for rows in (1, 7, 64):
        chunked = engine(method, base, models, rows, seed=11, dtype=dtype)
        for name in base:
            assert same_bytes(chunked[name], whole[name]), (rows, name)
    for name, b in base.items():
        t = [m[name] for m in models]
        dt = getattr(torch, dtype)
        expected = oracle_della(name, b.to(dt), [x.to(dt) for x in t], cfg, seed=11).to(b.dtype)  # the output dtype: the base's
        assert same_bytes(whole[name], expected), name


def test_della_fused_blocks_of_any_size_give_the_same_bytes(monkeypatch):
    base, models = pool(3, 6, quantized=False)
    method = Della(Della.Config(density=0.4, epsilon=0.2))
    expected = engine(method, base, models, 5, seed=2)
    for block in (40, 257, 1000, 1 << 20):  # blocks of one row, several rows, the whole unit
        monkeypatch.setattr(sparsify, "BLOCK", block)
        got = engine(method, base, models, 5, seed=2)
        assert all(same_bytes(got[k], expected[k]) for k in base), block


def test_della_is_rowwise_unless_the_l1_rescale_needs_whole_tensors():
    assert Della(Della.Config()).rowwise and not Della(Della.Config(rescale="l1")).rowwise
    from fusion_core.engine.stream import _plan_units
    from fusion_core.engine.validate import TensorPlan

    plans = [TensorPlan(name, shape, torch.float32) for name, shape in (("m", (64, 64)), ("v", (4096,)))]
    units = _plan_units(Della(Della.Config()), plans, 4, 3, 4, chunk_bytes=1024)
    assert {u.step for u in units if u.plan.name == "m"} == {"rows"}
    assert [u.step for u in units if u.plan.name == "v"] == ["whole"]  # a 1-D tensor is one row


def test_sub_blocks_of_the_fused_loops_do_not_change_the_bytes(monkeypatch):
    base, models = pool(3, 3, quantized=True)
    ties, dare = Ties(Ties.Config(convention="paper", density=0.3)), Dare(Dare.Config(convention="paper", density=0.4, variant="ties", rescale="l1"))
    expected = {m: engine(m, base, models, 5, seed=4) for m in (ties, dare)}
    for block in (40, 1000):  # multiples of 8 (the packed masks need it)
        monkeypatch.setattr(sparsify, "BLOCK", block)
        for m in (ties, dare):
            got = engine(m, base, models, 5, seed=4)
            assert all(same_bytes(got[k], expected[m][k]) for k in base), (block, m.name)


def test_the_tie_cut_by_index_list_and_by_scan_agree(monkeypatch):
    base, models = pool(3, 4, quantized=True)
    method = Ties(Ties.Config(convention="paper", density=0.35))
    listed = engine(method, base, models, 9)
    monkeypatch.setattr(sparsify, "_DROPPED_MAX", 0)
    assert sparsify.magnitude_top_k(base[BIG], models[0][BIG], 0.35).dropped is None
    scanned = engine(method, base, models, 9)
    assert all(same_bytes(listed[k], scanned[k]) for k in base)


def test_two_phase_path_is_taken_for_large_tensors(monkeypatch):
    base, models = pool(2, 5, quantized=False)
    calls: list = []
    method = Ties(Ties.Config(convention="paper", density=0.2))
    stats, chunk = method.chunk_stats, method.kernel_chunk
    monkeypatch.setattr(
        method, "chunk_stats", lambda name, b, t, i, ctx: calls.append(("stats", name, i)) or stats(name, b, t, i, ctx)
    )
    monkeypatch.setattr(
        method,
        "kernel_chunk",
        lambda name, b, ts, ctx, st, start: (
            calls.append(("rows", name, start, tuple(b.shape[:1]))) or chunk(name, b, ts, ctx, st, start)
        ),
    )
    engine(method, base, models, 100)
    big = [c for c in calls if c[1] == BIG]
    assert big[:2] == [("stats", BIG, 0), ("stats", BIG, 1)]
    assert [c[2:] for c in big[2:]] == [(0, (100,)), (100, (100,)), (200, (100,))]


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_other_compute_dtypes_chunk_identically(dtype):
    base, models = pool(3, 6, quantized=True)
    for method in (
        Ties(Ties.Config(convention="paper", density=0.25, divisor="weights", weights=[1.0, 2.0, -1.0])),
        Dare(Dare.Config(convention="paper", density=0.5, variant="ties")),
    ):
        whole = engine(method, base, models, None, seed=2, dtype=dtype)
        chunked = engine(method, base, models, 11, seed=2, dtype=dtype)
        assert all(same_bytes(chunked[k], whole[k]) for k in base), method.name
        ctx = KernelContext(name=BIG, seed=2, compute_dtype=dtype)
        cast = lambda t: t.to(getattr(torch, dtype))  # noqa: E731
        direct = method.kernel(BIG, cast(base[BIG]), [cast(m[BIG]) for m in models], ctx)
        assert same_bytes(whole[BIG], direct.to(whole[BIG].dtype))  # the output keeps the base dtype


# ----------------------------------------------------------------------------- the selection


def stable_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[torch.argsort(-scores.reshape(-1).double(), stable=True)[:k]] = True
    return keep


@pytest.mark.parametrize("kind", ["gaussian", "quantized", "half_zeros", "sorted"])
def test_top_k_of_a_large_tensor_matches_a_stable_sort(kind):
    gen = torch.Generator().manual_seed(7)
    n = 200_003
    scores = {
        "gaussian": lambda: torch.randn(n, generator=gen).abs(),
        "quantized": lambda: torch.randint(0, 30, (n,), generator=gen).float(),
        "half_zeros": lambda: torch.cat([torch.zeros(n // 2), torch.rand(n - n // 2, generator=gen)]),
        "sorted": lambda: torch.linspace(0, 1, n),  # a strided sample sees a skewed slice of nothing
    }[kind]()
    for k in (1, 17, n // 5, n // 2, n - 3, n - 1):
        selection = sparsify.top_k(scores, k)
        assert torch.equal(selection.keep_mask(scores, 0), stable_top_k(scores, k)), k


def test_top_k_mask_with_nan_scores_keeps_the_reference_rule():
    # np.partition ranks NaN above everything; entries compared against the threshold never
    # keep a NaN.  The sampled path detects NaN and defers to the exact one.
    gen = torch.Generator().manual_seed(8)
    scores = torch.rand(100_000, generator=gen)
    scores[::1000] = float("nan")
    for k in (50, 5000):
        flat = scores
        threshold = sparsify.kth_largest(flat, k)
        keep = flat >= threshold
        if int(keep.sum()) > k:
            tied = flat == threshold
            keep = (flat > threshold) | (tied & (torch.cumsum(tied, 0) <= k - int((flat > threshold).sum())))
        assert torch.equal(sparsify.top_k_mask(scores, k), keep), k


def test_packed_mask_is_the_rand_like_mask_at_any_offset():
    ctx = KernelContext(name="w", seed=3)
    n = 3 * sparsify.BLOCK + 1001
    mask = sparsify.packed_bernoulli_mask(n, 0.37, ctx, salt="2")
    expected = ctx.rand_like(torch.empty(n), salt="2") < 0.37
    for offset, length in ((0, n), (5, 77), (sparsify.BLOCK - 3, 11), (n - 9, 9)):
        assert torch.equal(mask.block(offset, length).bool(), expected[offset : offset + length])
    assert sparsify.packed_bernoulli_mask(n, 1.0, ctx, "0").keep_all
    assert sparsify.packed_bernoulli_mask(n, 0.0, ctx, "0").keep_none
