"""RankOne-MoE: routed rank-one experts from the task vectors' SVDs, routers trained by test-time adaptation.

WEMoE (:mod:`fusion_adaptive.wemoe`: target modules, task arithmetic elsewhere, entropy
adaptation of the routers on unlabelled test inputs) with other experts: for every 2-D
parameter ``W`` of an upscaled module and every task ``i``, the ``rank_k`` leading singular
components ``s_{i,r} u_{i,r} v_{i,r}ᵀ`` of the task vector ``τ_i(W)`` are experts; the router of
the module (one linear layer by default) gives one weight per (task, component), and

    W(x) = W₀ + Σᵢ Σ_r g_{i,r}(x) s_{i,r} u_{i,r} v_{i,r}ᵀ,

with the same weights for every 2-D parameter of the module.  Its other parameters (biases,
norms) are ``θ₀ + λ Σᵢ τᵢ`` with ``λ = init_lambda``, not routed.  ``select_k > 0`` softly keeps
the ``select_k`` largest router weights: ``g · sigmoid(100 (g − t))``, ``t`` the ``select_k``-th largest.
Closed form the tests check: with a router that outputs a constant ``λ`` and ``rank_k`` at least the
rank of every task vector, the module is task arithmetic with ``λ``.

Defaults follow FusionBench 0.2.33 (``CLIPRankOneMoEAlgorithm``, ``config/method/rankone_moe/
rankone_moe.yaml``, ``models/rankone_moe.py``): the MLP of every block, ``rank_k: 32``,
``select_k: -1`` (all), ``init_lambda: 0.3``, a linear router (``router_hidden_layers: 1``: weights
~ N(0, 0.01²), bias ``init_lambda``), ``batch_reduce: true``, Adam lr 1e-4, 1000 steps (with the
tasks' losses' gradients accumulated, as ``use_grad_accumulate``; the sum here has the same
gradient).  FusionBench hard-codes CLIP's ``fc1``/``fc2``; here any module's 2-D parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from fusion_core import Capabilities, in_range, option

from .wemoe import WEMoE

if TYPE_CHECKING:  # pragma: no cover
    import torch


def rank_one_factors(stacked: "torch.Tensor", rank: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``(u, s·v)`` stacked ``(N, rank, rows)`` and ``(N, rank, cols)``: the leading components of each ``(rows, cols)`` task vector."""
    import torch

    us, svs = [], []
    for tv in stacked:
        u, s, vh = torch.linalg.svd(tv, full_matrices=False)
        k = min(rank, s.numel())
        u_k, sv_k = u[:, :k].t(), s[:k, None] * vh[:k]
        pad = rank - k
        if pad:
            u_k = torch.cat([u_k, u_k.new_zeros(pad, u_k.shape[1])])
            sv_k = torch.cat([sv_k, sv_k.new_zeros(pad, sv_k.shape[1])])
        us.append(u_k)
        svs.append(sv_k)
    return torch.stack(us), torch.stack(svs)


class RankOneMoEMethod(WEMoE):
    """RankOne-MoE (Yang et al., 2025): WEMoE whose experts are the rank-one SVD components of the task vectors."""

    name = "rankone_moe"
    summary = "Upscales chosen modules into routed rank-one experts (top-k SVD components of each task vector); routers trained by entropy TTA."
    reference_url = "https://github.com/EnnengYang/RankOne-MoE"
    fusionbench_config = "rankone_moe/rankone_moe.yaml"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True, needs_data=True, trains=True, transductive=True, random=True)

    @attrs.frozen
    class Config(WEMoE.Config):
        router_hidden: int | None = option(
            0, help="hidden width of each router (0 = a linear router, FusionBench router_hidden_layers: 1; null = the module's input width)",
            validator=in_range(0, None)
        )
        rank_k: int = option(32, help="leading singular components of each task vector kept as experts, per parameter (FusionBench: 32)",
                             validator=in_range(1, None))
        select_k: int = option(-1, help="softly keep the select_k largest router weights of the N·rank_k (≤ 0: all, FusionBench -1)")

    def make_routers(self, targets: dict[str, Any], dims: dict[str, int], n: int, generator: "torch.Generator") -> dict[str, Any]:
        """WEMoE's routers with one output per (task, component): ``n · rank_k``."""
        return super().make_routers(targets, dims, n * self.config.rank_k, generator)

    def target_groups(self, model: Any) -> tuple[dict[str, Any], dict[str, str]]:
        """WEMoE's modules, each with a router of its own (no shared routing groups)."""
        return super().target_groups(model)[0], {}

    def make_layer(self, module: Any, experts: dict[str, "torch.Tensor"], router: Any, shared: Any = None) -> Any:
        from .layers import RankOneMoE

        factors, fixed = {}, {}
        for name, stacked in experts.items():
            if stacked.dim() == 3:
                factors[name] = rank_one_factors(stacked, self.config.rank_k)
            else:
                fixed[name] = stacked.sum(dim=0) * self.config.init_lambda
        return RankOneMoE(module, factors, fixed, router, select_k=self.config.select_k, batch_reduce=self.config.batch_reduce)


METHODS = [RankOneMoEMethod]
