"""How a mergekit ``merge_method`` and its parameters map onto a fusion method.

Each method module of fusion-merging declares its mappings next to the methods
(``MERGEKIT = [MergekitMapping(...), ...]``); the translator only reads them.  A
mapping lists every parameter mergekit 0.1.5's method takes (name, type, default), where
its value goes (a fusion field, a converter returning fields, or nowhere when it cannot
change the result), and the input contract (base required/optional/ignored, how many
inputs).  A parameter not listed is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from .schema import REQUIRED

BASES = ("required", "optional", "ignored")


@attrs.frozen
class Param:
    """One mergekit parameter.

    ``to``: the fusion field its value sets; or a function ``value → {field: value}``
    (it may raise ``ValueError`` naming what cannot be honoured); ``None`` when the value
    cannot change the result (e.g. ``int8_mask``, the storage dtype of a mask).
    """

    kind: type = float
    default: Any = REQUIRED
    to: str | Callable[[Any], dict] | None = None

    def fields(self, value: Any) -> dict:
        if self.to is None:
            return {}
        if isinstance(self.to, str):
            return {self.to: value}
        return self.to(value)


@attrs.frozen
class MergekitMapping:
    """mergekit ``merge_method`` → fusion ``method`` with ``fixed`` fields.

    ``shared``: parameters with one value per tensor; ``per_model``: parameters with one
    value per input and tensor, collected into a list (one value per model, in the order
    the method receives the models) for the fusion field ``to``.  ``per_model_scope`` is
    ``non_base`` (the base takes none) or ``input`` (every input, base included).
    ``base``: ``required`` (the base is the method's base), ``optional`` (used as the base
    when the recipe names one) or ``ignored`` (the base is an ordinary input).
    ``adjust``: a last fix-up of the fields of one tensor (mergekit corner cases).
    """

    merge_method: str
    method: str
    base: str = "required"
    fixed: Mapping[str, Any] = attrs.field(factory=dict)
    shared: Mapping[str, Param] = attrs.field(factory=dict)
    per_model: Mapping[str, Param] = attrs.field(factory=dict)
    per_model_scope: str = "non_base"
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int | None = None
    max_non_base: int | None = None
    adjust: Callable[[dict], dict] | None = None
    note: str = ""

    def __attrs_post_init__(self) -> None:
        if self.base not in BASES:
            raise ValueError(f"base must be one of {BASES}, got {self.base!r}")


def all_mappings() -> dict[str, MergekitMapping]:
    """Every declared mapping by mergekit method name."""
    from .. import basic, geometric, stacking, task_arithmetic

    table: dict[str, MergekitMapping] = {}
    for module in (basic, task_arithmetic, geometric, stacking):
        for mapping in getattr(module, "MERGEKIT", []):
            if mapping.merge_method in table:  # pragma: no cover - a declaration bug
                raise ValueError(f"mergekit method {mapping.merge_method!r} is mapped twice")
            table[mapping.merge_method] = mapping
    return table
