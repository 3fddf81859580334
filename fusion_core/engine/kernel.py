"""Per-tensor merge kernels: the method base classes of the merge engine.

A method that works tensor by tensor subclasses :class:`KernelMethod` and writes
only :meth:`KernelMethod.kernel`; reading, casting, validation, seeding, chunking
and writing are the engine's job (:mod:`fusion_core.engine.stream`).  What the
engine may do with a method is declared in :mod:`fusion_core.engine.protocol`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from ..components import Capabilities, Method
from .protocol import Kernel, KernelContext, Passthrough, TwoPhaseKernel, WholeModelPasses, streams, tensor_seed  # noqa: F401 - re-exported

if TYPE_CHECKING:  # pragma: no cover
    from ..components import ModelPool
    from ..run_context import RunContext

__all__ = ["KernelContext", "KernelMethod", "PassthroughMethod", "TwoPhaseKernel", "streams", "tensor_seed"]


class KernelMethod(Method, Kernel):
    """A method written as a per-tensor kernel; the engine streams every tensor through it.

    Class attributes a subclass may set:

    - ``min_models`` (default 1) / ``max_models``: how many fine-tuned inputs it accepts.
    - ``capabilities.needs_base``: whether a base tensor is required.
    - ``elementwise``: ``True`` when the kernel treats elements independently, so the
      engine may chunk very large tensors; ``False`` for methods that need the whole
      tensor (top-k, norms, SVD).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(needs_base=True)
    min_models: ClassVar[int] = 1

    def check_inputs(self, n_models: int, has_base: bool) -> None:
        """:meth:`Method.check_inputs`, plus: per-model ``weights`` (when the Config has them) match the models."""
        from ..errors import InputError

        super().check_inputs(n_models, has_base)
        weights = getattr(self.config, "weights", None)
        if weights is not None and len(weights) != n_models:
            raise InputError(f"method {self.name!r}: weights has {len(weights)} value(s) for {n_models} model(s)")

    def run(self, pool: "ModelPool", ctx: "RunContext") -> Any:
        """Merge the pool in memory, tensor by tensor, and return the merged state dict."""
        from .stream import merge_pool

        return merge_pool(self, pool, ctx)


class PassthroughMethod(Method, Passthrough):
    """A :class:`Method` that copies tensors from its inputs by a plan (see :class:`Passthrough`)."""

    def run(self, pool: "ModelPool", ctx: "RunContext") -> Any:
        """Copy the pool's tensors by the plan, in memory; return the state dict."""
        from .stream import merge_pool

        return merge_pool(self, pool, ctx)
