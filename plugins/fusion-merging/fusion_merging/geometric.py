"""Geometric merges: spherical interpolation and means, Model Stock and ExPO extrapolation.

Every method here is a per-tensor kernel (:class:`fusion_core.engine.kernel.KernelMethod`).
Unless a method says otherwise, a tensor is treated as one flat vector, the maths runs in
float32 (float64 inputs stay float64) and the result is returned in that working dtype
(the engine casts it to the output dtype).

Notation: θ₀ is the base tensor, θᵢ the fine-tuned tensors, τᵢ = θᵢ − θ₀ their task vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import attrs

from fusion_core import Capabilities, InputError, KernelMethod, in_range, option, positive

from .conventions import by_convention, convention_option, resolve
from .mergekit.mapping import MergekitMapping, Param

if TYPE_CHECKING:  # pragma: no cover
    import torch

NORM_EPS = 1e-8
"""Vectors with a norm at or below this have no usable direction."""

DOT_THRESHOLD = 0.9995
"""SLERP falls back to linear interpolation when |cos θ| exceeds this (near-colinear inputs)."""


def _work(x: "torch.Tensor") -> "torch.Tensor":
    """``x`` in the working dtype: float64 stays float64, everything else becomes float32."""
    import torch

    return x if x.dtype == torch.float64 else x.to(torch.float32)


def _as_rows(x: "torch.Tensor", mode: str) -> "torch.Tensor":
    """View ``x`` as a matrix whose rows are the vectors to interpolate.

    ``mode``: ``"flat"`` (one row, the whole tensor), ``"rows"`` (``x[i, ...]`` per row) or
    ``"columns"`` (``x[:, j, ...]`` per vector).  Tensors with fewer than 2 dims are always flat.
    """
    if mode == "flat" or x.dim() < 2:
        return x.reshape(1, -1)
    if mode == "rows":
        return x.reshape(x.shape[0], -1)
    return x.reshape(x.shape[0], -1).transpose(0, 1)


def _from_rows(rows: "torch.Tensor", like: "torch.Tensor", mode: str) -> "torch.Tensor":
    """Inverse of :func:`_as_rows`."""
    if mode == "columns" and like.dim() >= 2:
        rows = rows.transpose(0, 1)
    return rows.reshape(like.shape)


def slerp_rows(t: float, a: "torch.Tensor", b: "torch.Tensor", convention: str = "fusion") -> "torch.Tensor":
    """Spherical interpolation of each row of ``a`` towards the same row of ``b``.

    out = sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b, θ the angle between the rows, applied to
    the unnormalised rows (so norms are interpolated too).  Rows fall back to the linear
    interpolation (1−t)·a + t·b when they are near-colinear (|cos θ| > :data:`DOT_THRESHOLD`,
    antiparallel included) or when either has norm ≤ :data:`NORM_EPS` (no direction).
    ``convention="mergekit"``: a row of norm ≤ :data:`NORM_EPS` is not special-cased (its norm
    counts as 1, so it is orthogonal to the other row: ``slerp(0, b, t) = sin(tπ/2)·b``), as
    mergekit 0.1.5's ``slerp`` does.
    """
    import torch

    na = a.norm(dim=1, keepdim=True)
    nb = b.norm(dim=1, keepdim=True)
    no_direction = (na <= NORM_EPS) | (nb <= NORM_EPS)
    if convention == "mergekit":
        na = torch.where(na > NORM_EPS, na, torch.ones_like(na))
        nb = torch.where(nb > NORM_EPS, nb, torch.ones_like(nb))
        no_direction = torch.zeros_like(no_direction)
    dot = (a * b).sum(dim=1, keepdim=True) / (na.clamp_min(NORM_EPS) * nb.clamp_min(NORM_EPS))
    dot = dot.clamp(-1.0, 1.0)
    linear = no_direction | (dot.abs() > DOT_THRESHOLD)
    theta = torch.acos(dot)
    sin_theta = torch.where(linear, torch.ones_like(theta), torch.sin(theta))
    coef_a = torch.where(linear, torch.full_like(theta, 1.0 - t), torch.sin((1.0 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, torch.full_like(theta, t), torch.sin(t * theta) / sin_theta)
    return coef_a * a + coef_b * b


def _slerp_tensor(t: float, a: "torch.Tensor", b: "torch.Tensor", mode: str = "flat", convention: str = "fusion") -> "torch.Tensor":
    a, b = _work(a), _work(b)
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.clone()
    return _from_rows(slerp_rows(t, _as_rows(a, mode), _as_rows(b, mode), convention), a, mode)


CONVENTIONS = ("fusion", "mergekit")


def nuslerp_mergekit(t: float, v0: "torch.Tensor", v1: "torch.Tensor", *, row_wise: bool, flatten: bool) -> "torch.Tensor":
    """NuSLERP as mergekit 0.1.5 computes it (``merge_methods/nuslerp.py``).

    The vectors are the whole tensor (``flatten``), or, per mergekit's ``nuslerp_row_wise``,
    the slices along dim 0 (``row_wise``: the columns of a matrix) or along the last dim
    (otherwise: the rows of a matrix).  Unit vectors use a norm floor of 1e-7; a pair falls
    back to the linear interpolation when 1 − cos²θ ≤ (1e-8)² (|sin θ| < 1e-8), instead of
    fusion's |cos θ| > 0.9995.
    """
    import torch

    shape = v0.shape
    a, b = _work(v0), _work(v1)
    if flatten or a.dim() < 1:
        a, b = a.reshape(-1), b.reshape(-1)
    elif row_wise:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    ua = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (ua * ub).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= NORM_EPS**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * a + t * b, out)
    if row_wise and not flatten and out.dim() >= 1:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def _convention(what: str):
    return option("fusion", help=what, validator=attrs.validators.in_(CONVENTIONS))


# --------------------------------------------------------------------------- SLERP


class Slerp(KernelMethod):
    """Spherical linear interpolation between two models.

    With a base model and one fine-tuned model, interpolates from the base (t=0) to the
    fine-tuned model (t=1).  Without a base, interpolates from the first to the second
    fine-tuned model.  The whole tensor is one vector; the norm is interpolated along with
    the direction.

    Corner cases: near-colinear tensors (|cos θ| > 0.9995, antiparallel included: a and −a at
    t=0.5 give exactly 0) use the linear interpolation.  A tensor of norm ≤ 1e-8 has no
    direction, so the linear interpolation is used as well: slerp(0, b, t) = t·b.  (mergekit
    instead treats the zero vector as orthogonal to b and returns sin(tπ/2)·b, which depends on
    an arbitrary angle and overshoots t·b.)
    """

    name = "slerp"
    summary = "Spherical interpolation between two models (base+1 or 2 models); t=0 gives the first."
    reference_url = "https://doi.org/10.1145/325165.325242"
    fusionbench_config = "slerp/slerp.yaml"
    capabilities = Capabilities(needs_base=False)
    min_models = 1
    max_models = 2

    @attrs.frozen
    class Config:
        t: float = option(
            0.5, help="interpolation factor: 0 gives the base (or first model), 1 the other model", validator=in_range(0.0, 1.0)
        )
        convention: Literal["fusion", "mergekit"] = _convention(
            "fusion = a zero tensor has no direction, so lerp (t·b); mergekit = its norm counts as 1, "
            "so it is orthogonal (sin(tπ/2)·b), as mergekit 0.1.5 slerp (merge_methods/slerp.py); "
            "both lerp when |cos θ| > 0.9995"
        )

    def check_inputs(self, n_models: int, has_base: bool) -> None:
        super().check_inputs(n_models, has_base)
        if has_base and n_models != 1:
            raise InputError(
                f"method 'slerp' with a base takes exactly 1 fine-tuned model, got {n_models}; drop the base to interpolate two models"
            )
        if not has_base and n_models != 2:
            raise InputError(f"method 'slerp' without a base takes exactly 2 models, got {n_models}")

    def kernel(self, name, base, tensors, ctx):
        self.check_inputs(len(tensors), base is not None)
        a, b = (base, tensors[0]) if base is not None else (tensors[0], tensors[1])
        return _slerp_tensor(self.config.t, a, b, convention=self.config.convention)


# --------------------------------------------------------------------------- NuSLERP


def _non_empty(instance, attribute, value):
    if value is not None and len(value) == 0:
        raise ValueError(f"{attribute.name} must not be empty")


class NuSlerp(KernelMethod):
    """SLERP parametrised by per-model weights, optionally row- or column-wise.

    t = w₂/(w₁+w₂) (0.5 when |w₁+w₂| < 1e-6).  Without a base: slerp(θ₁, θ₂, t).  With a
    base: θ₀ + slerp(τ₁, τ₂, t).  ``flatten`` (default) treats the whole tensor as one vector;
    otherwise each row (``row_wise``) or each column is interpolated on its own (1-D tensors
    are always one vector).  Interpolation of each vector follows ``slerp``'s rules.
    """

    name = "nuslerp"
    summary = "Weighted SLERP of two models (or of their task vectors, with a base), flat or per row/column."
    reference_url = "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md"
    capabilities = Capabilities(needs_base=False)
    min_models = 2
    max_models = 2

    @attrs.frozen
    class Config:
        weights: list[float] | None = option(
            None, help="one weight per model; t = w2/(w1+w2) (None: equal, t=0.5)", validator=_non_empty
        )
        flatten: bool = option(True, help="interpolate the whole tensor as one vector")
        row_wise: bool = option(
            False,
            help="when not flattening, fusion convention: interpolate rows (true) or columns (false); "
            "mergekit convention: mergekit's nuslerp_row_wise, i.e. vectors along dim 0 (true: columns) or the last dim (false)",
        )
        convention: Literal["fusion", "mergekit"] = _convention(
            "fusion = rows/columns as row_wise says, lerp when |cos θ| > 0.9995; mergekit = mergekit 0.1.5's nuslerp "
            "(nuslerp_row_wise meaning, lerp only when |sin θ| < 1e-8; merge_methods/nuslerp.py)"
        )

    def interpolation_factor(self) -> float:
        w = self.config.weights or [1.0, 1.0]
        total = float(w[0]) + float(w[1])
        return 0.5 if abs(total) < 1e-6 else float(w[1]) / total

    def kernel(self, name, base, tensors, ctx):
        self.check_inputs(len(tensors), base is not None)
        mode = "flat" if self.config.flatten else ("rows" if self.config.row_wise else "columns")
        t = self.interpolation_factor()
        if self.config.convention == "mergekit":
            options = {"row_wise": self.config.row_wise, "flatten": self.config.flatten}
            if base is None:
                return nuslerp_mergekit(t, tensors[0], tensors[1], **options)
            b0 = _work(base)
            return b0 + nuslerp_mergekit(t, _work(tensors[0]) - b0, _work(tensors[1]) - b0, **options)
        if base is None:
            return _slerp_tensor(t, tensors[0], tensors[1], mode)
        b0 = _work(base)
        return b0 + _slerp_tensor(t, _work(tensors[0]) - b0, _work(tensors[1]) - b0, mode)


# --------------------------------------------------------------------------- Multi-SLERP


class MultiSlerp(KernelMethod):
    """Barycentric spherical interpolation of any number of models (mergekit's ``multislerp``).

    xᵢ = τᵢ with a base, θᵢ without.  Weights are normalised to sum to 1 (``normalize_weights``).
    uᵢ = xᵢ/(‖xᵢ‖+ε); m = Σwᵢuᵢ, m̂ = m/‖m‖; the tangent vectors vᵢ = uᵢ − ⟨uᵢ,m̂⟩m̂ are
    averaged, s = Σwᵢvᵢ, and mapped back: d = m̂·cos‖s‖ + s·sin‖s‖/‖s‖ (d = m̂ when ‖s‖ < ε).
    out = d·Σwᵢ‖xᵢ‖ (+ θ₀).  Note that s = m − ‖m‖m̂ vanishes in exact arithmetic, so the result
    is the renormalised weighted mean direction scaled by the weighted mean norm (a one-step
    approximation of the spherical mean; ``karcher`` iterates to the exact one).

    When ‖m‖ < ε the directions cancel: with 2 inputs the linear result Σwᵢxᵢ (+ θ₀) is
    returned, with more an :class:`~fusion_core.errors.InputError` is raised — unless every
    xᵢ is zero (a tensor no model changed), which comes out as the base (mergekit 0.1.5
    raises there with 3 or more models).
    """

    name = "multislerp"
    summary = "Barycentric SLERP of several models (or task vectors, with a base) with per-model weights."
    reference_url = "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md"
    capabilities = Capabilities(needs_base=False)
    min_models = 2

    @attrs.frozen
    class Config:
        weights: list[float] | None = option(None, help="one weight per model (None: equal weights)", validator=_non_empty)
        normalize_weights: bool = option(True, help="divide the weights by their sum")
        eps: float = option(1e-8, help="numerical floor for norms", validator=positive)

        def __attrs_post_init__(self):
            if self.normalize_weights and self.weights is not None and abs(sum(self.weights)) < 1e-12:
                raise ValueError("weights sum to 0 and cannot be normalised; change them or set normalize_weights: false")

    def kernel(self, name, base, tensors, ctx):
        import torch

        self.check_inputs(len(tensors), base is not None)
        eps = self.config.eps
        b0 = _work(base) if base is not None else None
        xs = [(_work(x) - b0 if b0 is not None else _work(x)).reshape(-1) for x in tensors]
        X = torch.stack(xs)
        n = len(xs)
        w = torch.tensor(self.config.weights if self.config.weights is not None else [1.0] * n, dtype=X.dtype)
        if self.config.normalize_weights:
            w = w / w.sum()
        norms = X.norm(dim=1)
        units = X / (norms[:, None] + eps)
        mean = (w[:, None] * units).sum(dim=0)
        mean_norm = mean.norm()
        if not bool((norms > eps).any()):
            out = torch.zeros_like(X[0])  # nothing moved (e.g. a frozen tensor): the base, or zeros without one
        elif mean_norm < eps:
            if n == 2:
                out = (w[:, None] * X).sum(dim=0)
            else:
                raise InputError(
                    f"multislerp: the directions of the {n} models cancel out in tensor {name!r} (weighted mean of unit vectors ≈ 0); change the weights or the models"
                )
        else:
            mhat = mean / mean_norm
            tangent = (w[:, None] * (units - (units @ mhat)[:, None] * mhat[None, :])).sum(dim=0)
            tn = tangent.norm()
            direction = mhat if tn < eps else mhat * torch.cos(tn) + tangent * (torch.sin(tn) / tn)
            out = direction * (w * norms).sum()
        out = out.reshape(tensors[0].shape)
        return out + b0 if b0 is not None else out


# --------------------------------------------------------------------------- Karcher mean


class Karcher(KernelMethod):
    """Karcher (Riemannian, Fréchet) mean of the models' directions on the unit sphere.

    Each tensor θᵢ is split into a norm and a unit direction; the direction μ minimising
    Σ arccos(⟨uᵢ,μ⟩)² is found by Riemannian gradient steps μ ← exp_μ(mean of log_μ(uᵢ)),
    starting from the normalised mean direction and stopping after ``max_iter`` steps or when
    the mean tangent norm falls below ``tol``.  The output is μ·(1/N)Σ‖θᵢ‖.  Weights are equal.
    Tensors of norm ≤ 1e-8 have no direction: they are left out of μ but still count
    (as 0) in the mean norm.  The base model, if any, is ignored (it is not one of the means).
    Exactly opposite directions have no unique mean; the starting direction is then kept.
    """

    name = "karcher"
    summary = "Riemannian (Karcher) mean of the models' directions on the sphere, rescaled by their mean norm."
    reference_url = "https://doi.org/10.1002/cpa.3160300502"
    capabilities = Capabilities(needs_base=False)
    min_models = 2

    @attrs.frozen
    class Config:
        max_iter: int = option(10, help="maximum number of Riemannian gradient steps", validator=in_range(1, None))
        tol: float = option(1e-5, help="stop when the mean tangent vector's norm is below this", validator=positive)

    def kernel(self, name, base, tensors, ctx):
        import torch

        self.check_inputs(len(tensors), base is not None)
        if all(torch.equal(x, tensors[0]) for x in tensors[1:]):
            return tensors[0].clone()  # the mean of identical points (a tensor nobody changed), without rounding
        X = torch.stack([_work(x).reshape(-1) for x in tensors])
        norms = X.norm(dim=1)
        scale = norms.mean()
        valid = norms > NORM_EPS
        if not bool(valid.any()):
            return torch.zeros_like(X[0]).reshape(tensors[0].shape)
        units = X[valid] / norms[valid][:, None]
        mu = units.mean(dim=0)
        mu_norm = mu.norm()
        mu = units[0].clone() if mu_norm <= NORM_EPS else mu / mu_norm
        for _ in range(self.config.max_iter):
            cos = (units @ mu).clamp(-1.0, 1.0)
            theta = torch.acos(cos)
            sin = torch.sin(theta)
            factor = torch.where(sin > 1e-7, theta / sin.clamp_min(1e-7), torch.ones_like(theta))
            logs = factor[:, None] * (units - cos[:, None] * mu[None, :])
            step = logs.mean(dim=0)
            step_norm = step.norm()
            if step_norm < self.config.tol:
                break
            mu = mu * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
            mu = mu / mu.norm()
        return (mu * scale).reshape(tensors[0].shape)


# --------------------------------------------------------------------------- Model Stock


MODEL_STOCK_PRESETS = {"fusionbench": {"average": "angle"}, "mergekit": {"average": "cosine"}}
"""FusionBench 0.2.33 ``ModelStock`` averages angles (degrees) for N > 2; mergekit 0.1.5 averages cosines."""

_FB_EPS = 1e-8


def _angle_ratio(taus: Sequence["torch.Tensor"]) -> "torch.Tensor":
    """FusionBench's ratio: the mean pairwise angle θ of the rows of ``taus``, t = N cos θ / ((N−1) cos θ + 1 + ε)."""
    import torch

    n = len(taus)
    squares = [(tau * tau).sum(dim=1, keepdim=True) for tau in taus]
    total = torch.zeros_like(squares[0], dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            dot = (taus[i] * taus[j]).sum(dim=1, keepdim=True)
            denominator = (squares[i] * squares[j]).double().sqrt() + _FB_EPS
            cos = (dot / denominator).to(dot.dtype).clamp(-1.0, 1.0)
            total = total + torch.acos(cos).double()
    angle = total / (n * (n - 1) / 2)
    cos = torch.cos(angle)
    return n * cos / ((n - 1) * cos + 1 + _FB_EPS)


class ModelStock(KernelMethod):
    """Model Stock: interpolate between the base and the fine-tuned average by their angle.

    cos = mean over pairs i<j of cos(τᵢ, τⱼ) (0 for a pair where a task vector has norm
    ≤ 1e-8); t = N·cos/(1+(N−1)·cos); out = t·mean(θᵢ) + (1−t)·θ₀.  With ``filter_wise`` the
    cosine and t are computed per row (``x[i, ...]``; 1-D tensors stay whole).  Identical
    fine-tunes with τ = 0 give cos = 0, so the base; a negative cos extrapolates (t < 0); when
    |1+(N−1)cos| < 1e-6 the base is returned.  (mergekit clamps the product of norms at 1e-6
    instead, which shrinks the cosine of small task vectors; here the exact cosine is used.)

    ``average: angle`` (FusionBench 0.2.33, the default) averages the pairwise *angles*
    instead: cosᵢⱼ = ⟨τᵢ,τⱼ⟩/(‖τᵢ‖‖τⱼ‖ + 1e-8) clamped to [−1, 1], θ = mean of arccos(cosᵢⱼ),
    t = N·cos θ/((N−1)·cos θ + 1 + 1e-8); with N = 2 both averages agree.  ``average: cosine``
    is mergekit's.
    """

    name = "model_stock"
    summary = "Interpolates base and fine-tuned average with a ratio set by the task vectors' angle."
    reference_url = "https://arxiv.org/abs/2403.19522"
    fusionbench_config = "model_stock/model_stock.yaml"
    capabilities = Capabilities(needs_base=True)
    min_models = 2

    @attrs.frozen
    class Config:
        convention: Literal["fusionbench", "mergekit"] = convention_option(MODEL_STOCK_PRESETS)
        average: Literal["angle", "cosine"] = by_convention(
            MODEL_STOCK_PRESETS,
            "average",
            "how the pairwise task-vector angles of N > 2 models are averaged: angle = mean angle, then its cosine "
            "(FusionBench); cosine = mean cosine (mergekit)",
            validator=attrs.validators.optional(attrs.validators.in_(("angle", "cosine"))),
        )
        filter_wise: bool = option(False, help="compute the ratio per row (output filter) instead of per tensor")

        def __attrs_post_init__(self) -> None:
            resolve(self, MODEL_STOCK_PRESETS)

    def interpolation_ratio(self, base: "torch.Tensor", tensors: Sequence["torch.Tensor"]) -> "torch.Tensor":
        """The ratio t, shape (rows, 1): one row unless ``filter_wise``."""
        import torch

        mode = "rows" if self.config.filter_wise else "flat"
        b0 = _as_rows(_work(base), mode)
        taus = [_as_rows(_work(x), mode) - b0 for x in tensors]
        if self.config.average == "angle":
            return _angle_ratio(taus)
        norms = [tau.norm(dim=1, keepdim=True) for tau in taus]
        n = len(taus)
        total = torch.zeros_like(norms[0])
        for i in range(n):
            for j in range(i + 1, n):
                ok = (norms[i] > NORM_EPS) & (norms[j] > NORM_EPS)
                dot = (taus[i] * taus[j]).sum(dim=1, keepdim=True)
                cos = (dot / (norms[i] * norms[j]).clamp_min(torch.finfo(dot.dtype).tiny)).clamp(-1.0, 1.0)
                total = total + torch.where(ok, cos, torch.zeros_like(cos))
        cos = total / (n * (n - 1) / 2)
        denom = 1.0 + (n - 1) * cos
        safe = denom.abs() >= 1e-6
        return torch.where(safe, n * cos / torch.where(safe, denom, torch.ones_like(denom)), torch.zeros_like(cos))

    def kernel(self, name, base, tensors, ctx):
        import torch

        self.check_inputs(len(tensors), base is not None)
        if all(torch.equal(x, base) for x in tensors):
            return base.clone()  # nothing moved (FusionBench's float32 arccos(0) gives t ≈ −2e-7 here, not 0)
        mode = "rows" if self.config.filter_wise else "flat"
        t = self.interpolation_ratio(base, tensors)
        b0 = _work(base)
        mean = sum(_work(x) for x in tensors) / len(tensors)
        if t.dtype == torch.float64 and b0.dtype != torch.float64:  # FusionBench: scalar ratios, each side rounded to the tensor's dtype
            out = t.to(b0.dtype) * _as_rows(mean, mode) + (1.0 - t).to(b0.dtype) * _as_rows(b0, mode)
        else:
            out = t * _as_rows(mean, mode) + (1.0 - t) * _as_rows(b0, mode)
        return _from_rows(out, b0, mode)


# --------------------------------------------------------------------------- ExPO


class ExPO(KernelMethod):
    """ExPO (model extrapolation): step past the aligned model, away from the weaker base.

    θ̄ = mean(θᵢ) (the aligned model itself when N = 1); out = θ̄ + α·(θ̄ − θ₀)
    = θ₀ + (1+α)·(θ̄ − θ₀).  The base θ₀ is the weaker starting checkpoint (typically the SFT
    model) and θᵢ the more aligned one(s) (DPO/RLHF); α = 0 returns θ̄.  The paper tunes α
    per model pair on a small grid (0.1 to 0.5 for most pairs).
    """

    name = "expo"
    summary = "Model extrapolation (ExPO): mean fine-tune + alpha * (mean fine-tune - base)."
    reference_url = "https://arxiv.org/abs/2404.16792"
    fusionbench_config = "linear/expo.yaml"
    capabilities = Capabilities(needs_base=True)
    min_models = 1
    elementwise = True

    @attrs.frozen
    class Config:
        alpha: float = option(
            0.1,
            help="extrapolation factor α ≥ 0 (0 returns the fine-tuned mean; FusionBench linear/expo.yaml: 0.1; fusion ≤ 0.1: 0.3)",
            validator=in_range(0.0, None),
        )

    def kernel(self, name, base, tensors, ctx):
        self.check_inputs(len(tensors), base is not None)
        b0 = _work(base)
        mean = sum(_work(x) for x in tensors) / len(tensors)
        return mean + self.config.alpha * (mean - b0)


# --------------------------------------------------------------------------- mergekit 0.1.5 equivalents

_MK = {"convention": "mergekit"}
MERGEKIT = [
    MergekitMapping("slerp", "slerp", fixed=_MK, shared={"t": Param(float, to="t")}, min_inputs=2, max_inputs=2),
    MergekitMapping(
        "nuslerp",
        "nuslerp",
        base="optional",
        fixed=_MK,
        shared={
            "nuslerp_row_wise": Param(bool, False, "row_wise"),
            "nuslerp_flatten": Param(bool, True, "flatten"),
        },
        per_model={"weight": Param(float, to="weights")},
        min_non_base=2,
        max_non_base=2,
    ),
    MergekitMapping(
        "multislerp",
        "multislerp",
        base="optional",
        shared={"normalize_weights": Param(bool, True, "normalize_weights"), "eps": Param(float, 1e-8, "eps")},
        per_model={"weight": Param(float, to="weights")},
        min_non_base=1,
    ),
    MergekitMapping(
        "karcher",
        "karcher",
        base="ignored",
        shared={"max_iter": Param(int, 10, "max_iter"), "tol": Param(float, 1e-5, "tol")},
    ),
    MergekitMapping("model_stock", "model_stock", fixed={"convention": "mergekit"}, shared={"filter_wise": Param(bool, False, "filter_wise")}, min_inputs=3),
]


METHODS = [Slerp, NuSlerp, MultiSlerp, Karcher, ModelStock, ExPO]
