"""Subspace merges: Task Singular Vectors (TSV-M) and isotropic merging (Iso-C, Iso-CTS).

All three work on the task vectors τᵢ = θᵢ − θ₀ of 2-D tensors (weight matrices) through
their singular value decompositions; tensors of any other rank (biases, norms, conv
kernels) are merged by the plain mean of the task vectors.  The result is
θ₀ + α·(merged task vector), α = ``scaling_factor``.  SVDs run in float32 (float64 inputs
stay float64) with ``torch.linalg.svd(full_matrices=False)``.

Numerically zero directions.  An SVD returns singular vectors for zero singular values too,
but those vectors are arbitrary (they depend on the LAPACK/cuSOLVER build and device).  The
reference implementations keep them, so a rank-deficient task vector injects arbitrary
directions; here components whose singular value is at or below
``max(m, n)·eps(dtype)·scale`` (the usual numerical-rank threshold, ``scale`` the largest
singular value or norm involved) are dropped.  For full-rank weight updates nothing changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import attrs

from fusion_core import Capabilities, KernelMethod, in_range, option

from .geometric import _work

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _tolerance(matrix: "torch.Tensor", scale) -> float:
    """Numerical-rank threshold for singular values of ``matrix`` at magnitude ``scale``."""
    import torch

    return max(matrix.shape) * torch.finfo(matrix.dtype).eps * float(scale)


def _task_vectors(base: "torch.Tensor", tensors) -> list["torch.Tensor"]:
    b0 = _work(base)
    return [_work(x) - b0 for x in tensors]


def orthogonal_factor(x: "torch.Tensor") -> "torch.Tensor":
    """The orthogonal (polar) factor P·Qᵀ of ``x`` = P·S·Qᵀ: the nearest matrix with orthonormal
    columns (or rows, when ``x`` is wide), i.e. the solution of the orthogonal Procrustes problem."""
    import torch

    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def _mean_update(base: "torch.Tensor", taus, alpha: float) -> "torch.Tensor":
    return _work(base) + alpha * (sum(taus) / len(taus))


def _recombine(base: "torch.Tensor", us, ss, vhs, alpha: float, *, isotropic: bool) -> "torch.Tensor":
    """θ₀ + α·U⊥·diag(S)·V⊥ᵀ from concatenated components (S replaced by its mean when ``isotropic``)."""
    import torch

    b0 = _work(base)
    u = torch.cat(us, dim=1)
    s = torch.cat(ss)
    vh = torch.cat(vhs, dim=0)
    if s.numel() == 0:
        return b0.clone()
    if isotropic:
        s = torch.full_like(s, float(s.mean()))
    return b0 + alpha * ((orthogonal_factor(u) * s[None, :]) @ orthogonal_factor(vh))


class TSVMerge(KernelMethod):
    """Task Singular Vectors merge (TSV-M).

    For each 2-D tensor (m×n, r = min(m, n)): SVD each task vector τᵢ = Uᵢ Sᵢ Vᵢᵀ and keep its
    top k components, k = ⌊r·fraction⌋ (at least 1; ``fraction`` defaults to 1/N, so k = ⌊r/N⌋
    and the N blocks fill the rank).  Concatenate U = [U₁…U_N], S, V = [V₁…V_N]; decorrelate
    the blocks by replacing U and V with their orthogonal factors (U⊥ = P·Qᵀ from U = P·Σ·Qᵀ,
    likewise V⊥) and form W = U⊥·diag(S)·V⊥ᵀ.  Task vectors that are already mutually
    orthogonal come back unchanged (W = Στᵢ up to truncation).  Other tensors: mean τ.
    out = θ₀ + α·W.
    """

    name = "tsv_m"
    summary = "Task Singular Vectors merge: per-matrix low-rank task SVDs, decorrelated by orthogonalisation."
    reference_url = "https://arxiv.org/abs/2412.00081"
    fusionbench_config = "task_singular_vector/TaskSingularVectorMerging.yaml"
    capabilities = Capabilities(needs_base=True)
    min_models = 1

    @attrs.frozen
    class Config:
        scaling_factor: float = option(
            1.0, help="α: scale of the merged task vector added to the base", validator=in_range(0.0, None)
        )
        fraction: float | None = option(
            None,
            help="share of each matrix's rank kept per task (None: 1/N for N models)",
            validator=in_range(0.0, 1.0, lo_open=True),
        )

        below_n: Literal["none", "one"] = option(
            "none",
            help="a matrix of rank r < N (⌊r/N⌋ = 0 components per task): none = no component, the matrix stays at "
            "the base (FusionBench 0.2.33); one = one component per task (fusion ≤ 0.1)",
            validator=attrs.validators.in_(("none", "one")),
        )

    def rank_per_task(self, rank: int, n_models: int) -> int:
        """Components kept per task for a matrix of rank ``rank``: ⌊r·(1/N)⌋ (FusionBench's float product)."""
        if self.config.fraction is None:
            k = int(rank * (1.0 / n_models))
        else:
            k = int(rank * self.config.fraction + 1e-9)
        return max(1, k) if self.config.below_n == "one" else k

    def kernel(self, name, base, tensors, ctx):
        import torch

        self.check_inputs(len(tensors), base is not None)
        taus = _task_vectors(base, tensors)
        alpha = self.config.scaling_factor
        if base.dim() != 2:
            return _mean_update(base, taus, alpha)
        k = self.rank_per_task(min(base.shape), len(taus))
        if k == 0:  # no component per task (FusionBench): nothing is added
            return base.clone()
        us, ss, vhs = [], [], []
        for tau in taus:
            u, s, vh = torch.linalg.svd(tau, full_matrices=False)
            keep = min(k, int((s > _tolerance(tau, s[0])).sum()))
            us.append(u[:, :keep])
            ss.append(s[:keep])
            vhs.append(vh[:keep])
        return _recombine(base, us, ss, vhs, alpha, isotropic=False)


class IsoC(KernelMethod):
    """Isotropic merging in the common subspace (Iso-C).

    For each 2-D tensor: M = Στᵢ (the task-arithmetic sum) = U·diag(s)·Vᵀ; replace every
    singular value by their mean: W = mean(s)·U·Vᵀ (over the numerically non-zero
    components).  W keeps M's row and column spaces with a flat spectrum.  Other tensors:
    mean τ.  out = θ₀ + α·W.
    """

    name = "iso_c"
    summary = "Isotropic merge: SVD of the summed task vectors with every singular value set to their mean."
    reference_url = "https://arxiv.org/abs/2502.04959"
    fusionbench_config = "isotropic_merging/iso_c.yaml"
    capabilities = Capabilities(needs_base=True)
    min_models = 1

    @attrs.frozen
    class Config:
        scaling_factor: float = option(
            1.0, help="α: scale of the merged task vector added to the base", validator=in_range(0.0, None)
        )

    def kernel(self, name, base, tensors, ctx):
        import torch

        self.check_inputs(len(tensors), base is not None)
        taus = _task_vectors(base, tensors)
        alpha = self.config.scaling_factor
        if base.dim() != 2:
            return _mean_update(base, taus, alpha)
        total = sum(taus)
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        keep = int((s > _tolerance(total, s[0])).sum())
        return _recombine(base, [u[:, :keep]], [s[:keep]], [vh[:keep]], alpha, isotropic=True)


class IsoCTS(KernelMethod):
    """Isotropic merging in common and task-specific subspaces (Iso-CTS).

    For each 2-D tensor (r = min(m, n), N tasks): the common subspace is the top k singular
    directions of M = Στᵢ, and each task adds its own top p directions from the part of τᵢ
    outside the common subspace, τᵢ − U_c·U_cᵀ·τᵢ.  Sizes: k₀ = ⌊r·common_space_fraction⌋,
    p = round((r − k₀)/N) (Python's rounding, capped at ⌊r/N⌋), k = r − N·p, so the blocks
    fill the rank exactly.  The concatenated U and V are orthogonalised (polar factor, as in
    TSV-M) and every singular value is replaced by the mean of all kept ones:
    W = mean(s)·U⊥·V⊥ᵀ.  common_space_fraction = 1 is Iso-C.  Other tensors: mean τ.
    out = θ₀ + α·W.  As in the paper, directions shared by several tasks' specific parts make
    the orthogonalisation non-unique; for real weight updates this does not happen.
    """

    name = "iso_cts"
    summary = "Isotropic merge over the common subspace plus each task's own subspace (Iso-CTS)."
    reference_url = "https://arxiv.org/abs/2502.04959"
    fusionbench_config = "isotropic_merging/iso_cts.yaml"
    capabilities = Capabilities(needs_base=True)
    min_models = 1

    @attrs.frozen
    class Config:
        scaling_factor: float = option(
            1.0, help="α: scale of the merged task vector added to the base", validator=in_range(0.0, None)
        )
        common_space_fraction: float = option(
            0.8,
            help="share of each matrix's rank given to the common subspace; the rest is split among tasks",
            validator=in_range(0.0, 1.0),
        )

    def subspace_sizes(self, rank: int, n_models: int) -> tuple[int, int]:
        """(common directions k, directions per task p), with k + N·p = rank."""
        k0 = int(rank * self.config.common_space_fraction + 1e-9)
        per_task = min(round((rank - k0) / n_models), rank // n_models)
        return rank - n_models * per_task, per_task

    def kernel(self, name, base, tensors, ctx):
        import torch

        self.check_inputs(len(tensors), base is not None)
        taus = _task_vectors(base, tensors)
        alpha = self.config.scaling_factor
        if base.dim() != 2:
            return _mean_update(base, taus, alpha)
        k, per_task = self.subspace_sizes(min(base.shape), len(taus))
        total = sum(taus)
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        keep = min(k, int((s > _tolerance(total, s[0])).sum()))
        us, ss, vhs = [u[:, :keep]], [s[:keep]], [vh[:keep]]
        if per_task > 0:
            common = u[:, :keep]
            for tau in taus:
                rest = tau - common @ (common.T @ tau)
                ru, rs, rvh = torch.linalg.svd(rest, full_matrices=False)
                n_keep = min(per_task, int((rs > _tolerance(tau, torch.linalg.matrix_norm(tau))).sum()))
                us.append(ru[:, :n_keep])
                ss.append(rs[:n_keep])
                vhs.append(rvh[:n_keep])
        return _recombine(base, us, ss, vhs, alpha, isotropic=True)


METHODS = [TSVMerge, IsoC, IsoCTS]
