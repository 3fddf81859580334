"""OPCM: continual merging by orthogonal projection and adaptive scaling.

The models arrive one at a time (pool order, or a seeded shuffle).  The state is the merged
task vector ``M_t`` (the model is ``θ₀ + M_t``) and a scale ``λ_t``; ``M₁ = τ₁``, ``λ₁ = 1``.
At step ``t``:

1. For every linear layer's weight, with ``M_{t−1} = U S Vᵀ`` (thin SVD, nonzero singular
   values only) and ``P = Uᵀ τ_t V``, the components of ``τ_t`` that would interfere with the
   merged model are removed: the top-left ``r × r`` block of ``P`` (``r`` = the number of
   leading singular values whose cumulative share of ``ΣS`` stays ≤ ``alpha``) and the whole
   diagonal of ``P``: ``τ'_t = τ_t − U (P ⊙ mask) Vᵀ``.  Other tensors use ``τ'_t = τ_t``.
2. ``Σ_t = λ_{t−1} M_{t−1} + τ'_t`` (the unscaled running sum).
3. ``λ_t = ‖Σ_t‖ / mean_{j≤t} ‖τ_j‖`` (norms over the whole model), ``M_t = Σ_t / λ_t``: the
   merged task vector keeps the average norm of the task vectors seen.

Closed form: when each ``τ_t`` has row and column spaces orthogonal to those of the earlier
ones, nothing is removed, and ``M_T = (mean_j ‖τ_j‖ / ‖Σ_j τ_j‖) · Σ_j τ_j``.

(FusionBench projects in a full SVD basis, where the completion beyond the rank of ``M`` is
arbitrary; here components outside ``M``'s row and column spaces are always kept.  The two agree
whenever ``M``'s weights have full rank, as fine-tuned task vectors do.)

As FusionBench 0.2.33 (``OPCMForCLIP``, ``config/method/opcm/opcm.yaml``): the order is shuffled
by default (here seeded by ``order_seed``, default the run's seed, the order every continual method draws; FusionBench uses Python's ``random`` with
``seed: null``), and parameters held directly by a module that has children (CLIP's
``embeddings.class_embedding``) are not merged after the first model (``non_leaf: skip``):
``Σ_t = M_{t−1}`` there (no new task vector, no ``λ_{t−1}``), so they only follow the rescaling.  ``non_leaf: merge`` (fuse's earlier default) treats
them as any other tensor.

The loop (order, evaluation after each step on the tasks seen so far, ``extras.opcm.steps`` of
the report) is :class:`fusion_adaptive.continual.ContinualMethod`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs

from fusion_core import Capabilities, in_range, option

from .continual import ContinualMethod, evaluate_option, order_seed_option, shuffle_option
from .modules import key as pkey
from .modules import linear_layers, weight_out_in

if TYPE_CHECKING:  # pragma: no cover
    import torch


RANK_TOLERANCE = 1e-7
"""Singular values below this fraction of the largest count as zero (outside the merged subspace)."""


def project_out(task: "torch.Tensor", merged: "torch.Tensor", alpha: float) -> "torch.Tensor":
    """``τ'`` of step 1: ``task`` (``(out, in)``) minus its interfering components in ``merged``'s singular basis."""
    import torch

    u, s, vh = torch.linalg.svd(merged.double(), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return task
    keep = s > s[0] * RANK_TOLERANCE
    u, s, v = u[:, keep], s[keep], vh[keep].t()
    share = s.cumsum(0) / s.sum()
    split = int((share <= alpha).sum())
    p = u.t() @ task.double() @ v
    mask = torch.zeros_like(p, dtype=torch.bool)
    mask[:split, :split] = True
    mask.fill_diagonal_(True)
    removed = u @ (p * mask) @ v.t()
    return (task.double() - removed).to(task.dtype)


def non_leaf_parameters(model: Any) -> set[str]:
    """Names of the parameters held directly by modules that have child modules (FusionBench skips them)."""
    out = set()
    for name, module in model.named_modules():
        if any(True for _ in module.children()):
            out.update(pkey(name, p) for p, _ in module.named_parameters(recurse=False))
    return out


def global_norm(vector: Mapping[str, "torch.Tensor"]) -> float:
    """The L2 norm of a whole task vector (all tensors)."""
    return float(sum(float((v.double() ** 2).sum()) for v in vector.values())) ** 0.5


class OPCM(ContinualMethod):
    """Orthogonal projection-based continual merging (Tang et al., 2025)."""

    name = "opcm"
    summary = "Continual merging: each new task vector is projected off the merged model's main subspace and the sum rescaled."
    reference_url = "https://arxiv.org/abs/2501.09522"
    fusionbench_config = "opcm/opcm.yaml"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True)

    @attrs.frozen
    class Config:
        alpha: float = option(0.5, help="share of the merged vector's singular-value mass whose subspace block is protected", validator=in_range(0.0, 1.0))
        shuffle: bool = shuffle_option()
        order_seed: int | None = order_seed_option()
        non_leaf: Literal["skip", "merge"] = option(
            "skip", help="parameters held directly by modules with children (e.g. CLIP's class_embedding): 'skip' = not merged after "
                         "the first model (FusionBench); 'merge' = merged like the others (fuse's earlier default)"
        )
        evaluate_every_step: bool = evaluate_option()

    def begin(self, model: Any) -> None:
        self._layouts = {pkey(n, "weight"): m for n, m in linear_layers(model).items()}
        self._skipped = non_leaf_parameters(model) if self.config.non_leaf == "skip" else set()
        self._vector: dict[str, torch.Tensor] | None = None  # M_t, the merged task vector
        self._scale, self._norms = 1.0, []

    def step(self, t, merged, params, base):
        tv = {k: params[k] - base[k] for k in params}
        self._norms.append(global_norm(tv))
        if self._vector is None:
            total = tv
        else:
            total = {}
            for key, value in tv.items():
                if key in self._skipped:  # FusionBench leaves the tensor as it is (not even times λ_{t−1}) before rescaling
                    total[key] = self._vector[key]
                    continue
                if key in self._layouts and value.dim() == 2:
                    module = self._layouts[key]
                    cleaned = weight_out_in(module, project_out(weight_out_in(module, value), weight_out_in(module, self._vector[key]),
                                                                self.config.alpha))
                else:
                    cleaned = value
                total[key] = self._scale * self._vector[key] + cleaned
        average = sum(self._norms) / len(self._norms)
        size = global_norm(total)
        self._scale = size / average if average > 0 else 1.0
        self._vector = {k: v / self._scale for k, v in total.items()} if self._scale > 0 else total
        return {k: base[k] + v for k, v in self._vector.items()}

    def facts(self) -> dict[str, Any]:
        return {"lambda": self._scale}


METHODS = [OPCM]
