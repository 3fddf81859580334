"""Golden tests for the task-vector sparsifiers and rescalers (fusion_merging.sparsify)."""

from __future__ import annotations

import pytest
import torch
from fusion_merging import sparsify

from fusion_core.engine.kernel import KernelContext

torch.set_num_threads(1)

# |TAU10| in descending order: 7 (idx 3), 6 (7), 5 (9), 4 (6), 3 (1), 2 (4), 1 (2), 0.5 (0), 0.2 (8), 0.1 (5)
TAU10 = torch.tensor([0.5, -3.0, 1.0, 7.0, -2.0, 0.1, 4.0, -6.0, 0.2, 5.0])


def kept(mask: torch.Tensor) -> set[int]:
    return set(torch.nonzero(mask.reshape(-1)).reshape(-1).tolist())


@pytest.mark.parametrize(
    "fraction, n, expected",
    [(0.29, 100, 29), (0.57, 100, 57), (0.3, 10, 3), (0.35, 10, 3), (0.0, 10, 0), (-0.5, 10, 0), (1.0, 10, 10), (0.01, 50, 0), (0.5, 0, 0)],
)
def test_fraction_count_is_a_float_safe_floor(fraction, n, expected):
    # plain int(0.29 * 100) is 28 because 0.29 * 100 == 28.999999999999996
    assert sparsify.fraction_count(fraction, n) == expected


@pytest.mark.parametrize(
    "density, n, expected",
    [(0.3, 10, 3), (0.29, 10, 2), (0.05, 10, 1), (0.99, 10, 9), (1.0, 10, 10), (0.0, 10, 0), (0.5, 1, 1), (0.5, 0, 0)],
)
def test_keep_count_floors_and_keeps_at_least_one(density, n, expected):
    assert sparsify.keep_count(density, n) == expected


def test_top_k_mask_picks_the_k_largest_of_ten():
    assert kept(sparsify.top_k_mask(TAU10.abs(), 3)) == {3, 7, 9}
    assert kept(sparsify.top_k_mask(TAU10.abs(), 1)) == {3}
    assert kept(sparsify.top_k_mask(TAU10.abs(), 0)) == set()
    assert kept(sparsify.top_k_mask(TAU10.abs(), 10)) == set(range(10))
    assert kept(sparsify.top_k_mask(TAU10.abs(), 99)) == set(range(10))


def test_top_k_mask_keeps_exactly_k_under_ties_lowest_index_first():
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0])
    assert kept(sparsify.top_k_mask(scores, 2)) == {1, 2}
    assert kept(sparsify.top_k_mask(scores, 4)) == {0, 1, 2, 3}
    assert kept(sparsify.top_k_mask(torch.ones(10), 3)) == {0, 1, 2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_top_k_mask_matches_a_stable_full_sort(dtype):
    # small integers force many ties; the oracle is a stable descending sort (lower index first)
    gen = torch.Generator().manual_seed(11)
    scores = torch.randint(0, 7, (300,), generator=gen).to(dtype)
    order = torch.argsort(-scores.double(), stable=True)
    for k in (1, 17, 150, 299):
        expected = torch.zeros(300, dtype=torch.bool)
        expected[order[:k]] = True
        assert torch.equal(sparsify.top_k_mask(scores, k), expected), k


def test_kth_largest_agrees_with_kthvalue():
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(1001, generator=gen)
    for k in (1, 500, 1001):
        assert sparsify.kth_largest(x, k).item() == torch.kthvalue(x, 1001 - k + 1).values.item()
    assert sparsify.kth_largest(x.to(torch.bfloat16), 3).item() == torch.sort(x.to(torch.bfloat16)).values[-3].item()


def test_top_k_mask_keeps_the_shape_of_2d_and_0d_inputs():
    scores = TAU10.abs().reshape(2, 5)
    mask = sparsify.top_k_mask(scores, 2)
    assert mask.shape == (2, 5)
    assert mask.dtype == torch.bool
    assert kept(mask) == {3, 7}
    assert sparsify.top_k_mask(torch.tensor(3.0), 1).item() is True
    assert sparsify.top_k_mask(torch.tensor(3.0), 0).item() is False


def test_rank_window_mask_is_disjoint_under_ties():
    # all equal: the order is the flat index, so ranks [2, 4) are indices 2 and 3
    assert kept(sparsify.rank_window_mask(torch.ones(6), 2, 4)) == {2, 3}
    assert kept(sparsify.rank_window_mask(TAU10.abs(), 1, 4)) == {7, 9, 6}


@pytest.mark.parametrize(
    "density, expected",
    [(0.3, {3, 7, 9}), (0.35, {3, 7, 9}), (0.29, {3, 7}), (0.05, {3}), (0.0, set()), (1.0, set(range(10)))],
)
def test_magnitude_mask_on_ten_elements(density, expected):
    assert kept(sparsify.magnitude_mask(TAU10, density)) == expected


def test_bernoulli_mask_follows_rand_like_and_salt():
    ctx = KernelContext(name="layer.weight", seed=7)
    tau = torch.randn(50, generator=torch.Generator().manual_seed(0))
    mask = sparsify.bernoulli_mask(tau, 0.4, ctx, salt="0")
    assert torch.equal(mask, ctx.rand_like(tau, salt="0") < 0.4)
    assert not torch.equal(mask, sparsify.bernoulli_mask(tau, 0.4, ctx, salt="1"))
    assert not sparsify.bernoulli_mask(tau, 0.0, ctx, salt="0").any()
    assert sparsify.bernoulli_mask(tau, 1.0, ctx, salt="0").all()


@pytest.mark.parametrize(
    "density, gamma, expected",
    [
        # n_top = floor(0.01 * 10) = 0: keep the 5 largest (mergekit 0.1.4 kept nothing here)
        (0.5, 0.01, {3, 7, 9, 6, 1}),
        # n_top = 1: drop 7 (idx 3), keep the next five
        (0.5, 0.1, {7, 9, 6, 1, 4}),
        # n_top = 2 but target = 9: the window slides to ranks [1, 10), only the largest goes
        (0.9, 0.2, set(range(10)) - {3}),
        (0.3, 0.2, {9, 6, 1}),
        (1.0, 0.5, set(range(10))),
        (0.0, 0.1, set()),
    ],
)
def test_breadcrumbs_mask_golden(density, gamma, expected):
    assert kept(sparsify.breadcrumbs_mask(TAU10, density, gamma)) == expected


def test_breadcrumbs_mask_on_a_small_tensor_keeps_the_largest():
    """Regression (mergekit 0.1.4): with fewer than 100 entries γ=0.01 drops no outlier,
    which must keep the top `target` entries, not nothing."""
    tau = torch.arange(1.0, 51.0) * torch.tensor([1.0, -1.0]).repeat(25)  # |τ| = 1..50
    mask = sparsify.breadcrumbs_mask(tau, density=0.2, gamma=0.01)
    assert kept(mask) == set(range(40, 50))


def test_della_keep_probs_rank_by_magnitude_per_row():
    tau = torch.tensor([[0.3, -0.1, 0.2], [1.0, 2.0, 3.0]])
    probs = sparsify.della_keep_probs(tau, density=0.5, epsilon=0.1)
    expected = torch.tensor([[0.6, 0.4, 0.5], [0.4, 0.5, 0.6]])
    torch.testing.assert_close(probs, expected)
    # a 1-D tensor is one row
    torch.testing.assert_close(sparsify.della_keep_probs(tau[0], 0.5, 0.1), expected[0])


def test_della_keep_probs_on_one_element_rows_is_density_not_nan():
    for shape in [(4, 1), (1,), ()]:
        probs = sparsify.della_keep_probs(torch.ones(shape), density=0.3, epsilon=0.2)
        assert probs.shape == torch.Size(shape)
        assert torch.equal(probs, torch.full(shape, 0.3))


def test_della_keep_probs_view_higher_rank_tensors_as_rows_of_dim0():
    tau = torch.tensor([[[1.0, 4.0], [3.0, 2.0]]])  # one row of 4: ranks 0, 3, 2, 1
    probs = sparsify.della_keep_probs(tau, density=0.5, epsilon=0.3)
    torch.testing.assert_close(probs, torch.tensor([[[0.2, 0.8], [0.6, 0.4]]]))


def test_rescale_inverse_p():
    masked = torch.tensor([0.0, 2.0, -4.0])
    assert torch.equal(sparsify.rescale_inverse_p(masked, 0.5), torch.tensor([0.0, 4.0, -8.0]))
    assert torch.equal(sparsify.rescale_inverse_p(masked, 0.0), torch.zeros(3))
    p = torch.tensor([0.5, 0.25, 0.0])
    assert torch.equal(sparsify.rescale_inverse_p(masked, p), torch.tensor([0.0, 8.0, 0.0]))


def test_rescale_l1_matches_the_norm_and_skips_tiny_norms():
    tau = torch.tensor([1.0, -2.0, 3.0, -4.0], dtype=torch.float64)
    masked = torch.tensor([0.0, -2.0, 0.0, -4.0], dtype=torch.float64)
    out = sparsify.rescale_l1(tau, masked)
    torch.testing.assert_close(out, torch.tensor([0.0, -20.0 / 6.0, 0.0, -40.0 / 6.0], dtype=torch.float64))
    assert float(out.abs().sum()) == pytest.approx(10.0, rel=1e-15)
    tiny = torch.full((4,), 1e-9)
    assert torch.equal(sparsify.rescale_l1(tiny, tiny * torch.tensor([1.0, 0, 0, 0])), tiny * torch.tensor([1.0, 0, 0, 0]))
    zero_kept = torch.zeros(4)
    assert torch.equal(sparsify.rescale_l1(tau.float(), zero_kept), zero_kept)


def test_apply_rescale_modes():
    tau = torch.tensor([1.0, -2.0, 3.0, -4.0])
    mask = torch.tensor([True, False, True, False])
    assert torch.equal(sparsify.apply_rescale("none", tau, mask, 0.5), torch.tensor([1.0, 0.0, 3.0, 0.0]))
    assert torch.equal(sparsify.apply_rescale("inverse_p", tau, mask, 0.5), torch.tensor([2.0, 0.0, 6.0, 0.0]))
    assert torch.equal(sparsify.apply_rescale("l1", tau, mask, 0.5), torch.tensor([2.5, 0.0, 7.5, 0.0]))
    with pytest.raises(ValueError, match="rescale must be one of"):
        sparsify.apply_rescale("l2", tau, mask, 0.5)


def test_row_order_is_a_stable_argsort_of_magnitudes():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(-3, 4, (50, 300), generator=gen).float() * 0.5  # many equal magnitudes, ±x
    rows[0, ::3] = -0.0
    rows[1, :5] = float("inf")
    rows[2, :5] = -float("inf")
    rows[3] = torch.randn(300, generator=gen)
    for part in (rows, rows[:, :1], rows[:, :2], rows[:7, :129]):
        expected = torch.argsort(part.abs(), dim=1, stable=True)
        assert torch.equal(sparsify.row_order(part.contiguous()), expected)
        assert torch.equal(sparsify.row_order(part.double()), expected)  # the argsort fallback
