"""Ensembles: the fine-tuned models run side by side and their predictions are combined.

The output (kind ``ensemble``) is an :class:`~fusion_adaptive.layers.EnsembleModel`.  A task
pool scores it like a model; to apply each task's head to every member before combining (the
exact ensemble of logits, needed by ``max_model_predictor`` and by non-affine heads), it
computes logits with :func:`fusion_core.adapters.logits`.  Called as a plain module
(``model(x)``) it combines the members' raw outputs, which is the same thing for members that
output logits and, for the mean, for affine heads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from fusion_core.components import Capabilities
from fusion_core.config import option
from fusion_core.errors import InputError

from .common import AdaptiveMethod, note, prepare

if TYPE_CHECKING:  # pragma: no cover
    from fusion_core.components import ModelPool
    from fusion_core.run_context import RunContext


class _Ensemble(AdaptiveMethod):
    capabilities: ClassVar[Capabilities] = Capabilities(output="ensemble")
    mode: ClassVar[str] = "mean"

    def weights(self, n: int) -> list[float]:
        return [1.0 / n] * n

    def run(self, pool: "ModelPool", ctx: "RunContext") -> Any:
        from collections.abc import Mapping

        from .layers import EnsembleModel

        names = list(pool.model_names)
        weights = self.weights(len(names))
        members = []
        for name in names:
            model = pool.load_model(name)
            if isinstance(model, Mapping):
                raise InputError(f"method {self.name!r} runs the models, but model pool {pool.name!r} gives state dicts without an architecture")
            members.append(prepare(model, ctx.device))
        note(ctx, self.name, members=names, weights=weights, mode=self.mode)
        return EnsembleModel(members, weights, self.mode, pool.forward)


class SimpleEnsemble(_Ensemble):
    """The mean of the members' logits."""

    name = "simple_ensemble"
    summary = "Runs every fine-tuned model and averages their logits (N times the inference cost)."
    reference_url = "https://tanganke.github.io/fusion_bench/algorithms/simple_ensemble/"

    @attrs.frozen
    class Config:
        """simple_ensemble has no options."""


class WeightedEnsemble(_Ensemble):
    """A weighted sum (or mean) of the members' logits."""

    name = "weighted_ensemble"
    summary = "Runs every fine-tuned model and sums their logits with given weights (normalised to sum 1 by default)."
    reference_url = "https://tanganke.github.io/fusion_bench/algorithms/weighted_ensemble/"

    @attrs.frozen
    class Config:
        weights: list[float] | None = option(None, help="one weight per model, in pool order; default equal weights")
        normalize: bool = option(True, help="divide the weights by their sum (which must not be 0)")

        def __attrs_post_init__(self) -> None:
            if self.normalize and self.weights is not None and abs(sum(self.weights)) < 1e-12:
                raise ValueError(f"weights {list(self.weights)} sum to 0, so normalize=true cannot divide by the sum")

    def weights(self, n: int) -> list[float]:
        given = self.config.weights
        if given is None:
            return [1.0 / n] * n
        if len(given) != n:
            raise InputError(f"method {self.name!r}: weights has {len(given)} value(s) for {n} model(s)")
        total = sum(given) if self.config.normalize else 1.0
        return [float(w) / total for w in given]

    def check_inputs(self, n_models: int, has_base: bool) -> None:
        super().check_inputs(n_models, has_base)
        if self.config.weights is not None and len(self.config.weights) != n_models:
            raise InputError(f"method {self.name!r}: weights has {len(self.config.weights)} value(s) for {n_models} model(s)")


class MaxModelPredictor(_Ensemble):
    """Per sample, the prediction of the most confident member."""

    name = "max_model_predictor"
    summary = "Runs every fine-tuned model and, per sample, keeps the logits of the one with the highest max probability."
    reference_url = "https://tanganke.github.io/fusion_bench/algorithms/max-model_predictor/"
    mode = "max_probability"

    @attrs.frozen
    class Config:
        """max_model_predictor has no options."""


METHODS = [SimpleEnsemble, WeightedEnsemble, MaxModelPredictor]
