"""EMR-Merging: Elect, Mask & Rescale (Huang et al., 2024, arXiv 2405.17461).

With task vectors ``τ_t = θ_t − θ₀`` (FusionBench 0.2.33 ``emr_merging/utils.emr_merge``):

- **elect**: the unified sign ``γ = sign(Σ_t τ_t)``, a zero sum counting as −1 (FusionBench's
  ``(x > 0)·2 − 1``), and the unified task vector ``τ_uni = γ ⊙ max_t |τ_t|`` over the tasks
  whose entry agrees with γ (``τ_t·γ > 0``; 0 where none agrees);
- **mask**: per task ``M_t = (τ_t ⊙ γ > 0)``;
- **rescale**: per task ``λ_t = Σ_tensors mean|τ_t| / Σ_tensors mean|M_t ⊙ τ_uni|`` (sums over
  tensors of per-tensor means, as FusionBench).

Task ``t``'s model is ``θ₀ + λ_t · M_t ⊙ τ_uni`` (FusionBench's ``EMRModulatedModel`` with task
``t``'s modulator applied).  ``fuse run`` scores each task with its own modulated model (the output
is of kind ``per_task``: the masks are kept, one byte per weight per task, and task ``t``'s model is
built when its turn comes); the unified model ``θ₀ + τ_uni`` is what is saved, and what
``fuse merge emr_merging`` writes.  The modulators' summary (``λ_t`` and each mask's density) is in
the run report's ``method_extras``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from fusion_core import Capabilities, KernelContext

from .task_arithmetic import _TaskVectorMethod, task_vectors

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fusion_core import ModelPool, RunContext
    from fusion_core.adapters import PerTaskModels


def emr_elect(deltas: Sequence["torch.Tensor"]) -> tuple["torch.Tensor", list["torch.Tensor"]]:
    """``(τ_uni, [M_t])`` of one tensor: elected sign (zero sum → −1), agreeing masks, largest agreeing magnitude."""
    import torch

    total = deltas[0].clone()
    for d in deltas[1:]:
        total += d
    gamma = torch.where(total > 0, 1.0, -1.0).to(total.dtype)
    masks = [d * gamma > 0 for d in deltas]
    largest = torch.zeros_like(total)
    for d, m in zip(deltas, masks, strict=True):
        largest = torch.maximum(largest, (d * m).abs())
    return largest * gamma, masks


class _Rescalers:
    """Running Σ over tensors of mean|τ_t| and mean|M_t ⊙ τ_uni|, per task; and the modulators (base, τ_uni, masks) per tensor."""

    def __init__(self) -> None:
        self.task: list[float] = []
        self.masked: list[float] = []
        self.kept: list[int] = []
        self.entries = 0
        self.modulators: dict[str, tuple["torch.Tensor", "torch.Tensor", list["torch.Tensor"]]] = {}

    def keep(self, name: str, base: "torch.Tensor", unified: "torch.Tensor", masks: Sequence["torch.Tensor"]) -> None:
        self.modulators[name] = (base, unified, list(masks))

    def rescaler(self, index: int) -> float:
        return self.task[index] / self.masked[index] if self.masked[index] else float("nan")

    def task_state(self, merged: Mapping[str, "torch.Tensor"], index: int) -> dict[str, "torch.Tensor"]:
        """Task ``index``'s model: ``θ₀ + λ_t · M_t ⊙ τ_uni`` on every merged float tensor, the rest as merged."""
        scale = self.rescaler(index)
        scale = 0.0 if math.isnan(scale) else scale  # no entry agrees with γ anywhere: M_t = 0, θ₀ (FusionBench: NaN)
        out = dict(merged)
        for name, (base, unified, masks) in self.modulators.items():
            out[name] = (base + unified * masks[index] * scale).to(merged[name].dtype)
        return out

    def add(self, deltas: Sequence["torch.Tensor"], unified: "torch.Tensor", masks: Sequence["torch.Tensor"]) -> None:
        if not self.task:
            self.task.extend([0.0] * len(deltas))
            self.masked.extend([0.0] * len(deltas))
            self.kept.extend([0] * len(deltas))
        for i, (d, m) in enumerate(zip(deltas, masks, strict=True)):
            self.task[i] += float(d.abs().mean())
            self.masked[i] += float((unified * m).abs().mean())
            self.kept[i] += int(m.sum())
        self.entries += unified.numel()

    def summary(self, names: Sequence[str]) -> dict[str, Any]:
        return {
            "rescalers": {n: self.rescaler(i) for i, n in enumerate(names)},
            "mask_density": {n: k / max(1, self.entries) for n, k in zip(names, self.kept, strict=True)},
        }


class EmrMerging(_TaskVectorMethod):
    """EMR-Merging: the unified task vector (elect), and per task its mask and rescaler applied at evaluation."""

    name = "emr_merging"
    summary = "EMR-Merging: elected sign, largest agreeing magnitude (θ₀ + τ_uni); each task scored with θ₀ + λ_t·M_t ⊙ τ_uni."
    reference_url = "https://arxiv.org/abs/2405.17461"
    fusionbench_config = "emr_merging/emr_merging.yaml"
    elementwise = False  # the rescalers average whole tensors
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True, output="per_task")

    @attrs.frozen
    class Config:
        """FusionBench 0.2.33 ``emr_merging.yaml`` has no parameters; neither has this."""

    _stats: _Rescalers | None = None

    def kernel(self, name: str, base: "torch.Tensor | None", tensors: Sequence["torch.Tensor"], ctx: KernelContext) -> "torch.Tensor":
        deltas = task_vectors(base, tensors)
        unified, masks = emr_elect(deltas)
        if self._stats is not None:
            self._stats.add(deltas, unified, masks)
            self._stats.keep(name, base.clone(), unified, masks)
        return base + unified

    def run(self, pool: "ModelPool", ctx: "RunContext") -> "PerTaskModels":
        """The unified model, and each task's modulated model built on demand (see the module docstring)."""
        from fusion_core.adapters import PerTaskModels

        stats = self._stats = _Rescalers()
        try:
            merged = super().run(pool, ctx)
        finally:
            self._stats = None
        names = list(pool.model_names)
        ctx.extras.setdefault(self.name, {}).update(stats.summary(names))
        return PerTaskModels(merged, lambda task: stats.task_state(merged, names.index(task)), names)


METHODS = [EmrMerging]
