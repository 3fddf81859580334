"""E-WEMoE: efficient weight-ensembling MoE — sparse task-vector experts and one router shared by every layer.

WEMoE (:mod:`fusion_adaptive.wemoe`) with two changes that cut its memory (Shen, Tang, Yang et al.,
2024): each expert keeps only the largest-magnitude entries of its task vector (per parameter tensor,
a fraction ``sparsity`` of the entries is set to 0), and every upscaled layer is routed by the same
router module, so the trainable parameters are those of one router whatever the depth.  The rest
(task arithmetic with ``init_lambda`` outside the upscaled modules, entropy test-time adaptation of
the router) is WEMoE's.

Defaults follow FusionBench 0.2.33 (``SparseCLIPWeightEnsemblingMoEAlgorithm``,
``config/method/wemoe/sparse_weight_ensembling_moe.yaml``, ``models/sparse_we_moe.py``):
``tv_prune_ratio: 0.9`` (the paper's 90 % row), ``shared_gate: true``, a two-layer router of the
layer's width (``router_hidden_layers: 2``) with weights ~ N(0, 0.01²) and last bias ``init_lambda``
0.3, ``batch_reduce: true``, Adam lr 1e-4, 1000 steps, no layer position encoding.  FusionBench's
pruning keeps the entries with ``|τ| > quantile(|τ|, ratio)`` (linear interpolation) in each
parameter tensor of each task vector, as here; at ratio 0 its quantile is the minimum, which drops the
smallest entry of every tensor — here ``sparsity: 0`` keeps every entry (exactly WEMoE).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from fusion_core import Capabilities, InputError, in_range, option

from .common import note
from .wemoe import WEMoE

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fusion_core import ModelPool, RunContext


def magnitude_threshold(magnitudes: "torch.Tensor", ratio: float) -> "torch.Tensor":
    """``quantile(magnitudes, ratio)`` with linear interpolation (``torch.quantile``'s), for tensors of any size.

    One selection (``kthvalue``) for the lower order statistic; the upper one is the least value above it.
    """
    import torch

    flat = magnitudes.flatten()
    q = ratio * (flat.numel() - 1)
    lo = int(q)
    hi = min(lo + 1, flat.numel() - 1)
    below = torch.kthvalue(flat, lo + 1).values
    above = below
    if hi != lo and int((flat <= below).sum()) < hi + 1:  # the next order statistic: the least value above ``below``
        above = flat[flat > below].min()
    return torch.lerp(below, above, torch.tensor(q - lo, dtype=flat.dtype, device=flat.device))


def magnitude_sparsify(tensor: "torch.Tensor", sparsity: float) -> "torch.Tensor":
    """``tensor`` with the entries whose magnitude is at most the ``sparsity`` quantile set to 0 (``sparsity`` 0: unchanged)."""
    if sparsity <= 0 or tensor.numel() == 0:
        return tensor
    magnitudes = tensor.abs()
    return tensor * (magnitudes > magnitude_threshold(magnitudes, sparsity))


def moe_statistics(model: Any) -> dict[str, int]:
    """Parameter counts and bytes of a routed model: total, router, base, expert entries (all and kept)."""
    from .layers import WeightEnsemblingMoE

    layers = [m for m in model.modules() if isinstance(m, WeightEnsemblingMoE)]
    routed = [layer for layer in layers if layer.router is not None]
    routers = {id(p): p for layer in routed for p in layer.router.parameters()}
    experts = [layer.expert(name) for layer in layers for name in layer.param_names]
    params = {id(p): p for p in model.parameters()}
    expert_entries = sum(e.numel() for e in experts)
    kept = sum(int((e != 0).sum()) for e in experts)
    expert_bytes = sum(e.numel() * e.element_size() for e in experts)
    element = experts[0].element_size() if experts else 4
    return {
        "parameters_total": sum(p.numel() for p in params.values()) + expert_entries,
        "router_parameters": sum(p.numel() for p in routers.values()),
        "routers": len({id(layer.router) for layer in routed}),
        "expert_entries": expert_entries,
        "expert_entries_kept": kept,
        "memory_bytes": sum(p.numel() * p.element_size() for p in params.values()) + expert_bytes,
        "expert_bytes_dense": expert_bytes,
        "expert_bytes_sparse": kept * (element + 8),  # (int64 flat index, value) pairs
    }


class EWEMoE(WEMoE):
    """Efficient WEMoE (Shen, Tang, Yang et al., 2024): WEMoE with sparse experts and one shared router.

    Duration: as WEMoE (a forward and backward pass per task each step; on ``mini`` about 1.3 s per
    step, 100 steps and the evaluation in 139 s in the leaderboard's run of 2026-12-01 on the idle
    machine, so about 22 min of one core for the default 1000 steps); the experts are stored
    dense with zeros, and ``expert_bytes_sparse`` in the report is what an (index, value) storage of
    the kept entries would take.  The shared router needs every upscaled module to take inputs of
    the same width (the blocks of one transformer do).
    """

    name = "e_wemoe"
    summary = "WEMoE with magnitude-sparsified task-vector experts and one router shared across layers (entropy TTA)."
    reference_url = "https://arxiv.org/abs/2410.21804"
    fusionbench_config = "wemoe/sparse_weight_ensembling_moe.yaml"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True, needs_data=True, trains=True, transductive=True, random=True)

    @attrs.frozen
    class Config(WEMoE.Config):
        sparsity: float = option(
            0.9, help="fraction of each task-vector tensor set to 0 in the experts, smallest magnitudes first "
                      "(FusionBench tv_prune_ratio 0.9; 0 = dense experts, WEMoE)", validator=in_range(0.0, 1.0, hi_open=True)
        )
        shared_router: bool = option(True, help="one router for every upscaled layer (FusionBench shared_gate); false = one per layer")

    def make_routers(self, targets: dict[str, Any], dims: dict[str, int], n: int, generator: "torch.Generator") -> dict[str, Any]:
        """One router for all targets (``shared_router``), else WEMoE's one per target."""
        if not self.config.shared_router:
            return super().make_routers(targets, dims, n, generator)
        widths = sorted(set(dims.values()))
        if len(widths) > 1:
            shown = ", ".join(f"{t} ({dims[t]})" for t in list(targets)[:6])
            raise InputError(
                f"method {self.name!r}: a shared router needs upscaled modules with one input width, these have "
                f"{widths}: {shown}; choose target_modules of one width or set method.shared_router=false"
            )
        first = next(iter(targets))
        shared = super().make_routers({first: targets[first]}, dims, n, generator)[first]
        return {t: shared for t in targets}

    def expert_tensor(self, stacked: "torch.Tensor") -> "torch.Tensor":
        """Each expert's task vector for this parameter, magnitude-sparsified on its own."""
        import torch

        return torch.stack([magnitude_sparsify(v, self.config.sparsity) for v in stacked])

    def run(self, pool: "ModelPool", ctx: "RunContext") -> Any:
        model = super().run(pool, ctx)
        note(ctx, self.name, sparsity=self.config.sparsity, shared_router=self.config.shared_router, **moe_statistics(model))
        return model


METHODS = [EWEMoE]
