"""AdaMerging: merge coefficients learned by entropy minimisation on unlabelled test inputs.

The merged parameters are ``θ = θ₀ + Σᵢ λᵢ τᵢ`` (task-wise: one λ per model) or
``θₖ = θ₀ₖ + Σᵢ λᵢₖ τᵢₖ`` (layer-wise: one λ per model and parameter tensor).  The λ
start at ``init`` and follow Adam on the sum over tasks of the mean prediction entropy of the
merged model on a batch of that task's unlabelled test inputs (through the task's head).
Each step builds the merged tensors from the base and the task vectors and runs the base
module functionally (``torch.func.functional_call``): no module is copied, and memory stays
near base + N task vectors + one set of merged tensors with its autograd graph.

This is test-time adaptation: it reads the *test* inputs (never their labels) and is flagged
``transductive`` in ``fuse show`` and in the run report (``extras.transductive``).

Defaults follow FusionBench 0.2.33 (``config/method/adamerging/clip.yaml``,
``LayerWiseAdaMergingAlgorithm``/``LayerWiseMergedModel``): layer-wise, init 0.3, Adam lr 1e-3,
1000 steps, no clamping (``clamp_weights: false``; with ``clamp: forward`` the merge uses
``clamp(λ, 0, 1)`` as FusionBench's ``clamp_weights: true`` does), entropy ``−Σ p log(p + 1e-8)``.
fuse's earlier defaults: 100 steps, ``clamp: project`` (λ clipped to [0, 1] after each step), exact
entropy (``entropy_eps: 0``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs

from fusion_core import Capabilities, in_range, option, positive

from .common import (
    AdaptationTask,
    AdaptiveMethod,
    adapt,
    adaptation_tasks,
    entropy,
    float_params,
    mark_transductive,
    note,
    prepare,
    state_with,
    summarize_history,
    task_vector,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fusion_core import ModelPool, RunContext


def merge_parameters(base: Mapping[str, "torch.Tensor"], task_vectors: Sequence[Mapping[str, "torch.Tensor"]],
                     coefficients: "torch.Tensor") -> dict[str, "torch.Tensor"]:
    """``θ₀ₖ + Σᵢ λᵢₖ τᵢₖ`` for every tensor ``k`` of ``base``.

    :param coefficients: ``(N, 1)`` (task-wise: the same λᵢ for every tensor) or ``(N, K)``
        (layer-wise, K = number of tensors of ``base``, in its order).
    """
    out = {}
    layer_wise = coefficients.shape[1] > 1
    for k, (key, value) in enumerate(base.items()):
        merged = value
        for i, tv in enumerate(task_vectors):
            merged = merged + coefficients[i, k if layer_wise else 0].to(value.dtype) * tv[key]
        out[key] = merged
    return out


def stack_task_vectors(task_vectors: Sequence[dict[str, "torch.Tensor"]], keys: Sequence[str]) -> dict[str, "torch.Tensor"]:
    """Per tensor ``k``, the models' ``τᵢₖ`` stacked ``(N, *shape)`` (each model's tensors are released as they are stacked).

    Tensors no model changed (every ``τᵢₖ = 0``: e.g. a frozen embedding table) are left out: the merge
    keeps the base's value there whatever the coefficients, with no (N, *shape) stack or contraction.
    """
    import torch

    out = {}
    for key in keys:
        parts = [tv.pop(key) for tv in task_vectors]
        if any(bool(p.any()) for p in parts):
            out[key] = torch.stack(parts)
    return out


def merge_stacked(base: Mapping[str, "torch.Tensor"], stacked: Mapping[str, "torch.Tensor"], coefficients: "torch.Tensor") -> dict[str, "torch.Tensor"]:
    """:func:`merge_parameters` on stacked task vectors: ``θ₀ₖ + λ·ₖ ⊗ τ·ₖ``, one contraction per tensor.

    One fused op per tensor instead of N additions: no per-model intermediate in the autograd graph,
    and the coefficients' gradient is one matrix product per tensor.  A tensor of ``base`` missing
    from ``stacked`` (no model changed it) is the base's.
    """
    import torch

    layer_wise = coefficients.shape[1] > 1
    return {key: value + torch.tensordot(coefficients[:, k if layer_wise else 0].to(value.dtype), stacked[key], dims=1)
            if key in stacked else value for k, (key, value) in enumerate(base.items())}


def entropy_objective(model: Any, params: Mapping[str, "torch.Tensor"], tasks: Sequence[AdaptationTask], batches: Sequence[Any],
                      pool: "ModelPool | None" = None, eps: float = 0.0) -> "torch.Tensor":
    """Σ over tasks of the mean prediction entropy of ``model`` with ``params`` on that task's batch."""
    from fusion_core.adapters import apply_classifier, functional_forward

    total = None
    for task, inputs in zip(tasks, batches, strict=True):
        value = entropy(apply_classifier(task.head, functional_forward(model, params, inputs, pool)), eps)
        total = value if total is None else total + value
    assert total is not None
    return total


class AdaMerging(AdaptiveMethod):
    """AdaMerging (Yang et al., ICLR 2024), task-wise or layer-wise.

    Defaults are FusionBench's (1000 steps, batch 16 per task, no clamping).  Duration on the ``mini``
    benchmark (MiniLM, six tasks; a step is a forward and backward pass of the merged encoder on 16
    test texts of each task, up to 32 tokens each): about 1.15 s per step, task- or layer-wise, with
    one thread while another leaderboard cell ran on the other core of the idle 2-core machine (the
    leaderboard's run of 2026-12-01: 100 steps and the evaluation in 119–123 s; 296 s when other
    jobs shared the CPU), so the default 1000 steps take about 20 min of one core there.  Tensors that no model changed (mini's frozen embedding tables) are not
    stacked nor contracted.  The run prints its own estimate after three steps, and notes
    ``seconds_per_step``.
    """

    name = "adamerging"
    summary = "Task arithmetic whose coefficients (per model or per model and tensor) minimise prediction entropy on unlabelled test inputs."
    reference_url = "https://arxiv.org/abs/2310.02575"
    fusionbench_config = "adamerging/clip.yaml"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True, needs_data=True, trains=True, transductive=True)

    @attrs.frozen
    class Config:
        granularity: Literal["task", "layer"] = option("layer", help="one coefficient per model (task) or per model and parameter tensor (layer)")
        init: float = option(0.3, help="initial value of every coefficient (0.3 = task arithmetic's usual scale)")
        lr: float = option(1e-3, help="Adam learning rate of the coefficients", validator=positive)
        steps: int = option(1000, help="adaptation steps (each reads one unlabelled test batch per task; FusionBench max_steps 1000)",
                            validator=in_range(0, None))
        clamp: Literal["none", "forward", "project"] | bool = option(
            "none", help="'none' (FusionBench clamp_weights: false); 'forward': merge with clamp(λ, 0, 1) (FusionBench "
                         "clamp_weights: true); 'project' (or true): clip λ to [0, 1] after each step (fuse's earlier default)"
        )
        entropy_eps: float = option(1e-8, help="ε of the entropy −Σ p·log(p + ε) (FusionBench 1e-8; 0 = exact log-softmax)",
                                    validator=in_range(0.0, None))
        batch_size: int | None = option(16, help="unlabelled test inputs per task in a step (FusionBench batch_size 16; the task "
                                                  "pool's batches are cut to it); null = the task pool's batches", validator=positive)

        def __attrs_post_init__(self) -> None:
            if self.clamp is True or self.clamp is False:  # the earlier boolean form
                object.__setattr__(self, "clamp", "project" if self.clamp else "none")

    def run(self, pool: "ModelPool", ctx: "RunContext") -> dict[str, "torch.Tensor"]:
        import torch

        cfg, names = self.config, list(pool.model_names)
        tasks = adaptation_tasks(pool, ctx.taskpool, method=self.name, device=ctx.device, batch_size=cfg.batch_size)
        base = prepare(pool.load_model(None), ctx.device)
        base_params = float_params(base)
        vectors = stack_task_vectors([task_vector(pool, n, base_params, method=self.name, device=ctx.device) for n in names],
                                     list(base_params))
        width = len(base_params) if cfg.granularity == "layer" else 1
        coefficients = torch.full((len(names), width), float(cfg.init), dtype=torch.float32, device=ctx.device, requires_grad=True)

        def effective(c: torch.Tensor) -> torch.Tensor:
            return c.clamp(0.0, 1.0) if cfg.clamp == "forward" else c

        def loss(step: int) -> torch.Tensor:
            merged = merge_stacked(base_params, vectors, effective(coefficients))
            return entropy_objective(base, merged, tasks, [t.next_inputs() for t in tasks], pool, cfg.entropy_eps)

        def clamp() -> None:
            if cfg.clamp == "project":
                with torch.no_grad():
                    coefficients.clamp_(0.0, 1.0)

        history = adapt([coefficients], loss, steps=cfg.steps, lr=cfg.lr, method=self.name, ctx=ctx, after_step=clamp)
        with torch.no_grad():
            merged = merge_stacked(base_params, vectors, effective(coefficients.detach()))
            state = state_with(base, merged)
        final = effective(coefficients.detach()).cpu()
        per_model = {n: (float(final[i, 0]) if width == 1 else float(final[i].mean())) for i, n in enumerate(names)}
        note(ctx, self.name, granularity=cfg.granularity, coefficients=per_model, tensors_unchanged=len(base_params) - len(vectors),
             **summarize_history(history))
        mark_transductive(ctx, self.name, names)
        return state


METHODS = [AdaMerging]
