"""Per-tensor merge kernels and the context the engine hands them.

A method that works tensor by tensor subclasses :class:`KernelMethod` and writes
only :meth:`KernelMethod.kernel`; reading, casting, validation, seeding, chunking
and writing are the engine's job (:mod:`fusion_core.engine.executor`).
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from ..components import Capabilities, Method

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..components import ModelPool
    from ..run_context import RunContext


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
    """For an ``elementwise`` kernel given a block of rows: the index of its first row in the
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


class KernelMethod(Method):
    """A method written as a per-tensor kernel; the engine streams every tensor through it.

    Class attributes a subclass may set:

    - ``min_models`` / ``max_models``: how many fine-tuned inputs it accepts.
    - ``capabilities.needs_base``: whether a base tensor is required.
    - ``elementwise``: ``True`` when the kernel treats elements independently, so the
      engine may chunk very large tensors; ``False`` for methods that need the whole
      tensor (top-k, norms, SVD).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True)
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    elementwise: ClassVar[bool] = False

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

    def check_inputs(self, n_models: int, has_base: bool) -> None:
        """Raise :class:`~fusion_core.errors.InputError` when the inputs do not fit this method."""
        from ..errors import InputError

        if self.capabilities.needs_base and not has_base:
            raise InputError(f"method {self.name!r} needs a base model; give one with --base (or `base:` in the model pool)")
        if n_models < self.min_models:
            raise InputError(f"method {self.name!r} needs at least {self.min_models} fine-tuned model(s), got {n_models}")
        if self.max_models is not None and n_models > self.max_models:
            raise InputError(f"method {self.name!r} takes at most {self.max_models} fine-tuned model(s), got {n_models}")
        weights = getattr(self.config, "weights", None)
        if weights is not None and len(weights) != n_models:
            raise InputError(f"method {self.name!r}: weights has {len(weights)} value(s) for {n_models} model(s)")

    def run(self, pool: "ModelPool", ctx: "RunContext") -> Any:
        """Merge the pool in memory, tensor by tensor, and return the merged state dict."""
        from .executor import merge_pool

        return merge_pool(self, pool, ctx)
