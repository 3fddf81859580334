"""TALL masks and consensus merging (Wang et al., 2024, "Localizing Task Information for Improved
Model Merging and Compression", arXiv 2405.07813).

With task vectors ``τ_t = θ_t − θ₀`` and the multi-task vector ``τ_MTL = Σ_t τ_t``, the TALL mask of
task ``t`` keeps the entries where the task's own vector outweighs what the others add:

    m_t = |τ_t| > λ · |τ_MTL − τ_t|

(the official release and FusionBench 0.2.33 ``tall_mask/utils.generate_task_masks`` compare with
``>``; the paper writes ``≥``, the two differ only where both sides are equal).  **Consensus**
merging keeps the entries that at least ``k`` tasks deem relevant and drops the rest ("selfish"
weights, relevant to one task, and "catastrophic" ones, relevant to none), then merges:

    θ = θ₀ + α · (Σ_t m_t ≥ k) ⊙ Σ_t τ_t        (consensus task arithmetic)

Each entry is decided on its own, so the kernel is element-wise (the engine may hand it row
blocks).  ``tall_masks`` returns the per-task reconstructions θ₀ + m_t ⊙ τ_MTL (one model per task,
each scored on every task, as FusionBench's program does; ``score: own`` scores each task with its
own reconstruction, the paper's compression setting and a row beside the merges on a leaderboard).  FusionBench 0.2.33 has TALL masks (``TallMaskTaskArithmeticAlgorithm``,
the same reconstructions) but no consensus method; its
``TallMaskTaskArithmeticAlgorithm`` passes the pretrained *weights* where the pretrained task
vector (zero) belongs, so it compares ``|θ₀ − τ_t|`` rather than ``|τ_t|`` (a peer defect; the
masks here follow ``generate_task_masks`` in ``tall_mask/utils.py`` and the paper).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs

from fusion_core import Capabilities, KernelContext, Method, in_range, option

from .task_arithmetic import _TaskVectorMethod, add_scaled, linear_merge, task_vectors

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fusion_core import ModelPool, RunContext


def tall_masks(deltas: Sequence["torch.Tensor"], tall_mask_lambda: float) -> list["torch.Tensor"]:
    """Per task, ``|τ_t| > λ·|τ_MTL − τ_t|`` with ``τ_MTL = Σ τ`` (boolean tensors)."""
    total = deltas[0].clone()
    for d in deltas[1:]:
        total += d
    return [d.abs() > (total - d).abs() * tall_mask_lambda for d in deltas]


def consensus_mask(masks: Sequence["torch.Tensor"], min_agreement: int) -> "torch.Tensor":
    """True where at least ``min_agreement`` of the masks are set."""
    import torch

    count = torch.zeros(masks[0].shape, dtype=torch.int32, device=masks[0].device)
    for m in masks:
        count += m
    return count >= min_agreement


def _lambda_option():
    return option(
        0.6, help="λ of the TALL masks |τ_t| > λ·|τ_MTL − τ_t| (FusionBench tall_mask/task_arithmetic.yaml: 0.6; "
                  "the paper picks it per task from 0.2…0.6 on validation data)",
        validator=in_range(0.0),
    )


class ConsensusTaskArithmetic(_TaskVectorMethod):
    """Task arithmetic restricted to the entries that at least k TALL masks keep."""

    name = "consensus_ta"
    summary = "Consensus task arithmetic: TALL masks per task, keep entries ≥ k tasks find relevant, then θ₀ + α·Σ τ."
    reference_url = "https://arxiv.org/abs/2405.07813"
    fusionbench_config = "tall_mask/task_arithmetic.yaml"
    elementwise = True

    @attrs.frozen
    class Config:
        tall_mask_lambda: float = _lambda_option()
        min_agreement: int = option(
            2, help="k: keep entries that at least k task masks keep (the paper's consensus uses k = 2; k = 1 only drops "
                    "weights no task needs; k = 0 keeps everything = task arithmetic)",
            validator=in_range(0),
        )
        scaling_factor: float = option(0.3, help="α: θ = θ₀ + α·consensus ⊙ Σ wᵢτᵢ (FusionBench's task arithmetic: 0.3)")
        weights: list[float] | None = option(
            None, help="one weight wᵢ per model in the merge Σ wᵢτᵢ (the masks use the plain Σ τ); default 1 each")

    def kernel(self, name: str, base: "torch.Tensor | None", tensors: Sequence["torch.Tensor"], ctx: KernelContext) -> "torch.Tensor":
        deltas = task_vectors(base, tensors)
        keep = consensus_mask(tall_masks(deltas, self.config.tall_mask_lambda), self.config.min_agreement)
        merged = linear_merge(deltas, self._weights(len(deltas))) * keep
        return add_scaled(base, merged, self.config.scaling_factor)


class TallMasks(Method):
    """TALL masks as compression: one model per task, θ₀ + m_t ⊙ τ_MTL (FusionBench ``TallMaskTaskArithmeticAlgorithm``)."""

    name = "tall_masks"
    summary = "TALL masks: one model per task, θ₀ + m_t ⊙ Σ τ with m_t = |τ_t| > λ·|Σ τ − τ_t|; scored on every task or its own."
    reference_url = "https://arxiv.org/abs/2405.07813"
    fusionbench_config = "tall_mask/task_arithmetic.yaml"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True, output="models")
    min_models: ClassVar[int] = 1

    @attrs.frozen
    class Config:
        tall_mask_lambda: float = _lambda_option()
        score: Literal["every", "own"] = option(
            "every", help="every: each reconstruction is a model scored on every task (FusionBench); own: each task is scored "
                          "with its own reconstruction θ₀ + m_t ⊙ τ_MTL (the paper's compression; the run keeps the first "
                          "model's reconstruction)")

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        if self.config.score == "own":  # the run program reads the instance's output kind
            self.capabilities = attrs.evolve(type(self).capabilities, output="per_task")

    def run(self, pool: "ModelPool", ctx: "RunContext") -> Any:
        """``{task: state dict}`` (every task model is held, as FusionBench), tensor by tensor from the pool's readers;
        ``score: own``: the same reconstructions as :class:`~fusion_core.adapters.PerTaskModels`."""
        import torch

        names = list(pool.model_names)
        base = pool.reader(None)
        readers = [pool.reader(n) for n in names]
        dtype = getattr(torch, ctx.compute_dtype)
        out: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
        kept, entries = [0] * len(names), 0
        try:
            for key in base.keys():
                b = base.get(key)
                if not b.is_floating_point():
                    for n in names:
                        out[n][key] = b
                    continue
                b = b.to(dtype)
                taus = [r.get(key).to(dtype) - b for r in readers]
                masks = tall_masks(taus, self.config.tall_mask_lambda)
                total = linear_merge(taus, [1.0] * len(taus))
                for i, (n, m) in enumerate(zip(names, masks, strict=True)):
                    out[n][key] = b + total * m
                    kept[i] += int(m.sum())
                entries += b.numel()
        finally:
            for reader in [base, *readers]:
                reader.close()
        ctx.extras.setdefault(self.name, {}).update(mask_density={n: k / max(1, entries) for n, k in zip(names, kept, strict=True)})
        if self.config.score == "own":
            from fusion_core.adapters import PerTaskModels

            return PerTaskModels(out[names[0]], out.__getitem__, names)
        return out


METHODS = [ConsensusTaskArithmetic, TallMasks]
