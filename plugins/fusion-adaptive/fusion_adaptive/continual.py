"""Continual merging: the models arrive one at a time, the merged model is updated after each.

The protocol is FusionBench 0.2.33's (``method/opcm/*``, ``method/dop/dop.py``): the merge order
is the pool's or a seeded shuffle of it (``shuffle: true``, FusionBench's default; here seeded by
``order_seed``, by default the run's seed, through :func:`fusion_core.tensor_seed`, the same order
for every continual method, where FusionBench calls Python's ``random.shuffle`` after
``seed_everything``), and after step ``t`` the merged model is scored on
the tasks of the first ``t`` models only (``evaluate_every_step``).  Each step's record goes to
``extras.<method>.steps`` of the report: ``step``, ``model``, the method's own facts (OPCM's
``lambda``), ``results`` (per task) and ``average`` (mean of the task pool's primary metric over
the tasks seen).  ``fuse continual REPORT.json ...`` prints those tables and plots the average
against the number of merged models (:mod:`fusion_adaptive.continual_report`).

The methods here (OPCM and DOP live in their own modules on the same loop):

- ``continual_task_arithmetic``: ``θ_t = θ_{t−1} + λ τ_t`` from ``θ_0`` = the base, so
  ``θ_T = θ₀ + λ Σ τ_j`` (FusionBench ``opcm/task_arithmetic.yaml``, λ = 0.3).
- ``continual_ties``: ``M_1 = λ τ_1``; ``M_t = M_{t−1} + λ · TIES(M_{t−1}, τ_t)`` where TIES keeps
  the top ``density`` of the two stacked whole-model vectors by magnitude (one threshold per
  vector: ``|v| ≥`` its ``(d − ⌊d·density⌋)``-th smallest ``|v|``), elects the sign of their sum
  (a zero sum takes the model-wide majority sign) and merges the agreeing entries
  (``merge_func``: sum / mean / max), as FusionBench ``opcm/ties_merging.yaml`` (λ = 0.5,
  threshold 20 = density 0.2, sum).
- ``continual_weight_average``: the running mean ``θ_t = ((t−1) θ_{t−1} + θ_t') / t`` of the
  fine-tuned models, no base needed (FusionBench ``opcm/weight_average.yaml``).

Every floating-point parameter is merged (FusionBench: those with ``requires_grad``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs

from fusion_core import Capabilities, InputError, in_range, option, tensor_seed

from .common import AdaptiveMethod, float_params, load_params, note, prepare, progress, state_with

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fusion_core import ModelPool, RunContext


def shuffle_option():
    return option(True, help="merge the models in a seeded random order (FusionBench shuffle_order: true); false = pool order")


def order_seed_option():
    return option(None, help="seed of the merge order (shuffle: true); null = the run's seed.  Every continual method draws the same "
                             "order from the same seed, so runs of different methods compare on one order")


def evaluate_option():
    return option(True, help="score the merged model on the tasks seen so far after each step (needs a task pool; "
                             "FusionBench evaluate_on_every_step: true)")


def seeded_order(names: list[str], seed: int) -> list[str]:
    """``names`` shuffled by a generator seeded from ``seed`` (the same for every continual method)."""
    import torch

    generator = torch.Generator(device="cpu")
    generator.manual_seed(tensor_seed(seed, "continual", "order"))
    return [names[i] for i in torch.randperm(len(names), generator=generator).tolist()]


class ContinualMethod(AdaptiveMethod):
    """The continual-merging loop: order, one :meth:`step` per arriving model, evaluation on the tasks seen.

    A subclass implements :meth:`step` (the merged parameters after one more model) and may
    override :meth:`begin` (state from the base model) and :meth:`facts` (per-step report facts).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True)

    def order(self, names: list[str], seed: int) -> list[str]:
        """The merge order: the pool's, or (``shuffle``) a permutation seeded by ``order_seed`` (default: the run's ``seed``)."""
        if not self.config.shuffle:
            return list(names)
        return seeded_order(names, seed if self.config.order_seed is None else self.config.order_seed)

    def begin(self, model: Any) -> None:
        """Called once with the base model (or the first model without a base) before the first step."""

    def step(self, t: int, merged: "dict[str, torch.Tensor] | None", params: "dict[str, torch.Tensor]",
             base: "Mapping[str, torch.Tensor] | None") -> "dict[str, torch.Tensor]":
        """The merged parameters after model ``t`` (0-based) with parameters ``params`` arrives."""
        raise NotImplementedError

    def facts(self) -> dict[str, Any]:
        """Facts of the step just taken, for its record in the report."""
        return {}

    def run(self, pool: "ModelPool", ctx: "RunContext") -> dict[str, "torch.Tensor"]:
        import torch

        order = self.order(list(pool.model_names), ctx.seed)
        if not order:
            raise InputError(f"method {self.name!r} merges the pool's models one by one; the pool has none")
        model = prepare(pool.load_model(None if pool.has_base else order[0]), ctx.device)
        reference = float_params(model)
        base = reference if pool.has_base else None
        self.begin(model)
        taskpool = ctx.taskpool if self.config.evaluate_every_step else None
        merged: dict[str, torch.Tensor] | None = None
        steps = []
        for t, name in enumerate(progress(ctx, order, f"continual merging ({self.name})", total=len(order), unit="model")):
            params = load_params(pool, name, reference, method=self.name, device=ctx.device)
            with torch.no_grad():
                merged = self.step(t, merged, params, base)
            del params
            record: dict[str, Any] = {"step": t + 1, "model": name, **self.facts()}
            seen = [n for n in order[: t + 1] if taskpool is not None and n in taskpool.task_names]
            if seen:
                results = taskpool.evaluate(pool.model_from_state_dict(state_with(model, merged)), tasks=seen, ctx=ctx)
                record["results"] = results
                metric = taskpool.primary_metric()
                values = [r[metric] for r in results.values() if metric in r]
                if values:
                    record["average"] = sum(values) / len(values)
            steps.append(record)
        assert merged is not None
        note(ctx, self.name, order=order, steps=steps)
        return state_with(model, merged)


class ContinualTaskArithmetic(ContinualMethod):
    """θ_t = θ_{t−1} + λ·τ_t, one model at a time."""

    name = "continual_task_arithmetic"
    summary = "Continual task arithmetic: each arriving model adds λ times its task vector; scored on the tasks seen after each step."
    reference_url = "https://arxiv.org/abs/2212.04089"
    fusionbench_config = "opcm/task_arithmetic.yaml"

    @attrs.frozen
    class Config:
        scaling_factor: float = option(0.3, help="λ: each arriving task vector is added times λ (FusionBench opcm/task_arithmetic.yaml: 0.3)")
        shuffle: bool = shuffle_option()
        order_seed: int | None = order_seed_option()
        evaluate_every_step: bool = evaluate_option()

    def step(self, t, merged, params, base):
        start = base if merged is None else merged
        lam = self.config.scaling_factor
        return {k: start[k] + lam * (params[k] - base[k]) for k in params}


class ContinualWeightAverage(ContinualMethod):
    """The running mean of the models seen."""

    name = "continual_weight_average"
    summary = "Continual weight averaging: the running mean of the models seen; scored on the tasks seen after each step."
    reference_url = "https://arxiv.org/abs/2203.05482"
    fusionbench_config = "opcm/weight_average.yaml"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=False)

    @attrs.frozen
    class Config:
        shuffle: bool = shuffle_option()
        order_seed: int | None = order_seed_option()
        evaluate_every_step: bool = evaluate_option()

    def step(self, t, merged, params, base):
        if merged is None:
            return {k: v.clone() for k, v in params.items()}
        return {k: (merged[k] * t + params[k]) / (t + 1) for k in params}


MERGE_FUNCS = {"sum": "none", "mean": "count", "max": "max"}
"""FusionBench ``merge_func`` → the divisor of :func:`fusion_merging.task_arithmetic.ties_merge`."""


def trim_whole(vector: "torch.Tensor", density: float) -> "torch.Tensor":
    """``vector`` with entries below its whole-vector magnitude threshold zeroed (ties at the threshold kept)."""
    import torch

    d = vector.numel()
    k = d - int(d * density)
    if k <= 0:
        return vector.clone()
    threshold = vector.abs().kthvalue(k).values
    return torch.where(vector.abs() >= threshold, vector, torch.zeros_like(vector))


def ties_whole(vectors: "list[torch.Tensor]", density: float, merge_func: str) -> "torch.Tensor":
    """FusionBench's TIES of flat whole-model vectors: trim each, elect signs (zero → model-wide majority), disjoint merge."""
    import torch
    from fusion_merging.task_arithmetic import ties_merge

    trimmed = [trim_whole(v, density) for v in vectors]
    signs = torch.sign(sum(trimmed[1:], trimmed[0]))
    zero = 1.0 if float(signs.sum()) > 0 else -1.0
    return ties_merge(trimmed, [1.0] * len(trimmed), "sum", MERGE_FUNCS[merge_func], zero=zero)


def add_flat(theta: "dict[str, torch.Tensor]", flat: "torch.Tensor", scale: float, keys: "list[str]") -> "dict[str, torch.Tensor]":
    """``θ + scale·flat``, ``flat`` laid out as the tensors of ``keys`` one after another (in ``θ``'s dtypes)."""
    out, at = dict(theta), 0
    for k in keys:
        n = theta[k].numel()
        out[k] = theta[k] + scale * flat[at : at + n].reshape(theta[k].shape).to(theta[k].dtype)
        at += n
    return out


def ties_pair(merged: "torch.Tensor", task: "torch.Tensor", density: float, merge_func: str) -> "torch.Tensor":
    """:func:`ties_whole` of the merged task vector and the arriving one."""
    return ties_whole([merged, task], density, merge_func)


class ContinualTies(ContinualMethod):
    """M_t = M_{t−1} + λ·TIES(M_{t−1}, τ_t) over the whole model."""

    name = "continual_ties"
    summary = "Continual TIES: each arriving task vector is TIES-merged with the merged task vector (whole-model trim) and added times λ."
    reference_url = "https://arxiv.org/abs/2306.01708"
    fusionbench_config = "opcm/ties_merging.yaml"

    @attrs.frozen
    class Config:
        scaling_factor: float = option(0.5, help="λ: the TIES merge of each step is added times λ (FusionBench opcm/ties_merging.yaml: 0.5)")
        density: float = option(0.2, help="fraction of each whole-model vector kept by magnitude (FusionBench threshold: 20 = 0.2)",
                                validator=in_range(0.0, 1.0))
        merge_func: Literal["sum", "mean", "max"] = option("sum", help="disjoint merge of the agreeing entries: sum, mean, or "
                                                                         "the largest magnitude (FusionBench merge_func)")
        shuffle: bool = shuffle_option()
        order_seed: int | None = order_seed_option()
        evaluate_every_step: bool = evaluate_option()

    def step(self, t, merged, params, base):
        import torch

        lam = self.config.scaling_factor
        tv = {k: params[k] - base[k] for k in params}
        if merged is None:
            return {k: base[k] + lam * tv[k] for k in tv}
        keys = sorted(tv)  # FusionBench flattens the state dict in sorted key order
        current = torch.cat([(merged[k] - base[k]).reshape(-1) for k in keys])
        flat = ties_pair(current, torch.cat([tv[k].reshape(-1) for k in keys]), self.config.density, self.config.merge_func)
        return add_flat({k: merged[k] for k in keys}, flat, lam, keys)


METHODS = [ContinualTaskArithmetic, ContinualTies, ContinualWeightAverage]
