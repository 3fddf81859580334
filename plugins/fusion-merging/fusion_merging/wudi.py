"""WUDI-Merging: "Whoever Started the Interference Should End It" (Cheng et al., 2025, arXiv 2503.08099).

Data-free: the task vectors themselves stand in for the inputs each layer sees.  For a linear
layer (a 2-D tensor) with task vectors ``τ_i`` (``out × in``), the merged task vector ``τ`` is
the minimiser of the interference

    L(τ) = Σ_i ‖(τ − τ_i) τ_iᵀ‖²_F / ‖τ_i‖²_F

found by Adam from ``τ = Σ_i τ_i`` (FusionBench 0.2.33 ``wudi/wudi.py``: 400 steps, learning rate
1e-5, no weight decay).  The gradient has the closed form ``2 (τ A − B)`` with
``A = Σ_i τ_iᵀ τ_i / ‖τ_i‖²`` (``in × in``) and ``B = Σ_i τ_i τ_iᵀ τ_i / ‖τ_i‖²``, both computed
once, so a step costs one matrix product and no autograd.  Every other tensor (biases, norms,
tensors named in ``exclude_keys``) is the mean task vector ``Σ_i τ_i / N``.  The model is
``θ₀ + τ`` (no scaling factor, as FusionBench).

A task vector that is exactly zero on a tensor (a frozen layer) adds nothing to ``L``; it is
left out of ``A`` and ``B`` here, where FusionBench divides 0 by 0 and returns NaN weights for
that tensor (a peer defect recorded in PARITY.md).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs

from fusion_core import KernelContext, in_range, option

from .task_arithmetic import _TaskVectorMethod, task_vectors

if TYPE_CHECKING:  # pragma: no cover
    import torch


def wudi_loss(merged: "torch.Tensor", deltas: Sequence["torch.Tensor"]) -> "torch.Tensor":
    """``Σ_i ‖(τ − τ_i) τ_iᵀ‖² / ‖τ_i‖²`` over the non-zero task vectors (the objective, for tests and reports)."""
    import torch

    total = torch.zeros((), dtype=merged.dtype, device=merged.device)
    for d in deltas:
        energy = d.pow(2).sum()
        if energy > 0:
            total = total + ((merged - d) @ d.T).pow(2).sum() / energy
    return total


def wudi_solve(deltas: Sequence["torch.Tensor"], iterations: int, lr: float) -> "torch.Tensor":
    """The merged task vector of one 2-D tensor: Adam on :func:`wudi_loss` from ``Σ τ_i``, closed-form gradients."""
    import torch

    merged = torch.nn.Parameter(torch.stack(list(deltas)).sum(0))
    gram = torch.zeros(merged.shape[1], merged.shape[1], dtype=merged.dtype, device=merged.device)
    target = torch.zeros_like(merged.data)
    for d in deltas:
        energy = d.pow(2).sum()
        if energy > 0:
            g = d.T @ d / energy
            gram += g
            target += d @ g
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0.0)
    with torch.no_grad():
        for _ in range(iterations):
            merged.grad = 2.0 * (merged @ gram - target)
            optimizer.step()
    return merged.detach()


class WudiMerging(_TaskVectorMethod):
    """WUDI-Merging: per linear layer, the merged task vector that least disturbs every task's own inputs."""

    name = "wudi"
    summary = "WUDI-Merging: per 2-D tensor, Adam on Σ‖(τ − τᵢ)τᵢᵀ‖²/‖τᵢ‖² from Σ τᵢ (data-free); other tensors: mean τ."
    reference_url = "https://arxiv.org/abs/2503.08099"
    fusionbench_config = "wudi/wudi.yaml"

    @attrs.frozen
    class Config:
        iter_num: int = option(400, help="Adam steps per 2-D tensor (FusionBench wudi.yaml: 400)", validator=in_range(0))
        lr: float = option(1e-5, help="Adam learning rate (FusionBench's wudi_merging: 1e-5, fixed there)",
                           validator=in_range(0.0, lo_open=True))
        exclude_keys: list[str] | None = option(
            None, help="tensor names (shell patterns, e.g. '*embed*') kept as the mean task vector instead of optimised "
                       "(FusionBench: exact names; default none)")

    def _excluded(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.config.exclude_keys or ())

    def kernel(self, name: str, base: "torch.Tensor | None", tensors: Sequence["torch.Tensor"], ctx: KernelContext) -> "torch.Tensor":
        import torch

        deltas = task_vectors(base, tensors)
        if base.dim() == 2 and not self._excluded(name):
            return base + wudi_solve(deltas, self.config.iter_num, self.config.lr)
        return base + torch.stack(deltas).sum(0) / len(deltas)


METHODS = [WudiMerging]
