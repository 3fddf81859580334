"""Exact order statistics of |τ| over a whole model, streamed: FusionBench's TIES trim.

FusionBench trims each model's *whole flattened* task vector: with ``d`` entries and
``threshold`` K (20 → 0.2), it takes ``v`` = the ``(d − ⌊d·K⌋)``-th smallest ``|τ|``
(``torch.kthvalue``) and keeps every entry with ``|τ| ≥ v`` — ⌊d·K⌋ + 1 entries when the
magnitudes are distinct, all entries equal to ``v`` otherwise.

Finding ``v`` exactly without holding the model: a non-negative float's bit pattern, read
as an integer, orders like the float, so the k-th smallest magnitude is found digit by
digit, 16 bits at a time, from the top:

- pass 0 counts every entry of the model in a histogram of its top 16 bits (65,536
  counters) and picks the bucket holding rank k (and k's rank inside it);
- each further pass counts, among the entries whose higher bits equal the digits found so
  far, the next 16 bits.

float32 needs 2 passes, float64 4, float16/bfloat16 1.  Memory per model: one 65,536-entry
int64 histogram (512 KiB) and a few integers, whatever the model's size; each pass reads
every tensor of every model once, one tensor at a time.  The result is the exact value
``kthvalue`` returns (ties need no cut: FusionBench keeps every entry ``≥ v``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

DIGIT = 16
BINS = 1 << DIGIT
CHUNK = 1 << 20
"""Entries per block of :meth:`KthMagnitude.add_difference` (its temporaries stay a few MiB)."""


def fusionbench_rank(d: int, density: float) -> int:
    """The 1-based rank (from the smallest) of FusionBench's TIES threshold in ``d`` magnitudes.

    FusionBench drops ``int(d·K)`` entries by rank and takes the ``d − int(d·K)``-th smallest;
    ``0`` means nothing is trimmed (``K ≥ 1``, where FusionBench itself fails).
    """
    return d - min(d, math.floor(d * density))


def _int_view(dtype: "torch.dtype") -> "tuple[torch.dtype, int]":
    import torch

    if dtype == torch.float32:
        return torch.int32, 2
    if dtype == torch.float64:
        return torch.int64, 4
    if dtype in (torch.float16, torch.bfloat16):
        return torch.int16, 1
    raise ValueError(f"whole-model trim: unsupported compute dtype {dtype}")


class KthMagnitude:
    """The exact ``rank``-th smallest of the magnitudes fed to it, found in :attr:`passes` passes.

    Feed every entry of the model once per pass (:meth:`add`, any split into tensors and
    blocks, any order), call :meth:`end_pass` after each; :attr:`threshold` is the value.
    ``density`` fixes the rank once the count is known (pass 0): see :func:`fusionbench_rank`.
    """

    def __init__(self, dtype: "torch.dtype | None", density: float) -> None:
        import torch

        self.dtype = None
        if dtype is not None:
            self.bind(dtype)
        self.density = float(density)
        self.count = 0
        self.rank = 0  # within the current bucket (1-based)
        self.prefix = 0  # the digits found so far
        self.level = 0
        self.hist = torch.zeros(BINS + 1, dtype=torch.int64)
        self.threshold: float | None = None
        self.keep_all = False

    def bind(self, dtype: "torch.dtype") -> None:
        """Fix the dtype of the magnitudes (the first tensor's, when it is not known up front)."""
        if self.dtype is None:
            self.dtype = dtype
            self.int_dtype, self.passes = _int_view(dtype)
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
        size = min(n, CHUNK)
        buffer = torch.empty(size, dtype=a.dtype, device=a.device)
        for start in range(0, n, CHUNK):
            part = buffer[: min(CHUNK, n - start)]
            torch.sub(a[start : start + part.numel()], b[start : start + part.numel()], out=part)
            self.add(part.abs_())
        if n == 0:
            self.add(buffer)

    def add(self, magnitudes: "torch.Tensor") -> None:
        """Count the non-negative ``magnitudes`` (any shape, the compute dtype) in this pass."""
        import torch

        if self.done or magnitudes.numel() == 0:
            if self.level == 0:
                self.count += magnitudes.numel()
            return
        bits = magnitudes.reshape(-1).view(self.int_dtype)
        shift = (self.passes - 1 - self.level) * DIGIT
        if self.level == 0:  # the top digit (the sign bit is 0: no mask needed)
            self.count += magnitudes.numel()
            key = bits.to(torch.int32) if self.int_dtype == torch.int16 else (bits >> shift if shift else bits)
        else:  # only the entries inside the bucket found so far (usually a small share), then their next digit
            inside = bits[(bits >> (shift + DIGIT)) == self.prefix]
            key = ((inside >> shift) if shift else inside) & 0xFFFF
        self.hist += torch.bincount(key, minlength=BINS + 1)

    def end_pass(self) -> None:
        """Pick the bucket holding the rank; after the last pass, :attr:`threshold` is set."""
        import torch

        if self.done:
            return
        if self.level == 0:
            self.rank = fusionbench_rank(self.count, self.density)
            if self.rank <= 0 or self.count == 0:
                self.keep_all = True
                return
        cumulative = torch.cumsum(self.hist[:BINS], 0)
        bucket = int(torch.searchsorted(cumulative, self.rank))
        below = int(cumulative[bucket - 1]) if bucket else 0
        self.rank -= below
        self.prefix = (self.prefix << DIGIT) | bucket
        self.level += 1
        self.hist.zero_()
        if self.level == self.passes:
            pattern = torch.tensor([self.prefix], dtype=torch.int64).to(self.int_dtype)
            self.threshold = float(pattern.view(self.dtype)[0])
