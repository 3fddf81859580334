"""Frank-Wolfe merging, hard variant (Chen et al., 2025, "FW-Merging: Scaling Model Merging with Frank-Wolfe
Optimization", arXiv 2503.12649; FusionBench 0.2.33 ``fw_merging/fw_hard.py``).

The merged weights θ move, by Frank-Wolfe steps, inside the convex hull of the candidate models
(the fine-tuned models and the starting point).  Each iteration:

1. the gradient ``g`` of the multi-task loss at θ: ``Σ_t Σ_{k < dataset_size} ℓ_t(x_k, y_k) / (dataset_size · T)``,
   cross entropy through each task's head on ``dataset_size`` labelled training examples per task
   (taken in order, cycling through the split, continuing from one iteration to the next);
2. the linear-minimisation oracle picks the candidate most opposed to ``g``: per candidate ``c``
   the alignment ``Σ_p cos(g_p, θ_c,p)`` over the parameters ``p`` (``granularity: task``), or per
   parameter the candidate of lowest ``cos(g_p, θ_c,p)`` (``granularity: layer``);
3. ``θ ← θ + γ_t · λ · (θ_c − θ)`` with ``γ_t = step_size · 2 / (t + 2)``.

θ starts as the ``merge_fn`` of the fine-tuned models with λ (``init: merge_fn``, FusionBench's
default) or at the base (``init: base``).  ``merge_fn`` is also how each step moves:

- ``task_arithmetic`` (FusionBench ``fw_hard.yaml``): start ``θ₀ + λ Σ τ_i``; step 3 as above;
- ``ties`` (FusionBench ``merge_fn: ties``): start ``θ₀ + λ·TIES(τ_1..τ_N)``, and each step
  ``θ ← θ + γ_t·λ·TIES(θ_c − θ)``, where TIES is FusionBench's over the whole flattened model: each
  vector trimmed to its ``density`` largest magnitudes (``threshold`` 20 = 0.2; ties at the
  threshold kept), signs elected by the sum (a zero sum takes the model-wide majority), the
  agreeing entries summed (``merge_func: sum``).  A step on one candidate is thus the trimmed
  difference ``θ_c − θ``.

FusionBench draws the examples from a shuffled loader; here they come in the split's order
(deterministic).

``fw_soft`` (FusionBench ``fw_soft.py``) starts at the base; each iteration takes, task by task, the
gradient of that task's loss alone and the fine-tuned model most opposed to it (with ``task``
granularity, one no earlier task of the iteration took), then merges the N picks around θ by
layer-wise AdaMerging: ``θ + Σ_i λ_ik (θ_i − θ)``, coefficients from 0.3 (first iteration) or
``ada_coeff``, ``ada_iters`` Adam steps on the tasks' prediction entropy on unlabelled test inputs
(``merge_fn: adamerging``, FusionBench's ``fw_soft.yaml``).  FusionBench's other ``merge_fn``
(``task_arithmetic``) adds the N picks by task arithmetic instead, with no test inputs:
``θ + λ·γ_t·Σ_i (θ_i − θ)``, ``γ_t = step_size · 2/(t + 2)`` and ``γ_0 = 1`` (λ 0.3, fixed there).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs

from fusion_core import Capabilities, in_range, option, positive

from .common import AdaptiveMethod, float_params, note, prepare, progress, state_with, to_device

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fusion_core import ModelPool, RunContext


def examples(batches: Any, task: str, method: str) -> Iterator[tuple[Any, "torch.Tensor"]]:
    """Labelled batches of one task, cycled forever (as (inputs, labels))."""
    from fusion_core.adapters import cycle, labelled

    return labelled(cycle(batches), method=method, name=task, split="train")


def take(stream: Iterator, count: int, buffer: list) -> list[tuple[Any, "torch.Tensor"]]:
    """The next ``count`` examples of ``stream`` as (possibly partial) batches; a split batch's rest waits in ``buffer``."""
    from .fisher import slice_inputs

    out, need = [], count
    while need > 0:
        x, y = buffer.pop(0) if buffer else next(stream)
        size = int(y.shape[0])
        if size > need:
            buffer.append((slice_inputs(x, need, size), y[need:]))
            x, y, size = slice_inputs(x, 0, need), y[:need], need
        out.append((x, y))
        need -= size
    return out


def alignment(grad: "torch.Tensor", weight: "torch.Tensor") -> float:
    """``cos(g, w)`` over the flattened tensors (FusionBench: ⟨g, w⟩ / (‖g‖‖w‖); 0/0 is NaN there, 0 here)."""
    denominator = float(grad.norm() * weight.norm())
    return float(grad.flatten() @ weight.flatten()) / denominator if denominator else 0.0


class FrankWolfeMerging(AdaptiveMethod):
    """Hard Frank-Wolfe merging: steps toward the candidate model whose weights oppose the multi-task gradient most."""

    name = "fw_merging"
    summary = "Frank-Wolfe merging (hard): per step, move θ toward the model (or per layer) most opposed to the multi-task gradient."
    reference_url = "https://arxiv.org/abs/2503.12649"
    fusionbench_config = "fw_merging/fw_hard.yaml"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True, needs_data=True, trains=True)

    @attrs.frozen
    class Config:
        max_iters: int = option(10, help="Frank-Wolfe iterations (FusionBench fw_hard.yaml: 10)", validator=in_range(0))
        step_size: float = option(0.1, help="γ_t = step_size · 2/(t + 2) (FusionBench: 0.1)", validator=in_range(0.0))
        scaling_factor: float = option(0.3, help="λ: the task-arithmetic start θ₀ + λΣτ and each step θ + γλ(θ_c − θ) "
                                                 "(FusionBench: 0.3)")
        dataset_size: int = option(100, help="training examples per task for each gradient (FusionBench: 100)", validator=positive)
        granularity: Literal["task", "layer"] = option(
            "task", help="task: one candidate per step (Σ of per-parameter cosines); layer: a candidate per parameter (FusionBench: task)",
            validator=attrs.validators.in_(("task", "layer")))
        merge_fn: Literal["task_arithmetic", "ties"] = option(
            "task_arithmetic", help="how the start and every step merge: task_arithmetic (θ + λ·Σ(θ_c − θ)) or ties (the same "
                                    "differences TIES-merged over the whole model; FusionBench merge_fn, fw_hard.yaml: task_arithmetic)",
            validator=attrs.validators.in_(("task_arithmetic", "ties")))
        density: float = option(0.2, help="merge_fn ties: fraction of each whole-model difference kept by magnitude (FusionBench "
                                          "threshold: 20 = 0.2)", validator=in_range(0.0, 1.0))
        init: Literal["merge_fn", "base"] = option(
            "merge_fn", help="the start: the merge_fn of the fine-tuned models with λ (FusionBench init_weight empty) or the base "
                             "(FusionBench init_weight: base)", validator=attrs.validators.in_(("merge_fn", "base")))
        split: str = option("train", help="the model pool's labelled split for the gradients (FusionBench: train)")

    def run(self, pool: "ModelPool", ctx: "RunContext") -> dict[str, "torch.Tensor"]:
        cfg, names = self.config, list(pool.model_names)
        setup = _Setup(pool, ctx, self.name, cfg.split)
        base = setup.base
        theta = dict(base) if cfg.init == "base" else self.merge(base, [setup.candidates[n] for n in names], cfg.scaling_factor)
        candidates = {**setup.candidates, "initial": {k: v.clone() for k, v in theta.items()}}
        chosen: list[Any] = []
        for step in progress(ctx, range(cfg.max_iters), "Frank-Wolfe", total=cfg.max_iters):
            grads = setup.gradient(theta, names, cfg.dataset_size)
            picks, counts = select(grads, candidates, cfg.granularity)
            gamma = cfg.step_size * 2 / (step + 2) * cfg.scaling_factor
            theta = self.merge(theta, [{k: candidates[picks[k]][k] for k in theta}], gamma)
            chosen.append(picks[next(iter(picks))] if cfg.granularity == "task" else counts)
        note(ctx, self.name, chosen=chosen, granularity=cfg.granularity)
        return state_with(setup.model, theta)

    def merge(self, theta: dict[str, "torch.Tensor"], models: list[dict[str, "torch.Tensor"]], scale: float) -> dict[str, "torch.Tensor"]:
        """``θ + scale·Σ_m (m − θ)`` (task_arithmetic), or ``θ + scale·TIES(m − θ for m)`` over the whole model (ties)."""
        if self.config.merge_fn == "task_arithmetic":
            return {k: theta[k] + scale * sum(m[k] - theta[k] for m in models) for k in theta}
        import torch

        from .continual import add_flat, ties_whole

        keys = list(theta)
        merged = ties_whole([torch.cat([(m[k] - theta[k]).reshape(-1) for k in keys]) for m in models], self.config.density, "sum")
        return add_flat(theta, merged, scale, keys)


class _Setup:
    """What both variants hold: the base module and parameters, the candidates' parameters, the heads and example streams."""

    def __init__(self, pool: "ModelPool", ctx: "RunContext", method: str, split: str) -> None:
        from fusion_core.adapters import get_classifier, require_data

        self.pool, self.device, self.names = pool, ctx.device, list(pool.model_names)
        self.streams = {n: examples(require_data(pool, n, split, method=method), n, method) for n in self.names}
        self.buffers: dict[str, list] = {n: [] for n in self.names}
        self.heads = {n: get_classifier(ctx.taskpool, n) for n in self.names}
        self.model = prepare(pool.load_model(None), ctx.device)
        self.base = {k: v.clone() for k, v in float_params(self.model).items()}
        self.candidates = {n: {k: v.to(ctx.device) for k, v in float_params(prepare(pool.load_model(n), ctx.device)).items()}
                           for n in self.names}
        self.method = method

    def gradient(self, theta: dict[str, "torch.Tensor"], tasks: list[str], dataset_size: int) -> dict[str, "torch.Tensor"]:
        """∇ of Σ over ``tasks`` of the summed cross entropy of their next ``dataset_size`` examples, / (dataset_size · N)."""
        import torch
        import torch.nn.functional as F

        from fusion_core import FuseError
        from fusion_core.adapters import apply_classifier, functional_forward

        leaves = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
        grads = {k: torch.zeros_like(v) for k, v in theta.items()}
        for n in tasks:
            for x, y in take(self.streams[n], dataset_size, self.buffers[n]):
                x, y = to_device(x, self.device), y.to(self.device)
                with torch.enable_grad():
                    logits = apply_classifier(self.heads[n], functional_forward(self.model, leaves, x, self.pool))
                    loss = F.cross_entropy(logits.float(), y, reduction="sum") / (dataset_size * len(self.names))
                    parts = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
                if not math.isfinite(float(loss.detach())):
                    raise FuseError(f"method {self.method!r}: the loss on task {n!r} is not finite; lower scaling_factor")
                for k, g in zip(leaves, parts, strict=True):
                    if g is not None:
                        grads[k] += g
        return grads


def select(grads: dict[str, "torch.Tensor"], candidates: dict[str, dict[str, "torch.Tensor"]], granularity: str,
           excluded: Any = ()) -> tuple[dict[str, str], dict[str, int]]:
    """The oracle: per parameter the chosen candidate (one for all with ``task``), and how often each was chosen.

    ``excluded``: candidates not to choose (``task``: names; ``layer``: per parameter a list of names).
    """
    if granularity == "task":
        scores = {c: sum(alignment(grads[k], w[k]) for k in grads) for c, w in candidates.items() if c not in excluded}
        pick = min(scores, key=lambda c: scores[c])  # the first of equal scores, as FusionBench's strict <
        return dict.fromkeys(grads, pick), {pick: len(grads)}
    picks: dict[str, str] = {}
    counts: dict[str, int] = {}
    for k in grads:
        scores = {c: alignment(grads[k], w[k]) for c, w in candidates.items() if c not in (excluded[k] if excluded else ())}
        picks[k] = min(scores, key=lambda c: scores[c])
        counts[picks[k]] = counts.get(picks[k], 0) + 1
    return picks, counts


class FrankWolfeSoftMerging(AdaptiveMethod):
    """Soft Frank-Wolfe merging: per step one oracle model per task, combined by layer-wise AdaMerging around θ."""

    name = "fw_soft"
    summary = ("Frank-Wolfe merging (soft): per step, per task the model most opposed to that task's gradient, then "
               "layer-wise AdaMerging of them around θ on unlabelled test inputs.")
    reference_url = "https://arxiv.org/abs/2503.12649"
    fusionbench_config = "fw_merging/fw_soft.yaml"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True, needs_data=True, trains=True, transductive=True)

    @attrs.frozen
    class Config:
        max_iters: int = option(10, help="Frank-Wolfe iterations (FusionBench fw_soft.yaml: 10)", validator=in_range(0))
        dataset_size: int = option(100, help="training examples of a task for its gradient (FusionBench: 100)", validator=positive)
        ada_iters: int = option(500, help="AdaMerging steps per iteration (FusionBench: 500)", validator=in_range(0))
        ada_coeff: float = option(1e-8, help="initial layer-wise coefficient after the first iteration (the first: 0.3; "
                                             "FusionBench: 1e-8)")
        lr: float = option(1e-3, help="AdaMerging's Adam learning rate (FusionBench: 1e-3)", validator=positive)
        granularity: Literal["task", "layer"] = option(
            "task", help="task: each task picks a model no earlier task of the step picked; layer: per parameter (FusionBench: task)",
            validator=attrs.validators.in_(("task", "layer")))
        entropy_eps: float = option(1e-8, help="ε of the entropy −Σ p·log(p + ε) (FusionBench: 1e-8)", validator=in_range(0.0))
        split: str = option("train", help="the model pool's labelled split for the gradients (FusionBench: train)")
        merge_fn: Literal["adamerging", "task_arithmetic"] = option(
            "adamerging", help="how each iteration merges the N picks around θ: layer-wise AdaMerging on unlabelled test inputs, or "
                               "task arithmetic θ + λ·γ_t·Σ(θ_i − θ) with no test inputs (FusionBench merge_fn; fw_soft.yaml: adamerging)",
            validator=attrs.validators.in_(("adamerging", "task_arithmetic")))
        step_size: float = option(0.1, help="merge_fn task_arithmetic: γ_t = step_size·2/(t + 2), γ_0 = 1 (FusionBench: 0.1)",
                                  validator=in_range(0.0))
        scaling_factor: float = option(0.3, help="merge_fn task_arithmetic: λ of each step (FusionBench: a fixed 0.3)")

    def run(self, pool: "ModelPool", ctx: "RunContext") -> dict[str, "torch.Tensor"]:
        import torch

        from .adamerging import entropy_objective, merge_stacked
        from .common import adapt, adaptation_tasks, mark_transductive

        cfg = self.config
        setup = _Setup(pool, ctx, self.name, cfg.split)
        names = setup.names
        adamerging = cfg.merge_fn == "adamerging"
        adaptation = adaptation_tasks(pool, ctx.taskpool, method=self.name, device=ctx.device) if adamerging else []
        theta = dict(setup.base)
        chosen: list[Any] = []
        for step in progress(ctx, range(cfg.max_iters), "Frank-Wolfe (soft)", total=cfg.max_iters, unit="iteration"):
            excluded: Any = [] if cfg.granularity == "task" else {k: [] for k in theta}
            selected, step_chosen = [], []
            for n in names:
                picks, counts = select(setup.gradient(theta, [n], cfg.dataset_size), setup.candidates, cfg.granularity, excluded)
                if cfg.granularity == "task":
                    excluded.append(picks[next(iter(picks))])
                    step_chosen.append(picks[next(iter(picks))])
                else:
                    for k, c in picks.items():
                        excluded[k].append(c)
                    step_chosen.append(counts)
                selected.append({k: setup.candidates[c][k] for k, c in picks.items()})
            chosen.append(step_chosen)
            if not adamerging:
                scale = cfg.scaling_factor * (1.0 if step == 0 else 2 / (step + 2) * cfg.step_size)
                theta = {k: theta[k] + scale * sum(m[k] - theta[k] for m in selected) for k in theta}
                continue
            stacked = {k: torch.stack([m[k] - theta[k] for m in selected]) for k in theta}
            coefficients = torch.full((len(selected), len(theta)), 0.3 if step == 0 else cfg.ada_coeff, dtype=torch.float32,
                                      device=ctx.device, requires_grad=True)
            around = {k: v.detach() for k, v in theta.items()}

            def loss(_: int, around=around, stacked=stacked, coefficients=coefficients) -> "torch.Tensor":
                merged = merge_stacked(around, stacked, coefficients)
                return entropy_objective(setup.model, merged, adaptation, [t.next_inputs() for t in adaptation], pool, cfg.entropy_eps)

            adapt([coefficients], loss, steps=cfg.ada_iters, lr=cfg.lr, method=self.name, ctx=ctx)
            with torch.no_grad():
                theta = merge_stacked(around, stacked, coefficients.detach())
        note(ctx, self.name, chosen=chosen, granularity=cfg.granularity)
        if adamerging:
            mark_transductive(ctx, self.name, names)
        return state_with(setup.model, theta)


METHODS = [FrankWolfeMerging, FrankWolfeSoftMerging]
