"""TALL masks and consensus task arithmetic on hand-worked toys."""

from __future__ import annotations

import torch
from fusion_merging.consensus import ConsensusTaskArithmetic, consensus_mask, tall_masks

from fusion_core.engine.kernel import KernelContext

NAME = "encoder.layer.0.weight"
T = torch.tensor
# τ1 = [3, 1, 0, 2], τ2 = [1, −1, 0, −2], τ3 = [0, 0.5, 4, 2]; τ_MTL = [4, 0.5, 4, 2]
TAUS = [T([3.0, 1.0, 0.0, 2.0]), T([1.0, -1.0, 0.0, -2.0]), T([0.0, 0.5, 4.0, 2.0])]


def merge(base, taus, **config):
    method = ConsensusTaskArithmetic(ConsensusTaskArithmetic.Config(**config))
    return method.kernel(NAME, base, [base + t for t in taus], KernelContext(name=NAME))


def test_tall_masks_hand_worked():
    # λ = 0.5:  m1: |τ1| = [3, 1, 0, 2] > 0.5·|τ_MTL − τ1| = [0.5, 0.25, 2, 0]   → [T, T, F, T]
    #           m2: |τ2| = [1, 1, 0, 2] > 0.5·|[3, 1.5, 4, 4]| = [1.5, .75, 2, 2] → [F, T, F, F]
    #           m3: |τ3| = [0, .5, 4, 2] > 0.5·|[4, 0, 0, 0]| = [2, 0, 0, 0]      → [F, T, T, T]
    masks = tall_masks(TAUS, 0.5)
    assert [m.tolist() for m in masks] == [[True, True, False, True], [False, True, False, False], [False, True, True, True]]
    # agreement counts [1, 3, 1, 2]
    assert consensus_mask(masks, 2).tolist() == [False, True, False, True]
    assert consensus_mask(masks, 3).tolist() == [False, True, False, False]


def test_consensus_ta_keeps_the_agreed_entries_of_the_scaled_sum():
    base = T([1.0, 1.0, 1.0, 1.0])
    # k = 2 keeps entries 1 and 3 of Σ τ = [4, 0.5, 4, 2]; α = 0.5 → base + [0, 0.25, 0, 1]
    assert merge(base, TAUS, tall_mask_lambda=0.5, min_agreement=2, scaling_factor=0.5).tolist() == [1.0, 1.25, 1.0, 2.0]
    # k = 1: every entry is relevant to some task here → plain task arithmetic
    assert merge(base, TAUS, tall_mask_lambda=0.5, min_agreement=1, scaling_factor=1.0).tolist() == [5.0, 1.5, 5.0, 3.0]
    # weights change the merged sum, not the masks: Σ wτ with w = [1, 0, 2] = [3, 2, 8, 6], kept [_, 2, _, 6]
    assert merge(base, TAUS, tall_mask_lambda=0.5, scaling_factor=1.0, weights=[1.0, 0.0, 2.0]).tolist() == [1.0, 3.0, 1.0, 7.0]


def test_mask_comparison_is_strict_as_the_official_code():
    # τ1 = τ2 = [1]: |τ1| = 1 and λ·|τ_MTL − τ1| = 1 → not kept by either task
    masks = tall_masks([T([1.0]), T([1.0])], 1.0)
    assert [m.tolist() for m in masks] == [[False], [False]]


def test_defaults_and_that_k_zero_is_task_arithmetic():
    cfg = ConsensusTaskArithmetic.Config()
    assert (cfg.tall_mask_lambda, cfg.min_agreement, cfg.scaling_factor) == (0.6, 2, 0.3)
    g = torch.Generator().manual_seed(0)
    base, taus = torch.randn(6, 5, generator=g), [torch.randn(6, 5, generator=g) for _ in range(4)]
    out = merge(base, taus, min_agreement=0)
    torch.testing.assert_close(out, base + 0.3 * sum(taus))


def test_tall_masks_gives_one_model_per_task_and_the_program_scores_each():
    from fusion_merging.consensus import TallMasks

    from fusion_core.engine.readers import StateDictReader
    from fusion_core.run_context import RunContext

    base = T([1.0, 1.0, 1.0, 1.0])

    class Pool:
        model_names = ["a", "b", "c"]

        def reader(self, name):
            tensors = {"w": base, "step": T([7])} if name is None else {"w": base + TAUS["abc".index(name)], "step": T([7])}
            return StateDictReader(tensors)

    ctx = RunContext(show_progress=False)
    out = TallMasks(TallMasks.Config(tall_mask_lambda=0.5)).run(Pool(), ctx)
    # θ₀ + m_t ⊙ τ_MTL with τ_MTL = [4, 0.5, 4, 2] and the masks of test_tall_masks_hand_worked
    assert out["a"]["w"].tolist() == [5.0, 1.5, 1.0, 3.0]
    assert out["b"]["w"].tolist() == [1.0, 1.5, 1.0, 1.0]
    assert out["c"]["w"].tolist() == [1.0, 1.5, 5.0, 3.0]
    assert out["a"]["step"].tolist() == [7]  # integer tensors are the base's
    assert ctx.extras["tall_masks"]["mask_density"] == {"a": 3 / 4, "b": 1 / 4, "c": 3 / 4}
    assert TallMasks.capabilities.output == "models"


def test_tall_masks_score_own_scores_each_task_with_its_own_reconstruction():
    from fusion_merging.consensus import TallMasks

    from fusion_core.adapters import PerTaskModels
    from fusion_core.engine.readers import StateDictReader
    from fusion_core.run_context import RunContext

    base = T([1.0, 1.0, 1.0, 1.0])

    class Pool:
        model_names = ["a", "b", "c"]

        def reader(self, name):
            return StateDictReader({"w": base if name is None else base + TAUS["abc".index(name)]})

    method = TallMasks(TallMasks.Config(tall_mask_lambda=0.5, score="own"))
    assert method.capabilities.output == "per_task" and TallMasks.capabilities.output == "models"
    out = method.run(Pool(), RunContext(show_progress=False))
    assert isinstance(out, PerTaskModels) and out.tasks == ["a", "b", "c"]
    assert out.model_for("b")["w"].tolist() == [1.0, 1.5, 1.0, 1.0]
    assert out.model_for("c")["w"].tolist() == [1.0, 1.5, 5.0, 3.0]
    assert out.shared["w"].tolist() == [5.0, 1.5, 1.0, 3.0]  # the first task's, kept by the run
