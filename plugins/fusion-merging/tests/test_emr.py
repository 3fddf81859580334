"""EMR-Merging: elect / mask / rescale on hand-worked toys, and the report's modulators."""

from __future__ import annotations

import math

import torch
from fusion_merging.emr import EmrMerging, emr_elect

from fusion_core.engine.kernel import KernelContext

T = torch.tensor
# τ1 = [3, −1, 0, 2], τ2 = [−1, −2, 0, 1], τ3 = [2, 4, 0, −5]
TAUS = [T([3.0, -1.0, 0.0, 2.0]), T([-1.0, -2.0, 0.0, 1.0]), T([2.0, 4.0, 0.0, -5.0])]


def test_elect_mask_hand_worked():
    # Σ τ = [4, 1, 0, −2] → γ = [+, +, − (zero sum counts as −1), −]
    unified, masks = emr_elect(TAUS)
    assert [m.tolist() for m in masks] == [
        [True, False, False, False],   # τ1·γ = [3, −1, 0, −2]
        [False, False, False, False],  # τ2·γ = [−1, −2, 0, −1]
        [True, True, False, True],     # τ3·γ = [2, 4, 0, 5]
    ]
    # largest agreeing |τ|: [max(3, 2), 4, none → 0, 5] with γ → [3, 4, −0, −5]
    assert unified.tolist() == [3.0, 4.0, 0.0, -5.0]


def test_kernel_gives_the_unified_model_and_run_reports_rescalers():
    base = T([1.0, 1.0, 1.0, 1.0])
    method = EmrMerging(EmrMerging.Config())
    out = method.kernel("w", base, [base + t for t in TAUS], KernelContext(name="w"))
    assert out.tolist() == [4.0, 5.0, 1.0, -4.0]

    from fusion_core.run_context import RunContext

    class Pool:
        model_names = ["a", "b", "c"]
        has_base = True

        def reader(self, name):
            from fusion_core.engine.readers import StateDictReader

            tensors = {"w": base, "v": T([0.0, 0.0])} if name is None else {
                "w": base + TAUS["abc".index(name)], "v": T([1.0, -2.0]) * ("abc".index(name) + 1)}
            return StateDictReader(tensors)

    ctx = RunContext(show_progress=False)
    output = method.run(Pool(), ctx)
    merged = output.shared
    assert merged["w"].tolist() == [4.0, 5.0, 1.0, -4.0]
    # v: τ_t = t·[1, −2] (t = 1, 2, 3) → Σ = [6, −12], γ = [+, −], every task agrees, τ_uni = [3, −6]
    assert merged["v"].tolist() == [3.0, -6.0]
    # rescalers: Σ over tensors of mean|τ_t| / mean|M_t ⊙ τ_uni|
    #   a: w: mean|τ1| = 6/4, mean|M1 τ_uni| = 3/4;  v: mean|τ| = 3/2, mean|τ_uni| = 9/2 → (1.5 + 1.5) / (0.75 + 4.5)
    #   b: w: 4/4, 0;                                v: 3,   9/2                      → (1 + 3) / 4.5
    #   c: w: 11/4, (3 + 4 + 5)/4 = 3;               v: 9/2, 9/2                      → (2.75 + 4.5) / 7.5
    extras = ctx.extras["emr_merging"]
    for name, expected in {"a": 3.0 / 5.25, "b": 4.0 / 4.5, "c": 7.25 / 7.5}.items():
        assert math.isclose(extras["rescalers"][name], expected, rel_tol=1e-6), name
    # mask densities over the 6 entries: a keeps 1 (w) + 2 (v), b 0 + 2, c 3 + 2
    assert extras["mask_density"] == {"a": 3 / 6, "b": 2 / 6, "c": 5 / 6}


def test_each_task_gets_its_masked_rescaled_model():
    base = T([1.0, 1.0, 1.0, 1.0])
    from fusion_core.engine.readers import StateDictReader
    from fusion_core.run_context import RunContext

    class Pool:
        model_names = ["a", "b", "c"]
        has_base = True

        def reader(self, name):
            return StateDictReader({"w": base if name is None else base + TAUS["abc".index(name)], "n": torch.tensor([7])})

    ctx = RunContext(show_progress=False)
    output = EmrMerging(EmrMerging.Config()).run(Pool(), ctx)
    unified = T([3.0, 4.0, 0.0, -5.0])
    masks = {"a": T([1.0, 0, 0, 0]), "b": T([0.0, 0, 0, 0]), "c": T([1.0, 1, 0, 1])}
    # λ_t = mean|τ_t| / mean|M_t ⊙ τ_uni| (one tensor): a 6/3, c 11/12; b keeps nothing (λ 0/0): its model is θ₀
    scales = {"a": 6 / 3, "b": 0.0, "c": 11 / 12}
    for task in "abc":
        state = output.model_for(task)
        assert torch.allclose(state["w"], base + scales[task] * masks[task] * unified, atol=1e-6), task
        assert torch.equal(state["n"], torch.tensor([7]))
    assert output.model_for("unknown") is output.shared  # a task without a modulator: the unified model
    assert torch.equal(output.shared["w"], base + unified)
