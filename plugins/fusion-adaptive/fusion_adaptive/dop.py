"""DOP: "Continual Model Merging without Data: Dual Projections for Balancing Stability and Plasticity" (NeurIPS 2025).

The models arrive one at a time (the loop of :class:`fusion_adaptive.continual.ContinualMethod`).
The first merged model is the first fine-tuned model.  When model ``t`` arrives, every linear
layer's weight ``W`` (``(out, in)``) is found by a small optimisation between two "tasks": the
merged model so far (``W₁``, its task vector ``τ₁ = W₁ − W₀``) and the new model (``W₂``,
``τ₂``).  For each, ``τ_i = U_i S_i V_iᵀ`` truncated to the leading ``r_i`` singular values,
``r_i`` = the first index where the cumulative share of ``ΣS`` reaches ``svd_epsilon``, and

    L_i(W) = ‖S_i U_iᵀ (W − W_i)‖²_F + ‖(W − W_i) V_i S_i‖²_F      (svd_proj_space: uv; u / v: one term)

keeps ``W`` close to ``W_i`` within the input and output subspaces model ``i`` uses (stability
for ``i = 1``, plasticity for ``i = 2``).  Starting from ``(W₁ + W₂)/2``, ``num_steps`` Adam steps
(``lr``) descend ``c₁ L₁ + c₂ L₂``.  With ``mgda`` the weights ``(c₁, c₂)`` are the min-norm point of
the two loss-normalised gradients ``∇L_i / L_i`` (the two-task MGDA of Sener & Koltun, 2018, in
closed form: ``c₁ = (g₂·g₂ − g₁·g₂) / ‖g₁ − g₂‖²``, 0.999 / 0.001 at the ends) smoothed by an EMA
from ``(alpha, 1 − alpha)`` with decay ``ema_beta`` (``ema``; restarted for every layer); without
``mgda`` they are ``(alpha, 1 − alpha)``.  The gradients are the closed forms
``∇L_i = 2 (U_i S_i²U_iᵀ Δ_i + Δ_i V_i S_i² V_iᵀ)``, ``Δ_i = W − W_i``.

Closed forms the tests check: with ``mgda: false`` and ``τ₂ = −τ₁`` (the same subspaces and
singular values) the result is the ``alpha``-weighted mean of ``W₁`` and ``W₂`` as seen through
those subspaces (``U_rᵀ W`` and ``W V_r``; Adam may drift in directions neither model uses); a
layer where both models agree does not move; the gradients are autograd's.

Every other parameter of a module without children (biases, norms, embeddings) is the plain
mean of the merged and the new model (FusionBench averages the two, not the running mean);
parameters held directly by a module with children (CLIP's ``class_embedding``) are the base's
after the first step, as FusionBench's ``ContinualDOPForCLIP`` leaves them
(``non_leaf: base``; ``average`` treats them as the others).  Defaults are FusionBench 0.2.33's
``config/method/dop/dop.yaml``.  Differences: FusionBench optimises ``nn.Linear`` only (a GPT-2
``Conv1D`` is averaged there; here it is optimised in its ``(out, in)`` view), and a zero loss
(a model identical to the merged one) normalises by 1 where FusionBench divides by zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs

from fusion_core import Capabilities, in_range, option, positive

from .continual import ContinualMethod, evaluate_option, order_seed_option, shuffle_option
from .modules import key as pkey
from .modules import linear_layers, weight_out_in
from .opcm import non_leaf_parameters

if TYPE_CHECKING:  # pragma: no cover
    import torch


def principal_factors(delta: "torch.Tensor", epsilon: float) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``(U_r S_r, V_r S_r)`` of ``delta``: ``r`` = the first index where ``cumsum(S)/ΣS`` reaches ``epsilon``."""
    import torch

    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    if s.numel() == 0 or float(s.sum()) == 0.0:
        return u[:, :0], vh.t()[:, :0]
    share = s.cumsum(dim=0) / s.sum()
    rank = int(torch.searchsorted(share, torch.tensor(min(epsilon, 1.0), dtype=share.dtype)))
    return u[:, :rank] * s[:rank], vh[:rank].t() * s[:rank]


def projected_loss(delta: "torch.Tensor", us: "torch.Tensor", vs: "torch.Tensor", space: str) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``L`` and ``∇L`` of ``‖(US)ᵀΔ‖² + ‖Δ(VS)‖²`` (``space``: ``uv``, ``u`` or ``v``) at ``Δ``."""
    import torch

    loss = delta.new_zeros(())
    grad = torch.zeros_like(delta)
    if space in ("uv", "u"):
        left = us.t() @ delta
        loss = loss + (left * left).sum()
        grad = grad + 2 * (us @ left)
    if space in ("uv", "v"):
        right = delta @ vs
        loss = loss + (right * right).sum()
        grad = grad + 2 * (right @ vs.t())
    return loss, grad


def min_norm_pair(g1: "torch.Tensor", g2: "torch.Tensor") -> tuple[float, float]:
    """The weights ``(c, 1 − c)``, ``c ∈ [0.001, 0.999]``, of the min-norm point of the segment [g1, g2]."""
    v11, v12, v22 = (g1 * g1).sum(), (g1 * g2).sum(), (g2 * g2).sum()
    if v12 >= v11:
        return 0.999, 1 - 0.999
    if v12 >= v22:
        return 0.001, 1 - 0.001
    c = -1.0 * ((v12 - v22) / (v11 + v22 - 2 * v12))
    return float(c), float(1 - c)


class DOP(ContinualMethod):
    """Dual orthogonal projections: each linear layer balances the merged and the new model in their own subspaces."""

    name = "dop"
    summary = "Continual merging by dual orthogonal projections: per layer, Adam on subspace-projected distances to the merged and new models, MGDA weights."
    reference_url = "https://github.com/tanganke/fusion_bench/tree/main/fusion_bench/method/dop"  # the NeurIPS 2025 paper's code
    fusionbench_config = "dop/dop.yaml"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True)

    @attrs.frozen
    class Config:
        lr: float = option(1e-4, help="Adam learning rate of each layer's optimisation (FusionBench: 1e-4)", validator=positive)
        num_steps: int = option(200, help="Adam steps per linear layer and arriving model (FusionBench: 200)", validator=in_range(0, 100_000))
        mgda: bool = option(True, help="weigh the two losses by the min-norm point of their loss-normalised gradients (MGDA); "
                                       "false: fixed weights (alpha, 1 − alpha)")
        alpha: float = option(0.8, help="weight of the merged model's loss (mgda: false), or the EMA's starting value (mgda, ema)",
                              validator=in_range(0.0, 1.0))
        ema: bool = option(True, help="smooth the MGDA weights by an exponential moving average (restarted for every layer)")
        ema_beta: float = option(0.999, help="the EMA's decay", validator=in_range(0.0, 1.0))
        svd_epsilon: float = option(0.99999, help="share of the singular-value mass of each task vector whose subspace is protected",
                                    validator=in_range(0.0, 1.0))
        svd_proj_space: Literal["uv", "u", "v"] = option("uv", help="project the weight difference on the left (u), right (v) or "
                                                                    "both (uv) singular subspaces")
        non_leaf: Literal["base", "average"] = option(
            "base", help="parameters held directly by modules with children (CLIP's class_embedding): 'base' = the base's value "
                         "after the first step (FusionBench); 'average' = the mean of the merged and the new model"
        )
        shuffle: bool = shuffle_option()
        order_seed: int | None = order_seed_option()
        evaluate_every_step: bool = evaluate_option()

    def begin(self, model: Any) -> None:
        self._layers = {pkey(n, "weight"): m for n, m in linear_layers(model).items()}
        self._fixed = non_leaf_parameters(model) if self.config.non_leaf == "base" else set()
        self._optimized = 0

    def optimize(self, w0: "torch.Tensor", w1: "torch.Tensor", w2: "torch.Tensor") -> "torch.Tensor":
        """The merged ``(out, in)`` weight between ``w1`` (merged so far) and ``w2`` (new), base ``w0``."""
        import torch

        cfg = self.config
        factors = [principal_factors(w - w0, cfg.svd_epsilon) for w in (w1, w2)]
        weight = torch.nn.Parameter((w1 + w2) / 2)
        optimizer = torch.optim.Adam([weight], lr=cfg.lr)
        ema = (cfg.alpha, 1 - cfg.alpha)
        with torch.enable_grad():
            for _ in range(cfg.num_steps):
                losses, grads = zip(*(projected_loss(weight.detach() - w, us, vs, cfg.svd_proj_space)
                                      for w, (us, vs) in zip((w1, w2), factors, strict=True)), strict=True)
                if cfg.mgda:
                    normalized = [g / (float(loss) if float(loss) != 0.0 else 1.0) for g, loss in zip(grads, losses, strict=True)]
                    weights = min_norm_pair(*normalized)
                    if cfg.ema:
                        ema = tuple(cfg.ema_beta * e + (1 - cfg.ema_beta) * c for e, c in zip(ema, weights, strict=True))
                        weights = ema
                else:
                    weights = (cfg.alpha, 1 - cfg.alpha)
                weight.grad = weights[0] * grads[0] + weights[1] * grads[1]
                optimizer.step()
        return weight.detach()

    def step(self, t, merged, params, base):
        import torch

        if merged is None:
            self._optimized = 0
            return {k: v.clone() for k, v in params.items()}
        out = {}
        self._optimized = 0
        for key in params:
            if key in self._fixed:
                out[key] = base[key].clone()
            elif key in self._layers and params[key].dim() == 2:
                module = self._layers[key]
                dtype = params[key].dtype  # half precision is optimised in float32
                work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
                view = [weight_out_in(module, x).to(work) for x in (base[key], merged[key], params[key])]
                out[key] = weight_out_in(module, self.optimize(*view)).to(dtype).contiguous()
                self._optimized += 1
            else:
                out[key] = (merged[key] + params[key]) / 2
        return out

    def facts(self) -> dict[str, Any]:
        return {"layers_optimized": self._optimized}


METHODS = [DOP]
