"""The page's state → ``fuse run`` overrides, validated by the core; the command, YAML, ``fuse merge``, dry run.

The page sends the text of each field exactly as a user would type it after ``key=``; it
is typed the way the CLI types it (YAML) and validated by the core's own functions
(:func:`fusion_core.runconfig.raw_run_config`, :func:`resolve_run_config`,
:func:`fusion_core.config.make_config`), so the page shows the CLI's errors word for word.
Only registered component names are accepted (no paths to code); no shell is involved.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any

import attrs

from fusion_core import ConfigError, FuseError, config_fields, make_config, parse_value, plain_data

from .catalog import SECTIONS, default_values, is_data_free

MERGE_PLACEHOLDERS = ("BASE", ("MODEL_A", "MODEL_B"))


@attrs.frozen
class Composed:
    """A validated (or refused) page state."""

    overrides: list[str]
    field_errors: dict[str, str]  # "method.density" → the core's message
    error: str | None
    config: Any = None  # the RunConfig when valid
    raw: dict = attrs.field(factory=dict)

    def to_json(self, registry) -> dict:
        out: dict[str, Any] = {
            "ok": self.error is None,
            "error": self.error,
            "field_errors": self.field_errors,
            "overrides": self.overrides,
            "command": "fuse run " + " ".join(shlex.quote(o) for o in self.overrides),
            "yaml": to_yaml(self.raw, flow=False) if self.raw else "",
        }
        if self.config is not None:
            out["resolved"] = to_yaml(self.config.to_dict())
            out["merge"] = merge_command(self.config, self.overrides, registry)
        return out


def to_yaml(data: Mapping, *, flow: bool | None = None) -> str:
    """YAML as a person writes it (``flow=False``: block style throughout, for config files)."""
    import yaml

    return yaml.safe_dump(plain_data(dict(data)), sort_keys=False, allow_unicode=True, default_flow_style=flow, width=100)


def _text(values: Mapping, section: str, name: str) -> str | None:
    text = (values.get(section) or {}).get(name)
    return None if text is None else str(text).strip()


def _section_overrides(section: str, config_cls, values: Mapping, prefix: str, errors: dict) -> list[str]:
    """``prefix+field=text`` for every field whose typed value differs from its default."""
    defaults = default_values(config_cls)
    given = values.get(section) or {}
    known = {f.name for f in config_fields(config_cls)}
    out = []
    for name in [*[f.name for f in config_fields(config_cls)], *[k for k in given if k not in known]]:
        text = _text(values, section, name)
        if text is None or (text == "" and name in defaults):
            continue
        key = f"{section}.{name}"
        try:
            value = parse_value(text)
        except ConfigError as exc:
            errors[key] = str(exc)
            continue
        if name in defaults and plain_data(value) == defaults[name]:
            continue
        if name in known:
            try:  # this field alone, through the core's validator: the message lands next to the field
                make_config(config_cls, {name: value}, where=section if section != "settings" else "run")
            except ConfigError as exc:
                if "missing required field" not in str(exc):
                    errors[key] = str(exc)
        out.append(f"{prefix}{name}={text}")
    return out


def compose(state: Mapping[str, Any], registry) -> Composed:
    """Validate a page state: ``{mode, benchmark, method, modelpool, taskpool, values: {section: {field: text}}}``."""
    from fusion_core import RunSettings, raw_run_config, resolve_run_config

    values = state.get("values") or {}
    errors: dict[str, str] = {}
    overrides: list[str] = []
    try:
        if state.get("mode", "benchmark") == "benchmark":
            bench = str(state.get("benchmark") or "")
            if bench not in registry.entries["benchmark"]:
                registry.get("benchmark", bench)  # the core's unknown-name message
            overrides.append(f"benchmark={bench}")
            sections = ["method"]
        else:
            sections = ["modelpool", "taskpool", "method"]
        entries = {}
        for section in sections:
            name = str(state.get(section) or "")
            if section == "taskpool" and not name:
                overrides.append("taskpool=null")  # no evaluation (an absent taskpool would be the default benchmark's)
                continue
            entries[section] = registry.get(SECTIONS[section], name)
            overrides.append(f"{section}={name}")
        for section, entry in entries.items():
            overrides += _section_overrides(section, entry.cls.Config, values, f"{section}.", errors)
        overrides += _section_overrides("settings", RunSettings, values, "", errors)
        overrides += _extra_overrides(str(state.get("extra") or ""), errors)
    except FuseError as exc:
        return Composed(overrides=overrides, field_errors=errors, error=str(exc))
    if errors:
        return Composed(overrides=overrides, field_errors=errors, error=next(iter(errors.values())))
    try:
        raw = raw_run_config([], overrides)
        config = resolve_run_config(raw, registry)
    except FuseError as exc:
        return Composed(overrides=overrides, field_errors=_attribute(str(exc)), error=str(exc))
    return Composed(overrides=overrides, field_errors={}, error=None, config=config, raw=raw)


def _extra_overrides(text: str, errors: dict) -> list[str]:
    """Free ``key=value`` arguments typed as on the command line (split like a shell would, never run by one)."""
    from fusion_core import parse_override

    try:
        args = shlex.split(text)
    except ValueError as exc:
        errors["extra.overrides"] = f"cannot split the extra arguments: {exc}"
        return []
    for arg in args:
        try:
            parse_override(arg)
        except ConfigError as exc:
            errors["extra.overrides"] = str(exc)
            return []
    return args


def _attribute(message: str) -> dict[str, str]:
    """Point a whole-config error at the field it names (``method.density`` or ``method: density ...``)."""
    import re

    match = re.search(r"\b(method|modelpool|taskpool)[.:] ?([A-Za-z_]\w*)\b", message)
    return {f"{match.group(1)}.{match.group(2)}": message, "extra.overrides": message} if match else {"extra.overrides": message}


def merge_command(config, overrides: list[str], registry) -> str | None:
    """The equivalent ``fuse merge`` for a per-tensor (data-free) method, else ``None``.

    Paths come from a ``files`` model pool when one is given, else placeholders to replace.
    """
    if not is_data_free(config.method.cls):
        return None
    pool = config.modelpool
    base, models = MERGE_PLACEHOLDERS
    if pool.name == "files":
        base = pool.config.base or base
        models = tuple(pool.config.models.values()) or models
    parts = ["fuse", "merge", config.method.name]
    if config.method.cls.capabilities.needs_base or base != MERGE_PLACEHOLDERS[0]:
        parts += ["--base", str(base)]
    for path in models:
        parts += ["--model", str(path)]
    for override in overrides:
        if override.startswith("method.") and not override.startswith("method.name="):
            parts += ["--set", override[len("method."):]]
    settings = config.settings
    if settings.seed:
        parts += ["--seed", str(settings.seed)]
    if settings.compute_dtype != "float32":
        parts += ["--compute-dtype", settings.compute_dtype]
    if settings.device != "cpu":
        parts += ["--device", settings.device]
    parts += ["--output", "merged/"]
    return " ".join(shlex.quote(p) for p in parts)


def dry_run(state: Mapping[str, Any], registry, plugin_manager) -> dict:
    """The core's ``--dry-run`` in this process: validate everything, load nothing heavy; the plan it returns."""
    composed = compose(state, registry)
    out = composed.to_json(registry)
    if composed.config is None:
        return out
    from fusion_core import run

    try:
        report = run(composed.config, registry=registry, plugin_manager=plugin_manager, dry_run=True)
    except FuseError as exc:
        out.update(ok=False, error=str(exc))
        return out
    out["plan"] = to_yaml(report["plan"])
    return out
