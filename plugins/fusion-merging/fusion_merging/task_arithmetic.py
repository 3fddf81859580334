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

from fusion_core import Capabilities, DefaultCase, KernelContext, KernelMethod, in_range, option

from . import sparsify
from .basic import check_weight_sum, resolve_weights
from .conventions import by_convention, convention_option, per_model, resolve
from .mergekit.mapping import MergekitMapping, Param

if TYPE_CHECKING:  # pragma: no cover
    import torch

SIGN_ELECTIONS = ("sum", "weighted_sum", "count")
DIVISORS = ("count", "weights", "none", "max")
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


def elect_sign(deltas: Sequence["torch.Tensor"], weights: Sequence[float], sign_election: str, zero: float = 1.0) -> "torch.Tensor":
    """The elected sign γ ∈ {+1, −1} per entry (a zero vote elects ``zero``: +1, or −1).

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
    if zero > 0:
        return torch.where(votes >= 0, torch.ones_like(votes), -torch.ones_like(votes))
    return torch.where(votes > 0, torch.ones_like(votes), -torch.ones_like(votes))


def ties_merge(
    deltas: Sequence["torch.Tensor"], weights: Sequence[float], sign_election: str = "sum", divisor: str = "count",
    zero: float = 1.0,
) -> "torch.Tensor":
    """TIES elect + disjoint merge of already-sparsified task vectors.

    Model i *agrees* at an entry when the sign of its vote (τᵢ, or wᵢτᵢ for
    ``weighted_sum``) equals the elected sign γ; a zero entry never agrees.  The result is
    ``Σ_agreeing wᵢτᵢ / D`` with D = the number of agreeing models (``count``, the paper's
    disjoint mean), ``Σ_agreeing wᵢ`` (``weights``, mergekit ``normalize: true``) or 1
    (``none``, mergekit ``normalize: false``).  Where D = 0 (nobody agrees) it is 0.
    ``max`` (FusionBench ``merge_func: max``) is γ · the largest agreeing ``|wᵢτᵢ|``.
    ``zero`` is the sign a zero vote elects (:func:`elect_sign`).
    """
    import torch

    if divisor not in DIVISORS:
        raise ValueError(f"divisor must be one of {', '.join(DIVISORS)}, got {divisor!r}")
    gamma = elect_sign(deltas, weights, sign_election, zero)
    if divisor == "max":
        best = torch.zeros_like(deltas[0])
        for w, d in zip(weights, deltas, strict=True):
            vote = w * d if sign_election == "weighted_sum" else d
            agree = torch.sign(vote) == gamma
            best = torch.maximum(best, torch.where(agree, (w * d).abs(), torch.zeros_like(d)))
        return best * gamma + 0.0
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
# - elect: γ = sign(sign(votes) + ½) is +1 where votes ≥ 0 (also −0) and −1 elsewhere
#   (a zero vote electing −1: sign(sign(votes) − ½), +1 only where votes > 0);
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
    block: int | None = None,
    zero: float = 1.0,
) -> "torch.Tensor":
    """θ₀ + λ·merge(sparse τ₁ … τ_N), block by block.

    ``fill(i, base_block, model_block, out, flat_offset)`` writes model ``i``'s sparse task
    vector for the block into ``out`` and returns ``False`` when it is all zero (a model
    trimmed to nothing; TIES then leaves it out, which changes nothing).
    ``offset`` is the flat position of ``base[0]`` in the whole tensor; ``block`` the
    entries per block (default :data:`sparsify.BLOCK`; DELLA passes whole rows); ``zero`` the
    sign a zero TIES vote elects.
    """
    import torch

    flat_base = base.reshape(-1)
    flats = [t.reshape(-1) for t in tensors]
    n = flat_base.numel()
    out = torch.empty_like(flat_base)
    if n == 0:
        return out.reshape(base.shape)
    size = min(n, block or sparsify.BLOCK)
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
            merged = _ties_block(deltas, ws, length, config.sign_election, config.divisor, zero)
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


def _ties_block(deltas: list, ws: _Workspace, length: int, sign_election: str, divisor: str, zero: float = 1.0) -> "torch.Tensor":
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
    gamma.add_(0.5 if zero > 0 else -0.5)
    torch.sign(gamma, out=gamma)
    # agreeing entries
    if divisor != "none":
        count.zero_()
    for w, d in deltas:
        torch.mul(d, gamma, out=d)
        d.relu_()  # pᵢ: |vᵢ| where model i agrees with γ, else 0
        if divisor == "max":
            if not weighted and w != 1.0:
                d.mul_(abs(w))
            torch.maximum(total, d, out=total)
            continue
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
    if divisor in ("none", "max"):
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


def trim_fill(stats: Sequence, dtype: "torch.dtype") -> "Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, int], bool]":
    """The :func:`fused_merge` ``fill`` of task vectors trimmed by their selections
    (:class:`sparsify.TopK` or :class:`sparsify.AtLeast`), one per model."""
    import torch

    lambdas = [None if s.keep_all or s.keep_none else _lambda_below(s.threshold, dtype) for s in stats]

    def fill(i: int, b: "torch.Tensor", t: "torch.Tensor", out: "torch.Tensor", at: int) -> bool:
        selection = stats[i]
        if selection.keep_none:
            out.zero_()
            return False
        torch.sub(t, b, out=out)
        if lambdas[i] is not None:
            torch.ops.aten.hardshrink.out(out, lambdas[i], out=out)
            if selection.threshold != 0:  # at 0 the tied entries are zeros either way
                selection.drop_ties(out, at)
        return True

    return fill


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


def _density(default: float | None, what: str):
    return option(default, help=what + "; one value, or a list with one per model", validator=in_range(0.0, 1.0))


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


_TIES_ONLY = " (variant=ties only)"
_LINEAR_ONLY = " (variant=linear only)"


# ---------------------------------------------------------------------------------------
# the methods


class _TaskVectorMethod(KernelMethod):
    """Shared plumbing: weights, and combining sparsified task vectors per variant."""

    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True)

    per_model_fields: ClassVar[tuple[str, ...]] = ("density", "epsilon", "gamma")
    """Fields that take one value or a list with one value per model (mergekit's per-model parameters)."""

    def _weights(self, n: int) -> list[float]:
        return resolve_weights(self.name, getattr(self.config, "weights", None), n)

    def _per_model(self, key: str, n: int) -> list[float]:
        return per_model(self.name, key, getattr(self.config, key), n)

    def check_inputs(self, n_models: int, has_base: bool) -> None:
        super().check_inputs(n_models, has_base)
        from fusion_core import InputError

        for key in self.per_model_fields:
            value = getattr(self.config, key, None)
            if isinstance(value, (list, tuple)) and len(value) != n_models:
                raise InputError(f"method {self.name!r}: {key} has {len(value)} value(s) for {n_models} model(s)")

    def _stream(self, ctx: KernelContext, index: int, offset: int) -> list:
        """Model ``index``'s random stream for this tensor, ``[generator, position]``, positioned at
        flat ``offset``: the draws of ``ctx.rand_like(τ, salt=str(index))``, continued across row
        blocks (random methods: DARE, DELLA; re-drawn up to ``offset`` if blocks come out of order)."""
        import torch

        streams = self.__dict__.setdefault("_streams", {})
        key = (ctx.name, index)
        if offset == 0 or key not in streams:
            if offset == 0:  # a new tensor: forget the others' streams
                for other in [k for k in streams if k[0] != ctx.name]:
                    del streams[other]
            streams[key] = [ctx.generator(str(index)), 0]
        entry = streams[key]
        if entry[1] != offset:  # out of order: start over and skip ahead (not taken by the engine)
            entry[0], entry[1] = ctx.generator(str(index)), 0
            for start in range(0, offset, sparsify.BLOCK):
                torch.rand(min(sparsify.BLOCK, offset - start), generator=entry[0], dtype=torch.float32)
            entry[1] = offset
        return entry

    def _merge_trimmed(
        self, base: "torch.Tensor", tensors: Sequence["torch.Tensor"], stats: Sequence, offset: int, variant: str, zero: float = 1.0
    ) -> "torch.Tensor":
        """θ₀ + λ·merge of the τᵢ trimmed by their selections (:class:`sparsify.TopK` or
        :class:`sparsify.AtLeast`), flat positions ``offset …``: TIES, magnitude_prune."""
        import torch

        weights = self._weights(len(tensors))
        if not fused_supported(base):  # the reference operations on this block
            deltas = []
            for t, selection in zip(tensors, stats, strict=True):
                tau = (t - base).reshape(-1)
                keep = selection.keep_mask(tau.abs(), offset)
                deltas.append(torch.where(keep, tau, torch.zeros_like(tau)).reshape(base.shape))
            return self._combine(base, deltas, weights, variant, zero)
        return fused_merge(base, tensors, offset, trim_fill(stats, base.dtype), weights, variant, self.config, zero=zero)

    def _combine(self, base: "torch.Tensor", deltas: list["torch.Tensor"], weights: list[float], variant: str, zero: float = 1.0) -> "torch.Tensor":
        cfg = self.config
        if variant == "ties":
            merged = ties_merge(deltas, weights, cfg.sign_election, cfg.divisor, zero)
        else:
            merged = linear_merge(deltas, weights, cfg.normalize)
        return add_scaled(base, merged, cfg.scaling_factor)


TA_PRESETS: dict[str, dict[str, Any]] = {
    "fusionbench": {"scaling_factor": 0.3},
    "mergekit": {"scaling_factor": 1.0},
    "paper": {"scaling_factor": 1.0},
}
"""FusionBench 0.2.33 ``task_arithmetic.yaml`` (scaling_factor 0.3); mergekit ``lambda`` 1; the paper / fusion ≤ 0.1: 1."""


class TaskArithmetic(_TaskVectorMethod):
    """θ₀ + λ·Σ wᵢτᵢ (÷ Σ wᵢ with normalize)."""

    name = "task_arithmetic"
    summary = "Adds the scaled sum of task vectors to the base: θ₀ + λ·Σ wᵢ(θᵢ − θ₀)."
    reference_url = "https://arxiv.org/abs/2212.04089"
    fusionbench_config = "task_arithmetic.yaml"
    elementwise = True

    @attrs.frozen
    class Config:
        convention: Literal["fusionbench", "mergekit", "paper"] = convention_option(TA_PRESETS)
        scaling_factor: float = by_convention(TA_PRESETS, "scaling_factor", "λ: θ = θ₀ + λ·Σ wᵢτᵢ")
        weights: list[float] | None = _weights()
        normalize: bool = _normalize()

        def __attrs_post_init__(self) -> None:
            resolve(self, TA_PRESETS)
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

    # Like TIES (trim: tensor): a per-model top-k selection (phase 1 of the engine's two-phase
    # protocol), then the trim and the linear merge in the fused block loop (phase 2); the same
    # bytes as ``torch.where(magnitude_mask(τ, d), τ, 0)`` and ``linear_merge``.

    def kernel(self, name: str, base: "torch.Tensor | None", tensors: Sequence["torch.Tensor"], ctx: KernelContext) -> "torch.Tensor":
        stats = [self.chunk_stats(name, base, t, i, ctx) for i, t in enumerate(tensors)]
        return self.kernel_chunk(name, base, tensors, ctx, stats, 0)

    def chunk_stats(self, name: str, base: "torch.Tensor", tensor: "torch.Tensor", index: int, ctx: KernelContext) -> sparsify.TopK:
        """Phase 1: the top-``density`` selection of ``|τᵢ|`` over the whole tensor."""
        density = self.config.density
        return sparsify.magnitude_top_k(base, tensor, density[index] if isinstance(density, (list, tuple)) else density)

    def kernel_chunk(self, name: str, base: "torch.Tensor", tensors: Sequence["torch.Tensor"], ctx: KernelContext,
                     stats: Sequence[sparsify.TopK], start: int) -> "torch.Tensor":
        """Phase 2: rows ``start …`` of the merge, given every model's selection."""
        return self._merge_trimmed(base, tensors, stats, _row_offset(base, start), "linear")


class _WholeModelTrim:
    """The engine's whole-model passes for FusionBench's TIES trim: per model, the exact threshold
    ``v`` of its whole task vector (:class:`fusion_merging.model_trim.KthMagnitude`); entries with
    ``|τ| ≥ v`` are kept.  Subclasses say which models trim how much (:meth:`_trim_densities`) and
    what is trimmed (:meth:`_feed`: the task vector, or DARE's dropped one)."""

    _thresholds: list | None = None

    def _trim_densities(self, n: int) -> list[float] | None:
        """The trim density of each of ``n`` models, or ``None`` for no whole-model trim."""
        raise NotImplementedError

    def _feed(self, kth: Any, name: str, base: "torch.Tensor", tensor: "torch.Tensor", index: int, ctx: KernelContext) -> None:
        kth.add_difference(tensor, base)

    def model_passes(self, n_models: int) -> int:
        self._thresholds = None
        densities = self._trim_densities(n_models)
        if densities is None:
            return 0
        from .model_trim import MAX_PASSES, KthMagnitude

        self._kth = [KthMagnitude(None, d) for d in densities]
        return MAX_PASSES  # at most; model_pass_end says when every threshold is found

    def model_pass(self, pass_index: int, name: str, base: "torch.Tensor", tensor: "torch.Tensor", index: int, ctx: KernelContext) -> None:
        kth = self._kth[index]
        if not kth.done:
            kth.bind(tensor.dtype)
            self._feed(kth, name, base, tensor, index, ctx)

    def model_pass_end(self, pass_index: int) -> bool:
        for kth in self._kth:
            kth.end_pass()
        if all(k.done for k in self._kth):
            self._thresholds = [None if k.keep_all else k.threshold for k in self._kth]
            return True
        return False

    def _thresholds_for(self, name: str, base: "torch.Tensor", tensors: Sequence["torch.Tensor"], ctx: KernelContext) -> list:
        """Per model, the trim threshold (``None``: keep all).  Outside the engine's model passes
        (a kernel called on its own) the model is this one tensor."""
        densities = self._trim_densities(len(tensors))
        if densities is None:
            return [None] * len(tensors)
        if self._thresholds is not None:
            return self._thresholds
        from .model_trim import KthMagnitude

        out = []
        for i, (t, d) in enumerate(zip(tensors, densities, strict=True)):
            kth = KthMagnitude(base.dtype, d)
            while not kth.done:
                self._feed(kth, name, base, t, i, ctx)
                kth.end_pass()
            out.append(None if kth.keep_all else kth.threshold)
        return out


TIES_PRESETS: dict[str, dict[str, Any]] = {
    "fusionbench": {"trim": "model", "density": 0.2, "scaling_factor": 0.3, "sign_election": "sum", "divisor": "none",
                    "zero_vote": "majority"},
    "mergekit": {"trim": "tensor", "density": 1.0, "scaling_factor": 1.0, "sign_election": "weighted_sum", "divisor": "weights",
                 "zero_vote": "plus"},
    "paper": {"trim": "tensor", "density": 0.2, "scaling_factor": 1.0, "sign_election": "sum", "divisor": "count",
              "zero_vote": "plus"},
}
"""TIES per convention: FusionBench 0.2.33 ``config/method/ties_merging.yaml`` (threshold 20, merge_func sum,
scaling 0.3, whole-model trim, zero votes take the model-wide majority sign); mergekit 0.1.5 ``ties`` (no trim unless density is given, weighted sign vote,
normalize: true); the paper / fusion ≤ 0.1 (per-tensor trim, disjoint mean, λ 1)."""

TRIMS = ("model", "tensor")
ZERO_VOTES = ("plus", "majority")


class Ties(_WholeModelTrim, _TaskVectorMethod):
    """TIES-Merging: trim each τᵢ to its top-density magnitudes, elect signs, disjoint merge."""

    name = "ties"
    summary = "TIES-Merging: trim task vectors by magnitude, elect a sign per entry, average the agreeing entries."
    reference_url = "https://arxiv.org/abs/2306.01708"
    fusionbench_config = "ties_merging.yaml"

    @attrs.frozen
    class Config:
        convention: Literal["fusionbench", "mergekit", "paper"] = convention_option(
            TIES_PRESETS, " (fusionbench = fusion_bench method=ties_merging; mergekit = merge_method: ties)"
        )
        trim: Literal["model", "tensor"] = by_convention(
            TIES_PRESETS,
            "trim",
            "model = keep the top density of each model's whole task vector: |τ| ≥ the (d − ⌊d·density⌋)-th smallest "
            "of all d entries, ties kept (FusionBench, streamed exactly, see fusion_merging.model_trim); "
            "tensor = keep max(1, ⌊density·n⌋) entries per tensor, equal magnitudes in index order",
            validator=attrs.validators.optional(attrs.validators.in_(TRIMS)),
        )
        density: float | list[float] = by_convention(
            TIES_PRESETS, "density", "fraction of each task vector kept by magnitude (FusionBench threshold/100); 1 = no trim, 0 = all dropped",
            validator=in_range(0.0, 1.0),
        )
        scaling_factor: float = by_convention(TIES_PRESETS, "scaling_factor", "λ: θ = θ₀ + λ·merged task vector")
        weights: list[float] | None = _weights()
        sign_election: Literal["sum", "weighted_sum", "count"] = by_convention(
            TIES_PRESETS,
            "sign_election",
            "how the sign of each entry is elected: sum = sign of Σ τᵢ (paper, FusionBench, PEFT), "
            "weighted_sum = sign of Σ wᵢτᵢ (mergekit), count = sign of Σ sign(τᵢ) (majority vote); a zero vote: see zero_vote",
            validator=attrs.validators.optional(attrs.validators.in_(SIGN_ELECTIONS)),
        )
        divisor: Literal["count", "weights", "none", "max"] = by_convention(
            TIES_PRESETS,
            "divisor",
            "disjoint-merge divisor over agreeing models: none = plain sum (FusionBench merge_func: sum, mergekit normalize: false), "
            "count = their mean (paper, FusionBench merge_func: mean, PEFT), weights = Σ agreeing wᵢ (mergekit normalize: true), "
            "max = the largest agreeing magnitude, signed (FusionBench merge_func: max)",
            validator=attrs.validators.optional(attrs.validators.in_(DIVISORS)),
        )
        zero_vote: Literal["plus", "majority"] = by_convention(
            TIES_PRESETS,
            "zero_vote",
            "the sign elected where the votes cancel exactly: plus = + (mergekit, the paper); majority = the sign of "
            "(#entries electing + − #entries electing −) over the whole model, − on a tie (FusionBench resolve_sign; "
            "one more streamed pass, see fusion_merging.ties_votes)",
            validator=attrs.validators.optional(attrs.validators.in_(ZERO_VOTES)),
        )

        def __attrs_post_init__(self) -> None:
            resolve(self, TIES_PRESETS)

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._thresholds: list | None = None
        self._tally = None  # zero_vote: majority — the model-wide vote counts (ties_votes.VoteTally)
        self._voting = False
        self._majority: float | None = None  # its zero sign, once counted
        if self.config.trim == "model":
            self.elementwise = True  # a global threshold: entries are independent, so any row block works

    # -- the whole-model trim (FusionBench): exact global thresholds from the engine's model passes,
    # then (zero_vote: majority, two models or more) one pass counting the elected signs

    def _trim_densities(self, n: int) -> list[float] | None:
        return self._per_model("density", n) if self.config.trim == "model" else None

    def _needs_majority(self, n_models: int) -> bool:
        """One model's zero votes are entries it does not keep: they merge to 0 whatever γ is."""
        return self.config.zero_vote == "majority" and n_models > 1

    def model_passes(self, n_models: int) -> int:
        from .ties_votes import VoteTally

        passes = super().model_passes(n_models)
        self._tally, self._voting, self._majority, self._n = None, False, None, n_models
        if not self._needs_majority(n_models):
            return passes
        self._tally = VoteTally()
        self._voting = passes == 0  # no thresholds to find first (trim: tensor)
        return passes + 1

    def model_pass(self, pass_index: int, name: str, base: "torch.Tensor", tensor: "torch.Tensor", index: int, ctx: KernelContext) -> None:
        if not self._voting:
            super().model_pass(pass_index, name, base, tensor, index, ctx)
            return
        selection = self._pass_selection(name, base, tensor, index, ctx)
        weight = self._weights(self._n)[index]
        if fused_supported(base):  # the merge's own trim, block by block
            fill = trim_fill([selection], base.dtype)
            self._tally.add_blocks(name, base, tensor, lambda b, t, out, at: fill(0, b, t, out, at), weight, self.config.sign_election)
        else:
            from .ties_votes import trimmed_vote

            self._tally.add(name, trimmed_vote(base, tensor, selection, weight, self.config.sign_election))

    def model_pass_end(self, pass_index: int) -> bool:
        if self._voting:
            self._tally.flush()
            self._voting, self._majority = False, self._tally.zero_sign
            return True
        done = super().model_pass_end(pass_index)
        if done and self._tally is not None:
            self._voting = True  # one more pass: the model-wide majority sign
            return False
        return done

    def _pass_selection(self, name: str, base: "torch.Tensor", tensor: "torch.Tensor", index: int, ctx: KernelContext):
        if self.config.trim == "model":
            return sparsify.AtLeast(base.numel(), self._thresholds[index])
        return self.chunk_stats(name, base, tensor, index, ctx)

    def _zero_sign(self, base: "torch.Tensor", tensors: Sequence["torch.Tensor"], stats: Sequence, offset: int) -> float:
        """The sign a zero vote elects: the engine's tally, or (a kernel called on its own) this tensor's."""
        if not self._needs_majority(len(tensors)):
            return 1.0
        if self._majority is not None:
            return self._majority
        from .ties_votes import VoteTally, trimmed_vote

        tally = VoteTally()
        weights = self._weights(len(tensors))
        for t, selection, w in zip(tensors, stats, weights, strict=True):
            tally.add("", trimmed_vote(base, t, selection, w, self.config.sign_election, offset))
        tally.flush()
        return tally.zero_sign

    def _model_selections(self, name: str, base: "torch.Tensor", tensors: Sequence["torch.Tensor"], ctx: KernelContext) -> list:
        return [sparsify.AtLeast(base.numel(), th) for th in self._thresholds_for(name, base, tensors, ctx)]

    # The per-tensor whole-tensor kernel is the two-phase protocol run on one block: a per-model
    # top-k selection (phase 1), then the trim, election and disjoint merge (phase 2).

    def kernel(self, name: str, base: "torch.Tensor | None", tensors: Sequence["torch.Tensor"], ctx: KernelContext) -> "torch.Tensor":
        if self.config.trim == "model":
            return self._merge(base, tensors, self._model_selections(name, base, tensors, ctx), 0)
        stats = [self.chunk_stats(name, base, t, i, ctx) for i, t in enumerate(tensors)]
        return self.kernel_chunk(name, base, tensors, ctx, stats, 0)

    def chunk_stats(self, name: str, base: "torch.Tensor", tensor: "torch.Tensor", index: int, ctx: KernelContext) -> sparsify.TopK:
        """Phase 1 (trim: tensor): the top-``density`` selection of ``|τᵢ|`` over the whole tensor."""
        density = self.config.density
        if isinstance(density, (list, tuple)):
            density = density[index]
        return sparsify.magnitude_top_k(base, tensor, density)

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
        return self._merge(base, tensors, stats, _row_offset(base, start))

    def _merge(self, base: "torch.Tensor", tensors: Sequence["torch.Tensor"], stats: Sequence, offset: int) -> "torch.Tensor":
        return self._merge_trimmed(base, tensors, stats, offset, "ties", self._zero_sign(base, tensors, stats, offset))


DARE_PRESETS: dict[str, dict[str, Any]] = {
    "fusionbench": {"density": 0.5, "rescale": "inverse_p", "scaling_factor": 0.3, "sign_election": "sum", "divisor": "none", "ties_trim": 0.2},
    "mergekit": {"density": 1.0, "rescale": "l1", "scaling_factor": 1.0, "sign_election": "weighted_sum", "divisor": "none", "ties_trim": 1.0},
    "paper": {"density": 0.1, "rescale": "inverse_p", "scaling_factor": 1.0, "sign_election": "sum", "divisor": "count", "ties_trim": 1.0},
}
"""FusionBench 0.2.33 ``dare/task_arithmetic.yaml`` (sparsity_ratio 0.5, rescale, scaling 0.3) and
``dare/ties_merging.yaml`` (scaling 0.5, merge_func sum, then TIES's whole-model trim to the top 20 %);
mergekit 0.1.5 dare_linear/dare_ties (L1 rescale, weighted vote, normalize: false); the paper / fusion ≤ 0.1."""


_NO_L1 = sparsify.PackedMask(0, True)
"""A placeholder mask for :func:`sparsify.apply_packed_rescale` where the rescale is not L1."""


class Dare(_WholeModelTrim, _TaskVectorMethod):
    """DARE: drop each task-vector entry with probability 1 − density, rescale, then merge."""

    name = "dare"
    summary = "DARE: randomly drops task-vector entries and rescales the rest, then merges linearly or with TIES."
    reference_url = "https://arxiv.org/abs/2311.03099"
    fusionbench_config = "dare/task_arithmetic.yaml"
    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True, random=True)

    @attrs.frozen
    class Config:
        variant: Literal["linear", "ties"] = _variant(
            "linear", "how the sparse task vectors are merged: linear (task arithmetic) or ties (sign election + disjoint mean)"
        )
        convention: Literal["fusionbench", "mergekit", "paper"] = convention_option(
            DARE_PRESETS, " (fusionbench = fusion_bench method=dare/task_arithmetic or dare/ties_merging; mergekit = dare_linear / dare_ties)"
        )
        density: float | list[float] = by_convention(
            DARE_PRESETS, "density", "probability of keeping each entry (1 − drop rate; FusionBench 1 − sparsity_ratio); one value or one per model",
            validator=in_range(0.0, 1.0),
        )
        rescale: Literal["inverse_p", "l1", "none"] = by_convention(
            DARE_PRESETS,
            "rescale",
            "inverse_p = divide kept entries by density (paper, FusionBench rescale: true, PEFT; density 0 gives zeros); "
            "l1 = match ‖τ‖₁ (mergekit rescale: true); none = no rescale",
            validator=attrs.validators.optional(attrs.validators.in_(RESCALES)),
        )
        scaling_factor: float = by_convention(
            DARE_PRESETS, "scaling_factor", "λ: θ = θ₀ + λ·merged task vector (FusionBench: 0.3 for variant linear, 0.5 for ties)",
            cases=[DefaultCase("fusionbench", "variant", "ties", 0.5)],  # FusionBench dare/ties_merging.yaml
        )
        weights: list[float] | None = _weights()
        normalize: bool = _normalize(_LINEAR_ONLY)
        sign_election: Literal["sum", "weighted_sum", "count"] = by_convention(
            DARE_PRESETS, "sign_election", "how the sign is elected (variant=ties): sum = sign of Σ τᵢ, weighted_sum = of Σ wᵢτᵢ, count = majority vote",
            validator=attrs.validators.optional(attrs.validators.in_(SIGN_ELECTIONS)),
        )
        divisor: Literal["count", "weights", "none"] = by_convention(
            DARE_PRESETS, "divisor", "disjoint-merge divisor (variant=ties): none = sum (FusionBench merge_func sum, mergekit normalize: false), "
            "count = mean of the agreeing (paper), weights = Σ agreeing wᵢ (mergekit normalize: true)",
            validator=attrs.validators.optional(attrs.validators.in_(DIVISORS)),
        )

        ties_trim: float | list[float] = by_convention(
            DARE_PRESETS,
            "ties_trim",
            "variant=ties: after the drop and rescale, keep the top ties_trim of each model's whole task vector "
            "(|τ| ≥ its (d − ⌊d·ties_trim⌋)-th smallest, FusionBench's TIES threshold/100, streamed exactly); 1 = no trim",
            validator=in_range(0.0, 1.0),
        )

        def __attrs_post_init__(self) -> None:
            resolve(self, DARE_PRESETS)
            check_weight_sum("dare", self.weights, self.normalize and self.variant == "linear")

    # Like TIES, the whole-tensor kernel is the two-phase protocol on one block: phase 1
    # draws model i's mask (the same stream as ``ctx.rand_like(τᵢ, salt=str(i)) < density``)
    # and keeps it packed, one bit per entry, with the L1 norms when rescale = l1.

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._thresholds: list | None = None
        if self.config.rescale != "l1":
            # masks are drawn in the block loop from one stream per (tensor, model): no per-tensor
            # statistic is needed (the L1 rescale needs the masked norm first: two phases)
            self.elementwise = True

    def _trims(self) -> bool:
        trim = self.config.ties_trim
        return self.config.variant == "ties" and any(d < 1 for d in (trim if isinstance(trim, (list, tuple)) else [trim]))

    # -- FusionBench's DARE-TIES: the whole-model TIES trim of the dropped, rescaled task vectors

    def _trim_densities(self, n: int) -> list[float] | None:
        return self._per_model("ties_trim", n) if self._trims() else None

    def _feed(self, kth: Any, name: str, base: "torch.Tensor", tensor: "torch.Tensor", index: int, ctx: KernelContext) -> None:
        """Count model ``index``'s dropped, rescaled |τ| of this tensor, block by block, with the
        draws of the merge (its stream, in the fused loop's operations).  The sampling pass draws
        only for the sampled entries, from a stream of their own: they stand for the drop's
        statistics and place the first window (the threshold itself is counted exactly)."""
        import torch

        cfg = self.config
        density = cfg.density[index] if isinstance(cfg.density, (list, tuple)) else cfg.density
        a, b = tensor.reshape(-1), base.reshape(-1)
        if cfg.rescale == "l1":  # the L1 factor needs the whole masked tensor: the packed mask
            mask = self.chunk_stats(name, base, tensor, index, ctx)
            for start in range(0, a.numel(), sparsify.BLOCK):
                tau = a[start : start + sparsify.BLOCK] - b[start : start + sparsify.BLOCK]
                if not mask.keep_all:
                    tau.mul_(mask.block(start, tau.numel(), tau.device).to(tau.dtype)).add_(0.0)
                kth.add(sparsify.apply_packed_rescale(cfg.rescale, tau, mask, density).abs_())
            return
        if kth.sampling:
            step = kth.sample_step
            tau = a[::step] - b[::step]
            if 0 < density < 1:
                noise = torch.rand(tau.numel(), generator=ctx.generator(f"{index}/sample"), dtype=torch.float32)
                tau.mul_(noise.to(tau.device) < density)
            elif density <= 0:
                tau.zero_()
            kth.add_sample(sparsify.apply_packed_rescale(cfg.rescale, tau, _NO_L1, density).abs_(), a.numel())
            return
        generator = ctx.generator(str(index))  # the merge's stream (Dare._stream at offset 0)
        size = min(a.numel(), sparsify.BLOCK)
        tau = torch.empty(size, dtype=a.dtype, device=a.device)
        noise = torch.empty(size, dtype=torch.float32)
        keep = torch.empty(size, dtype=torch.bool)
        for start in range(0, a.numel(), size):
            length = min(size, a.numel() - start)
            part = tau[:length]
            torch.sub(a[start : start + length], b[start : start + length], out=part)
            if density <= 0:
                part.zero_()
            elif density < 1:
                torch.rand(length, generator=generator, dtype=torch.float32, out=noise[:length])
                torch.lt(noise[:length], density, out=keep[:length])
                part.mul_(keep[:length].to(part.device))
            kth.add(sparsify.apply_packed_rescale(cfg.rescale, part, _NO_L1, density).abs_())

    def kernel(self, name: str, base: "torch.Tensor | None", tensors: Sequence["torch.Tensor"], ctx: KernelContext) -> "torch.Tensor":
        if getattr(self, "elementwise", False):
            return self._merge_streamed(name, base, tensors, ctx)
        stats = [self.chunk_stats(name, base, t, i, ctx) for i, t in enumerate(tensors)]
        return self.kernel_chunk(name, base, tensors, ctx, stats, ctx.start)

    def _merge_streamed(self, name: str, base: "torch.Tensor", tensors: Sequence["torch.Tensor"], ctx: KernelContext) -> "torch.Tensor":
        """Rows ``ctx.start …``: each model's mask drawn block by block inside the fused loop (the same
        draws as :meth:`chunk_stats`'s packed mask, without packing or a second read of the models)."""
        import torch

        cfg = self.config
        weights = self._weights(len(tensors))
        densities = self._per_model("density", len(tensors))
        offset = _row_offset(base, ctx.start)
        thresholds = self._thresholds_for(name, base, tensors, ctx)
        lambdas = [None if th is None else _lambda_below(th, base.dtype) for th in thresholds]
        streams = [self._stream(ctx, i, offset) for i in range(len(tensors))]
        if not fused_supported(base):  # the reference operations, with the same draws
            deltas = []
            for t, density, stream, th in zip(tensors, densities, streams, thresholds, strict=True):
                tau = t - base
                if 0 < density < 1:
                    keep = torch.rand(tau.numel(), generator=stream[0], dtype=torch.float32).to(tau.device) < density
                    tau = torch.where(keep.reshape(tau.shape), tau, torch.zeros_like(tau))
                elif density <= 0:
                    tau = torch.zeros_like(tau)
                stream[1] = offset + tau.numel()
                delta = sparsify.apply_packed_rescale(cfg.rescale, tau, _NO_L1, density)
                if th is not None:
                    delta = torch.where(delta.abs() >= th, delta, torch.zeros_like(delta))
                deltas.append(delta)
            return self._combine(base, deltas, weights, cfg.variant)
        size = min(base.numel(), sparsify.BLOCK)
        noise = torch.empty(size, dtype=torch.float32)
        keep = torch.empty(size, dtype=torch.bool)

        def fill(i: int, b: "torch.Tensor", t: "torch.Tensor", out: "torch.Tensor", at: int) -> bool:
            density, stream = densities[i], streams[i]
            length = out.numel()
            if density <= 0 or density >= 1:  # no draws (as the packed mask): all kept, or all dropped
                stream[1] = at + length
                if density <= 0:
                    out.zero_()
                    return False
                torch.sub(t, b, out=out)
            else:
                torch.sub(t, b, out=out)
                torch.rand(length, generator=stream[0], dtype=torch.float32, out=noise[:length])
                stream[1] = at + length
                torch.lt(noise[:length], density, out=keep[:length])
                out.mul_(keep[:length])
                out.add_(0.0)  # a dropped −τ is −0 here and +0 in the reference
            sparsify.apply_packed_rescale(cfg.rescale, out, _NO_L1, density)
            if lambdas[i] is not None:
                torch.ops.aten.hardshrink.out(out, lambdas[i], out=out)
            return True

        return fused_merge(base, tensors, offset, fill, weights, cfg.variant, cfg)

    def chunk_stats(self, name: str, base: "torch.Tensor", tensor: "torch.Tensor", index: int, ctx: KernelContext) -> sparsify.PackedMask:
        """Phase 1: model ``index``'s Bernoulli mask over the whole tensor (and L1 rescale)."""
        cfg = self.config
        density = cfg.density[index] if isinstance(cfg.density, (list, tuple)) else cfg.density
        mask = sparsify.packed_bernoulli_mask(tensor.numel(), density, ctx, salt=str(index))
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
        densities = self._per_model("density", len(tensors))
        offset = _row_offset(base, start)
        thresholds = self._thresholds_for(name, base, tensors, ctx)
        if not fused_supported(base):  # the reference operations on this block
            deltas = []
            for t, mask, density, th in zip(tensors, stats, densities, thresholds, strict=True):
                tau = t - base
                keep = mask.block(offset, tau.numel(), tau.device).to(torch.bool).reshape(tau.shape)
                delta = sparsify.apply_packed_rescale(cfg.rescale, torch.where(keep, tau, torch.zeros_like(tau)), mask, density)
                if th is not None:
                    delta = torch.where(delta.abs() >= th, delta, torch.zeros_like(delta))
                deltas.append(delta)
            return self._combine(base, deltas, weights, cfg.variant)
        lambdas = [None if th is None else _lambda_below(th, base.dtype) for th in thresholds]
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
            sparsify.apply_packed_rescale(cfg.rescale, out, mask, densities[i])
            if lambdas[i] is not None:  # FusionBench's whole-model TIES trim (every entry ≥ the threshold kept)
                torch.ops.aten.hardshrink.out(out, lambdas[i], out=out)
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
            help="fraction of largest-magnitude entries dropped as outliers (floor(gamma·n); 0 on tensors under 1/gamma entries); "
            "one value or one per model",
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
        n = len(tensors)
        deltas = [
            torch.where(sparsify.breadcrumbs_mask(tau, d, g), tau, torch.zeros_like(tau))
            for tau, d, g in zip(task_vectors(base, tensors), self._per_model("density", n), self._per_model("gamma", n), strict=True)
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
            help="half-width ε of the keep-probability range; requires 0 < density − epsilon and density + epsilon ≤ 1; one value or one per model",
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
            densities = self.density if isinstance(self.density, (list, tuple)) else [self.density]
            epsilons = self.epsilon if isinstance(self.epsilon, (list, tuple)) else [self.epsilon]
            for d in densities:
                for e in epsilons:
                    low, high = d - e, d + e
                    if not (low > 0 and high <= 1 + 1e-12):
                        raise ValueError(
                            f"della: keep probabilities must lie in (0, 1], but density ± epsilon = [{low:g}, {high:g}] "
                            f"(density={d}, epsilon={e}); lower epsilon or move density"
                        )
            check_weight_sum("della", self.weights, self.normalize and self.variant == "linear")

    # Ranks are taken within rows, so the kernel sees blocks of whole rows (``rowwise``) and
    # draws each model's mask from its stream inside the fused block loop; blocks of any size
    # give the same bytes as the reference (``keep_probs``, ``ctx.rand_like(τ, salt=str(i)) <
    # p``, ``apply_rescale``, ``ties_merge``/``linear_merge`` on the whole tensor).  The L1
    # rescale needs whole-tensor norms: that path takes whole tensors and the reference operations.

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        if self.config.rescale != "l1":
            self.rowwise = True

    def kernel(self, name: str, base: "torch.Tensor | None", tensors: Sequence["torch.Tensor"], ctx: KernelContext) -> "torch.Tensor":
        import torch

        cfg = self.config
        n = len(tensors)
        densities, epsilons = self._per_model("density", n), self._per_model("epsilon", n)
        weights = self._weights(n)
        offset = _row_offset(base, ctx.start)
        streams = [self._stream(ctx, i, offset) for i in range(n)]
        if cfg.rescale == "l1" or not fused_supported(base):  # the reference operations on this block
            deltas = []
            for i, t in enumerate(tensors):
                tau = t - base
                probs = self.keep_probs(tau, densities[i], epsilons[i])
                noise = torch.rand(tau.shape, generator=streams[i][0], dtype=torch.float32).to(tau.device)
                streams[i][1] = offset + tau.numel()
                deltas.append(sparsify.apply_rescale(cfg.rescale, tau, noise < probs, probs))
            return self._combine(base, deltas, weights, cfg.variant)
        row = math.prod(base.shape[1:]) if base.dim() >= 2 else max(1, base.numel())
        block = max(1, sparsify.BLOCK // row) * row
        size = min(base.numel(), block)
        probs = torch.empty(size, dtype=torch.float32, device=base.device)
        noise = torch.empty(size, dtype=torch.float32)
        keep = torch.empty(size, dtype=torch.bool, device=base.device)

        def fill(i: int, b: "torch.Tensor", t: "torch.Tensor", out: "torch.Tensor", at: int) -> bool:
            length = out.numel()
            torch.sub(t, b, out=out)
            shape = (length // row, *base.shape[1:]) if base.dim() >= 2 else base.shape
            p = probs[:length]
            self.keep_probs(out.view(shape), densities[i], epsilons[i], out=p.view(shape))
            torch.rand(length, generator=streams[i][0], dtype=torch.float32, out=noise[:length])
            streams[i][1] = at + length
            torch.lt(noise[:length].to(out.device), p, out=keep[:length])
            out.mul_(keep[:length])
            if cfg.rescale == "inverse_p":
                out.div_(p)
            out.add_(0.0)  # a dropped −τ is −0 here and +0 in the reference (a kept τ = −0 has base +0: no change)
            return True

        return fused_merge(base, tensors, offset, fill, weights, cfg.variant, cfg, block=block)

    def keep_probs(self, tau: "torch.Tensor", density: float, epsilon: float, out: "torch.Tensor | None" = None) -> "torch.Tensor":
        """MagPrune keep probabilities, ranked per row or along dim 1 (``ranking``); into ``out`` if given."""
        if self.config.ranking == "dim1" and tau.dim() > 2:
            moved = tau.movedim(1, -1)
            probs = sparsify.della_keep_probs(moved.reshape(-1, moved.shape[-1]), density, epsilon)
            probs = probs.reshape(moved.shape).movedim(-1, 1)
            return probs if out is None else out.copy_(probs)
        return sparsify.della_keep_probs(tau, density, epsilon, out=out)


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
    fusionbench_config = "magmax/magmax.yaml"
    elementwise = True

    @attrs.frozen
    class Config:
        scaling_factor: float = option(
            0.5, help="λ: θ = θ₀ + λ·τ_max (FusionBench magmax.yaml and the official release: 0.5; fusion ≤ 0.1: 1)"
        )
        tie_break: Literal["later", "earlier"] = option(
            "later",
            help="which model wins where magnitudes are equal: later (the official release and FusionBench, ≥) or earlier (fusion ≤ 0.1)",
            validator=attrs.validators.in_(("later", "earlier")),
        )

    def kernel(self, name: str, base: "torch.Tensor | None", tensors: Sequence["torch.Tensor"], ctx: KernelContext) -> "torch.Tensor":
        import torch

        deltas = task_vectors(base, tensors)
        best = deltas[0]
        later = self.config.tie_break == "later"
        for d in deltas[1:]:
            wins = d.abs() >= best.abs() if later else d.abs() > best.abs()
            best = torch.where(wins, d, best)
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


def _mk_divisor(value: bool) -> dict:
    return {"divisor": "weights" if value else "none"}


def _mk_shared(normalize: bool, rescale: bool, ties: bool, rescaling: bool, method: str) -> dict:
    return {
        "int8_mask": Param(bool, False),  # the storage dtype of mergekit's sign mask only
        "normalize": Param(bool, normalize, _mk_divisor if ties else "normalize"),
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
        fixed={"convention": "mergekit"},
        shared=_mk_shared(False, False, False, False, "task_arithmetic") | {"rescale": Param(bool, False)},
        per_model=_mk_per_model(density=False) | {"density": Param(float, 1.0)},  # no sparsification: density unused
    ),
    MergekitMapping(
        "ties", "ties", fixed={"convention": "mergekit", **_TIES}, shared=_mk_shared(True, False, True, False, "ties"), per_model=_mk_per_model()
    ),
    MergekitMapping(
        "dare_ties",
        "dare",
        fixed={"convention": "mergekit", "variant": "ties", **_TIES},
        shared=_mk_shared(False, True, True, True, "dare"),
        per_model=_mk_per_model(),
    ),
    MergekitMapping(
        "dare_linear",
        "dare",
        fixed={"convention": "mergekit", "variant": "linear"},
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
