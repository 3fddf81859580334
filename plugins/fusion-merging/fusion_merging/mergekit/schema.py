"""mergekit 0.1.5's config schema: reading a recipe, and resolving a parameter for one tensor.

The recipe is normalised as mergekit normalises it (``plan.py``): ``models:`` becomes one
output slice whose sources are the models over all their layers, with the base appended
when it is not listed.  A parameter is resolved for a tensor the way mergekit's
``parameter_resolver`` does: the scopes are tried from the most to the least specific
(the source's own ``parameters`` for per-model values, then the slice's, then the
top-level ``parameters``) and the first that yields a value wins, else the method's
default (an error when the parameter has none).  A value is a scalar, a **gradient** (a
list interpolated linearly over ``t``, the layer's position in its slice, 0…1), or a list
of **conditions** (``filter``: a substring of the tensor name, first match wins; no
filter, or ``*``, matches every tensor), whose values may themselves be gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from fusion_core import ConfigError

TOP_LEVEL = (
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
)
#: keys mergekit reads that fuse refuses, with the reason
REFUSED_TOP_LEVEL = {"modules": "multi-module merges (modules:) are not supported; use models: or slices:"}


@attrs.frozen
class Source:
    """One input of an output slice: a model over a range of its layers (``None``: all)."""

    model: str
    layer_range: tuple[int, int] | None
    parameters: Mapping[str, Any] | None


@attrs.frozen
class OutSlice:
    sources: tuple[Source, ...]
    base_model: str | None = None
    parameters: Mapping[str, Any] | None = None


@attrs.frozen
class Recipe:
    """A mergekit YAML, validated and normalised to slices."""

    merge_method: str
    base_model: str | None
    slices: tuple[OutSlice, ...]
    from_models: bool
    """``True`` when the recipe used ``models:`` (one slice over whole models)."""
    parameters: Mapping[str, Any] | None
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None
    tokenizer: Mapping[str, Any] | None
    chat_template: str | None
    where: str

    def referenced_models(self) -> list[str]:
        """Every model the recipe names, base first, in order of appearance."""
        seen: list[str] = [self.base_model] if self.base_model else []
        for out in self.slices:
            for source in out.sources:
                if source.model not in seen:
                    seen.append(source.model)
        return seen


def _where(path: str | None) -> str:
    return f"mergekit config {path}" if path else "mergekit config"


def _mapping(value: Any, where: str, what: str) -> Mapping[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: {what} must be a mapping of parameter names to values")
    return value


def _model_ref(value: Any, where: str, what: str) -> str:
    if isinstance(value, Mapping):
        raise ConfigError(f"{where}: {what} must be a path string (structured model references are not supported)")
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {what} must be a path, got {value!r}")
    if "+" in value:
        import os

        if not os.path.exists(value):
            raise ConfigError(
                f"{where}: {what} {value!r} looks like a model+LoRA reference, which fuse merge does not support; merge the adapter first"
            )
    return value


def _layer_range(value: Any, where: str, what: str) -> tuple[int, int]:
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
        and 0 <= value[0] < value[1]
    )
    if not ok:
        raise ConfigError(f"{where}: {what} must be [start, end] with 0 <= start < end (end excluded), got {value!r}")
    return (int(value[0]), int(value[1]))


def _keys(entry: Any, allowed: Sequence[str], where: str, what: str) -> Mapping[str, Any]:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: {what} must be a mapping")
    extra = sorted(str(k) for k in entry if k not in allowed)
    if extra:
        raise ConfigError(f"{where}: {what} has unsupported key(s) {', '.join(extra)} (allowed: {', '.join(allowed)})")
    return entry


def parse(data: Any, *, path: str | None = None) -> Recipe:
    """Validate a parsed mergekit YAML mapping and normalise it to slices."""
    where = _where(path)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    for key in data:
        if key in REFUSED_TOP_LEVEL:
            raise ConfigError(f"{where}: {REFUSED_TOP_LEVEL[key]}")
        if key not in TOP_LEVEL:
            raise ConfigError(f"{where}: unsupported key {key!r}; fuse merge reads {', '.join(TOP_LEVEL)}")
    method = data.get("merge_method")
    if not isinstance(method, str) or not method:
        raise ConfigError(f"{where}: merge_method is missing")
    base = _model_ref(data["base_model"], where, "base_model") if data.get("base_model") is not None else None
    for key in ("dtype", "out_dtype", "chat_template"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise ConfigError(f"{where}: {key} must be a string, got {data[key]!r}")
    tokenizer_source = data.get("tokenizer_source")
    if tokenizer_source is not None and not isinstance(tokenizer_source, str):
        raise ConfigError(f"{where}: tokenizer_source must be base, union or a model path, got {tokenizer_source!r}")
    tokenizer = _mapping(data.get("tokenizer"), where, "tokenizer")
    if tokenizer_source and tokenizer:
        raise ConfigError(f"{where}: give tokenizer_source or tokenizer, not both (as mergekit)")
    has_models, has_slices = bool(data.get("models")), bool(data.get("slices"))
    if has_models == has_slices:
        raise ConfigError(f"{where}: give exactly one of models or slices (a non-empty list)")
    if has_models:
        slices = (_models_slice(data["models"], base, where),)
    else:
        slices = _slices(data["slices"], where)
    return Recipe(
        merge_method=method,
        base_model=base,
        slices=slices,
        from_models=has_models,
        parameters=_mapping(data.get("parameters"), where, "parameters"),
        dtype=data.get("dtype"),
        out_dtype=data.get("out_dtype"),
        tokenizer_source=tokenizer_source,
        tokenizer=tokenizer,
        chat_template=data.get("chat_template"),
        where=where,
    )


def _models_slice(entries: Any, base: str | None, where: str) -> OutSlice:
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: models must be a list of {{model: PATH, parameters: {{...}}}}")
    sources = []
    for i, entry in enumerate(entries):
        entry = _keys(entry, ("model", "parameters"), where, f"models[{i}]")
        ref = _model_ref(entry.get("model"), where, f"models[{i}].model")
        sources.append(Source(ref, None, _mapping(entry.get("parameters"), where, f"models[{i}].parameters")))
    if base is not None and not any(s.model == base for s in sources):
        sources.append(Source(base, None, None))  # mergekit adds the base as an input
    return OutSlice(tuple(sources))


def _slices(entries: Any, where: str) -> tuple[OutSlice, ...]:
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: slices must be a list of {{sources: [...]}}")
    out = []
    for i, item in enumerate(entries):
        item = _keys(item, ("sources", "base_model", "parameters", "residual_weight"), where, f"slices[{i}]")
        if item.get("residual_weight") is not None:
            raise ConfigError(f"{where}: slices[{i}].residual_weight is not supported (mergekit does not apply it either)")
        raw = item.get("sources")
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{where}: slices[{i}].sources must be a non-empty list")
        sources = []
        for j, src in enumerate(raw):
            what = f"slices[{i}].sources[{j}]"
            src = _keys(src, ("model", "layer_range", "parameters"), where, what)
            ref = _model_ref(src.get("model"), where, f"{what}.model")
            layers = _layer_range(src.get("layer_range"), where, f"{what}.layer_range")
            sources.append(Source(ref, layers, _mapping(src.get("parameters"), where, f"{what}.parameters")))
        if len({s.model for s in sources}) != len(sources):
            raise ConfigError(f"{where}: slices[{i}] lists a model twice (mergekit refuses duplicate merge inputs)")
        base = _model_ref(item["base_model"], where, f"slices[{i}].base_model") if item.get("base_model") else None
        out.append(OutSlice(tuple(sources), base, _mapping(item.get("parameters"), where, f"slices[{i}].parameters")))
    return tuple(out)


# --------------------------------------------------------------------------- values


def _scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def evaluate(setting: Any, tensor: str, t: float, convert: Callable[[Any], Any]) -> Any:
    """The value of one setting for ``tensor`` at layer position ``t`` (``None``: no condition matched).

    As mergekit's ``evaluate_setting``: numeric gradients interpolate between the two
    nearest points (``t·(n−1)``), non-numeric ones pick the point ``int(t·(n−1))``.
    """
    if isinstance(setting, Mapping):
        setting = [setting]
    if _scalar(setting):
        return convert(setting)
    if not isinstance(setting, list):
        raise ValueError(f"unexpected value {setting!r}")
    if not setting:
        return None
    if all(_scalar(e) for e in setting):
        values = [convert(e) for e in setting]
        if not all(_numeric(v) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return convert((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:
        if not isinstance(cond, Mapping) or "value" not in cond or set(cond) - {"value", "filter"}:
            raise ValueError(f"a list of conditions must hold {{filter: SUBSTRING, value: V}} mappings, got {cond!r}")
        pattern = cond.get("filter")
        if pattern is None or pattern == "*" or (tensor and str(pattern) in tensor):
            return evaluate(cond["value"], tensor, t, convert)
    return None


def converter(kind: type, name: str) -> Callable[[Any], Any]:
    """A validator like pydantic's for mergekit's parameter types (float, int, bool, str)."""

    def convert(value: Any) -> Any:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if _numeric(value) and value in (0, 1):
                return bool(value)
        elif kind is float:
            if _numeric(value):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        elif kind is int:
            if _numeric(value) and float(value).is_integer():
                return int(value)
        elif isinstance(value, str):
            return value
        raise ValueError(f"parameter {name!r} must be a {kind.__name__}, got {value!r}")

    return convert


def resolve(
    name: str,
    scopes: Sequence[Mapping[str, Any] | None],
    tensor: str,
    t: float,
    convert: Callable[[Any], Any],
    default: Any,
    where: str,
) -> Any:
    """The first value ``scopes`` (most specific first) give for parameter ``name``, else ``default``.

    ``default`` is :data:`REQUIRED` for a parameter without one: then a missing value is an error.
    """
    for scope in scopes:
        if scope is not None and name in scope:
            try:
                value = evaluate(scope[name], tensor, t, convert)
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            if value is not None:
                return value
    if default is REQUIRED:
        raise ConfigError(f"{where}: missing required parameter {name!r} for tensor {tensor!r} (mergekit requires it too)")
    return default


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
