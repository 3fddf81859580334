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
by default (here seeded by the run's seed; FusionBench uses Python's ``random`` with
``seed: null``), and parameters held directly by a module that has children (CLIP's
``embeddings.class_embedding``) are not merged after the first model (``non_leaf: skip``):
``Σ_t = M_{t−1}`` there (no new task vector, no ``λ_{t−1}``), so they only follow the rescaling.  ``non_leaf: merge`` (fuse's earlier default) treats
them as any other tensor.

After each step the merged model is scored on the tasks seen so far through the task pool's
``evaluate`` (the callback of the run context), and the per-step results go to
``extras.opcm.steps`` of the report.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs

from fusion_core import Capabilities, in_range, option, tensor_seed

from .common import AdaptiveMethod, float_params, note, prepare, progress, state_with, task_vector
from .modules import key as pkey
from .modules import linear_layers, weight_out_in

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fusion_core import ModelPool, RunContext

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


class OPCM(AdaptiveMethod):
    """Orthogonal projection-based continual merging (Tang et al., 2025)."""

    name = "opcm"
    summary = "Continual merging: each new task vector is projected off the merged model's main subspace and the sum rescaled."
    reference_url = "https://arxiv.org/abs/2501.09522"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True)

    @attrs.frozen
    class Config:
        alpha: float = option(0.5, help="share of the merged vector's singular-value mass whose subspace block is protected", validator=in_range(0.0, 1.0))
        shuffle: bool = option(True, help="merge the models in a seeded random order (FusionBench shuffle_order: true); false = pool order")
        non_leaf: Literal["skip", "merge"] = option(
            "skip", help="parameters held directly by modules with children (e.g. CLIP's class_embedding): 'skip' = not merged after "
                         "the first model (FusionBench); 'merge' = merged like the others (fuse's earlier default)"
        )
        evaluate_every_step: bool = option(True, help="score the merged model on the tasks seen so far after each step (needs a task pool)")

    def order(self, names: list[str], seed: int) -> list[str]:
        if not self.config.shuffle:
            return list(names)
        import torch

        generator = torch.Generator(device="cpu")
        generator.manual_seed(tensor_seed(seed, self.name, "order"))
        return [names[i] for i in torch.randperm(len(names), generator=generator).tolist()]

    def run(self, pool: "ModelPool", ctx: "RunContext") -> dict[str, "torch.Tensor"]:
        import torch

        cfg = self.config
        order = self.order(list(pool.model_names), ctx.seed)
        base = prepare(pool.load_model(None), ctx.device)
        base_params = float_params(base)
        layouts = {pkey(n, "weight"): m for n, m in linear_layers(base).items()}
        skipped = non_leaf_parameters(base) if cfg.non_leaf == "skip" else set()
        merged: dict[str, torch.Tensor] | None = None
        scale, norms, steps = 1.0, [], []
        taskpool = ctx.taskpool if cfg.evaluate_every_step else None
        for t, name in enumerate(progress(ctx, order, f"continual merging ({self.name})", total=len(order), unit="model")):
            tv = task_vector(pool, name, base_params, method=self.name, device=ctx.device)
            norms.append(global_norm(tv))
            if merged is None:
                total = tv
            else:
                total = {}
                for key, value in tv.items():
                    if key in skipped:  # FusionBench leaves the tensor as it is (not even times λ_{t−1}) before rescaling
                        total[key] = merged[key]
                        continue
                    if key in layouts and value.dim() == 2:
                        module = layouts[key]
                        cleaned = weight_out_in(module, project_out(weight_out_in(module, value), weight_out_in(module, merged[key]), cfg.alpha))
                    else:
                        cleaned = value
                    total[key] = scale * merged[key] + cleaned
            average = sum(norms) / len(norms)
            size = global_norm(total)
            scale = size / average if average > 0 else 1.0
            merged = {k: v / scale for k, v in total.items()} if scale > 0 else total
            record: dict[str, Any] = {"step": t + 1, "model": name, "lambda": scale}
            if taskpool is not None:
                seen = [n for n in order[: t + 1] if n in taskpool.task_names]
                if seen:
                    with torch.no_grad():
                        state = state_with(base, {k: base_params[k] + merged[k] for k in merged})
                    record["results"] = taskpool.evaluate(pool.model_from_state_dict(state), tasks=seen, ctx=ctx)
            steps.append(record)
            del tv, total
        assert merged is not None
        note(ctx, self.name, order=order, steps=steps)
        with torch.no_grad():
            return state_with(base, {k: base_params[k] + merged[k] for k in merged})


METHODS = [OPCM]
