"""Sparsifiers and rescalers for task vectors (τ = θᵢ − θ₀), shared by the task-arithmetic family.

Every statistic is computed inside one tensor (never across the model).  Selections by
magnitude use O(n) selection, not a full sort, and break ties in a fixed, device-independent
order: **larger magnitude first, equal magnitudes in flat index order**.  Masks are boolean
tensors shaped like their input.

For the merge engine's two-phase path (statistics of one model at a time, then row blocks)
a selection is also available as a small :class:`TopK` (threshold and tie cut-off, read by
blocks, see :func:`magnitude_top_k`), and a Bernoulli mask as a :class:`PackedMask` (one bit
per entry, drawn from the same random stream as :func:`bernoulli_mask`).  Large CPU
selections bracket the k-th largest value with a strided sample, count what lies above the
bracket and select inside it: exact (a missed bracket falls back to a full selection), and
several times faster than selecting over the whole tensor.

Counts come from :func:`fraction_count`: ``floor(fraction · n)``, computed so that float
error does not lose an element (0.29 · 100 = 28.999… counts as 29; a plain ``int()``, as in
mergekit, gives 28).

torch is imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from fusion_core import KernelContext

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

    O(n): the threshold comes from :func:`top_k` (a selection, not a sort); the tie-break
    touches only the entries equal to the threshold, and only when there are too many.
    """
    import torch

    flat = scores.reshape(-1)
    selection = top_k(flat, k)
    if selection.keep_none:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if selection.keep_all:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    return selection.keep_mask(flat, 0).reshape(scores.shape)


# ---------------------------------------------------------------------------------------
# top-k selection by blocks (TIES's trim; the engine's two-phase path)

BLOCK = 1 << 16
"""Elements per block of the fused loops (a few such buffers stay in cache); a multiple of 8,
so that the blocks of a :class:`PackedMask` start on byte boundaries."""

_SAMPLED_MIN = 1 << 16
"""Tensors at least this large are selected from a sample-bracketed band (below: a full selection)."""

_DROPPED_MAX = 4096
"""At most this many dropped threshold-equal indices are kept in a :class:`TopK` (else they are found by a scan)."""


@dataclasses.dataclass(frozen=True, eq=False)
class TopK:
    """The outcome of a top-``k`` selection over ``n`` flat scores.

    Entry ``j`` is kept when ``score > threshold``, or ``score == threshold`` and ``j ≤ cut``
    (``cut`` is ``None`` when every threshold-equal entry is kept): the ``k`` largest, equal
    scores in flat index order, exactly as a stable descending sort would pick them.
    ``dropped`` lists the threshold-equal indices after ``cut`` when there are few of them.
    """

    n: int
    k: int
    threshold: float = math.nan
    cut: int | None = None
    dropped: "np.ndarray | None" = None

    @property
    def keep_all(self) -> bool:
        return self.k >= self.n

    @property
    def keep_none(self) -> bool:
        return self.k <= 0 and self.n > 0

    def keep_mask(self, scores: "torch.Tensor", offset: int) -> "torch.Tensor":
        """Boolean keep mask of the 1-D ``scores`` at flat positions ``offset …``."""
        import torch

        if self.keep_all:
            return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
        if self.keep_none:
            return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        keep = scores >= self.threshold
        tail = self._tail_start(offset, scores.numel())
        if tail is not None:
            keep[tail:] = scores[tail:] > self.threshold
        return keep

    def _tail_start(self, offset: int, length: int) -> int | None:
        """Where, in a block of ``length`` at ``offset``, threshold-equal entries stop being kept."""
        if self.cut is None or self.cut >= offset + length - 1:
            return None
        return max(0, self.cut + 1 - offset)

    def drop_ties(self, values: "torch.Tensor", offset: int) -> None:
        """Zero, in place, the threshold-equal entries past ``cut`` of the 1-D block ``values``
        (at flat positions ``offset …``), whose magnitudes are the scores."""
        tail = self._tail_start(offset, values.numel())
        if tail is None:
            return
        import torch

        if self.dropped is not None:
            import numpy as np

            lo, hi = np.searchsorted(self.dropped, [offset + tail, offset + values.numel()])
            if hi > lo:
                index = torch.from_numpy(self.dropped[lo:hi] - offset).to(values.device)
                values.index_fill_(0, index, 0.0)
            return
        part = values[tail:]
        part.masked_fill_(part.abs() == self.threshold, 0.0)


def top_k(scores: "torch.Tensor", k: int) -> TopK:
    """Select the ``k`` largest entries of the 1-D ``scores`` (see :class:`TopK`)."""
    return _select(_Scores(scores.reshape(-1)), k)


def magnitude_top_k(base: "torch.Tensor", tensor: "torch.Tensor", density: float) -> TopK:
    """TIES's trim of τ = ``tensor − base``: the :func:`keep_count` largest ``|τ|``.

    Reads τ by blocks and never materialises it (nor ``|τ|``) for large tensors.
    """
    source = _Scores(tensor.reshape(-1), base.reshape(-1))
    return _select(source, keep_count(density, source.n))


class _Scores:
    """Flat scores by blocks: ``|a − b|`` (a task vector's magnitudes) or ``a`` itself."""

    def __init__(self, a: "torch.Tensor", b: "torch.Tensor | None" = None) -> None:
        self.a, self.b = a.detach(), (None if b is None else b.detach())
        self.n = a.numel()

    def block(self, start: int, stop: int, out: "torch.Tensor") -> "torch.Tensor":
        import torch

        if self.b is None:
            return self.a[start:stop]
        part = out[: stop - start]
        torch.sub(self.a[start:stop], self.b[start:stop], out=part)
        return part.abs_()

    def full(self) -> "torch.Tensor":
        return self.a if self.b is None else (self.a - self.b).abs_()

    def sample(self, step: int) -> "torch.Tensor":
        if self.b is None:
            return self.a[::step].clone()
        return (self.a[::step] - self.b[::step]).abs_()

    def blocks(self) -> "Iterator[tuple[int, torch.Tensor]]":
        import torch

        size = min(self.n, BLOCK)
        out = torch.empty(size, dtype=self.a.dtype, device=self.a.device) if self.b is not None else None
        for start in range(0, self.n, BLOCK):
            yield start, self.block(start, min(self.n, start + BLOCK), out)


def _select(source: _Scores, k: int) -> TopK:
    n = source.n
    if k <= 0 or k >= n:
        return TopK(n, k)
    a = source.a
    if n >= _SAMPLED_MIN and a.device.type == "cpu" and a.dtype in (_torch().float32, _torch().float64):
        found = _select_in_band(source, k)
        if found is not None:
            return found
    return _select_exact(source, k)


def _torch():
    import torch

    return torch


def _select_exact(source: _Scores, k: int) -> TopK:
    """A selection over the materialised scores (small tensors, other devices, NaN, a missed band)."""
    flat = source.full()
    threshold = float(kth_largest(flat, k))
    del flat
    at_least = greater = 0
    for _, part in source.blocks():
        at_least += int((part >= threshold).sum())
        greater += int((part > threshold).sum())
    if at_least <= k:
        return TopK(source.n, k, threshold)
    need = k - greater  # threshold-equal entries kept, in flat order (≤ 0 only with NaN scores)
    cut, seen = -1, 0
    if need > 0:
        for start, part in source.blocks():
            tied = (part == threshold).nonzero().reshape(-1)
            if seen + tied.numel() >= need:
                cut = start + int(tied[need - seen - 1])
                break
            seen += tied.numel()
    return TopK(source.n, k, threshold, cut)


def _select_in_band(source: _Scores, k: int) -> TopK | None:
    """Bracket the ``k``-th largest score between two order statistics of a strided sample,
    count what lies above the bracket and collect what lies in it (one pass), and select in
    the bracket.  Exact; ``None`` when the bracket missed (or scores hold NaN)."""
    import numpy as np

    n = source.n
    step = max(1, n // min(max(1 << 14, n // 31), 1 << 18)) | 1
    sample = source.sample(step).numpy()
    m = sample.size
    expected = k * m / n  # the k-th largest's rank (from the top) in the sample
    margin = 6.0 * math.sqrt(max(expected * (1.0 - expected / m), 1.0)) + 8.0
    upper_rank, lower_rank = math.floor(expected - margin), math.ceil(expected + margin)
    picks = [m - r for r in (lower_rank, upper_rank) if 1 <= r <= m]
    parted = np.partition(sample, picks) if picks else sample
    hi = float(parted[m - upper_rank]) if 1 <= upper_rank <= m else math.inf
    lo = float(parted[m - lower_rank]) if 1 <= lower_rank <= m else -math.inf
    del sample, parted
    limit = max(_DROPPED_MAX, n // 16)
    size = min(n, BLOCK)
    ge, le = np.empty(size, dtype=bool), np.empty(size, dtype=bool)
    at_least_lo = at_most_hi = in_band = 0
    values: list = []
    indices: list = []
    for start, part in source.blocks():
        x = part.numpy()
        length = x.size
        above_lo, below_hi = ge[:length], le[:length]
        np.greater_equal(x, lo, out=above_lo)
        np.less_equal(x, hi, out=below_hi)
        at_least_lo += int(np.count_nonzero(above_lo))
        at_most_hi += int(np.count_nonzero(below_hi))
        np.logical_and(above_lo, below_hi, out=above_lo)
        where = np.flatnonzero(above_lo)
        in_band += where.size
        if in_band > limit:
            return None  # a wide band (heavy ties or a skewed sample): select exactly instead
        if where.size:
            values.append(x[where])
            indices.append(where + start)
    if at_least_lo + at_most_hi - in_band != n:
        return None  # NaN scores: the exact path reproduces their ordering
    above = at_least_lo - in_band
    if not above < k <= above + in_band:
        return None
    band = np.concatenate(values)
    threshold = float(np.partition(band, in_band - (k - above))[in_band - (k - above)])
    greater = above + int(np.count_nonzero(band > threshold))
    tied = np.concatenate(indices)[band == threshold]
    if greater + tied.size <= k:
        return TopK(n, k, threshold)
    need = k - greater
    rest = tied[need:]
    return TopK(n, k, threshold, int(tied[need - 1]), rest.copy() if rest.size <= _DROPPED_MAX else None)


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


@dataclasses.dataclass(frozen=True, eq=False)
class PackedMask:
    """A keep mask over ``n`` flat entries, one bit each (``numpy.packbits`` order), plus the
    L1 rescale factor when one was computed (:func:`with_l1_scale`).

    ``packed`` is ``None`` when the mask keeps everything (``keep_all``) or nothing.
    """

    n: int
    keep_all: bool
    packed: "np.ndarray | None" = None
    l1_scale: float | None = None

    @property
    def keep_none(self) -> bool:
        return self.packed is None and not self.keep_all

    def block(self, offset: int, length: int, device: "torch.device | str" = "cpu") -> "torch.Tensor":
        """The mask at flat positions ``offset … offset + length`` as a uint8 tensor of 0/1."""
        import numpy as np
        import torch

        if self.packed is None:
            fill = torch.ones if self.keep_all else torch.zeros
            return fill(length, dtype=torch.uint8, device=device)
        first, skip = divmod(offset, 8)
        bits = np.unpackbits(self.packed[first : (offset + length + 7) // 8])[skip : skip + length]
        return torch.from_numpy(bits).to(device)


def packed_bernoulli_mask(n: int, density: float, ctx: "KernelContext", salt: str) -> PackedMask:
    """:func:`bernoulli_mask` of an ``n``-entry tensor, drawn by blocks and kept packed.

    The same draws as ``ctx.rand_like(τ, salt) < density`` (the CPU generator fills
    consecutive blocks from one stream), in n/8 bytes instead of 4n.  Density ≥ 1 keeps every
    entry and ≤ 0 none (uniform noise lies in [0, 1)), without drawing.
    """
    import numpy as np
    import torch

    if density >= 1 or n == 0:
        return PackedMask(n, True)
    if density <= 0:
        return PackedMask(n, False)
    generator = ctx.generator(salt)
    size = min(n, BLOCK)
    noise = torch.empty(size, dtype=torch.float32)
    keep = torch.empty(size, dtype=torch.bool)
    packed = np.empty((n + 7) // 8, dtype=np.uint8)
    for start in range(0, n, size):  # size is a multiple of 8 except for a single block
        length = min(size, n - start)
        torch.rand(length, generator=generator, dtype=torch.float32, out=noise[:length])
        torch.lt(noise[:length], density, out=keep[:length])
        bits = np.packbits(keep[:length].numpy())
        packed[start // 8 : start // 8 + bits.size] = bits
    return PackedMask(n, False, packed)


def with_l1_scale(mask: PackedMask, base: "torch.Tensor", tensor: "torch.Tensor") -> PackedMask:
    """``mask`` with :func:`rescale_l1`'s factor ``‖τ‖₁ / ‖mask⊙τ‖₁`` for τ = ``tensor − base``
    (``l1_scale`` ``None``: the rescale is skipped).

    The norms are the same float64 sums as :func:`rescale_l1`'s (a float64 sum of a tensor
    converts it to float64 first; here ``|τ|`` is written into one float64 tensor by
    blocks), so the factor is the same float.
    """
    import torch

    magnitudes = torch.empty(tensor.shape, dtype=torch.float64, device=tensor.device)
    flat, a, b = magnitudes.reshape(-1), tensor.reshape(-1), base.reshape(-1)
    size = min(flat.numel(), BLOCK)
    buffer = torch.empty(size, dtype=tensor.dtype, device=tensor.device)
    for start in range(0, flat.numel(), BLOCK):
        stop = min(flat.numel(), start + BLOCK)
        part = buffer[: stop - start]
        torch.sub(a[start:stop], b[start:stop], out=part)
        flat[start:stop].copy_(part.abs_())
    before = float(magnitudes.sum(dtype=torch.float64))
    if mask.keep_all:
        after = before
    else:
        factor = torch.empty(size, dtype=torch.float64, device=tensor.device)
        for start in range(0, flat.numel(), BLOCK):
            part = flat[start : start + BLOCK]
            keep = factor[: part.numel()]
            keep.copy_(mask.block(start, part.numel(), flat.device))
            part.mul_(keep)
        after = float(magnitudes.sum(dtype=torch.float64))
    scale = None if before < L1_NORM_FLOOR or after < L1_NORM_FLOOR else before / after
    return dataclasses.replace(mask, l1_scale=scale)


def apply_packed_rescale(kind: str, masked: "torch.Tensor", mask: PackedMask, p: float) -> "torch.Tensor":
    """:func:`apply_rescale` for an already masked ``τ``, in place (the same operations)."""
    if kind == "inverse_p":
        if p <= 0:
            return masked.zero_()
        return masked.div_(p)
    if kind == "l1":
        if mask.l1_scale is not None:
            masked.mul_(mask.l1_scale)
        return masked
    if kind == "none":
        return masked
    raise ValueError(f"rescale must be one of inverse_p, l1, none, got {kind!r}")


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


def della_keep_probs(
    tau: "torch.Tensor", density: float, epsilon: float, out: "torch.Tensor | None" = None
) -> "torch.Tensor":
    """DELLA MagPrune keep probabilities, shaped like ``τ`` (float32; written into ``out`` if given).

    Within each row (dim 0 indexes rows; a 2-D+ tensor is viewed as ``(shape[0], -1)``, a
    0-D/1-D tensor is one row) entries are ranked by ``|τ|`` ascending, r = 0…n−1 (equal
    magnitudes in index order), and get ``p = (d − ε) + 2ε · r / (n − 1)``: the smallest
    ``d − ε``, the largest ``d + ε``.  A row of one entry gets ``p = d`` (no 0/0).

    Rows are ranked in groups of about :data:`BLOCK` entries (:func:`row_order`), so the
    temporaries stay small; each row's ``p`` values are scattered to its entries in rank order.
    """
    import torch

    if out is None:
        out = torch.empty(tau.shape, dtype=torch.float32, device=tau.device)
    if tau.numel() == 0:
        return out
    rows = tau.reshape(tau.shape[0], -1) if tau.dim() >= 2 else tau.reshape(1, -1)
    n = rows.shape[1]
    if n <= 1:
        return out.fill_(float(density))
    by_rank = (density - epsilon) + (2.0 * epsilon / (n - 1)) * torch.arange(n, device=tau.device).to(torch.float32)
    target = out.view(rows.shape)
    group = max(1, BLOCK // n)
    for start in range(0, rows.shape[0], group):
        order = row_order(rows[start : start + group])
        target[start : start + group].scatter_(1, order, by_rank.expand(order.shape))
    return out


def row_order(rows: "torch.Tensor") -> "torch.Tensor":
    """Per row of the 2-D ``rows``, the column indices by ascending ``|x|``, equal magnitudes in
    index order (a stable ``argsort``), as int64.

    float32 on CPU: one int64 key per entry, the magnitude's bit pattern (the float's bits without
    the sign bit; a non-negative float orders like its bits) above the column index, sorted row by row by numpy's vectorised sort
    (several times faster than a stable argsort); the low bits of the sorted keys are the
    columns.  Other dtypes and devices: ``torch.argsort(stable=True)``.
    """
    import torch

    n = rows.shape[1]
    if rows.dtype != torch.float32 or rows.device.type != "cpu":
        return torch.argsort(rows.abs(), dim=1, stable=True)
    width = max(1, (n - 1).bit_length())
    keys = torch.empty(rows.shape, dtype=torch.int64)
    keys.copy_(rows.view(torch.int32))
    keys.bitwise_and_(0x7FFFFFFF).bitwise_left_shift_(width).bitwise_or_(torch.arange(n))  # |x|'s bits, then the column
    keys.numpy().sort(axis=1)
    return keys.bitwise_and_((1 << width) - 1)


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


@dataclasses.dataclass(frozen=True, eq=False)
class AtLeast:
    """A trim that keeps every entry with ``score ≥ threshold`` (FusionBench's TIES, ties all kept);
    ``threshold`` ``None`` keeps everything.  Same interface as :class:`TopK`."""

    n: int
    threshold: float | None

    @property
    def keep_all(self) -> bool:
        return self.threshold is None

    keep_none = False

    def keep_mask(self, scores: "torch.Tensor", offset: int) -> "torch.Tensor":
        import torch

        if self.threshold is None:
            return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
        return scores >= self.threshold

    def drop_ties(self, values: "torch.Tensor", offset: int) -> None:
        """Nothing to drop: every threshold-equal entry is kept."""
