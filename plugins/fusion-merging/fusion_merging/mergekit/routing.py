"""Running a translated recipe on the streaming engine: per-tensor inputs and parameters.

A mergekit recipe may merge, for one output tensor, differently named tensors of
different subsets of the models (slices), with parameters that vary per tensor
(gradients, filters) and per model.  The engine streams a fixed list of inputs that
share tensor names, so the translator hands it:

- one :class:`SlotReader` per input *slot* (the base, then each model that is ever a
  non-base input), which serves, under the output name, the tensor that slot
  contributes to that output tensor (renamed across layers), or an empty placeholder
  when the slot does not take part in it;
- a :func:`routed` method: a subclass of the fusion method whose ``kernel`` (and two-phase
  ``chunk_stats``/``kernel_chunk``) picks the slots taking part in the tensor and runs the
  method configured with that tensor's resolved fields (the kernel context carries them as
  :class:`Route`).  Configured methods are cached per distinct set of fields.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from fusion_core import TensorReader

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


@attrs.frozen
class Route:
    """Which model slots take part in one output tensor, whether it has a base, and the method's fields for it."""

    slots: tuple[int, ...]
    has_base: bool
    fields: tuple  # frozen (field, value) pairs
    copy: bool = False
    """The tensor is one input's, copied (a buffer only some inputs store), not merged."""

    @classmethod
    def make(cls, slots: Sequence[int], has_base: bool, fields: Mapping[str, Any], copy: bool = False) -> "Route":
        return cls(tuple(slots), has_base, _freeze(fields), copy)

    def field_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.fields}


@attrs.frozen
class Stored:
    """A stored tensor of one input: ``reader``'s ``name``."""

    reader: TensorReader
    name: str

    @property
    def owns_tensors(self) -> bool:
        return self.reader.owns_tensors

    def dtype(self) -> "torch.dtype":
        return self.reader.dtype(self.name)

    def get(self) -> "torch.Tensor":
        return self.reader.get(self.name)

    def get_rows(self, start: int, stop: int) -> "torch.Tensor":
        return self.reader.get_rows(self.name, start, stop)


class SlotReader(TensorReader):
    """One input slot of a routed merge, under the output's tensor names.

    ``table[out_name]`` is a :class:`Stored` tensor (or another entry with ``get``,
    ``get_rows``, ``dtype`` and ``owns_tensors``, e.g. rows permuted to an output
    vocabulary) or ``None`` (the slot does not take
    part: an empty float tensor is served, or, for non-float tensors, ``fallback``'s tensor
    so that the engine's equality check of integer buffers passes).  ``cast``: float tensors
    are read as this dtype (mergekit's ``dtype``: inputs are rounded to it before merging).
    """

    def __init__(
        self,
        label: str,
        order: Sequence[str],
        shapes: Mapping[str, tuple[int, ...]],
        dtypes: Mapping[str, "torch.dtype"],
        table: Mapping[str, Any],
        fallback: Mapping[str, Stored],
        folder=None,
        cast: "torch.dtype | None" = None,
    ) -> None:
        self.label, self.folder, self.cast = label, folder, cast
        self._order, self._shapes, self._dtypes = list(order), shapes, dtypes
        self._table, self._fallback = table, fallback
        self._position = {name: i for i, name in enumerate(self._order)}
        self.owns_tensors = all(entry.owns_tensors for entry in table.values() if entry is not None)

    def keys(self) -> list[str]:
        return list(self._order)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._shapes[name])

    def dtype(self, name: str) -> "torch.dtype":
        entry = self._table.get(name)
        dtype = entry.dtype() if entry is not None else self._dtypes[name]
        return self.cast if self.cast is not None and dtype.is_floating_point else dtype

    def _cast(self, tensor: "torch.Tensor") -> "torch.Tensor":
        if self.cast is None or not tensor.is_floating_point() or tensor.dtype == self.cast:
            return tensor
        return tensor.to(self.cast)

    def _placeholder(self, name: str) -> "torch.Tensor":
        import torch

        dtype = self.dtype(name)
        if not dtype.is_floating_point:
            return self._fallback[name].get()
        return torch.empty(0, dtype=dtype)

    def get(self, name: str) -> "torch.Tensor":
        entry = self._table.get(name)
        return self._placeholder(name) if entry is None else self._cast(entry.get())

    def get_rows(self, name: str, start: int, stop: int) -> "torch.Tensor":
        entry = self._table.get(name)
        return self._placeholder(name) if entry is None else self._cast(entry.get_rows(start, stop))

    def location(self, name: str) -> tuple[str, int]:
        return ("", self._position[name])


class _Routed:
    """Mixed into a copy of a fusion method class: each tensor runs the method configured for it."""

    routes: Mapping[str, Route]
    _configured: Any  # route → the method configured with its fields (set by :func:`routed`)

    def check_inputs(self, n_models: int, has_base: bool) -> None:
        """Every tensor's inputs were checked when the recipe was planned."""

    def kernel(self, name, base, tensors, ctx):
        route = self.routes[name]
        if route.copy:
            return tensors[route.slots[0]].clone()
        method = self._configured(route)
        return method.kernel(name, base if route.has_base else None, [tensors[i] for i in route.slots], ctx)


class _RoutedTwoPhase(_Routed):
    def chunk_stats(self, name, base, tensor, index, ctx):
        route = self.routes[name]
        if index not in route.slots or route.copy:
            return None
        return self._configured(route).chunk_stats(name, base, tensor, route.slots.index(index), ctx)

    def kernel_chunk(self, name, base, tensors, ctx, stats, start):
        route = self.routes[name]
        if route.copy:
            return tensors[route.slots[0]].clone()
        method = self._configured(route)
        picked = [tensors[i] for i in route.slots]
        picked_stats = [stats[i] for i in route.slots]  # stats come in slot order, one per slot
        return method.kernel_chunk(name, base if route.has_base else None, picked, ctx, picked_stats, start)


def routed(cls: type, config: Any, routes: Mapping[str, Route]) -> Any:
    """An instance of a subclass of ``cls`` that runs each tensor with its :class:`Route`.

    It is a ``cls`` (same name, capabilities, ``elementwise`` and two-phase protocol), so
    the engine treats it as the method itself.
    """
    two_phase = callable(getattr(cls, "chunk_stats", None)) and callable(getattr(cls, "kernel_chunk", None))
    mixin = _RoutedTwoPhase if two_phase else _Routed
    subclass = type(f"Routed{cls.__name__}", (mixin, cls), {"routes": routes, "_configured": _configured_for(cls)})
    return subclass(config)


def _configured_for(cls: type):
    """``method._configured(route)``: an instance of ``cls`` with the route's fields, cached per distinct fields."""

    def configured(self, route: Route) -> Any:
        cache = self.__dict__.setdefault("_configured_cache", {})
        method = cache.get(route.fields)
        if method is None:
            from fusion_core import make_config

            config = make_config(cls.Config, route.field_dict(), where=f"method {cls.name}")
            method = cache[route.fields] = cls(config)
        return method

    return configured
