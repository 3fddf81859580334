"""The task-arithmetic family: methods that combine task vectors τᵢ = θᵢ − θ₀ per tensor.

Every method here returns ``θ₀ + scaling_factor · merged(τ₁ … τ_N)``; they differ in how
each τᵢ is sparsified (:mod:`fusion_merging.sparsify`) and how the sparse vectors are
combined:

- **linear**: ``Σ wᵢτᵢ`` (divided by ``Σ wᵢ`` with ``normalize``);
- **TIES** (elect + disjoint mean): a sign γ is elected per entry, only entries whose sign
  agrees with γ are kept, and they are averaged (see :func:`ties_merge`).

Conventions differ between the papers, mergekit and PEFT; each is an explicit option whose
default is the paper's.  Notes on mergekit/PEFT compatibility are in the option help.

TIES and DARE also implement the engine's two-phase protocol (``chunk_stats`` per model,
then ``kernel_chunk`` per row block), so a large tensor never has all N task vectors in
memory, and their whole-tensor ``kernel`` is that protocol run on one block.  Phase 2 runs
fused block loops (:func:`fused_merge`) that give the same bytes as the reference functions
(:func:`ties_merge`, :func:`linear_merge`, :func:`fusion_merging.sparsify.apply_rescale`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs

from fusion_core.components import Capabilities
from fusion_core.config import in_range, option
from fusion_core.engine.kernel import KernelContext, KernelMethod

from . import sparsify
from .basic import check_weight_sum, resolve_weights
from .mergekit.mapping import MergekitMapping, Param

if TYPE_CHECKING:  # pragma: no cover
    import torch

SIGN_ELECTIONS = ("sum", "weighted_sum", "count")
DIVISORS = ("count", "weights", "none")
RESCALES = ("inverse_p", "l1", "none")
VARIANTS = ("linear", "ties")


# ---------------------------------------------------------------------------------------
# combining task vectors


def task_vectors(base: "torch.Tensor", tensors: Sequence["torch.Tensor"]) -> list["torch.Tensor"]:
    """τᵢ = θᵢ − θ₀."""
    return [t - base for t in tensors]


def linear_merge(deltas: Sequence["torch.Tensor"], weights: Sequence[float], normalize: bool = False) -> "torch.Tensor":
    """``Σ wᵢτᵢ``, divided by ``Σ wᵢ`` when ``normalize`` (the caller checks the sum is not 0)."""
    total = deltas[0] * weights[0]
    for w, d in zip(weights[1:], deltas[1:], strict=True):
        total += w * d
    if normalize:
        return total / sum(weights)
    return total


def elect_sign(deltas: Sequence["torch.Tensor"], weights: Sequence[float], sign_election: str) -> "torch.Tensor":
    """The elected sign γ ∈ {+1, −1} per entry (a zero vote elects +1).

    ``sum``: sign of Σ τᵢ (TIES paper, PEFT "total"); ``weighted_sum``: sign of Σ wᵢτᵢ
    (mergekit); ``count``: sign of Σ sign(τᵢ) (a majority vote, PEFT "frequency").
    """
    import torch

    if sign_election not in SIGN_ELECTIONS:
        raise ValueError(f"sign_election must be one of {', '.join(SIGN_ELECTIONS)}, got {sign_election!r}")
    votes = torch.zeros_like(deltas[0])
    for w, d in zip(weights, deltas, strict=True):
        if sign_election == "sum":
            votes += d
        elif sign_election == "weighted_sum":
            votes += w * d
        else:
            votes += torch.sign(d)
    return torch.where(votes >= 0, torch.ones_like(votes), -torch.ones_like(votes))


def ties_merge(
    deltas: Sequence["torch.Tensor"], weights: Sequence[float], sign_election: str = "sum", divisor: str = "count"
) -> "torch.Tensor":
    """TIES elect + disjoint merge of already-sparsified task vectors.

    Model i *agrees* at an entry when the sign of its vote (τᵢ, or wᵢτᵢ for
    ``weighted_sum``) equals the elected sign γ; a zero entry never agrees.  The result is
    ``Σ_agreeing wᵢτᵢ / D`` with D = the number of agreeing models (``count``, the paper's
    disjoint mean), ``Σ_agreeing wᵢ`` (``weights``, mergekit ``normalize: true``) or 1
    (``none``, mergekit ``normalize: false``).  Where D = 0 (nobody agrees) it is 0.
    """
    import torch

    if divisor not in DIVISORS:
        raise ValueError(f"divisor must be one of {', '.join(DIVISORS)}, got {divisor!r}")
    gamma = elect_sign(deltas, weights, sign_election)
    numerator = torch.zeros_like(deltas[0])
    denominator = torch.zeros_like(deltas[0])
    for w, d in zip(weights, deltas, strict=True):
        vote = w * d if sign_election == "weighted_sum" else d
        agree = torch.sign(vote) == gamma
        numerator += torch.where(agree, w * d, torch.zeros_like(d))
        if divisor == "count":
            denominator += agree.to(denominator.dtype)
        elif divisor == "weights":
            denominator += agree.to(denominator.dtype) * w
    if divisor == "none":
        return numerator
    denominator = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    return numerator / denominator


def per_model(value: "float | Sequence[float]", i: int) -> float:
    """Model ``i``'s value of a field given as one scalar for all models or as a per-model list."""
    return float(value[i]) if isinstance(value, (list, tuple)) else float(value)


def add_scaled(base: "torch.Tensor", merged: "torch.Tensor", scaling_factor: float) -> "torch.Tensor":
    """θ₀ + λ·merged."""
    return base + float(scaling_factor) * merged


# ---------------------------------------------------------------------------------------
# fused block kernels (TIES, DARE): the same numbers as the functions above, bit for bit,
# computed block by block in a few reused buffers.
#
# The reference functions above allocate a full-size temporary per step (``where``,
# ``zeros_like``, boolean masks), which costs more than the arithmetic.  The fused loops
# below work on blocks of :data:`sparsify.BLOCK` elements and use float-only operations:
#
# - trim: ``hardshrink(τ, λ)`` with λ the float just below the top-k threshold keeps
#   exactly the entries with ``|τ| ≥ threshold`` (then :meth:`TopK.drop_ties`);
# - elect: γ = sign(sign(votes) + ½) is +1 where votes ≥ 0 (also −0) and −1 elsewhere;
# - agree: ``pᵢ = relu(vᵢ·γ)`` is ``|vᵢ|`` where sign(vᵢ) = γ and 0 elsewhere, so the
#   disjoint sum is γ·Σ qᵢ (qᵢ = pᵢ, or wᵢ·pᵢ) and the count is Σ sign(pᵢ).  Multiplying
#   by ±1 is exact and rounding is symmetric, so γ·Σ qᵢ equals Σ γ·qᵢ; ``+ 0.0`` turns the
#   one possible difference, a −0, into the +0 the reference produces.
#
# Entries are treated independently, so any split into blocks gives the same bytes.


class _Workspace:
    """Reused block buffers: one per model (its sparse τ) and a few shared ones."""

    def __init__(self, n_models: int, size: int, dtype: "torch.dtype", device: "torch.device") -> None:
        import torch

        def empty() -> "torch.Tensor":
            return torch.empty(size, dtype=dtype, device=device)

        self.deltas = [empty() for _ in range(n_models)]
        self.gamma, self.total, self.count, self.tmp = empty(), empty(), empty(), empty()


def fused_supported(base: "torch.Tensor") -> bool:
    """Whether the fused loops apply (float32/float64 compute); others use the reference ops."""
    import torch

    return base.dtype in (torch.float32, torch.float64)


def _row_offset(base: "torch.Tensor", start: int) -> int:
    """The flat offset of row ``start`` of a tensor shaped like ``base``'s rows."""
    return start * (math.prod(base.shape[1:]) if base.dim() > 1 else 1)


def fused_merge(
    base: "torch.Tensor",
    tensors: Sequence["torch.Tensor"],
    offset: int,
    fill: "Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, int], bool]",
    weights: Sequence[float],
    variant: str,
    config: Any,
) -> "torch.Tensor":
    """θ₀ + λ·merge(sparse τ₁ … τ_N), block by block.

    ``fill(i, base_block, model_block, out, flat_offset)`` writes model ``i``'s sparse task
    vector for the block into ``out`` and returns ``False`` when it is all zero (a model
    trimmed to nothing; TIES then leaves it out, which changes nothing).
    ``offset`` is the flat position of ``base[0]`` in the whole tensor.
    """
    import torch

    flat_base = base.reshape(-1)
    flats = [t.reshape(-1) for t in tensors]
    n = flat_base.numel()
    out = torch.empty_like(flat_base)
    if n == 0:
        return out.reshape(base.shape)
    size = min(n, sparsify.BLOCK)
    ws = _Workspace(len(flats), size, flat_base.dtype, flat_base.device)
    scale = float(config.scaling_factor)
    for start in range(0, n, size):
        stop = min(n, start + size)
        length = stop - start
        b = flat_base[start:stop]
        deltas: list[tuple[float, torch.Tensor]] = []
        for i, (w, t) in enumerate(zip(weights, flats, strict=True)):
            d = ws.deltas[i][:length]
            if fill(i, b, t[start:stop], d, offset + start) or variant != "ties":
                deltas.append((w, d))
        if variant == "ties":
            merged = _ties_block(deltas, ws, length, config.sign_election, config.divisor)
        else:
            merged = _linear_block(deltas, ws, length, config.normalize)
        torch.mul(merged, scale, out=merged)
        torch.add(b, merged, out=out[start:stop])
    return out.reshape(base.shape)


def _linear_block(deltas: list, ws: _Workspace, length: int, normalize: bool) -> "torch.Tensor":
    """:func:`linear_merge` of one block (the same operations, in place)."""
    import torch

    total, tmp = ws.total[:length], ws.tmp[:length]
    w, d = deltas[0]
    if w == 1.0:
        total.copy_(d)
    else:
        torch.mul(d, w, out=total)
    for w, d in deltas[1:]:
        if w == 1.0:
            total += d
        else:
            torch.mul(d, w, out=tmp)
            total += tmp
    if normalize:
        total.div_(sum(w for w, _ in deltas))
    return total


def _ties_block(deltas: list, ws: _Workspace, length: int, sign_election: str, divisor: str) -> "torch.Tensor":
    """:func:`ties_merge` of one block; ``deltas`` are (wᵢ, τᵢ) and τᵢ may be overwritten."""
    import torch

    if sign_election not in SIGN_ELECTIONS:
        raise ValueError(f"sign_election must be one of {', '.join(SIGN_ELECTIONS)}, got {sign_election!r}")
    if divisor not in DIVISORS:
        raise ValueError(f"divisor must be one of {', '.join(DIVISORS)}, got {divisor!r}")
    gamma, total, count, tmp = ws.gamma[:length], ws.total[:length], ws.count[:length], ws.tmp[:length]
    total.zero_()
    if not deltas:
        return total  # nobody votes: numerator 0 (and D = 0 → 1)
    weighted = sign_election == "weighted_sum"
    if weighted:  # the vote and the contribution are both wᵢτᵢ
        for w, d in deltas:
            if w != 1.0:
                d.mul_(w)
    # votes → γ
    if sign_election == "count":
        torch.sign(deltas[0][1], out=gamma)
        for _, d in deltas[1:]:
            torch.sign(d, out=tmp)
            gamma += tmp
    else:
        gamma.copy_(deltas[0][1])
        for _, d in deltas[1:]:
            gamma += d
    torch.sign(gamma, out=gamma)
    gamma.add_(0.5)
    torch.sign(gamma, out=gamma)
    # agreeing entries
    if divisor != "none":
        count.zero_()
    for w, d in deltas:
        torch.mul(d, gamma, out=d)
        d.relu_()  # pᵢ: |vᵢ| where model i agrees with γ, else 0
        if divisor == "count":
            torch.sign(d, out=tmp)
            count += tmp
        elif divisor == "weights":
            torch.sign(d, out=tmp)
            tmp.mul_(w)
            count += tmp
        if not weighted and w != 1.0:
            d.mul_(w)
        total += d
    torch.mul(total, gamma, out=total)
    total.add_(0.0)  # −0 → +0
    if divisor == "none":
        return total
    if divisor == "count":
        count.clamp_(min=1.0)
    else:  # D = 0 → 1, other values unchanged: D + (1 − sign|D|)
        torch.abs(count, out=tmp)
        torch.sign(tmp, out=tmp)
        tmp.neg_()
        tmp.add_(1.0)
        count += tmp
    return total.div_(count)


def _lambda_below(threshold: float, dtype: "torch.dtype") -> float:
    """The largest value of ``dtype`` below ``threshold``: ``|x| > it`` ⇔ ``|x| ≥ threshold``."""
    import numpy as np
    import torch

    kind = np.float32 if dtype == torch.float32 else np.float64
    return float(np.nextafter(kind(threshold), kind(-np.inf)))


# ---------------------------------------------------------------------------------------
# option declarations shared by the configs (each call makes a fresh attrs field)


def _scaling_factor():
    return option(
        1.0,
        help="λ: θ = θ₀ + λ·merged task vector (the papers tune λ on validation data; "
        "FusionBench uses 0.3 for TA/TIES on CLIP ViT-B/32 × 8 tasks)",
    )


def _weights():
    return option(None, help="one weight wᵢ per model, in pool order (may be negative); default 1 each")


def _normalize(what: str = ""):
    return option(False, help=f"divide Σ wᵢτᵢ by Σ wᵢ (an error if they sum to 0){what}")


_PER_MODEL = " (one value, or a list with one value per model in pool order)"


def _density(default: float, what: str):
    return option(default, help=what + _PER_MODEL, validator=in_range(0.0, 1.0))


def _sign_election(what: str = ""):
    return option(
        "sum",
        help="how the sign of each entry is elected: sum = sign of Σ τᵢ (paper, PEFT), "
        f"weighted_sum = sign of Σ wᵢτᵢ (mergekit), count = sign of Σ sign(τᵢ) (majority vote){what}",
        validator=attrs.validators.in_(SIGN_ELECTIONS),
    )


def _divisor(what: str = ""):
    return option(
        "count",
        help="disjoint-merge divisor over agreeing models: count (paper's mean, PEFT), "
        f"weights = Σ agreeing wᵢ (mergekit normalize: true), none = plain sum (mergekit normalize: false){what}",
        validator=attrs.validators.in_(DIVISORS),
    )


def _variant(default: str, what: str):
    return option(default, help=what, validator=attrs.validators.in_(VARIANTS))


def _rescale(what: str):
    return option("inverse_p", help=what, validator=attrs.validators.in_(RESCALES))


def _len(value) -> int:
    return len(value) if isinstance(value, (list, tuple)) else 1


_TIES_ONLY = " (variant=ties only)"
_LINEAR_ONLY = " (variant=linear only)"


# ---------------------------------------------------------------------------------------
# the methods


class _TaskVectorMethod(KernelMethod):
    """Shared plumbing: weights, and combining sparsified task vectors per variant."""

    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True)

    def _weights(self, n: int) -> list[float]:
        return resolve_weights(self.name, getattr(self.config, "weights", None), n)

    def check_inputs(self, n_models: int, has_base: bool) -> None:
        super().check_inputs(n_models, has_base)
        from fusion_core.errors import InputError

        for field in ("density", "gamma", "epsilon"):
            value = getattr(self.config, field, None)
            if isinstance(value, (list, tuple)) and len(value) != n_models:
                raise InputError(f"method {self.name!r}: {field} has {len(value)} value(s) for {n_models} model(s)")

    def _combine(self, base: "torch.Tensor", deltas: list["torch.Tensor"], weights: list[float], variant: str) -> "torch.Tensor":
        cfg = self.config
        if variant == "ties":
            merged = ties_merge(deltas, weights, cfg.sign_election, cfg.divisor)
        else:
            merged = linear_merge(deltas, weights, cfg.normalize)
        return add_scaled(base, merged, cfg.scaling_factor)


class TaskArithmetic(_TaskVectorMethod):
    """θ₀ + λ·Σ wᵢτᵢ (÷ Σ wᵢ with normalize)."""

    name = "task_arithmetic"
    summary = "Adds the scaled sum of task vectors to the base: θ₀ + λ·Σ wᵢ(θᵢ − θ₀)."
    reference_url = "https://arxiv.org/abs/2212.04089"
    elementwise = True

    @attrs.frozen
    class Config:
        scaling_factor: float = _scaling_factor()
        weights: list[float] | None = _weights()
        normalize: bool = _normalize()

        def __attrs_post_init__(self) -> None:
            check_weight_sum("task_arithmetic", self.weights, self.normalize)

    def kernel(self, name: str, base: "torch.Tensor | None", tensors: Sequence["torch.Tensor"], ctx: KernelContext) -> "torch.Tensor":
        deltas = task_vectors(base, tensors)
        return self._combine(base, deltas, self._weights(len(deltas)), "linear")


class MagnitudePrune(_TaskVectorMethod):
    """Task arithmetic on task vectors trimmed to their top-density magnitudes (no rescale)."""

    name = "magnitude_prune"
    summary = "Task arithmetic on task vectors trimmed to their largest-magnitude entries (PEFT magnitude_prune)."
    reference_url = "https://huggingface.co/docs/peft/developer_guides/model_merging"

    @attrs.frozen
    class Config:
        density: float | list[float] = _density(
            0.2, "fraction of each task vector's entries kept, by magnitude, per tensor: 1 keeps all, 0 keeps none"
        )
        scaling_factor: float = _scaling_factor()
        weights: list[float] | None = _weights()
        normalize: bool = _normalize()

        def __attrs_post_init__(self) -> None:
            check_weight_sum("magnitude_prune", self.weights, self.normalize)

    def kernel(self, name: str, base: "torch.Tensor | None", tensors: Sequence["torch.Tensor"], ctx: KernelContext) -> "torch.Tensor":
        import torch

        deltas = [
            torch.where(sparsify.magnitude_mask(tau, per_model(self.config.density, i)), tau, torch.zeros_like(tau))
            for i, tau in enumerate(task_vectors(base, tensors))
        ]
        return self._combine(base, deltas, self._weights(len(deltas)), "linear")


class Ties(_TaskVectorMethod):
    """TIES-Merging: trim each τᵢ to its top-density magnitudes, elect signs, disjoint mean."""

    name = "ties"
    summary = "TIES-Merging: trim task vectors by magnitude, elect a sign per entry, average the agreeing entries."
    reference_url = "https://arxiv.org/abs/2306.01708"

    @attrs.frozen
    class Config:
        density: float | list[float] = _density(
            0.2,
            "fraction of each task vector kept by magnitude, per tensor: k = max(1, floor(density·n)); "
            "1 = no trim, 0 = all dropped (θ₀); paper: 0.2",
        )
        scaling_factor: float = _scaling_factor()
        weights: list[float] | None = _weights()
        sign_election: Literal["sum", "weighted_sum", "count"] = _sign_election()
        divisor: Literal["count", "weights", "none"] = _divisor()

    # The whole-tensor kernel is the two-phase protocol run on one block: a per-model
    # top-k selection (phase 1), then the trim, election and disjoint merge (phase 2).

    def kernel(self, name: str, base: "torch.Tensor | None", tensors: Sequence["torch.Tensor"], ctx: KernelContext) -> "torch.Tensor":
        stats = [self.chunk_stats(name, base, t, i, ctx) for i, t in enumerate(tensors)]
        return self.kernel_chunk(name, base, tensors, ctx, stats, 0)

    def chunk_stats(self, name: str, base: "torch.Tensor", tensor: "torch.Tensor", index: int, ctx: KernelContext) -> sparsify.TopK:
        """Phase 1: the top-``density`` selection of ``|τᵢ|`` over the whole tensor."""
        return sparsify.magnitude_top_k(base, tensor, per_model(self.config.density, index))

    def kernel_chunk(
        self,
        name: str,
        base: "torch.Tensor",
        tensors: Sequence["torch.Tensor"],
        ctx: KernelContext,
        stats: Sequence[sparsify.TopK],
        start: int,
    ) -> "torch.Tensor":
        """Phase 2: rows ``start …`` of the merge, given every model's selection."""
        import torch

        weights = self._weights(len(tensors))
        offset = _row_offset(base, start)
        if not fused_supported(base):  # the reference operations on this block
            deltas = []
            for t, selection in zip(tensors, stats, strict=True):
                tau = (t - base).reshape(-1)
                keep = selection.keep_mask(tau.abs(), offset)
                deltas.append(torch.where(keep, tau, torch.zeros_like(tau)).reshape(base.shape))
            return self._combine(base, deltas, weights, "ties")
        lambdas = [None if s.keep_all or s.keep_none else _lambda_below(s.threshold, base.dtype) for s in stats]

        def fill(i: int, b: "torch.Tensor", t: "torch.Tensor", out: "torch.Tensor", at: int) -> bool:
            selection = stats[i]
            if selection.keep_none:
                return False
            torch.sub(t, b, out=out)
            if lambdas[i] is not None:
                torch.ops.aten.hardshrink.out(out, lambdas[i], out=out)
                if selection.threshold != 0:  # at 0 the tied entries are zeros either way
                    selection.drop_ties(out, at)
            return True

        return fused_merge(base, tensors, offset, fill, weights, "ties", self.config)


class Dare(_TaskVectorMethod):
    """DARE: drop each task-vector entry with probability 1 − density, rescale, then merge."""

    name = "dare"
    summary = "DARE: randomly drops task-vector entries and rescales the rest, then merges linearly or with TIES."
    reference_url = "https://arxiv.org/abs/2311.03099"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True, random=True)

    @attrs.frozen
    class Config:
        variant: Literal["linear", "ties"] = _variant(
            "linear", "how the sparse task vectors are merged: linear (task arithmetic) or ties (sign election + disjoint mean)"
        )
        density: float | list[float] = _density(0.1, "probability of keeping each entry (1 − drop rate); paper: drop 90%, i.e. 0.1")
        rescale: Literal["inverse_p", "l1", "none"] = _rescale(
            "inverse_p = divide kept entries by density (paper, PEFT; density 0 gives zeros); "
            "l1 = match ‖τ‖₁ (mergekit rescale: true); none = no rescale"
        )
        scaling_factor: float = _scaling_factor()
        weights: list[float] | None = _weights()
        normalize: bool = _normalize(_LINEAR_ONLY)
        sign_election: Literal["sum", "weighted_sum", "count"] = _sign_election(_TIES_ONLY)
        divisor: Literal["count", "weights", "none"] = _divisor(_TIES_ONLY)

        def __attrs_post_init__(self) -> None:
            check_weight_sum("dare", self.weights, self.normalize and self.variant == "linear")

    # Like TIES, the whole-tensor kernel is the two-phase protocol on one block: phase 1
    # draws model i's mask (the same stream as ``ctx.rand_like(τᵢ, salt=str(i)) < density``)
    # and keeps it packed, one bit per entry, with the L1 norms when rescale = l1.

    def kernel(self, name: str, base: "torch.Tensor | None", tensors: Sequence["torch.Tensor"], ctx: KernelContext) -> "torch.Tensor":
        stats = [self.chunk_stats(name, base, t, i, ctx) for i, t in enumerate(tensors)]
        return self.kernel_chunk(name, base, tensors, ctx, stats, 0)

    def chunk_stats(self, name: str, base: "torch.Tensor", tensor: "torch.Tensor", index: int, ctx: KernelContext) -> sparsify.PackedMask:
        """Phase 1: model ``index``'s Bernoulli mask over the whole tensor (and L1 rescale)."""
        cfg = self.config
        mask = sparsify.packed_bernoulli_mask(tensor.numel(), per_model(cfg.density, index), ctx, salt=str(index))
        if cfg.rescale == "l1":
            mask = sparsify.with_l1_scale(mask, base, tensor)
        return mask

    def kernel_chunk(
        self,
        name: str,
        base: "torch.Tensor",
        tensors: Sequence["torch.Tensor"],
        ctx: KernelContext,
        stats: Sequence[sparsify.PackedMask],
        start: int,
    ) -> "torch.Tensor":
        """Phase 2: rows ``start …`` of the merge, given every model's mask."""
        import torch

        cfg = self.config
        if cfg.rescale not in RESCALES:
            raise ValueError(f"rescale must be one of inverse_p, l1, none, got {cfg.rescale!r}")
        weights = self._weights(len(tensors))
        offset = _row_offset(base, start)
        if not fused_supported(base):  # the reference operations on this block
            deltas = []
            for i, (t, mask) in enumerate(zip(tensors, stats, strict=True)):
                tau = t - base
                keep = mask.block(offset, tau.numel(), tau.device).to(torch.bool).reshape(tau.shape)
                masked = torch.where(keep, tau, torch.zeros_like(tau))
                deltas.append(sparsify.apply_packed_rescale(cfg.rescale, masked, mask, per_model(cfg.density, i)))
            return self._combine(base, deltas, weights, cfg.variant)
        keep_f = torch.empty(min(base.numel(), sparsify.BLOCK), dtype=base.dtype, device=base.device)

        def fill(i: int, b: "torch.Tensor", t: "torch.Tensor", out: "torch.Tensor", at: int) -> bool:
            mask = stats[i]
            if mask.keep_none:  # rescaled or not, nothing is left
                out.zero_()
                return False
            torch.sub(t, b, out=out)
            if not mask.keep_all:
                keep = keep_f[: out.numel()]
                keep.copy_(mask.block(at, out.numel(), out.device))
                out.mul_(keep)
                out.add_(0.0)  # a dropped −τ is −0 here and +0 in the reference
            sparsify.apply_packed_rescale(cfg.rescale, out, mask, per_model(cfg.density, i))
            return True

        return fused_merge(base, tensors, offset, fill, weights, cfg.variant, cfg)


class Breadcrumbs(_TaskVectorMethod):
    """Model Breadcrumbs: drop the largest gamma fraction and the smallest entries of each τᵢ."""

    name = "breadcrumbs"
    summary = "Model Breadcrumbs: masks out both the largest outliers and the smallest task-vector entries, then merges."
    reference_url = "https://arxiv.org/abs/2312.06795"

    @attrs.frozen
    class Config:
        variant: Literal["linear", "ties"] = _variant(
            "linear", "how the masked task vectors are merged: linear (paper, task arithmetic) or ties (mergekit breadcrumbs_ties)"
        )
        density: float | list[float] = _density(
            0.9, "fraction of each task vector kept, per tensor (floor(density·n) entries); 1 keeps everything"
        )
        gamma: float | list[float] = option(
            0.01,
            help="fraction of largest-magnitude entries dropped as outliers (floor(gamma·n); 0 on tensors under 1/gamma entries)"
            + _PER_MODEL,
            validator=in_range(0.0, 1.0),
        )
        scaling_factor: float = _scaling_factor()
        weights: list[float] | None = _weights()
        normalize: bool = _normalize(_LINEAR_ONLY)
        sign_election: Literal["sum", "weighted_sum", "count"] = _sign_election(_TIES_ONLY)
        divisor: Literal["count", "weights", "none"] = _divisor(_TIES_ONLY)

        def __attrs_post_init__(self) -> None:
            check_weight_sum("breadcrumbs", self.weights, self.normalize and self.variant == "linear")

    def kernel(self, name: str, base: "torch.Tensor | None", tensors: Sequence["torch.Tensor"], ctx: KernelContext) -> "torch.Tensor":
        import torch

        cfg = self.config
        deltas = [
            torch.where(sparsify.breadcrumbs_mask(tau, per_model(cfg.density, i), per_model(cfg.gamma, i)), tau, torch.zeros_like(tau))
            for i, tau in enumerate(task_vectors(base, tensors))
        ]
        return self._combine(base, deltas, self._weights(len(deltas)), cfg.variant)


class Della(_TaskVectorMethod):
    """DELLA-Merging: MagPrune (magnitude-ranked keep probabilities per row), then elect and fuse."""

    name = "della"
    summary = "DELLA: drops task-vector entries with probabilities ranked by magnitude per row, rescales, then TIES or linear merge."
    reference_url = "https://arxiv.org/abs/2406.11617"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True, random=True)

    @attrs.frozen
    class Config:
        variant: Literal["linear", "ties"] = _variant(
            "ties", "how the pruned task vectors are merged: ties (paper: elect + fuse; mergekit della) or linear (mergekit della_linear)"
        )
        density: float | list[float] = _density(0.5, "mean keep probability d; keep probabilities span [d − epsilon, d + epsilon] within each row")
        epsilon: float | list[float] = option(
            0.15,
            help="half-width ε of the keep-probability range; requires 0 < density − epsilon and density + epsilon ≤ 1"
            + _PER_MODEL,
            validator=in_range(0.0, 0.5),
        )
        ranking: Literal["rows", "dim1"] = option(
            "rows",
            help="how entries are ranked in tensors of more than 2 dims: rows = within each row (dim 0 index), "
            "flattened (fusion); dim1 = along dim 1, one ranking per position of the other dims "
            "(mergekit 0.1.5 sparsify.della_magprune, selected by mergekit recipes); 1-D/2-D tensors rank the same either way",
            validator=attrs.validators.in_(("rows", "dim1")),
        )
        rescale: Literal["inverse_p", "l1", "none"] = _rescale(
            "inverse_p = divide each kept entry by its own keep probability (paper); "
            "l1 = match ‖τ‖₁ per tensor (mergekit); none = no rescale"
        )
        scaling_factor: float = _scaling_factor()
        weights: list[float] | None = _weights()
        normalize: bool = _normalize(_LINEAR_ONLY)
        sign_election: Literal["sum", "weighted_sum", "count"] = _sign_election(_TIES_ONLY)
        divisor: Literal["count", "weights", "none"] = _divisor(_TIES_ONLY)

        def __attrs_post_init__(self) -> None:
            n = max((len(v) for v in (self.density, self.epsilon) if isinstance(v, (list, tuple))), default=1)
            for i in range(n):
                density, epsilon = per_model(self.density, i % _len(self.density)), per_model(self.epsilon, i % _len(self.epsilon))
                low, high = density - epsilon, density + epsilon
                if not (low > 0 and high <= 1 + 1e-12):
                    raise ValueError(
                        f"della: keep probabilities must lie in (0, 1], but density ± epsilon = [{low:g}, {high:g}] "
                        f"(density={density}, epsilon={epsilon}); lower epsilon or move density"
                    )
            check_weight_sum("della", self.weights, self.normalize and self.variant == "linear")

    def kernel(self, name: str, base: "torch.Tensor | None", tensors: Sequence["torch.Tensor"], ctx: KernelContext) -> "torch.Tensor":
        cfg = self.config
        deltas = []
        for i, tau in enumerate(task_vectors(base, tensors)):
            probs = self.keep_probs(tau, per_model(cfg.density, i), per_model(cfg.epsilon, i))
            mask = sparsify.probability_mask(tau, probs, ctx, salt=str(i))
            deltas.append(sparsify.apply_rescale(cfg.rescale, tau, mask, probs))
        return self._combine(base, deltas, self._weights(len(deltas)), cfg.variant)


    def keep_probs(self, tau: "torch.Tensor", density: float, epsilon: float) -> "torch.Tensor":
        """MagPrune keep probabilities, ranked per row or along dim 1 (``ranking``)."""
        if self.config.ranking == "dim1" and tau.dim() > 2:
            moved = tau.movedim(1, -1)
            probs = sparsify.della_keep_probs(moved.reshape(-1, moved.shape[-1]), density, epsilon)
            return probs.reshape(moved.shape).movedim(-1, 1)
        return sparsify.della_keep_probs(tau, density, epsilon)


class Sce(_TaskVectorMethod):
    """SCE (FuseChat): Select by variance across models, Calculate weights from τ², Erase minority signs."""

    name = "sce"
    summary = "SCE: keeps the highest-variance positions, weights models by mean τ², merges the sign-agreeing entries."
    reference_url = "https://arxiv.org/abs/2408.07990"

    @attrs.frozen
    class Config:
        select_topk: float = option(
            1.0,
            help="fraction of positions with non-zero variance across models that are kept "
            "(floor(topk · count of non-zero variances), highest variance first); 1 keeps all",
            validator=in_range(0.0, 1.0),
        )
        scaling_factor: float = _scaling_factor()

    def kernel(self, name: str, base: "torch.Tensor | None", tensors: Sequence["torch.Tensor"], ctx: KernelContext) -> "torch.Tensor":
        import torch

        deltas = task_vectors(base, tensors)
        topk = self.config.select_topk
        if topk < 1:
            variance = torch.stack(deltas).var(dim=0, unbiased=False)
            k = sparsify.fraction_count(topk, int(torch.count_nonzero(variance)))
            keep = sparsify.top_k_mask(variance, k)
            deltas = [torch.where(keep, d, torch.zeros_like(d)) for d in deltas]
        energies = [float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2 / max(1, d.numel()) for d in deltas]
        total = sum(energies)
        weights = [1.0 / len(deltas)] * len(deltas) if abs(total) < 1e-6 else [e / total for e in energies]
        gamma = elect_sign(deltas, weights, "sum")
        numerator = torch.zeros_like(deltas[0])
        denominator = torch.zeros_like(deltas[0])
        for w, d in zip(weights, deltas, strict=True):
            agree = (torch.sign(d) == gamma).to(d.dtype)
            numerator += w * agree * d
            denominator += w * agree
        merged = numerator / denominator.clamp(min=1e-6)
        return add_scaled(base, merged, self.config.scaling_factor)


class MagMax(_TaskVectorMethod):
    """MagMax: per entry, the task-vector value of largest magnitude."""

    name = "magmax"
    summary = "MagMax: per entry keeps the task-vector value with the largest magnitude, then adds it to the base."
    reference_url = "https://arxiv.org/abs/2407.06322"
    elementwise = True

    @attrs.frozen
    class Config:
        scaling_factor: float = _scaling_factor()

    def kernel(self, name: str, base: "torch.Tensor | None", tensors: Sequence["torch.Tensor"], ctx: KernelContext) -> "torch.Tensor":
        import torch

        deltas = task_vectors(base, tensors)
        best = deltas[0]
        for d in deltas[1:]:
            best = torch.where(d.abs() > best.abs(), d, best)  # equal magnitudes: the earlier model wins
        return add_scaled(base, best, self.config.scaling_factor)


# ---------------------------------------------------------------------------------------
# mergekit 0.1.5's task-arithmetic family (merge_methods/generalized_task_arithmetic.py):
# Σ over agreeing wᵢτᵢ with the sign elected on Σ wᵢτᵢ, divided by Σ agreeing wᵢ when
# normalize, times lambda.  An absent density is 1 (no sparsification).


def _rescale_l1(value: bool) -> dict:
    return {"rescale": "l1" if value else "none"}


def _no_rescale(method: str):
    def fields(value: bool) -> dict:
        if value:
            raise ValueError(f"rescale: true is not supported for {method} (fusion's {method} has no L1 rescale of the trim)")
        return {}

    return fields


def _divisor(value: bool) -> dict:
    return {"divisor": "weights" if value else "none"}


def _mk_shared(normalize: bool, rescale: bool, ties: bool, rescaling: bool, method: str) -> dict:
    return {
        "int8_mask": Param(bool, False),  # the storage dtype of mergekit's sign mask only
        "normalize": Param(bool, normalize, _divisor if ties else "normalize"),
        "rescale": Param(bool, rescale, _rescale_l1 if rescaling else _no_rescale(method)),
        "lambda": Param(float, 1.0, "scaling_factor"),
    }


def _mk_per_model(density: bool = True, **extra: Param) -> dict:
    out = {"weight": Param(float, to="weights")}
    if density:
        out["density"] = Param(float, 1.0, "density")
    return {**out, **extra}


def _della_density_one(fields: dict) -> dict:
    """mergekit's della keeps a task vector whole at density ≥ 1 (before checking ε): ε = 0 there."""
    density, epsilon = fields.get("density"), fields.get("epsilon")
    if isinstance(density, list) and isinstance(epsilon, list):
        fields["epsilon"] = [0.0 if d >= 1 else e for d, e in zip(density, epsilon, strict=True)]
    return fields


_TIES = {"sign_election": "weighted_sum"}
MERGEKIT = [
    MergekitMapping(
        "task_arithmetic",
        "task_arithmetic",
        shared=_mk_shared(False, False, False, False, "task_arithmetic") | {"rescale": Param(bool, False)},
        per_model=_mk_per_model(density=False) | {"density": Param(float, 1.0)},  # no sparsification: density unused
    ),
    MergekitMapping(
        "ties", "ties", fixed=_TIES, shared=_mk_shared(True, False, True, False, "ties"), per_model=_mk_per_model()
    ),
    MergekitMapping(
        "dare_ties",
        "dare",
        fixed={"variant": "ties", **_TIES},
        shared=_mk_shared(False, True, True, True, "dare"),
        per_model=_mk_per_model(),
    ),
    MergekitMapping(
        "dare_linear",
        "dare",
        fixed={"variant": "linear"},
        shared=_mk_shared(False, True, False, True, "dare"),
        per_model=_mk_per_model(),
    ),
    MergekitMapping(
        "breadcrumbs",
        "breadcrumbs",
        fixed={"variant": "linear"},
        shared=_mk_shared(False, False, False, False, "breadcrumbs"),
        per_model=_mk_per_model(gamma=Param(float, 0.01, "gamma")),
    ),
    MergekitMapping(
        "breadcrumbs_ties",
        "breadcrumbs",
        fixed={"variant": "ties", **_TIES},
        shared=_mk_shared(False, False, True, False, "breadcrumbs"),
        per_model=_mk_per_model(gamma=Param(float, 0.01, "gamma")),
    ),
    MergekitMapping(
        "della",
        "della",
        fixed={"variant": "ties", "ranking": "dim1", **_TIES},
        shared=_mk_shared(True, True, True, True, "della"),
        per_model=_mk_per_model(epsilon=Param(float, 0.15, "epsilon")),
        adjust=_della_density_one,
    ),
    MergekitMapping(
        "della_linear",
        "della",
        fixed={"variant": "linear", "ranking": "dim1"},
        shared=_mk_shared(False, True, False, True, "della"),
        per_model=_mk_per_model(epsilon=Param(float, 0.15, "epsilon")),
        adjust=_della_density_one,
    ),
    MergekitMapping(
        "sce",
        "sce",
        shared={"int8_mask": Param(bool, False), "select_topk": Param(float, 1.0, "select_topk")},
    ),
]


METHODS = [TaskArithmetic, Ties, Dare, Breadcrumbs, Della, MagnitudePrune, Sce, MagMax]
