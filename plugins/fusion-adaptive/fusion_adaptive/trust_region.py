"""Task arithmetic in the trust region (TATR; Sun et al., ICLR 2025, "Task Arithmetic in Trust Region:
A Training-Free Model Merging Approach to Navigate Knowledge Conflicts", openreview q3ztjJRQuJ).

Task vectors ``τ_j = θ_j − θ₀`` conflict where adding ``τ_j`` moves a parameter that task ``i``'s
loss is sensitive to.  With ``g_i`` = the mean over ``max_samples`` labelled training examples of
task ``i`` of ``|∂ℓ_i/∂θ|`` at the *pretrained* weights (one backward pass per example, cross
entropy through the task's head), the conflict of each parameter is

    Ω = Σ_i Σ_{j≠i} g_i ⊙ |τ_j|

(``zero_shot``: no data, ``g_i = |τ_i|``).  Parameters whose Ω is in the top ``1 − q`` of the whole
model (``q`` = ``threshold_quantile``; threshold = the ``⌊q·size⌋``-th smallest Ω, as FusionBench)
lie outside the trust region and are dropped from every task vector:

    θ = θ₀ + λ · (Ω < threshold) ⊙ Σ_j τ_j

As FusionBench 0.2.33 (``trust_region/clip_task_arithmetic.py``), the quantile is taken over every
merged tensor of the model at once.  Here the merged tensors are the floating-point tensors of
the pool's models (a tensor that gets no gradient, a float buffer, has ``g_i = 0`` there).
FusionBench's gradient mode keeps the gradients of every task under one key (the name of the last
parameter instead of the task's), so its Ω is 0 and its merge returns the pretrained model (a
peer-defect row); with its estimator called once per task and keyed by the task, its gradient mode
matches this one exactly, as its zero-shot mode does (parity suite).

``scaling_factor`` may be a list, as FusionBench's: the mask is computed once and one model per λ
is returned (output *several models*, reported as ``merged:<λ>``), FusionBench's way of choosing λ.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from fusion_core import Capabilities, InputError, in_range, option, positive

from .common import AdaptiveMethod, float_params, note, prepare, progress, to_device

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fusion_core import ModelPool, RunContext


def mean_abs_gradients(model: Any, batches: Iterable, head: Any, *, pool: "ModelPool", max_samples: int,
                       device: str, task: str = "") -> tuple[dict[str, "torch.Tensor"], int]:
    """Per parameter, the mean over the first ``max_samples`` examples of ``|∂ cross-entropy / ∂θ|`` (one example at a time)."""
    import torch
    import torch.nn.functional as F

    from fusion_core.adapters import apply_classifier, functional_forward, labelled

    from .fisher import slice_inputs

    params = float_params(model)
    names = list(params)
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    count = 0
    for x, y in labelled(batches, method="trust_region_ta", name=task, split="train"):
        x, y = to_device(x, device), y.to(device)
        for j in range(min(int(y.shape[0]), max_samples - count)):
            with torch.enable_grad():
                out = apply_classifier(head, functional_forward(model, leaves, slice_inputs(x, j, j + 1), pool))
                loss = F.cross_entropy(out.float(), y[j : j + 1])
                grads = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
            for k, g in zip(names, grads, strict=True):
                if g is not None:
                    total[k] += g.abs()
            count += 1
        if count >= max_samples:
            break
    if count == 0:
        raise InputError("method 'trust_region_ta': the training data gave no examples")
    return {k: v / count for k, v in total.items()}, count


def conflict(sensitivities: list["torch.Tensor"], magnitudes: list["torch.Tensor"]) -> "torch.Tensor":
    """``Ω = Σ_i Σ_{j≠i} g_i ⊙ |τ_j|`` of one tensor (summed in FusionBench's order: i, then j)."""
    import torch

    omega = torch.zeros_like(magnitudes[0])
    for i, g in enumerate(sensitivities):
        for j, m in enumerate(magnitudes):
            if i != j:
                omega += g * m
    return omega


def quantile_threshold(values: Iterable["torch.Tensor"], q: float) -> "torch.Tensor":
    """The ``min(⌊q·size⌋, size − 1)``-th smallest of all ``values`` together (0-based, FusionBench's rule)."""
    import torch

    flat = torch.cat([v.reshape(-1) for v in values])
    index = max(0, min(int(flat.numel() * q), flat.numel() - 1))
    return flat.kthvalue(index + 1).values


def _distinct(instance, attribute, value) -> None:
    """A list of λ must be non-empty and distinct (each names its model)."""
    if isinstance(value, (list, tuple)):
        labels = [f"{v:g}" for v in value]
        if not labels or len(set(labels)) != len(labels):
            raise ValueError(f"{attribute.name} must be one number or a non-empty list of distinct numbers, got {list(value)!r}")


class TrustRegionTaskArithmetic(AdaptiveMethod):
    """TATR: task arithmetic restricted to the parameters where the task vectors do not conflict with the tasks' gradients."""

    name = "trust_region_ta"
    summary = ("Task arithmetic in the trust region: drops parameters with the largest Ω = Σ_{i≠j} |∇ℓ_i| ⊙ |τ_j| "
               "(top 1 − q of the model), then θ₀ + λ·Σ τ.")
    reference_url = "https://openreview.net/forum?id=q3ztjJRQuJ"
    fusionbench_config = "trust_region/clip_task_arithmetic.yaml"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True, needs_data=True)  # labels: checked at run time (zero_shot reads none)

    @attrs.frozen
    class Config:
        scaling_factor: float | list[float] = option(
            0.3, help="λ: θ = θ₀ + λ·mask ⊙ Σ τ (FusionBench clip_task_arithmetic.yaml: 0.3); a list of distinct λ gives one model "
                      "per λ (reported as merged:<λ>), the mask computed once, as FusionBench's list", validator=_distinct)
        threshold_quantile: float = option(
            0.99, help="q: parameters whose Ω is at or above the q-quantile of the whole model are dropped (FusionBench: 0.99)",
            validator=in_range(0.0, 1.0))
        max_samples: int = option(128, help="training examples per task for the mean |gradient| (FusionBench: 128)",
                                  validator=positive)
        zero_shot: bool = option(False, help="no data: use |τ_i| in place of task i's mean |gradient| (FusionBench: false)")
        split: str = option("train", help="the model pool's data split the gradients are taken on (FusionBench: train)")

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        if isinstance(self.config.scaling_factor, (list, tuple)):  # a sweep: several models (the run program reads this)
            self.capabilities = attrs.evolve(type(self).capabilities, output="models")

    def run(self, pool: "ModelPool", ctx: "RunContext") -> "dict[str, torch.Tensor] | dict[str, dict[str, torch.Tensor]]":
        """The merged state dict; ``{f"{λ:g}": state dict}`` for a list of λ."""
        import torch

        cfg, names = self.config, list(pool.model_names)
        sensitivity: dict[str, dict[str, torch.Tensor]] = {}
        if not cfg.zero_shot:
            from fusion_core.adapters import get_classifier, require_data

            data = {n: require_data(pool, n, cfg.split, method=self.name) for n in names}
            base_model = prepare(pool.load_model(None), ctx.device)
            examples = {}
            for name in progress(ctx, names, "trust region: |gradients|", total=len(names), unit="task"):
                sensitivity[name], examples[name] = mean_abs_gradients(
                    base_model, data[name], get_classifier(ctx.taskpool, name), pool=pool, max_samples=cfg.max_samples,
                    device=ctx.device, task=name)
            note(ctx, self.name, examples=examples)
            del base_model
        readers = [pool.reader(None), *[pool.reader(n) for n in names]]
        sums, omegas, out = {}, {}, {}
        try:
            for key in readers[0].keys():
                base = readers[0].get(key)
                if not base.is_floating_point():
                    out[key] = base
                    continue
                taus = [r.get(key).to(base.dtype) - base for r in readers[1:]]
                magnitudes = [t.abs() for t in taus]
                grads = magnitudes if cfg.zero_shot else [
                    sensitivity[n].get(key, torch.zeros_like(base)).to("cpu", base.dtype) for n in names]
                omegas[key] = conflict(grads, magnitudes)
                total = taus[0].clone()
                for t in taus[1:]:
                    total += t
                sums[key], out[key] = total, base
        finally:
            for reader in readers:
                reader.close()
        if not omegas:
            raise InputError(f"method {self.name!r}: the models have no floating-point tensors to merge")
        threshold = quantile_threshold(omegas.values(), cfg.threshold_quantile)
        kept = entries = 0
        for key, omega in omegas.items():
            mask = omega < threshold
            sums[key] = sums[key] * mask
            kept, entries = kept + int(mask.sum()), entries + mask.numel()
        note(ctx, self.name, threshold=float(threshold), kept_fraction=kept / max(1, entries), zero_shot=cfg.zero_shot)
        if not isinstance(cfg.scaling_factor, (list, tuple)):
            return {**out, **{key: out[key] + cfg.scaling_factor * sums[key] for key in omegas}}
        return {f"{lam:g}": {**out, **{key: out[key] + lam * sums[key] for key in omegas}} for lam in cfg.scaling_factor}


METHODS = [TrustRegionTaskArithmetic]
