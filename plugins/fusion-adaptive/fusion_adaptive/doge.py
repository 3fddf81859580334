"""DOGE: task arithmetic with a shared delta learned by adaptive projective gradient descent (data-free).

"Modeling Multi-Task Model Merging as Adaptive Projective Gradient Descent" (Wei et al., 2025).
Per linear-layer weight (``(out, in)``), with task vectors ``τᵢ`` and adaptive scales
``λᵢ = lamda / ‖τᵢ‖`` (per layer):

- A *shared subspace*: the top ``⌊r/N⌋`` left singular vectors of each ``τᵢ`` (r = min(out, in)),
  put side by side and orthogonalised by a second SVD, of which the top ``⌊r/subspace⌋`` are kept
  (``P``: the projector on them).
- A delta ``Δ`` (starting at 0) minimises a data-free proxy of each task's loss gap, the
  squared row-wise agreement between ``τⱼ`` and what the merge misses of it:
  ``Σⱼ Σ_rows (Σ_cols τⱼ ⊙ (τⱼ − Σᵢ λᵢ τᵢ − (Σᵢ λᵢ) Δ))²``, by Adam with each gradient projected
  off the shared subspace (``g ← g − P g``).  With ``reproject`` (fuse's earlier default) the
  iterate is also put back off it after each step (``Δ ← Δ − PΔ``); FusionBench projects the
  gradient only (``reproject: false``, the default).
- The merge: ``θ = θ₀ + Σᵢ λᵢ ((τᵢ + Δ) ⊙ maskᵢ)``, with ``maskᵢ`` the entries of ``|τᵢ|`` at or
  above the ``(n − ⌊n·keep/100⌋)``-th smallest over all linear weights of model ``i`` (FusionBench's
  ``topk_values_mask``: ``kthvalue`` and ``>=``).

Other tensors (biases, norms, embeddings) are merged by task arithmetic with scale
``other_scaling``: 0 (default) keeps them at the base as FusionBench 0.2.33 does
(``DOGE_TA_Algorithm``, ``config/method/doge_ta/doge_ta.yaml``); fuse's earlier default was 0.3.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import attrs

from fusion_core import Capabilities, in_range, option, positive

from .common import AdaptiveMethod, check_finite, float_params, note, prepare, progress, state_with, task_vector
from .modules import key as pkey
from .modules import linear_layers, weight_out_in

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fusion_core import ModelPool, RunContext


def shared_projection(vectors: "torch.Tensor", subspace: int) -> "torch.Tensor":
    """``(out, out)`` projector on the shared subspace of ``vectors`` (``(N, out, in)``)."""
    import torch

    n, out, inner = vectors.shape
    r = min(out, inner)
    per_task = max(1, r // n)
    columns = []
    for i in range(n):
        u, _, _ = torch.linalg.svd(vectors[i].double(), full_matrices=False)
        columns.append(u[:, :per_task])
    uu, _, _ = torch.linalg.svd(torch.cat(columns, dim=1), full_matrices=False)
    k = min(r // subspace, uu.shape[1])
    basis = uu[:, :k]
    return (basis @ basis.t()).to(vectors.dtype)


def delta_loss(vectors: "torch.Tensor", scales: "torch.Tensor", delta: "torch.Tensor") -> "torch.Tensor":
    """``Σⱼ Σ_rows (Σ_cols τⱼ ⊙ (τⱼ − Σᵢ λᵢ τᵢ − (Σᵢ λᵢ) Δ))²`` for ``vectors`` ``(N, out, in)``."""
    merged = (vectors * scales.view(-1, 1, 1)).sum(dim=0) + scales.sum() * delta
    gap = vectors - merged.unsqueeze(0)
    return (vectors * gap).sum(dim=2).pow(2).sum()


def optimize_delta(vectors: "torch.Tensor", scales: "torch.Tensor", projection: "torch.Tensor", *, steps: int, lr: float,
                   method: str = "doge", reproject: bool = False) -> tuple["torch.Tensor", list[float]]:
    """Adam on :func:`delta_loss` with gradients projected off ``projection``'s subspace; returns (Δ, losses).

    With ``reproject`` ``Δ`` itself is projected after each step too (``Δ ← Δ − PΔ``): Adam's
    per-coordinate scaling would otherwise move it into the shared subspace (FusionBench
    projects the gradient only).
    """
    import torch

    delta = torch.zeros_like(vectors[0], requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=lr)
    history = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = delta_loss(vectors, scales, delta)
            check_finite(loss, step, method=method)
            loss.backward()
        with torch.no_grad():
            delta.grad -= projection @ delta.grad
        optimizer.step()
        if reproject:
            with torch.no_grad():  # Adam rescales coordinates: put the iterate back off the shared subspace
                delta -= projection @ delta
        history.append(float(loss.detach()))
    return delta.detach(), history


def top_fraction_masks(vectors: Sequence["torch.Tensor"], keep: float) -> list["torch.Tensor"]:
    """Per tensor, ``|t| ≥`` the ``(n − ⌊n·keep/100⌋)``-th smallest ``|t|`` of all of them together (FusionBench's rule)."""
    import torch

    if keep >= 100:
        return [torch.ones_like(v, dtype=torch.bool) for v in vectors]
    flat = torch.cat([v.abs().reshape(-1) for v in vectors])
    dropped = flat.numel() - int(flat.numel() * keep / 100)
    if dropped <= 0:
        return [torch.ones_like(v, dtype=torch.bool) for v in vectors]
    threshold = flat.kthvalue(dropped).values
    return [v.abs() >= threshold for v in vectors]


class DOGE(AdaptiveMethod):
    """DOGE-TA (Wei et al., 2025), data-free."""

    name = "doge"
    summary = "Task arithmetic with adaptive per-layer scales and a delta learned off the tasks' shared subspace (projective GD, data-free)."
    reference_url = "https://arxiv.org/abs/2501.01230"
    fusionbench_config = "doge_ta/doge_ta.yaml"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True, trains=True)

    @attrs.frozen
    class Config:
        lamda: float = option(0.07, help="λᵢ = lamda / ‖τᵢ‖ per layer (the adaptive task-arithmetic scale)", validator=positive)
        subspace: int = option(6, help="the shared subspace keeps min(out, in) / subspace directions per layer", validator=positive)
        keep: float = option(30.0, help="percent of each task vector's largest linear-weight entries kept (100 = all)", validator=in_range(0.0, 100.0, lo_open=True))
        steps: int = option(400, help="Adam steps on the delta, per layer", validator=in_range(0, None))
        lr: float = option(1e-4, help="Adam learning rate of the delta", validator=positive)
        other_scaling: float = option(0.0, help="task-arithmetic scale of the tensors that are not linear weights (0 = keep the base's, "
                                                "FusionBench; fuse's earlier default 0.3)")
        reproject: bool = option(False, help="also project Δ itself off the shared subspace after each Adam step (fuse's earlier "
                                             "default; FusionBench projects the gradient only)")

    def run(self, pool: "ModelPool", ctx: "RunContext") -> dict[str, "torch.Tensor"]:
        import torch

        cfg, names = self.config, list(pool.model_names)
        base = prepare(pool.load_model(None), ctx.device)
        base_params = float_params(base)
        layers = {pkey(n, "weight"): m for n, m in linear_layers(base).items() if pkey(n, "weight") in base_params}
        vectors = [task_vector(pool, n, base_params, method=self.name, device=ctx.device) for n in names]
        deltas, scales, losses = {}, {}, {}
        for key in progress(ctx, list(layers), f"projective descent ({self.name})", total=len(layers), unit="layer"):
            module = layers[key]
            stacked = torch.stack([weight_out_in(module, v[key]) for v in vectors])
            norms = stacked.flatten(1).norm(dim=1)
            lam = torch.where(norms > 0, cfg.lamda / torch.where(norms > 0, norms, torch.ones_like(norms)), torch.zeros_like(norms))
            projection = shared_projection(stacked, cfg.subspace)
            delta, history = optimize_delta(stacked, lam, projection, steps=cfg.steps, lr=cfg.lr, method=self.name,
                                            reproject=cfg.reproject)
            deltas[key], scales[key] = weight_out_in(module, delta), lam
            if history:
                losses[key] = (history[0], history[-1])
        merged = {}
        with torch.no_grad():
            for i, vector in enumerate(vectors):
                masks = dict(zip(layers, top_fraction_masks([vector[k] for k in layers], cfg.keep), strict=True))
                for key, value in vector.items():
                    if key in layers:
                        term = scales[key][i] * (value + deltas[key]) * masks[key]
                    else:
                        term = cfg.other_scaling * value
                    merged[key] = merged[key] + term if key in merged else term
            state = state_with(base, {k: base_params[k] + merged[k] for k in merged})
        note(ctx, self.name, layers=len(layers), loss_first_last=losses)
        return state


METHODS = [DOGE]
