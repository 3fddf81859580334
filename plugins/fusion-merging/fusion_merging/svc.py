"""Singular value calibration (SVC): "When Shared Knowledge Hurts: Spectral Over-Accumulation in Model
Merging" (arXiv 2602.05536), as a wrapper around any merge method.

The base method merges first; then every 2-D tensor of its result is calibrated against the
experts.  With ``ΔM = M − θ₀ = U diag(S) Vᵀ`` (thin SVD) and task matrices ``ΔW_i = θ_i − θ₀``,
the responses along the merged model's left singular direction ``u_r`` are
``a_r = u_rᵀ ΔM = S_r v_rᵀ`` and ``a_r^i = u_rᵀ ΔW_i``.  How much the merge over-counts task ``i``
there is the projection coefficient ``s_r^i = ⟨a_r, a_r^i⟩ / ‖a_r^i‖²`` (1: preserved, > 1: several
tasks added up along ``u_r``).  Each singular value is rescaled by

    γ_r = K / Σ_i max(α, s_r^i)          (K tasks)

and the tensor becomes ``θ₀ + U diag(γ ⊙ S) Vᵀ``.  α bounds the correction: a direction where the
merge under-represents every task is never scaled up by more than ``1/α``.  Other tensors keep
the base method's values.  As FusionBench 0.2.33's default implementation
(``singular_value_calibration/utils.py``, the vectorised one), the calibration is computed in
float64, ``‖a_r^i‖²`` is clamped below at 1e-12, and the result is cast back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from fusion_core import Capabilities, Method, in_range, option

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fusion_core import ModelPool, RunContext


def calibrate(base: "torch.Tensor", tasks: Sequence["torch.Tensor"], merged: "torch.Tensor", alpha: float) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``(calibrated tensor, γ per singular direction)`` of one 2-D tensor (computed in float64)."""
    import torch

    b = base.to(torch.float64)
    delta = merged.to(torch.float64) - b
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    merged_responses = s.unsqueeze(1) * vh  # u_rᵀ ΔM = S_r v_rᵀ, one row per direction
    total = torch.zeros_like(s)
    for task in tasks:
        responses = u.T @ (task.to(torch.float64) - b)  # (R, n)
        energy = responses.pow(2).sum(1).clamp_min(1e-12)
        coefficient = (merged_responses * responses).sum(1) / energy
        total += torch.nan_to_num(coefficient, nan=alpha, neginf=alpha).clamp_min(alpha)
    gamma = len(tasks) / total
    calibrated = b + (u * (gamma * s).unsqueeze(0)) @ vh
    return calibrated.to(merged.dtype), gamma


class SingularValueCalibration(Method):
    """SVC: runs a base merge method, then rescales each 2-D tensor's singular values by how much the merge over-counts the tasks."""

    name = "svc"
    summary = "Singular value calibration around a base method (base=…): γ_r = K / Σᵢ max(α, sᵣⁱ) per singular direction of M − θ₀."
    reference_url = "https://arxiv.org/abs/2602.05536"
    fusionbench_config = "singular_value_calibration/task_arithmetic.yaml"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True)
    min_models = 1

    @attrs.frozen
    class Config:
        base: str = option("task_arithmetic", help="the merge method run first (any method that outputs one model, e.g. "
                                                   "task_arithmetic, ties, wudi, tsv_m, iso_c, adamerging)")
        base_config: dict[str, Any] = option(
            factory=dict, help="the base method's fields (default: its own defaults, e.g. task_arithmetic's λ = 0.3 as "
                               "FusionBench's svc task_arithmetic.yaml)")
        alpha: float = option(0.1, help="α: γ_r = K / Σᵢ max(α, sᵣⁱ) (FusionBench: 0.1 for task arithmetic, TIES, DARE, "
                                        "ISO-C, simple average; 0.2 ISO-CTS; 1.0 WUDI and TSV-M)",
                              validator=in_range(0.0, lo_open=True))

    def base_method(self) -> Method:
        """The configured base method, built from the registry of installed plugins."""
        from fusion_core.adapters import inner_method

        return inner_method(self.name, self.config.base, self.config.base_config)

    def check_inputs(self, n_models: int, has_base: bool) -> None:
        super().check_inputs(n_models, has_base)
        self.base_method().check_inputs(n_models, has_base)

    def run(self, pool: "ModelPool", ctx: "RunContext") -> Any:
        import torch

        merged = self.base_method().run(pool, ctx)
        # a state dict is copied (its tensors may be shared); a module's merged tensors are calibrated in place
        state = dict(merged) if isinstance(merged, Mapping) else merged.state_dict()
        readers = [pool.reader(None), *[pool.reader(n) for n in pool.model_names]]
        gammas: list[torch.Tensor] = []
        try:
            keys = set(readers[0].keys())
            with torch.no_grad():
                for key, tensor in state.items():
                    if key not in keys or tensor.dim() != 2 or not tensor.is_floating_point():
                        continue
                    base, *tasks = (r.get(key) for r in readers)
                    calibrated, gamma = calibrate(base, tasks, tensor, self.config.alpha)
                    if isinstance(merged, Mapping):
                        state[key] = calibrated
                    else:
                        tensor.copy_(calibrated)
                    gammas.append(gamma)
        finally:
            for reader in readers:
                reader.close()
        every = torch.cat(gammas) if gammas else torch.zeros(0)
        ctx.extras.setdefault(self.name, {}).update(
            base=self.config.base, calibrated_tensors=len(gammas),
            gamma_mean=float(every.mean()) if every.numel() else None,
            gamma_min=float(every.min()) if every.numel() else None,
            gamma_max=float(every.max()) if every.numel() else None,
        )
        return state if isinstance(merged, Mapping) else merged


METHODS = [SingularValueCalibration]
