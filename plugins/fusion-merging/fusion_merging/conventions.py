"""Named conventions: which peer's settings a method reproduces when a field is left unset.

A method that exists in FusionBench and in mergekit (or in its paper) with different
defaults or semantics has a ``convention`` field (``fusionbench`` by default: FusionBench
0.2.33's ``config/method/*.yaml``) and declares the convention-dependent fields with
``None`` defaults.  :func:`resolve` fills each unset field from the chosen convention's
preset after validation, so the built config (``fuse run --print-config``) shows concrete
values and an explicitly given value always wins.  The mergekit importer sets
``convention: mergekit``.

Per-model parameters (mergekit allows ``density``, ``epsilon``, ``gamma`` and ``weight``
per model) are a scalar or a list with one value per model, in pool order
(:func:`per_model`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from fusion_core import DefaultBy, DefaultCase, InputError, option

CONVENTIONS = ("fusionbench", "mergekit", "paper")


def convention_option(presets: Mapping[str, Mapping[str, Any]], what: str = ""):
    """The ``convention`` field: which preset fills the fields left unset (default fusionbench)."""
    names = tuple(presets)
    spelled = "; ".join(f"{name}: " + ", ".join(f"{k}={v!r}" for k, v in preset.items()) for name, preset in presets.items())
    return option(
        names[0],
        help=f"whose settings fill the fields left unset ({', '.join(names)}){what} — {spelled}",
        validator=attrs.validators.in_(names),
    )


def resolve(config: Any, presets: Mapping[str, Mapping[str, Any]]) -> None:
    """Fill, in place, each ``None`` field of the frozen ``config`` named by its convention's preset.

    A field declared with :func:`by_convention` takes the value its declaration chooses (the
    preset's, or a case's: e.g. FusionBench's DARE λ for ``variant: ties``), so what ``fuse show``
    and ``fuse ui`` display is what is filled."""
    fields = attrs.fields_dict(type(config))
    current = {name: getattr(config, name) for name in fields}
    for key, value in presets[config.convention].items():
        if getattr(config, key) is None:
            chosen = DefaultBy.of(fields[key])
            if chosen is not None:
                value = chosen.value_for(current)
            object.__setattr__(config, key, list(value) if isinstance(value, list) else value)


def preset_values(presets: Mapping[str, Mapping[str, Any]], key: str) -> dict[str, Any]:
    """Convention → the value its preset gives ``key`` (the conventions that set it)."""
    return {name: preset[key] for name, preset in presets.items() if key in preset}


def by_convention(presets: Mapping[str, Mapping[str, Any]], key: str, help: str, validator=None,
                  cases: Sequence[DefaultCase] = ()):
    """A convention-dependent field: ``None`` (= the convention's value) by default.

    Declared with :class:`fusion_core.DefaultBy` (the ``convention`` field chooses; ``cases``
    refine a convention's value by another field), so ``fuse show`` and ``fuse ui`` show the
    effective default and each convention's.  Annotate it with the plain type (not ``| None``):
    a value given explicitly must be a real one."""
    chosen = DefaultBy("convention", preset_values(presets, key), tuple(cases))
    return option(None, help=help, validator=validator, default_by=chosen)


def per_model(method: str, key: str, value: float | Sequence[float], n: int) -> list[float]:
    """A scalar-or-per-model parameter as one float per model (a list must have ``n`` values)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise InputError(f"method {method!r}: {key} has {len(value)} value(s) for {n} model(s); give one or one per model")
        return [float(v) for v in value]
    return [float(value)] * n


def check_per_model_count(method: str, config: Any, keys: Sequence[str], n: int) -> None:
    """Raise :class:`InputError` when a per-model list among ``keys`` does not have ``n`` values."""
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)):
            per_model(method, key, value, n)
