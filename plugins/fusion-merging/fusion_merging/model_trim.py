"""Exact order statistics of |τ| over a whole model, streamed: FusionBench's TIES trim.

FusionBench trims each model's *whole flattened* task vector: with ``d`` entries and
``threshold`` K (20 → 0.2), it takes ``v`` = the ``(d − ⌊d·K⌋)``-th smallest ``|τ|``
(``torch.kthvalue``) and keeps every entry with ``|τ| ≥ v`` — ⌊d·K⌋ + 1 entries when the
magnitudes are distinct, all entries equal to ``v`` otherwise.

Finding ``v`` exactly without holding the model: a non-negative float's bit pattern, read
as an integer, orders like the float, so ``v`` is found by counting bit patterns in a
*window* ``[lo, lo + 2^18·2^s)`` of patterns, 2^18 buckets of ``2^s`` patterns each:

- pass 1 reads a strided sample of every tensor (every 16th entry, the step doubling as the
  sample is thinned to at most 2^19) and brackets ``v`` between two sample order statistics (±6σ of the rank's
  sampling error): the first window;
- each further pass counts, from the offsets ``bits − lo``, the entries below the window and
  keeps the offsets of the few inside it (on CPU, up to :data:`BAND_CAP`): ``v`` is the one of
  rank k among them (``np.partition``), whatever the window's width;
- past the cap (or on other devices) it counts their buckets ``offset >> s`` instead (a
  262,144-entry histogram); the bucket holding rank k becomes the next window (``s`` drops by
  18), until ``s = 0``: the bucket is one bit pattern, ``v`` itself.

A good bracket holds few entries, so the sample pass and one counting pass usually suffice;
if the rank falls outside the bracket (a skewed sample), the window restarts at all
patterns (2 more passes for float32, 4 for float64).  Memory per model: the sample
(≤ 4 MiB), the kept offsets (≤ 16 MiB for float32) and one int64 histogram (2 MiB),
whatever the model's size; each
pass reads every tensor of every model once, one tensor at a time.  The result is the exact
value ``kthvalue`` returns (ties need no cut: FusionBench keeps every entry ``≥ v``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

BINS = 1 << 18
"""Buckets of a counting pass: 2 MiB of int64 counters per model."""
CHUNK = 1 << 20
"""Entries per block of :meth:`KthMagnitude.add_difference` (its temporaries stay a few MiB)."""
SAMPLE_STEP = 16
"""Every SAMPLE_STEP-th entry of each tensor goes into the bracketing sample, at first (the step
doubles whenever the sample is thinned)."""
SAMPLE_CAP = 1 << 18
"""The sample is thinned (every other entry) whenever it grows past twice this."""
BAND_CAP = 1 << 22
"""At most this many in-window entries (their offsets, ≤ 16 MiB for float32) are kept per model in a
counting pass on CPU, for an exact selection among them; past it the pass counts the histogram."""
MAX_PASSES = 6
"""Sample, then at most 4 counting passes (float64 after a missed bracket) and one spare."""


def fusionbench_rank(d: int, density: float) -> int:
    """The 1-based rank (from the smallest) of FusionBench's TIES threshold in ``d`` magnitudes.

    FusionBench drops ``int(d·K)`` entries by rank and takes the ``d − int(d·K)``-th smallest;
    ``0`` means nothing is trimmed (``K ≥ 1``, where FusionBench itself fails).
    """
    return d - min(d, math.floor(d * density))


def _int_view(dtype: "torch.dtype") -> "tuple[torch.dtype, int]":
    """The integer dtype of the same width, and the number of value bits of a non-negative float."""
    import torch

    if dtype == torch.float32:
        return torch.int32, 31
    if dtype == torch.float64:
        return torch.int64, 63
    if dtype in (torch.float16, torch.bfloat16):
        return torch.int16, 15
    raise ValueError(f"whole-model trim: unsupported compute dtype {dtype}")


class KthMagnitude:
    """The exact ``rank``-th smallest of the magnitudes fed to it, found pass by pass.

    Feed every entry of the model once per pass (:meth:`add`, any split into tensors and
    blocks, any order), call :meth:`end_pass` after each until :attr:`done`; :attr:`threshold`
    is the value (``keep_all``: nothing is trimmed).  ``density`` fixes the rank once the
    count is known (first pass): see :func:`fusionbench_rank`.
    """

    def __init__(self, dtype: "torch.dtype | None", density: float) -> None:
        import torch

        self.dtype = None
        if dtype is not None:
            self.bind(dtype)
        self.density = float(density)
        self.count = 0
        self.rank = 0  # 1-based, among all entries
        self.sampling = True
        self._sample: list = []
        self._sampled = 0
        self._step = SAMPLE_STEP
        self.lo = 0  # the window: bit patterns [lo, lo + BINS << shift)
        self.shift = 0
        self.below = 0  # entries below the window, counted in this pass
        self.hist = torch.zeros(BINS, dtype=torch.int64)
        self._band = True  # this pass keeps its in-window offsets (CPU); False once the histogram counts
        self._banded = 0
        self._buffer = None  # the kept offsets: one array of BAND_CAP (pages touched as it fills)
        self.threshold: float | None = None
        self.keep_all = False

    def bind(self, dtype: "torch.dtype") -> None:
        """Fix the dtype of the magnitudes (the first tensor's, when it is not known up front)."""
        if self.dtype is None:
            self.dtype = dtype
            self.int_dtype, self.bits = _int_view(dtype)
        elif dtype != self.dtype:
            raise ValueError(f"whole-model trim: tensors of dtype {dtype} and {self.dtype} in one model")

    @property
    def done(self) -> bool:
        return self.keep_all or self.threshold is not None

    def add_difference(self, tensor: "torch.Tensor", base: "torch.Tensor") -> None:
        """:meth:`add` the magnitudes ``|tensor − base|``, by blocks (a few MiB of temporaries)."""
        import torch

        a, b = tensor.reshape(-1), base.reshape(-1)
        n = a.numel()
        if self.sampling:  # only the sample's entries are needed (and the count)
            self.count += n
            self._keep_sample((a[:: self._step] - b[:: self._step]).abs_())
            return
        size = min(n, CHUNK)
        buffer = torch.empty(size, dtype=a.dtype, device=a.device)
        for start in range(0, n, CHUNK):
            part = buffer[: min(CHUNK, n - start)]
            torch.sub(a[start : start + part.numel()], b[start : start + part.numel()], out=part)
            self.add(part.abs_())

    @property
    def sample_step(self) -> int:
        """In the sampling pass: the stride at which :meth:`add` samples (for :meth:`add_sample`)."""
        return self._step

    def add_sample(self, sampled: "torch.Tensor", count: int) -> None:
        """The sampling pass without the whole tensor: ``count`` entries of which ``sampled`` are
        every :attr:`sample_step`-th magnitude (or values distributed like them: the sample only
        places the first window, so it changes how many passes run, never the threshold)."""
        self.count += count
        self._keep_sample(sampled)

    def add(self, magnitudes: "torch.Tensor") -> None:
        """Count the non-negative ``magnitudes`` (any shape, the compute dtype) in this pass."""
        import torch

        flat = magnitudes.reshape(-1)
        if self.sampling:
            self.count += flat.numel()
            self._keep_sample(flat[:: self._step].clone())
            return
        if self.done or flat.numel() == 0:
            return
        bits = flat.view(self.int_dtype)
        if self.int_dtype == torch.int16:
            bits = bits.to(torch.int32)
        if self.lo == 0 and (BINS << self.shift) >= (1 << self.bits):  # the window holds every pattern
            self._flush_band()
            key = bits >> self.shift if self.shift else bits
            self.hist += torch.bincount(key, minlength=BINS)[:BINS]
            return
        if bits.device.type == "cpu":
            self._count_band(bits.numpy())
            return
        self._flush_band()
        # elsewhere one histogram op: bucket 0 counts the entries below the window, 1…BINS its buckets, BINS + 1 above
        key = bits - self.lo
        if self.shift:
            key.bitwise_right_shift_(self.shift)  # floor: entries below the window stay negative
        key.clamp_(-1, BINS).add_(1)
        counts = torch.bincount(key, minlength=BINS + 2).cpu()
        self.below += int(counts[0])
        self.hist += counts[1 : BINS + 1]

    def _count_band(self, bits: "np.ndarray") -> None:
        """Count on CPU: the offsets ``bits − lo``, those below the window (negative) and, for the
        few inside it (unsigned offset < the window's span), their offsets (or buckets, past the cap)."""
        import numpy as np

        key = np.subtract(bits, bits.dtype.type(self.lo))
        flags = np.less(key, 0)
        self.below += int(np.count_nonzero(flags))
        unsigned = key.view(np.uint32 if key.dtype == np.int32 else np.uint64)
        np.less(unsigned, unsigned.dtype.type(BINS << self.shift), out=flags)
        inside = key[flags]
        if self._band and self._banded + inside.size <= BAND_CAP:
            if self._buffer is None or self._buffer.dtype != inside.dtype:
                self._buffer = np.empty(BAND_CAP, dtype=inside.dtype)
            self._buffer[self._banded : self._banded + inside.size] = inside
            self._banded += inside.size
            return
        self._flush_band()
        self._bucket(inside)

    def _bucket(self, offsets: "np.ndarray") -> None:
        import numpy as np
        import torch

        key = offsets >> self.shift if self.shift else offsets
        self.hist += torch.from_numpy(np.bincount(key, minlength=BINS)[:BINS])

    def _flush_band(self) -> None:
        """Count the kept in-window offsets into the histogram, and count there from now on."""
        if self._band and self._banded:
            self._bucket(self._buffer[: self._banded])
        self._band, self._banded = False, 0

    def _keep_sample(self, values: "torch.Tensor") -> None:
        import torch

        self._sample.append(values.reshape(-1).to(torch.float64))
        self._sampled += values.numel()
        if self._sampled > 2 * SAMPLE_CAP:  # thin it: every other entry, and sample half as often from now on
            merged = torch.cat(self._sample)
            while merged.numel() > 2 * SAMPLE_CAP:
                merged, self._step = merged[::2], self._step * 2
            self._sample, self._sampled = [merged.clone()], merged.numel()

    def _pattern(self, value: float, up: bool) -> int:
        """The bit pattern of ``value`` in this dtype (rounded down, or up with ``up``)."""
        import torch

        x = torch.tensor([value], dtype=torch.float64).to(self.dtype)
        if x.double().item() > value and not up or x.double().item() < value and up:
            x = torch.nextafter(x, torch.tensor([-math.inf if not up else math.inf], dtype=self.dtype))
        bits = x.view(self.int_dtype).to(torch.int64).item()
        return max(0, int(bits))

    def _window(self, lo: int, hi: int) -> None:
        """Count bit patterns [lo, hi] next (the smallest shift whose :data:`BINS` buckets cover them)."""
        self.lo = lo
        self.shift = max(0, math.ceil(math.log2(max(1, hi - lo + 1) / BINS)))

    def end_pass(self) -> None:
        """Narrow the window to the bucket holding the rank; :attr:`threshold` is set once it is one pattern."""
        import torch

        if self.done:
            return
        if self.sampling:
            self.sampling = False
            self.rank = fusionbench_rank(self.count, self.density)
            if self.rank <= 0 or self.count == 0:
                self.keep_all = True
                return
            sample = torch.cat(self._sample) if self._sample else torch.zeros(0, dtype=torch.float64)
            self._sample = []
            m = sample.numel()
            if m < 64:
                self._window(0, (1 << self.bits) - 1)
                return
            expected = self.rank * m / self.count
            margin = 6.0 * math.sqrt(max(expected * (1.0 - expected / m), 1.0)) + 8.0
            lo_rank, hi_rank = math.floor(expected - margin), math.ceil(expected + margin)
            ordered = torch.sort(sample).values
            lo = self._pattern(float(ordered[lo_rank - 1]), up=False) if lo_rank >= 1 else 0
            hi = self._pattern(float(ordered[hi_rank - 1]), up=True) if hi_rank <= m else (1 << self.bits) - 1
            self._window(lo, hi)
            return
        wanted = self.rank - self.below
        band, kept = self._band, self._banded
        self._band, self._banded, self.below = True, 0, 0
        if band:  # every in-window entry was kept: select among them, exactly
            import numpy as np

            if not 1 <= wanted <= kept:  # the bracket missed: count every pattern
                self._window(0, (1 << self.bits) - 1)
                return
            pattern = torch.tensor([self.lo + int(np.partition(self._buffer[:kept], wanted - 1)[wanted - 1])], dtype=torch.int64)
            self.threshold = float(pattern.to(self.int_dtype).view(self.dtype)[0])
            return
        cumulative = torch.cumsum(self.hist, 0)
        total = int(cumulative[-1])
        self.hist.zero_()
        if not 1 <= wanted <= total:  # the bracket missed: count every pattern
            self._window(0, (1 << self.bits) - 1)
            return
        bucket = int(torch.searchsorted(cumulative, wanted))
        lo = self.lo + (bucket << self.shift)
        if self.shift == 0:
            pattern = torch.tensor([lo], dtype=torch.int64).to(self.int_dtype)
            self.threshold = float(pattern.view(self.dtype)[0])
            return
        self._window(lo, lo + (1 << self.shift) - 1)
