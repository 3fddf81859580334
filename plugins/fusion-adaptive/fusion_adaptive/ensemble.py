"""Ensembles: the fine-tuned models run side by side and their predictions are combined.

The output (kind ``ensemble``) is an :class:`~fusion_adaptive.layers.EnsembleModel`; a task pool
scores it through :func:`fusion_core.adapters.logits`.

Where the combination happens (``combine``):

- ``outputs`` (default; FusionBench 0.2.33 ``EnsembleModule`` / ``WeightedEnsembleModule`` /
  ``MaxModelPredictor`` in ``fusion_bench/models/wrappers/ensemble.py``): the members' raw outputs
  (e.g. a CLIP vision tower's pooled features) are averaged, or their element-wise maximum taken,
  and the task's head (CLIP: projection, normalisation, text embeddings) is applied once.
- ``logits`` (fuse's earlier behaviour): the head is applied to each member and the logits are
  combined: the exact ensemble of the members' predictions, also for non-affine heads.

The two agree for members that output logits (no head).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs

from fusion_core import Capabilities, InputError, option

from .common import AdaptiveMethod, note, prepare

if TYPE_CHECKING:  # pragma: no cover
    from fusion_core import ModelPool, RunContext


COMBINE_HELP = ("'outputs' (FusionBench): combine the members' raw outputs and apply the task's head once; "
                "'logits' (fuse's earlier default): apply the head to each member and combine the logits")


class _Ensemble(AdaptiveMethod):
    capabilities: ClassVar[Capabilities] = Capabilities(output="ensemble")
    mode: ClassVar[str] = "mean"

    def ensemble_mode(self) -> tuple[str, str]:
        """(how outputs are combined: mean / max / max_probability, where: outputs / logits)."""
        return self.mode, self.config.combine

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
        mode, combine_at = self.ensemble_mode()
        note(ctx, self.name, members=names, weights=weights, mode=mode, combine=combine_at)
        return EnsembleModel(members, weights, mode, pool.forward, combine_at)


class SimpleEnsemble(_Ensemble):
    """The mean of the members' outputs (FusionBench), or of their logits."""

    name = "simple_ensemble"
    summary = "Runs every fine-tuned model and averages their outputs, the task's head applied once (N times the inference cost)."
    reference_url = "https://tanganke.github.io/fusion_bench/algorithms/simple_ensemble/"
    fusionbench_config = "ensemble/simple_ensemble.yaml"

    @attrs.frozen
    class Config:
        combine: Literal["outputs", "logits"] = option("outputs", help=COMBINE_HELP)


class WeightedEnsemble(_Ensemble):
    """A weighted sum (or mean) of the members' outputs (FusionBench), or of their logits."""

    name = "weighted_ensemble"
    summary = "Runs every fine-tuned model and sums their outputs with given weights (normalised to sum 1 by default)."
    reference_url = "https://tanganke.github.io/fusion_bench/algorithms/weighted_ensemble/"
    fusionbench_config = "ensemble/weighted_ensemble.yaml"

    @attrs.frozen
    class Config:
        weights: list[float] | None = option(None, help="one weight per model, in pool order; default equal weights")
        normalize: bool = option(True, help="divide the weights by their sum (which must not be 0)")
        combine: Literal["outputs", "logits"] = option("outputs", help=COMBINE_HELP)

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
    """The element-wise maximum of the members' outputs (FusionBench), or per sample the most confident member."""

    name = "max_model_predictor"
    summary = "Runs every fine-tuned model and takes the element-wise maximum of their outputs (or the most confident member)."
    reference_url = "https://tanganke.github.io/fusion_bench/algorithms/max-model_predictor/"
    fusionbench_config = "ensemble/max_model_predictor.yaml"

    @attrs.frozen
    class Config:
        rule: Literal["elementwise_max", "max_probability"] = option(
            "elementwise_max",
            help="'elementwise_max' (FusionBench MaxModelPredictor: max over members of each output element, head applied "
                 "once); 'max_probability' (fuse's earlier default: per sample, the logits of the member whose softmax peaks highest)",
        )

    def ensemble_mode(self) -> tuple[str, str]:
        if self.config.rule == "max_probability":
            return "max_probability", "logits"
        return "max", "outputs"


METHODS = [SimpleEnsemble, WeightedEnsemble, MaxModelPredictor]
