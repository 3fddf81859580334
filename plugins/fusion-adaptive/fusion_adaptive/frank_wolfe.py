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

θ starts as task arithmetic ``θ₀ + λ Σ τ_i`` (FusionBench ``merge_fn: task_arithmetic``) or at the
base (``init: base``).  FusionBench draws the examples from a shuffled loader; here they come in
the split's order (deterministic).  FusionBench's ``merge_fn: ties`` and the soft variant
(``fw_soft``, AdaMerging inside each step) are not implemented.
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
        init: Literal["task_arithmetic", "base"] = option(
            "task_arithmetic", help="the start: task arithmetic with λ (FusionBench merge_fn: task_arithmetic) or the base "
                                    "(FusionBench init_weight: base)", validator=attrs.validators.in_(("task_arithmetic", "base")))
        split: str = option("train", help="the model pool's labelled split for the gradients (FusionBench: train)")

    def run(self, pool: "ModelPool", ctx: "RunContext") -> dict[str, "torch.Tensor"]:
        import torch
        import torch.nn.functional as F

        from fusion_core.adapters import apply_classifier, functional_forward, get_classifier, require_data

        cfg, names = self.config, list(pool.model_names)
        streams = {n: examples(require_data(pool, n, cfg.split, method=self.name), n, self.name) for n in names}
        buffers: dict[str, list] = {n: [] for n in names}
        heads = {n: get_classifier(ctx.taskpool, n) for n in names}
        model = prepare(pool.load_model(None), ctx.device)
        base = {k: v.clone() for k, v in float_params(model).items()}
        candidates = {n: {k: v.to(ctx.device) for k, v in float_params(prepare(pool.load_model(n), ctx.device)).items()} for n in names}
        theta = dict(base) if cfg.init == "base" else {
            k: base[k] + cfg.scaling_factor * sum(candidates[n][k] - base[k] for n in names) for k in base}
        candidates["initial"] = {k: v.clone() for k, v in theta.items()}
        chosen: list[Any] = []
        for step in progress(ctx, range(cfg.max_iters), "Frank-Wolfe", total=cfg.max_iters):
            leaves = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
            grads = {k: torch.zeros_like(v) for k, v in theta.items()}
            total = 0.0
            for n in names:
                for x, y in take(streams[n], cfg.dataset_size, buffers[n]):
                    x, y = to_device(x, ctx.device), y.to(ctx.device)
                    with torch.enable_grad():
                        logits = apply_classifier(heads[n], functional_forward(model, leaves, x, pool))
                        loss = F.cross_entropy(logits.float(), y, reduction="sum") / (cfg.dataset_size * len(names))
                        parts = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
                    for k, g in zip(leaves, parts, strict=True):
                        if g is not None:
                            grads[k] += g
                    total += float(loss.detach())
            gamma = cfg.step_size * 2 / (step + 2) * cfg.scaling_factor
            with torch.no_grad():
                if cfg.granularity == "task":
                    scores = {c: sum(alignment(grads[k], w[k]) for k in theta) for c, w in candidates.items()}
                    pick = min(scores, key=lambda c: scores[c])  # the first of equal scores, as FusionBench's strict <
                    theta = {k: theta[k] + gamma * (candidates[pick][k] - theta[k]) for k in theta}
                    chosen.append(pick)
                else:
                    counts: dict[str, int] = {}
                    for k in theta:
                        scores = {c: alignment(grads[k], w[k]) for c, w in candidates.items()}
                        pick = min(scores, key=lambda c: scores[c])
                        theta[k] = theta[k] + gamma * (candidates[pick][k] - theta[k])
                        counts[pick] = counts.get(pick, 0) + 1
                    chosen.append(counts)
            if not math.isfinite(total):
                from fusion_core import FuseError

                raise FuseError(f"method {self.name!r}: the loss is not finite at iteration {step + 1}; lower scaling_factor")
        note(ctx, self.name, chosen=chosen, granularity=cfg.granularity)
        return state_with(model, theta)


METHODS = [FrankWolfeMerging]
