"""The engine's protocol: what a method declares so that the merge engine can stream it.

The engine (:mod:`fusion_core.engine.stream`) asks these interfaces, never probes
attributes: :class:`Kernel` (a per-tensor kernel), :class:`TwoPhaseKernel` (optional: a
per-input statistic, then row blocks), :class:`Passthrough` (a copy plan instead of
arithmetic).  Methods implement them through :class:`~fusion_core.engine.kernel.KernelMethod`
and :class:`~fusion_core.engine.kernel.PassthroughMethod`; this module imports neither the
engine nor torch, so both sides can depend on it.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

if TYPE_CHECKING:  # pragma: no cover
    import torch


def tensor_seed(seed: int, name: str, salt: str = "") -> int:
    """A 63-bit seed derived from (run seed, tensor name, salt): independent of order, threads, device."""
    digest = hashlib.sha256(f"{int(seed)}\x00{name}\x00{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@attrs.frozen
class KernelContext:
    """What a kernel knows besides its tensors."""

    name: str
    """The tensor's name (e.g. ``encoder.layer.0.weight``)."""
    seed: int = 0
    """The run's seed; use :meth:`generator` rather than global RNG state."""
    compute_dtype: str = "float32"
    """The dtype inputs were cast to before the kernel (a ``torch`` dtype name)."""
    device: str = "cpu"
    """The device inputs were moved to."""
    start: int = 0
    """For an ``elementwise`` (or ``rowwise``) kernel given a block of rows: the index of its first row in the
    whole tensor (blocks of one tensor come in row order); 0 for whole tensors."""

    def generator(self, salt: str = "") -> "torch.Generator":
        """A fresh ``torch.Generator`` on CPU seeded from (seed, tensor name, salt).

        Draw on CPU and move the result, so outputs do not depend on the device.
        Use a different ``salt`` per model for per-model masks (e.g. ``salt=str(i)``).
        """
        import torch

        gen = torch.Generator(device="cpu")
        gen.manual_seed(tensor_seed(self.seed, self.name, salt))
        return gen

    def rand_like(self, tensor: "torch.Tensor", salt: str = "") -> "torch.Tensor":
        """Uniform [0, 1) noise shaped like ``tensor``, drawn on CPU in fp32, on ``tensor``'s device."""
        import torch

        noise = torch.rand(tensor.shape, generator=self.generator(salt), dtype=torch.float32)
        return noise.to(device=tensor.device)

    @property
    def torch_dtype(self) -> "torch.dtype":
        import torch

        return getattr(torch, self.compute_dtype)


class Kernel(abc.ABC):
    """A per-tensor kernel: the engine streams every tensor of the inputs through :meth:`kernel`."""

    elementwise: ClassVar[bool] = False
    """``True`` when the kernel treats elements independently, so the engine may hand it row blocks
    of very large tensors; ``False`` for kernels that need the whole tensor (top-k, norms, SVD)."""

    rowwise: ClassVar[bool] = False
    """``True`` when the kernel treats each row (slice along dim 0) of a tensor of two or more dims
    independently (DELLA's per-row ranks): the engine may hand it blocks of whole rows of such
    tensors, in row order with ``ctx.start`` set, as for ``elementwise``; 0-D/1-D tensors come whole."""

    @abc.abstractmethod
    def check_inputs(self, n_models: int, has_base: bool) -> None:
        """Raise :class:`~fusion_core.errors.InputError` when the inputs do not fit."""

    @abc.abstractmethod
    def kernel(
        self,
        name: str,
        base: "torch.Tensor | None",
        tensors: Sequence["torch.Tensor"],
        ctx: KernelContext,
    ) -> "torch.Tensor":
        """Merge one tensor.

        :param name: the tensor's name.
        :param base: the base model's tensor in ``ctx.compute_dtype`` (``None`` without a base).
        :param tensors: the N fine-tuned models' tensors, same shape and dtype as ``base``.
        :param ctx: seed/generator, compute dtype and device.
        :returns: the merged tensor (any float dtype; the engine casts it to the output dtype).
        """


def _defines(cls: type, *names: str) -> bool:
    """Whether ``cls`` (or a base) defines every attribute in ``names`` as a callable."""
    return all(callable(getattr(cls, name, None)) for name in names)


class TwoPhaseKernel(abc.ABC):
    """The optional two-phase interface of a :class:`KernelMethod`, for kernels that need a
    per-tensor statistic of each input (TIES's top-k threshold, an L1 norm).

    Declare it by subclassing (``class Ties(KernelMethod, TwoPhaseKernel)``); a class that
    defines both methods is recognised too (``isinstance`` answers for it).  The engine uses
    it only for tensors above ``chunk_bytes`` (one input at a time, then row blocks); smaller
    tensors go through ``kernel``, so both paths must agree (test them against each other).
    """

    @abc.abstractmethod
    def chunk_stats(self, name: str, base: "torch.Tensor | None", tensor: "torch.Tensor", index: int, ctx: KernelContext) -> Any:
        """Whole tensors: the base (or ``None``) and input ``index``; return what phase 2 needs."""

    @abc.abstractmethod
    def kernel_chunk(self, name: str, base: "torch.Tensor | None", tensors: Sequence["torch.Tensor"], ctx: KernelContext,
                     stats: Sequence[Any], start: int) -> "torch.Tensor":
        """Rows ``[start, start + len)`` of the base and of every input → those rows of the merge.

        ``stats`` is the list of :meth:`chunk_stats` results in input order.
        """

    @classmethod
    def __subclasshook__(cls, other: type) -> bool:
        if cls is TwoPhaseKernel:
            return _defines(other, "chunk_stats", "kernel_chunk") or NotImplemented
        return NotImplemented


class WholeModelPasses(abc.ABC):
    """The optional whole-model interface of a :class:`KernelMethod`: passes over every merged
    tensor of every model before merging, for a statistic of each model's whole task vector
    (FusionBench's TIES: a global top-k threshold per model).

    Declare it by subclassing; a class that defines the three methods is recognised too.
    """

    @abc.abstractmethod
    def model_passes(self, n_models: int) -> int:
        """At most how many passes to make before merging (0: none); resets the statistic."""

    @abc.abstractmethod
    def model_pass(self, pass_index: int, name: str, base: "torch.Tensor | None", tensor: "torch.Tensor", index: int,
                   ctx: KernelContext) -> None:
        """One tensor of model ``index`` (read-only: it may be a view of the file)."""

    @abc.abstractmethod
    def model_pass_end(self, pass_index: int) -> bool:
        """True when the statistic is complete (no further pass is needed)."""

    @classmethod
    def __subclasshook__(cls, other: type) -> bool:
        if cls is WholeModelPasses:
            return _defines(other, "model_passes", "model_pass", "model_pass_end") or NotImplemented
        return NotImplemented


class Passthrough(abc.ABC):
    """A method that copies tensors (possibly renamed) from its inputs instead of computing them
    (layer stacking, "frankenmerges"): the engine asks it for the plan and copies.

    Declare it by subclassing (:class:`~fusion_core.engine.kernel.PassthroughMethod`); a class
    that defines ``check_inputs``, ``passthrough_plan`` and ``update_config`` is recognised too.
    """

    @abc.abstractmethod
    def check_inputs(self, n_models: int, has_base: bool) -> None:
        """Raise :class:`~fusion_core.errors.InputError` when the inputs do not fit."""

    @abc.abstractmethod
    def passthrough_plan(self, inputs: Sequence[Any], has_base: bool, out_dtype: "torch.dtype | None" = None) -> list:
        """Every output tensor as a :class:`~fusion_core.engine.validate.TensorPlan` of kind ``PASSTHROUGH``."""

    def update_config(self, path: Any) -> None:  # noqa: B027 - optional: a no-op unless overridden
        """Adjust the output folder's ``config.json`` at ``path`` (layer counts...); default: leave it."""

    @classmethod
    def __subclasshook__(cls, other: type) -> bool:
        if cls is Passthrough:
            return _defines(other, "check_inputs", "passthrough_plan", "update_config") or NotImplemented
        return NotImplemented


def streams(method: Any) -> bool:
    """Whether the merge engine can run ``method`` (a per-tensor kernel or a passthrough plan)."""
    return isinstance(method, (Kernel, Passthrough))
