"""FusionBench's tie-break for TIES: a zero vote takes the model-wide majority sign, streamed.

FusionBench 0.2.33 (``ties_merging_utils.resolve_sign``) elects γ = sign(Σᵢ trimmed τᵢ) per
entry of the flattened merged vector, then sets every γ = 0 (the votes cancel, or nobody
kept the entry) to sign(Σ γ): the sign of (#entries electing + − #entries electing −) over
the *whole model*; when that is 0 too the entries stay 0, which its disjoint merge
(``where(γ > 0, τ > 0, τ < 0)``) treats as − for ``sum`` and ``mean``.

:class:`VoteTally` counts those two numbers exactly (integers; FusionBench sums the ±1
floats in the model's dtype, which is exact below 2^24 entries) in one extra whole-model
pass, once the trim thresholds are known: for each tensor name the engine hands it each
model's tensor in turn; it adds the trimmed votes into one buffer of that tensor's size and
counts the signs when the next name starts.  Memory: one tensor, whatever the model's size.

The one case left apart: with ``merge_func: max`` (``divisor: max``) and an exact model-wide
tie, FusionBench multiplies the cancelled entries by γ = 0 (they come out 0); here they take −.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch


def trimmed_vote(
    base: "torch.Tensor", tensor: "torch.Tensor", selection, weight: float, sign_election: str, offset: int = 0
) -> "torch.Tensor | None":
    """Model ``i``'s vote for one tensor (flat positions ``offset …`` of it): its trimmed τ (``sum``),
    wᵢ·τ (``weighted_sum``) or sign(τ) (``count``), flat; ``None`` when the selection keeps nothing."""
    import torch

    if selection.keep_none:
        return None
    tau = (tensor - base).reshape(-1)
    tau = torch.where(selection.keep_mask(tau.abs(), offset), tau, torch.zeros_like(tau))
    if sign_election == "weighted_sum":
        return tau.mul_(weight) if weight != 1.0 else tau
    if sign_election == "count":
        return torch.sign(tau)
    return tau


class VoteTally:
    """Entries electing + and − over a whole model (see the module docstring).

    Feed it, for each tensor name in turn, every model's vote in model order (:meth:`add_blocks`
    or :meth:`add`); it sums them into one buffer (the merge's summation order) and counts the
    signs when the next name starts (or at :meth:`flush`)."""

    def __init__(self) -> None:
        self.plus = 0
        self.minus = 0
        self._name: str | None = None
        self._votes: "torch.Tensor | None" = None
        self._fresh = True  # no model has voted on the current tensor yet (the buffer is uninitialised)
        self._block: "torch.Tensor | None" = None

    def _start(self, name: str, like: "torch.Tensor") -> "torch.Tensor":
        import torch

        if name != self._name:
            self.flush()
            self._name = name
        if self._votes is None:
            self._votes = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
        return self._votes

    def add_blocks(self, name: str, base: "torch.Tensor", tensor: "torch.Tensor", fill: "Callable", weight: float, sign_election: str) -> None:
        """Add one model's vote, block by block: ``fill(base_block, model_block, out, flat_offset)``
        writes its trimmed τ into ``out`` and returns ``False`` when the model keeps nothing (the
        first voter writes straight into the buffer)."""
        import torch

        from .sparsify import BLOCK

        votes = self._start(name, base)
        a, b = tensor.reshape(-1), base.reshape(-1)
        n = a.numel()
        if self._block is None or self._block.dtype != a.dtype or self._block.device != a.device:
            self._block = torch.empty(BLOCK, dtype=a.dtype, device=a.device)
        for start in range(0, n, BLOCK):
            stop = min(n, start + BLOCK)
            out = votes[start:stop] if self._fresh else self._block[: stop - start]
            if not fill(b[start:stop], a[start:stop], out, start):
                return  # a model trimmed to nothing votes 0 everywhere (known at its first block)
            if sign_election == "weighted_sum":
                if weight != 1.0:
                    out.mul_(weight)
            elif sign_election == "count":
                torch.sign(out, out=out)
            if not self._fresh:
                votes[start:stop] += out
        self._fresh = False

    def add(self, name: str, vote: "torch.Tensor | None") -> None:
        """Add one model's whole vote (:func:`trimmed_vote`; ``None``: it keeps nothing)."""
        if vote is None:
            if name != self._name:
                self.flush()
                self._name = name
            return
        votes = self._start(name, vote)
        if self._fresh:
            votes.copy_(vote.reshape(-1))
        else:
            votes += vote.reshape(-1)
        self._fresh = False

    def flush(self) -> None:
        """Count the signs of the summed votes of the current tensor."""
        import torch

        if self._votes is not None and not self._fresh:
            for start in range(0, self._votes.numel(), 1 << 20):
                part = self._votes[start : start + (1 << 20)]
                self.plus += int(torch.count_nonzero(part > 0))
                self.minus += int(torch.count_nonzero(part < 0))
        self._name, self._votes, self._fresh = None, None, True

    @property
    def zero_sign(self) -> float:
        """The sign a zero vote elects: +1 when more entries elect + than −, else −1 (FusionBench)."""
        return 1.0 if self.plus > self.minus else -1.0
