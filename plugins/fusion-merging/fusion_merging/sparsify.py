"""Sparsifiers and rescalers for task vectors (τ = θᵢ − θ₀), shared by the task-arithmetic family.

Every statistic is computed inside one tensor (never across the model).  Selections by
magnitude use O(n) selection (:func:`kth_largest`), not a full sort, and break ties in a
fixed, device-independent order: **larger magnitude first, equal magnitudes in flat index
order**.  Masks are boolean tensors shaped like their input.

Counts come from :func:`fraction_count`: ``floor(fraction · n)``, computed so that float
error does not lose an element (0.29 · 100 = 28.999… counts as 29; a plain ``int()``, as in
mergekit, gives 28).

torch is imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fusion_core.engine.kernel import KernelContext

L1_NORM_FLOOR = 1e-7
"""L1 rescaling is skipped when either norm is below this (mergekit's guard)."""


def fraction_count(fraction: float, n: int) -> int:
    """``floor(fraction · n)`` clamped to [0, n], robust to float error (0.29·100 → 29)."""
    if fraction <= 0 or n <= 0:
        return 0
    if fraction >= 1:
        return n
    return min(n, max(0, math.floor(fraction * n + 1e-6)))


def keep_count(density: float, n: int) -> int:
    """How many entries a magnitude trim at ``density`` keeps out of ``n``.

    ``density ≥ 1`` keeps all ``n`` (no trim), ``density ≤ 0`` keeps none (all zero), and
    otherwise ``max(1, floor(density · n))``: a non-zero density keeps at least one entry.
    """
    if n <= 0 or density <= 0:
        return 0
    if density >= 1:
        return n
    return max(1, fraction_count(density, n))


def kth_largest(flat: "torch.Tensor", k: int) -> "torch.Tensor":
    """The ``k``-th largest value (1 ≤ k ≤ n) of a 1-D tensor, by O(n) selection.

    On CPU, for dtypes numpy has, numpy's introselect (``np.partition``, about 3× faster than
    ``torch.kthvalue`` there); elsewhere ``torch.kthvalue``.  The value is the same either way.
    """
    import torch

    n = flat.numel()
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64, torch.float16):
        import numpy as np

        array = flat.detach().numpy()
        return torch.as_tensor(np.partition(array, n - k)[n - k])
    return torch.kthvalue(flat, n - k + 1).values


def top_k_mask(scores: "torch.Tensor", k: int) -> "torch.Tensor":
    """Mask of the ``k`` largest ``scores``; among equal scores the lower flat indices win.

    O(n): one selection for the threshold (:func:`kth_largest`), then comparisons; the
    tie-break needs a cumulative sum only when several entries share the threshold.
    """
    import torch

    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k >= n:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    threshold = kth_largest(flat, k).to(device=flat.device)
    keep = flat >= threshold
    if int(keep.sum()) > k:  # several entries equal the threshold: keep the first ones
        tied = flat == threshold
        need = k - int((flat > threshold).sum())
        keep = (flat > threshold) | (tied & (torch.cumsum(tied, dim=0) <= need))
    return keep.reshape(scores.shape)


def rank_window_mask(scores: "torch.Tensor", start: int, stop: int) -> "torch.Tensor":
    """Mask of the entries ranked ``start`` (inclusive) to ``stop`` (exclusive) in the order
    of :func:`top_k_mask` (largest first, ties by flat index): ``top(stop) \\ top(start)``."""
    keep = top_k_mask(scores, stop)
    if start > 0:
        keep &= ~top_k_mask(scores, start)
    return keep


def magnitude_mask(tau: "torch.Tensor", density: float) -> "torch.Tensor":
    """TIES trim: keep the :func:`keep_count` largest ``|τ|`` of the tensor."""
    return top_k_mask(tau.abs(), keep_count(density, tau.numel()))


def bernoulli_mask(tau: "torch.Tensor", density: float, ctx: "KernelContext", salt: str) -> "torch.Tensor":
    """DARE drop: keep each entry independently with probability ``density``.

    Drawn from ``ctx.rand_like(τ, salt)``, so the mask depends only on (run seed, tensor
    name, salt) — pass the model's index as ``salt`` — and not on order, threads or device.
    """
    return ctx.rand_like(tau, salt=salt) < density


def breadcrumbs_mask(tau: "torch.Tensor", density: float, gamma: float) -> "torch.Tensor":
    """Model Breadcrumbs: drop the largest ``gamma`` fraction of ``|τ|`` (outliers) and the
    smallest entries, keeping ``floor(density · n)`` entries.

    With ``n_top = floor(γ·n)`` and ``target = floor(d·n)``, it keeps the entries ranked
    ``[n_top, n_top + target)`` from the largest down; when ``n_top + target > n`` the window
    slides up to ``[n − target, n)`` (the smallest ``target`` entries are all kept), so
    ``density ≥ 1`` keeps everything.  ``n_top = 0`` (γ·n < 1, e.g. tensors of fewer than 100
    entries at γ = 0.01) keeps the ``target`` largest; mergekit 0.1.4 kept nothing there.
    """
    n = tau.numel()
    target = fraction_count(density, n)
    n_top = fraction_count(gamma, n)
    start = min(n_top, n - target)
    return rank_window_mask(tau.abs(), start, start + target)


def della_keep_probs(tau: "torch.Tensor", density: float, epsilon: float) -> "torch.Tensor":
    """DELLA MagPrune keep probabilities, shaped like ``τ`` (float32).

    Within each row (dim 0 indexes rows; a 2-D+ tensor is viewed as ``(shape[0], -1)``, a
    0-D/1-D tensor is one row) entries are ranked by ``|τ|`` ascending, r = 0…n−1 (equal
    magnitudes in index order), and get ``p = (d − ε) + 2ε · r / (n − 1)``: the smallest
    ``d − ε``, the largest ``d + ε``.  A row of one entry gets ``p = d`` (no 0/0).
    """
    import torch

    if tau.numel() == 0:
        return torch.full(tau.shape, float(density), dtype=torch.float32, device=tau.device)
    rows = tau.reshape(tau.shape[0], -1) if tau.dim() >= 2 else tau.reshape(1, -1)
    n = rows.shape[1]
    if n <= 1:
        return torch.full(tau.shape, float(density), dtype=torch.float32, device=tau.device)
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(n, device=tau.device).expand_as(order)
    ranks.scatter_(1, order, positions)
    probs = (density - epsilon) + (2.0 * epsilon / (n - 1)) * ranks.to(torch.float32)
    return probs.reshape(tau.shape)


def probability_mask(tau: "torch.Tensor", probs: "torch.Tensor", ctx: "KernelContext", salt: str) -> "torch.Tensor":
    """Keep each entry with its own probability (DELLA); draws like :func:`bernoulli_mask`."""
    return ctx.rand_like(tau, salt=salt) < probs


def rescale_inverse_p(masked: "torch.Tensor", p: "float | torch.Tensor") -> "torch.Tensor":
    """Unbiased rescale (the DARE/DELLA papers): ``masked / p``, elementwise when ``p`` is a tensor.

    Where ``p ≤ 0`` nothing can have been kept, so the result is 0 there (not 0/0 = NaN).
    """
    import torch

    if not isinstance(p, torch.Tensor):
        if p <= 0:
            return torch.zeros_like(masked)
        return masked / p
    safe = torch.where(p > 0, p, torch.ones_like(p))
    return torch.where(p > 0, masked / safe, torch.zeros_like(masked)).to(masked.dtype)


def rescale_l1(tau: "torch.Tensor", masked: "torch.Tensor") -> "torch.Tensor":
    """mergekit's rescale: ``masked · ‖τ‖₁ / ‖masked‖₁`` so the L1 norm is kept.

    Skipped (``masked`` returned as is) when either norm is below :data:`L1_NORM_FLOOR`.
    Norms are summed in float64.
    """
    import torch

    before = float(tau.abs().sum(dtype=torch.float64))
    after = float(masked.abs().sum(dtype=torch.float64))
    if before < L1_NORM_FLOOR or after < L1_NORM_FLOOR:
        return masked
    return masked * (before / after)


def apply_rescale(
    kind: str, tau: "torch.Tensor", mask: "torch.Tensor", p: "float | torch.Tensor"
) -> "torch.Tensor":
    """Zero ``τ`` outside ``mask`` and rescale it: ``inverse_p`` (÷p), ``l1`` (norm match) or ``none``."""
    import torch

    masked = torch.where(mask, tau, torch.zeros_like(tau))
    if kind == "inverse_p":
        return rescale_inverse_p(masked, p)
    if kind == "l1":
        return rescale_l1(tau, masked)
    if kind == "none":
        return masked
    raise ValueError(f"rescale must be one of inverse_p, l1, none, got {kind!r}")
