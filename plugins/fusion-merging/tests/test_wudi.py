"""WUDI-Merging: the closed-form gradient, its fixed points, and the kernel's per-tensor rules."""

from __future__ import annotations

import torch
from fusion_merging.wudi import WudiMerging, wudi_loss, wudi_solve

from fusion_core.engine.kernel import KernelContext

torch.set_num_threads(1)


def _deltas(n: int = 3, shape=(6, 5), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) * (1 + i) for i in range(n)]


def test_closed_form_gradient_is_the_gradient_of_the_loss():
    deltas = _deltas()
    merged = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    wudi_loss(merged, deltas).backward()
    gram = sum(d.T @ d / d.pow(2).sum() for d in deltas)
    target = sum(d @ d.T @ d / d.pow(2).sum() for d in deltas)
    assert torch.allclose(merged.grad, 2 * (merged.detach() @ gram - target), atol=1e-10)


def test_adam_lowers_the_interference_from_the_sum():
    deltas = [d.float() for d in _deltas()]
    start = torch.stack(deltas).sum(0)
    solved = wudi_solve(deltas, iterations=200, lr=1e-2)
    assert wudi_loss(solved, deltas) < 0.5 * wudi_loss(start, deltas)
    assert torch.equal(wudi_solve(deltas, iterations=0, lr=1e-2), start)  # no step: task arithmetic with λ = 1


def test_orthogonal_inputs_keep_the_sum():
    # task vectors reading disjoint input columns: (Σ τ_j − τ_i) τ_iᵀ = 0, so Σ τ is the minimum (loss 0, gradient 0)
    a, b = torch.zeros(4, 6), torch.zeros(4, 6)
    a[:, :3] = torch.randn(4, 3)
    b[:, 3:] = torch.randn(4, 3)
    solved = wudi_solve([a, b], iterations=50, lr=1e-2)
    assert torch.equal(solved, a + b)
    assert float(wudi_loss(solved, [a, b])) == 0.0


def test_one_model_is_returned_unchanged():
    base, model = torch.randn(5, 4), torch.randn(5, 4)
    method = WudiMerging(WudiMerging.Config(iter_num=30, lr=1e-2))
    out = method.kernel("w", base, [model], KernelContext(name="w"))
    assert torch.allclose(out, model, atol=1e-6)


def test_other_tensors_and_excluded_keys_are_the_mean_task_vector():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 3, generator=g)
    models = [base + torch.randn(4, 3, generator=g) for _ in range(3)]
    mean = base + sum(m - base for m in models) / 3
    method = WudiMerging(WudiMerging.Config(iter_num=20, lr=1e-2, exclude_keys=["*.embed*"]))
    assert torch.allclose(method.kernel("x.embed.weight", base, models, KernelContext(name="x.embed.weight")), mean, atol=1e-6)
    bias = method.kernel("b", base[0], [m[0] for m in models], KernelContext(name="b"))
    assert torch.allclose(bias, mean[0], atol=1e-6)
    optimised = method.kernel("fc.weight", base, models, KernelContext(name="fc.weight"))
    assert not torch.allclose(optimised, mean, atol=1e-3)


def test_a_zero_task_vector_adds_nothing_and_no_nan():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(4, 3, generator=g)
    other = base + torch.randn(4, 3, generator=g)
    method = WudiMerging(WudiMerging.Config(iter_num=30, lr=1e-2))
    out = method.kernel("w", base, [base.clone(), other], KernelContext(name="w"))
    assert torch.isfinite(out).all()
    # the frozen model contributes no term: the other alone is the minimum, its τ is the start → unchanged
    assert torch.allclose(out, other, atol=1e-6)
