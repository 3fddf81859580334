"""Plain weight averaging: simple average, weighted average and two-model interpolation.

None of these needs a base model (a base given to them is ignored).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import attrs

from fusion_core import Capabilities, InputError, KernelContext, KernelMethod, in_range, option

from .mergekit.mapping import MergekitMapping, Param

if TYPE_CHECKING:  # pragma: no cover
    import torch

WEIGHT_SUM_FLOOR = 1e-12
"""``|Σw|`` below this cannot be divided by (``normalize``)."""


def check_weight_sum(method: str, weights: Sequence[float] | None, normalize: bool) -> None:
    if normalize and weights is not None and abs(sum(weights)) < WEIGHT_SUM_FLOOR:
        raise ValueError(
            f"{method}: weights {list(weights)} sum to 0, so normalize=true cannot divide by the sum; "
            "change the weights or set normalize=false"
        )


def resolve_weights(method: str, weights: Sequence[float] | None, n: int) -> list[float]:
    """The per-model weights: ``weights`` as given, or 1 for each of the ``n`` models."""
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise InputError(f"method {method!r}: weights has {len(weights)} value(s) for {n} model(s)")
    return [float(w) for w in weights]


class SimpleAverage(KernelMethod):
    """θ = (1/N) Σ θᵢ (a uniform model soup)."""

    name = "simple_average"
    summary = "Element-wise mean of the fine-tuned models (uniform model soup); no base needed."
    reference_url = "https://arxiv.org/abs/2203.05482"
    fusionbench_config = "simple_average.yaml"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=False)
    elementwise = True

    @attrs.frozen
    class Config:
        """simple_average has no options."""

    def kernel(self, name: str, base: "torch.Tensor | None", tensors: Sequence["torch.Tensor"], ctx: KernelContext) -> "torch.Tensor":
        total = tensors[0].clone()
        for t in tensors[1:]:
            total += t
        return total / len(tensors)


class WeightedAverage(KernelMethod):
    """θ = Σ wᵢθᵢ / Σ wᵢ (or Σ wᵢθᵢ with normalize=false)."""

    name = "weighted_average"
    summary = "Weighted sum of the fine-tuned models, divided by the weight sum unless normalize=false."
    reference_url = "https://arxiv.org/abs/2203.05482"
    fusionbench_config = "linear/weighted_average.yaml"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=False)
    elementwise = True

    @attrs.frozen
    class Config:
        weights: list[float] | None = option(
            None, help="one weight per model, in pool order (may be negative); default 1 each"
        )
        normalize: bool = option(
            True, help="divide by the sum of the weights (an error if they sum to 0); false gives Σ wᵢθᵢ"
        )

        def __attrs_post_init__(self) -> None:
            check_weight_sum("weighted_average", self.weights, self.normalize)

    def kernel(self, name: str, base: "torch.Tensor | None", tensors: Sequence["torch.Tensor"], ctx: KernelContext) -> "torch.Tensor":
        weights = resolve_weights(self.name, self.config.weights, len(tensors))
        total = tensors[0] * weights[0]
        for w, t in zip(weights[1:], tensors[1:], strict=True):
            total += w * t
        if self.config.normalize:
            return total / sum(weights)
        return total


class LinearInterpolation(KernelMethod):
    """θ = (1 − t)·θ_a + t·θ_b for exactly two models (a base, if any, is not used)."""

    name = "linear_interpolation"
    summary = "Interpolates two fine-tuned models: (1 - t)·first + t·second; t=0 gives the first exactly."
    reference_url = "https://arxiv.org/abs/2109.01903"
    fusionbench_config = "linear/linear_interpolation.yaml"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=False)
    min_models = 2
    max_models = 2
    elementwise = True

    @attrs.frozen
    class Config:
        t: float = option(
            0.5, help="position between the two models in [0, 1]: 0 = the first, 1 = the second", validator=in_range(0.0, 1.0)
        )

    def kernel(self, name: str, base: "torch.Tensor | None", tensors: Sequence["torch.Tensor"], ctx: KernelContext) -> "torch.Tensor":
        if len(tensors) != 2:
            raise InputError(f"method {self.name!r} takes exactly 2 fine-tuned models, got {len(tensors)}")
        t = float(self.config.t)
        first, second = tensors
        return (1.0 - t) * first + t * second


#: how mergekit's methods map onto these (read by :mod:`fusion_merging.mergekit`)
MERGEKIT = [
    MergekitMapping(
        "linear",
        "weighted_average",
        base="ignored",
        shared={"normalize": Param(bool, True, "normalize")},
        per_model={"weight": Param(float, to="weights")},
        per_model_scope="input",
    )
]

METHODS = [SimpleAverage, WeightedAverage, LinearInterpolation]

