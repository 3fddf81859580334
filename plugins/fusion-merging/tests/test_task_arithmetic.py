"""Golden tests for the task-arithmetic family: every expected value is worked out by hand
in the comments (not by calling the code under test)."""

from __future__ import annotations

import attrs
import pytest
import torch
from fusion_merging import task_arithmetic as ta
from fusion_merging.task_arithmetic import Breadcrumbs, Dare, Della, MagMax, MagnitudePrune, Sce, TaskArithmetic, Ties

from fusion_core.engine.kernel import KernelContext
from fusion_core.errors import InputError

torch.set_num_threads(1)

NAME = "encoder.layer.0.weight"


# The golden values below were worked out under fusion's pre-FusionBench defaults (the papers'
# conventions); they are pinned explicitly here, so each test states the convention it checks.
# The FusionBench defaults are tested in test_conventions.py and against FusionBench in tests/parity.
PINNED = {
    TaskArithmetic: {"convention": "paper"},
    Ties: {"convention": "paper"},
    Dare: {"convention": "paper"},
    MagMax: {"scaling_factor": 1.0, "tie_break": "earlier"},
}


def merge(cls, base, tensors, name=NAME, seed=0, **config):
    config = {**PINNED.get(cls, {}), **config}
    return cls(cls.Config(**config)).kernel(name, base, list(tensors), KernelContext(name=name, seed=seed))


def t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


# Three task vectors of 5 entries with distinct magnitudes, on a zero base.
TAU1 = t(4.0, -1.0, 0.5, 2.0, -3.0)
TAU2 = t(-2.0, 3.0, -0.25, 1.0, -5.0)
TAU3 = t(1.0, -4.0, 6.0, -0.5, 0.75)
ZERO5 = torch.zeros(5)
ONES5 = torch.ones(5)
# Trimmed at density 0.6 (k = 3 per model):
#   τ̂1 = [ 4,  0, 0, 2, -3]   τ̂2 = [-2, 3, 0, 0, -5]   τ̂3 = [1, -4, 6, 0, 0]
#   Σ τ̂ = [3, -1, 6, 2, -8]  → elected signs [+, −, +, +, −]


def models(base, *taus):
    return [base + tau for tau in taus]


# ----------------------------------------------------------------------------- task arithmetic


def test_task_arithmetic_scaled_sum():
    base = ONES5[:3]
    t1, t2 = t(2.0, 0.0, 1.0), t(1.0, 3.0, -1.0)  # τ1 = [1, −1, 0], τ2 = [0, 2, −2]
    # 1 + 0.5·[1, 1, −2]
    assert torch.equal(merge(TaskArithmetic, base, [t1, t2], scaling_factor=0.5), t(1.5, 1.5, 0.0))
    # weights [3, 1], normalize: (3τ1 + τ2)/4 = [0.75, −0.25, −0.5]
    out = merge(TaskArithmetic, base, [t1, t2], weights=[3.0, 1.0], normalize=True)
    assert torch.equal(out, t(1.75, 0.75, 0.5))
    # negative weight: τ1 − τ2 = [1, −3, 2]
    assert torch.equal(merge(TaskArithmetic, base, [t1, t2], weights=[1.0, -1.0]), t(2.0, -2.0, 3.0))


def test_task_arithmetic_at_lambda_zero_is_the_base():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(4, 6, generator=gen)
    tensors = [torch.randn(4, 6, generator=gen) for _ in range(3)]
    assert torch.equal(merge(TaskArithmetic, base, tensors, scaling_factor=0.0), base)


def test_task_arithmetic_normalize_with_zero_weight_sum_is_a_clear_error():
    with pytest.raises(ValueError, match="task_arithmetic: weights .* sum to 0"):
        TaskArithmetic.Config(weights=[2.0, -2.0], normalize=True)


def test_task_arithmetic_weight_count_mismatch():
    with pytest.raises(InputError, match="weights has 1 value"):
        merge(TaskArithmetic, ZERO5, [TAU1, TAU2], weights=[1.0])


# ----------------------------------------------------------------------------- TIES


def test_ties_paper_default_golden():
    # agreeing entries: [4, 1] → 2.5 | [−4] | [6] | [2] | [−3, −5] → −4
    out = merge(Ties, ZERO5, [TAU1, TAU2, TAU3], density=0.6)
    assert torch.equal(out, t(2.5, -4.0, 6.0, 2.0, -4.0))


def test_ties_with_base_and_scaling():
    out = merge(Ties, ONES5, models(ONES5, TAU1, TAU2, TAU3), density=0.6, scaling_factor=0.5)
    assert torch.equal(out, t(2.25, -1.0, 4.0, 2.0, -1.0))


def test_ties_divisor_none_is_the_sum_of_agreeing_entries():
    out = merge(Ties, ZERO5, [TAU1, TAU2, TAU3], density=0.6, divisor="none")
    assert torch.equal(out, t(5.0, -4.0, 6.0, 2.0, -8.0))


def test_ties_mergekit_convention_weighted_election_and_weight_divisor():
    # ω = w·τ̂ with w = [1, 2, 0.5]: ω1 = [4,0,0,2,−3]  ω2 = [−4,6,0,0,−10]  ω3 = [0.5,−2,3,0,0]
    # Σω = [0.5, 4, 3, 2, −13] → [+, +, +, +, −]
    # pos0: (4 + 0.5)/(1 + 0.5) = 3 | pos1: 6/2 = 3 | pos2: 3/0.5 = 6 | pos3: 2/1 | pos4: −13/3
    out = merge(
        Ties, ZERO5, [TAU1, TAU2, TAU3], density=0.6, weights=[1.0, 2.0, 0.5], sign_election="weighted_sum", divisor="weights"
    )
    torch.testing.assert_close(out, t(3.0, 3.0, 6.0, 2.0, -13.0 / 3.0))


def test_ties_peft_convention_unweighted_election_count_divisor():
    # election on Σ τ̂ → [+, −, +, +, −]; agreeing w·τ̂ averaged by count
    # pos0: (1·4 + 0.5·1)/2 | pos1: 0.5·(−4) | pos2: 0.5·6 | pos3: 1·2 | pos4: (1·(−3) + 2·(−5))/2
    out = merge(Ties, ZERO5, [TAU1, TAU2, TAU3], density=0.6, weights=[1.0, 2.0, 0.5])
    assert torch.equal(out, t(2.25, -2.0, 3.0, 2.0, -6.5))


def test_ties_count_election_is_a_majority_vote():
    # Σ sign(τ̂) = [1, 0, 1, 1, −2] → [+, + (tie), +, +, −]; pos1 now keeps τ̂2 = 3
    out = merge(Ties, ZERO5, [TAU1, TAU2, TAU3], density=0.6, sign_election="count")
    assert torch.equal(out, t(2.5, 3.0, 6.0, 2.0, -4.0))


def test_ties_density_one_does_not_trim():
    # Σ τ = [3, −2, 6.25, 2.5, −7.25] → [+, −, +, +, −]
    # pos0: (4+1)/2 | pos1: (−1−4)/2 | pos2: (0.5+6)/2 | pos3: (2+1)/2 | pos4: (−3−5)/2
    out = merge(Ties, ZERO5, [TAU1, TAU2, TAU3], density=1.0)
    assert torch.equal(out, t(2.5, -2.5, 3.25, 1.5, -4.0))


def test_ties_density_zero_returns_the_base():
    base = t(1.0, -2.0, 3.0, 0.5, 7.0)
    out = merge(Ties, base, models(base, TAU1, TAU2, TAU3), density=0.0)
    assert torch.equal(out, base)


def test_ties_tiny_density_keeps_one_entry_per_model():
    # k = max(1, floor(0.01·5)) = 1: τ̂1 = 4@0, τ̂2 = −5@4, τ̂3 = 6@2
    out = merge(Ties, ZERO5, [TAU1, TAU2, TAU3], density=0.01)
    assert torch.equal(out, t(4.0, 0.0, 6.0, 0.0, -5.0))


@pytest.mark.parametrize(
    "density, expected",
    [
        (0.3, [0, 0, 0, 7, 0, 0, 0, -6, 0, 5]),  # k = 3
        (0.35, [0, 0, 0, 7, 0, 0, 0, -6, 0, 5]),  # k = floor(3.5) = 3
        (0.29, [0, 0, 0, 7, 0, 0, 0, -6, 0, 0]),  # k = 2
        (0.05, [0, 0, 0, 7, 0, 0, 0, 0, 0, 0]),  # k = max(1, 0) = 1
        (0.5, [0, -3, 0, 7, 0, 0, 4, -6, 0, 5]),  # k = 5
    ],
)
def test_ties_k_on_a_ten_element_tensor(density, expected):
    tau = t(0.5, -3.0, 1.0, 7.0, -2.0, 0.1, 4.0, -6.0, 0.2, 5.0)
    out = merge(Ties, torch.zeros(10), [tau], density=density)
    assert torch.equal(out, torch.tensor(expected, dtype=torch.float32))


def test_ties_keeps_exactly_k_when_magnitudes_tie():
    tau = t(1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0)
    out = merge(Ties, torch.zeros(10), [tau], density=0.3)
    # exactly 3 kept, equal magnitudes in index order
    assert torch.equal(out, t(1.0, -1.0, 1.0, 0, 0, 0, 0, 0, 0, 0))


def test_ties_exactly_opposite_entries_elect_plus():
    # Σ = 0 elects +1: keep the positive entry of each pair
    out = merge(Ties, torch.zeros(2), [t(2.0, -1.0), t(-2.0, 1.0)], density=1.0)
    assert torch.equal(out, t(2.0, 1.0))


def test_ties_position_where_every_task_vector_is_zero_stays_base():
    base = t(3.0, 3.0)
    out = merge(Ties, base, [t(3.0, 5.0), t(3.0, 4.0)], density=1.0)
    assert torch.equal(out, t(3.0, 4.5))  # pos0 all zero → 3; pos1: 3 + (2 + 1)/2


def test_ties_negative_weights_flip_signs_in_weighted_election():
    base = torch.zeros(1)
    tensors = [t(1.0), t(0.5)]
    # ω = [−1, 0.5] → Σ = −0.5 → γ = −; model 1 agrees: −1 / count 1
    assert torch.equal(merge(Ties, base, tensors, density=1.0, weights=[-1.0, 1.0], sign_election="weighted_sum"), t(-1.0))
    # mergekit divisor Σ agreeing w = −1: −1 / −1
    out = merge(Ties, base, tensors, density=1.0, weights=[-1.0, 1.0], sign_election="weighted_sum", divisor="weights")
    assert torch.equal(out, t(1.0))
    # unweighted election: Σ τ = 1.5 → +; both agree: (−1·1 + 1·0.5)/2
    assert torch.equal(merge(Ties, base, tensors, density=1.0, weights=[-1.0, 1.0]), t(-0.25))


def test_ties_weight_divisor_with_zero_sum_of_agreeing_weights_gives_zero():
    # w = [1, −1], both τ = 2 agree under the unweighted election; Σ agreeing w = 0 → divisor 1
    out = merge(Ties, torch.zeros(1), [t(2.0), t(2.0)], density=1.0, weights=[1.0, -1.0], divisor="weights")
    assert torch.equal(out, t(0.0))


# ----------------------------------------------------------------------------- DARE


def test_dare_density_one_is_task_arithmetic():
    for rescale in ("inverse_p", "l1", "none"):
        out = merge(Dare, ZERO5, [TAU1, TAU2], density=1.0, rescale=rescale, scaling_factor=0.5)
        assert torch.equal(out, t(1.0, 1.0, 0.125, 1.5, -4.0))  # 0.5·(τ1 + τ2)


def test_dare_density_zero_is_the_base_not_nan():
    base = t(1.0, 2.0, 3.0, 4.0, 5.0)
    for rescale in ("inverse_p", "l1", "none"):
        for variant in ("linear", "ties"):
            out = merge(Dare, base, models(base, TAU1, TAU2), density=0.0, rescale=rescale, variant=variant)
            assert torch.equal(out, base)


def test_dare_inverse_p_golden_mask():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(8, 8, generator=gen)
    tau = torch.randn(8, 8, generator=gen)
    ctx = KernelContext(name=NAME, seed=5)
    keep = ctx.rand_like(tau, salt="0") < 0.25  # the documented mask of model 0
    assert 0 < int(keep.sum()) < 64
    out = merge(Dare, base, [base + tau], seed=5, density=0.25)
    expected_delta = torch.where(keep, ((base + tau) - base) * 4.0, torch.zeros(8, 8))
    torch.testing.assert_close(out - base, expected_delta)
    assert torch.equal(out[~keep], base[~keep])


def test_dare_l1_rescale_keeps_the_l1_norm_and_the_mask():
    gen = torch.Generator().manual_seed(4)
    tau = torch.randn(40, 25, dtype=torch.float64, generator=gen)
    base = torch.zeros(40, 25, dtype=torch.float64)
    out = merge(Dare, base, [tau], density=0.3, rescale="l1")
    keep = KernelContext(name=NAME, seed=0).rand_like(tau, salt="0") < 0.3
    assert torch.equal(out != 0, keep)  # non-zero pattern = mask
    assert float(out.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-12)
    ratio = float(tau.abs().sum()) / float(tau[keep].abs().sum())
    torch.testing.assert_close(out[keep], tau[keep] * ratio, rtol=1e-12, atol=0)


def test_dare_is_deterministic_per_seed_and_tensor_name():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(30, 30, generator=gen)
    tensors = [torch.randn(30, 30, generator=gen) for _ in range(2)]
    first = merge(Dare, base, tensors, name="a.weight", seed=1, density=0.5)
    assert torch.equal(first, merge(Dare, base, tensors, name="a.weight", seed=1, density=0.5))
    assert not torch.equal(first, merge(Dare, base, tensors, name="b.weight", seed=1, density=0.5))
    assert not torch.equal(first, merge(Dare, base, tensors, name="a.weight", seed=2, density=0.5))


def test_dare_mask_of_each_model_depends_only_on_its_salt():
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(20, 20, generator=gen)
    t1, t2 = torch.randn(20, 20, generator=gen), torch.randn(20, 20, generator=gen)
    alone = merge(Dare, base, [t1], density=0.5) - base
    # adding a model whose τ is 0 after it does not change model 0's mask
    assert torch.equal(merge(Dare, base, [t1, base], density=0.5) - base, alone)
    # with both models, the result is the sum of each model's own sparse task vector
    only_second = merge(Dare, base, [base, t2], density=0.5) - base
    both = merge(Dare, base, [t1, t2], density=0.5) - base
    torch.testing.assert_close(both, alone + only_second)
    keep1 = KernelContext(name=NAME, seed=0).rand_like(t2, salt="1") < 0.5
    assert torch.equal(only_second != 0, keep1 & ((t2 - base) != 0))
    # and the two models get different masks
    keep0 = KernelContext(name=NAME, seed=0).rand_like(t1, salt="0") < 0.5
    assert not torch.equal(keep0, keep1)


def test_dare_ties_density_one_is_ties_without_trim():
    out = merge(Dare, ZERO5, [TAU1, TAU2, TAU3], variant="ties", density=1.0, rescale="none")
    assert torch.equal(out, t(2.5, -2.5, 3.25, 1.5, -4.0))


def test_dare_ties_of_one_model_is_its_masked_task_vector():
    gen = torch.Generator().manual_seed(7)
    tau = torch.randn(16, 4, generator=gen)
    out = merge(Dare, torch.zeros(16, 4), [tau], variant="ties", density=0.5)
    keep = KernelContext(name=NAME, seed=0).rand_like(tau, salt="0") < 0.5
    torch.testing.assert_close(out, torch.where(keep, tau * 2.0, torch.zeros_like(tau)))


def test_dare_and_della_are_random_methods():
    assert Dare.capabilities.random and Della.capabilities.random
    assert Dare.capabilities.needs_base and Della.capabilities.needs_base
    assert not Ties.capabilities.random and not TaskArithmetic.capabilities.random


# ----------------------------------------------------------------------------- breadcrumbs

TAU10 = t(0.5, -3.0, 1.0, 7.0, -2.0, 0.1, 4.0, -6.0, 0.2, 5.0)


def test_breadcrumbs_small_tensor_keeps_the_largest_when_no_outlier_is_dropped():
    """Regression: mergekit 0.1.4 kept nothing when floor(gamma·n) = 0 (tensors < 100 entries)."""
    out = merge(Breadcrumbs, torch.zeros(10), [TAU10], density=0.5, gamma=0.01)
    assert torch.equal(out, t(0, -3.0, 0, 7.0, 0, 0, 4.0, -6.0, 0, 5.0))


def test_breadcrumbs_drops_the_outlier_and_the_smallest():
    # n_top = 1 drops 7; the next five are kept; 1, 0.5, 0.2, 0.1 dropped as small
    out = merge(Breadcrumbs, torch.ones(10), [torch.ones(10) + TAU10], density=0.5, gamma=0.1, scaling_factor=2.0)
    assert torch.equal(out, torch.ones(10) + 2.0 * t(0, -3.0, 0, 0, -2.0, 0, 4.0, -6.0, 0, 5.0))


# Breadcrumbs at density 0.6, gamma 0.2 on 5 entries: n_top = 1, target = 3, keep ranks 1..3
#   b1 = [0, −1, 0, 2, −3]   b2 = [−2, 3, 0, 1, 0]   b3 = [1, −4, 0, 0, 0.75]


def test_breadcrumbs_linear_golden():
    out = merge(Breadcrumbs, ZERO5, [TAU1, TAU2, TAU3], density=0.6, gamma=0.2)
    assert torch.equal(out, t(-1.0, -2.0, 0.0, 3.0, -2.25))


def test_breadcrumbs_ties_golden():
    # Σ = [−1, −2, 0, 3, −2.25] → [−, −, + (zero), +, −]
    # pos0: [−2] | pos1: [−1, −4] → −2.5 | pos2: nothing | pos3: [2, 1] → 1.5 | pos4: [−3]
    out = merge(Breadcrumbs, ZERO5, [TAU1, TAU2, TAU3], variant="ties", density=0.6, gamma=0.2)
    assert torch.equal(out, t(-2.0, -2.5, 0.0, 1.5, -3.0))


def test_breadcrumbs_density_one_and_zero():
    assert torch.equal(merge(Breadcrumbs, ZERO5, [TAU1, TAU2], density=1.0, gamma=0.4), TAU1 + TAU2)
    assert torch.equal(merge(Breadcrumbs, ONES5, models(ONES5, TAU1, TAU2), density=0.0), ONES5)


# ----------------------------------------------------------------------------- DELLA


def test_della_full_keep_probability_is_ties_or_linear_without_trim():
    out = merge(Della, ZERO5, [TAU1, TAU2, TAU3], density=1.0, epsilon=0.0)
    assert torch.equal(out, t(2.5, -2.5, 3.25, 1.5, -4.0))
    out = merge(Della, ZERO5, [TAU1, TAU2, TAU3], variant="linear", density=1.0, epsilon=0.0)
    assert torch.equal(out, TAU1 + TAU2 + TAU3)


def test_della_paper_rescale_divides_each_kept_entry_by_its_probability():
    # one row [0.3, −0.1, 0.2], d = 0.5, ε = 0.1: ranks by |τ| 2, 0, 1 → p = [0.6, 0.4, 0.5]
    tau = t(0.3, -0.1, 0.2)
    probs = [0.6, 0.4, 0.5]
    for seed in range(6):
        u = KernelContext(name=NAME, seed=seed).rand_like(tau, salt="0").tolist()
        expected = t(*[tau[j].item() / probs[j] if u[j] < probs[j] else 0.0 for j in range(3)])
        out = merge(Della, torch.zeros(3), [tau], seed=seed, variant="linear", density=0.5, epsilon=0.1)
        torch.testing.assert_close(out, expected)


def test_della_l1_rescale_keeps_the_norm():
    gen = torch.Generator().manual_seed(8)
    tau = torch.randn(12, 30, dtype=torch.float64, generator=gen)
    out = merge(Della, torch.zeros(12, 30, dtype=torch.float64), [tau], variant="linear", density=0.4, epsilon=0.2, rescale="l1")
    assert 0 < int((out != 0).sum()) < tau.numel()
    assert float(out.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-12)


def test_della_keeps_large_magnitudes_more_often():
    tau = torch.arange(1.0, 1001.0).repeat(20, 1)  # each row ranks 1..1000 by magnitude
    out = merge(Della, torch.zeros(20, 1000), [tau], variant="linear", density=0.5, epsilon=0.4, rescale="none")
    kept = (out != 0).float().mean(dim=0)
    assert kept[:100].mean() < 0.2 and kept[-100:].mean() > 0.8  # p ≈ 0.1…0.18 vs 0.82…0.9


@pytest.mark.parametrize("rescale", ["inverse_p", "l1", "none"])
def test_della_one_element_rows_do_not_nan(rescale):
    tau = t(1.0, -2.0, 3.0, -4.0).reshape(4, 1)
    out = merge(Della, torch.zeros(4, 1), [tau, -tau * 0.5], density=0.5, epsilon=0.2, rescale=rescale)
    assert torch.isfinite(out).all()
    out = merge(Della, torch.tensor(1.0), [torch.tensor(3.0)], density=1.0, epsilon=0.0, rescale=rescale)
    assert torch.equal(out, torch.tensor(3.0))


@pytest.mark.parametrize("density, epsilon", [(0.1, 0.15), (0.9, 0.15), (0.15, 0.15), (0.0, 0.0)])
def test_della_probability_range_is_validated(density, epsilon):
    with pytest.raises(ValueError, match=r"della: keep probabilities must lie in \(0, 1\].*lower epsilon"):
        Della.Config(density=density, epsilon=epsilon)


def test_della_probability_range_edges_are_accepted():
    Della.Config(density=0.85, epsilon=0.15)
    Della.Config(density=1.0, epsilon=0.0)


# ----------------------------------------------------------------------------- magnitude_prune


def test_magnitude_prune_golden():
    # τ̂1 = [4, 0, 0, 2, −3], τ̂2 = [−2, 3, 0, 0, −5]; w = [1, 0.5] → [3, 1.5, 0, 2, −5.5]
    out = merge(MagnitudePrune, ZERO5, [TAU1, TAU2], density=0.6, weights=[1.0, 0.5])
    assert torch.equal(out, t(3.0, 1.5, 0.0, 2.0, -5.5))
    out = merge(MagnitudePrune, ZERO5, [TAU1, TAU2], density=0.6, weights=[1.0, 0.5], normalize=True)
    torch.testing.assert_close(out, t(2.0, 1.0, 0.0, 4.0 / 3.0, -11.0 / 3.0))


def test_magnitude_prune_density_one_is_task_arithmetic():
    out = merge(MagnitudePrune, ONES5, models(ONES5, TAU1, TAU2), density=1.0, scaling_factor=0.5)
    assert torch.equal(out, ONES5 + 0.5 * (TAU1 + TAU2))


# ----------------------------------------------------------------------------- SCE

SCE1 = t(1.0, 2.0, -1.0, 0.0)
SCE2 = t(3.0, -2.0, -1.0, 6.0)


def test_sce_without_selection_golden():
    # mean τ²: 6/4 = 1.5 and 50/4 = 12.5 → w = [3/28, 25/28]; Σ τ = [4, 0, −2, 6] → [+, +, −, +]
    # pos0: (3/28·1 + 25/28·3)/1 = 39/14 | pos1: τ1 = 2 only | pos2: −1 | pos3: τ2 = 6 only (0 never agrees)
    out = merge(Sce, torch.zeros(4), [SCE1, SCE2])
    torch.testing.assert_close(out, t(39.0 / 14.0, 2.0, -1.0, 6.0))


def test_sce_variance_selection_golden():
    # population variances [1, 4, 0, 9]: 3 non-zero
    # select_topk 0.5: k = floor(1.5) = 1 → position 3 only; w = [0, 1]
    out = merge(Sce, torch.ones(4), [torch.ones(4) + SCE1, torch.ones(4) + SCE2], select_topk=0.5)
    torch.testing.assert_close(out, t(1.0, 1.0, 1.0, 7.0))
    # select_topk 0.7: k = 2 → positions 3 and 1; w ∝ [4/4, 40/4]; pos1 sum 0 elects + → τ1 = 2
    out = merge(Sce, torch.zeros(4), [SCE1, SCE2], select_topk=0.7, scaling_factor=0.5)
    torch.testing.assert_close(out, t(0.0, 1.0, 0.0, 3.0))
    # select_topk 0 keeps nothing
    assert torch.equal(merge(Sce, torch.ones(4), [SCE1, SCE2], select_topk=0.0), torch.ones(4))


def test_sce_identical_models_give_base_plus_their_task_vector():
    # zero energy → uniform weights; all-zero task vectors leave the base
    assert torch.equal(merge(Sce, ONES5, [ONES5, ONES5]), ONES5)
    out = merge(Sce, ONES5, [ONES5 + TAU1, ONES5 + TAU1])
    torch.testing.assert_close(out, ONES5 + TAU1)


def test_sce_tiny_energies_fall_back_to_uniform_weights():
    # mean τ² = 1e-8 and 9e-8 sum to 1e-7 < 1e-6 → w = [1/2, 1/2] → plain mean 2e-4
    # (energy weights [0.1, 0.9] would give 2.8e-4)
    out = merge(Sce, torch.zeros(2, dtype=torch.float64), [torch.full((2,), 1e-4, dtype=torch.float64), torch.full((2,), 3e-4, dtype=torch.float64)])
    torch.testing.assert_close(out, torch.full((2,), 2e-4, dtype=torch.float64))


# ----------------------------------------------------------------------------- MagMax


def test_magmax_golden():
    taus = [t(1.0, -4.0, 2.0, 0.0), t(-3.0, 2.0, 2.0, 0.0), t(0.5, 1.0, -2.5, 0.0)]
    out = merge(MagMax, torch.zeros(4), taus)
    assert torch.equal(out, t(-3.0, -4.0, -2.5, 0.0))
    base = t(1.0, 1.0, 1.0, 1.0)
    out = merge(MagMax, base, [base + x for x in taus], scaling_factor=0.5)
    assert torch.equal(out, t(-0.5, -1.0, -0.25, 1.0))


def test_magmax_equal_magnitudes_keep_the_first_model_with_tie_break_earlier():
    assert torch.equal(merge(MagMax, torch.zeros(1), [t(2.0), t(-2.0)]), t(2.0))
    assert torch.equal(merge(MagMax, torch.zeros(1), [t(-2.0), t(2.0)]), t(-2.0))


# ----------------------------------------------------------------------------- all methods

KEEP_ALL = {
    TaskArithmetic: {},
    Ties: {"density": 1.0},
    Dare: {"density": 1.0},
    Breadcrumbs: {"density": 1.0},
    Della: {"density": 1.0, "epsilon": 0.0},
    MagnitudePrune: {"density": 1.0},
    Sce: {},
    MagMax: {},
}


@pytest.mark.parametrize("cls", ta.METHODS, ids=lambda c: c.name)
@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 4), (2, 3, 2), (0, 3)])
def test_one_model_keep_all_gives_base_plus_its_task_vector_on_any_shape(cls, shape):
    gen = torch.Generator().manual_seed(10)
    base = torch.randn(shape, generator=gen).to(torch.bfloat16)
    tuned = torch.randn(shape, generator=gen).to(torch.bfloat16)
    out = merge(cls, base, [tuned], **KEEP_ALL[cls])
    assert out.shape == torch.Size(shape) and out.dtype == torch.bfloat16
    assert torch.equal(out, base + (tuned - base))


@pytest.mark.parametrize("cls", [c for c in ta.METHODS if "density" in attrs.fields_dict(c.Config)], ids=lambda c: c.name)
@pytest.mark.parametrize("density", [-0.1, 1.5])
def test_density_outside_unit_interval_names_the_field(cls, density):
    extra = {"epsilon": 0.0} if cls is Della else {}
    with pytest.raises(ValueError, match=r"^density must be in \[0.0, 1.0\]"):
        cls.Config(density=density, **extra)


@pytest.mark.parametrize(
    "cls, field, value",
    [
        (Ties, "sign_election", "majority"),
        (Ties, "divisor", "mean"),
        (Dare, "variant", "magnitude"),
        (Dare, "rescale", "l2"),
        (Della, "rescale", "l2"),
        (Breadcrumbs, "gamma", 1.5),
        (Sce, "select_topk", 2.0),
    ],
)
def test_invalid_choices_name_the_field(cls, field, value):
    with pytest.raises(ValueError, match=field):
        cls.Config(**{field: value})


def test_methods_are_described():
    assert [c.name for c in ta.METHODS] == [
        "task_arithmetic", "ties", "dare", "breadcrumbs", "della", "magnitude_prune", "sce", "magmax",
    ]
    for cls in ta.METHODS:
        assert cls.summary and "\n" not in cls.summary
        assert cls.reference_url.startswith("https://")
        assert cls.capabilities.needs_base
        with pytest.raises(InputError, match="needs a base model"):
            cls().check_inputs(2, has_base=False)
        for field in attrs.fields(cls.Config):
            assert field.metadata["help"], (cls.name, field.name)
    assert TaskArithmetic.elementwise and MagMax.elementwise
    assert not (Ties.elementwise or Dare.elementwise or Della.elementwise or Sce.elementwise)
