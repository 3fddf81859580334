"""What is installed, as JSON for the page: components grouped by kind and plugin, with typed fields.

Everything comes from the core's registry and its field descriptions (the data ``fuse show``
prints); nothing here imports torch.
"""

from __future__ import annotations

import json
import typing
from typing import Any, Literal

import attrs

from fusion_core import DefaultBy, config_fields, describe_fields, parse_value, plain_data

#: page section → registry kind
SECTIONS = {"method": "method", "modelpool": "model-pool", "taskpool": "task-pool"}


def value_text(value: Any) -> str:
    """A value written the way ``key=value`` reads it back (YAML): ``0.2``, ``true``, ``null``, ``[1, 2]``, ``cpu``."""
    if isinstance(value, str):
        try:
            if parse_value(value) == value and value.strip() == value and value != "":
                return value
        except Exception:  # noqa: BLE001 - anything YAML cannot read back plainly gets quoted
            pass
        return json.dumps(value, ensure_ascii=False)
    return json.dumps(plain_data(value), ensure_ascii=False, separators=(", ", ": "))


def _choices(tp) -> list | None:
    """The allowed values of a ``Literal`` (or ``Literal | None``) field, else ``None``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return list(typing.get_args(tp))
    if origin is not None:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and typing.get_origin(args[0]) is Literal:
            return [*typing.get_args(args[0]), None]
    return None


def _default(field) -> tuple[bool, Any]:
    if field.default is attrs.NOTHING:
        return False, None
    if isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
        return True, field.default.factory()
    return True, field.default


def chosen_default(chosen: DefaultBy, defaults: dict[str, Any]) -> dict:
    """A field whose default another field chooses, as the page shows it: the choosing field, each choice's
    value and the cases (as text), and the value and its description under the other fields' defaults."""
    return {
        "field": chosen.field,
        "values": {choice: value_text(v) for choice, v in chosen.values.items()},
        "cases": [{"choice": c.choice, "when": c.when, "equals": value_text(c.equals), "value": value_text(c.value)}
                  for c in chosen.cases],
        "value": value_text(chosen.value_for(defaults)),
        "text": chosen.describe(defaults, show=value_text),
    }


def field_info(config_cls) -> list[dict]:
    """Each field: name, type text, widget (``bool``/``choice``/``text``), default (as text), help, required.

    A field another field fills when it is left unset (a method's ``convention``) has ``default: ""``
    (the input stays empty, so the command leaves it out) and ``default_by`` (see :func:`chosen_default`):
    the page shows the value the current choice gives it."""
    described = {d["name"]: d for d in describe_fields(config_cls)}
    defaults = default_values(config_cls)
    out = []
    for f in config_fields(config_cls):
        has_default, default = _default(f)
        choices = _choices(f.type)
        chosen = DefaultBy.of(f)
        widget = "bool" if f.type in (bool, "bool") else "choice" if choices else "text"
        out.append({
            "name": f.name,
            "type": described[f.name]["type"],
            "widget": widget,
            "choices": [value_text(c) for c in choices] if choices else None,
            "default": value_text(default) if has_default and chosen is None else "",
            "default_by": chosen_default(chosen, defaults) if chosen is not None else None,
            "required": not has_default,
            "help": described[f.name]["help"],
        })
    return out


def default_values(config_cls) -> dict[str, Any]:
    """Field name → default value (fields without one are left out)."""
    out = {}
    for f in config_fields(config_cls):
        has_default, default = _default(f)
        if has_default:
            out[f.name] = plain_data(default)
    return out


def _component(entry) -> dict:
    cls = entry.cls
    info = {
        "name": entry.name, "plugin": entry.plugin, "dist": entry.dist, "summary": cls.summary,
        "doc": (cls.__doc__ or "").strip(), "reference": cls.reference_url,
        "capabilities": cls.capabilities.flags(), "fields": field_info(cls.Config),
    }
    if entry.kind == "method":
        info["data_free"] = is_data_free(cls)
        info["fusionbench_config"] = cls.fusionbench_config  # the FusionBench yaml its defaults are checked against, or None
    return info


def is_data_free(cls) -> bool:
    """A per-tensor kernel method: ``fuse merge`` can run it on checkpoints on disk."""
    from fusion_core import KernelMethod

    return isinstance(cls, type) and issubclass(cls, KernelMethod)


def catalog(registry) -> dict:
    """The page's catalog: per section the components grouped by plugin, the benchmarks, the run settings."""
    from fusion_core import DEFAULT_BENCHMARK, RunSettings

    out: dict[str, Any] = {"sections": {}, "benchmarks": [], "default_benchmark": DEFAULT_BENCHMARK}
    for section, kind in SECTIONS.items():
        groups: dict[str, list] = {}
        for name in registry.names(kind):
            entry = registry.entries[kind][name]
            groups.setdefault(entry.plugin, []).append(_component(entry))
        out["sections"][section] = [{"plugin": plugin, "items": items} for plugin, items in sorted(groups.items())]
    for name in registry.names("benchmark"):
        bench = registry.entries["benchmark"][name]
        out["benchmarks"].append({
            "name": bench.name, "plugin": bench.plugin, "summary": bench.summary,
            "modelpool": plain_data(bench.modelpool), "taskpool": plain_data(bench.taskpool),
            "methods": [m["name"] for m in bench.methods],
        })
    settings = [f for f in field_info(RunSettings) if f["name"] != "benchmark"]
    out["settings"] = settings
    return out
