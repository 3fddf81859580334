"""Run configs: YAML files + ``key=value`` overrides → a validated :class:`RunConfig`.

The spelling follows FusionBench: ``method=ties method.density=0.2
modelpool=files modelpool.base=... taskpool=...``.  Selecting ``method=NAME``
gives that component's defaults; ``method.x=v`` sets one field.  Everything is
validated against the registry and the components' typed configs before any
weight is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import attrs

from .config import (
    at_least_one,
    config_to_dict,
    known_device,
    load_yaml_file,
    make_config,
    option,
    parse_override,
    seed_range,
    summarize,
)
from .errors import ConfigError, did_you_mean

COMPONENT_KEYS = {"method": "method", "modelpool": "model-pool", "taskpool": "task-pool"}
DEFAULT_BENCHMARK = "mini"


@attrs.frozen
class RunSettings:
    """Settings of a run besides its three components."""

    benchmark: str | None = option(None, help="A registered benchmark supplying modelpool/taskpool (default: 'mini' when none is given).")
    seed: int = option(0, help="Seed for random methods (per-tensor generators) and torch, in [0, 2**63 - 1].", validator=seed_range)
    output_dir: str | None = option(None, help="Where the report (and model) go; default runs/<method>-<time>.")
    save_model: bool = option(False, help="Also save the merged model in the output directory.")
    evaluate_inputs: bool = option(True, help="Also evaluate the pretrained model and each individual fine-tuned model.")
    device: str = option("cpu", help="Device for merging and evaluation (cpu, cuda, cuda:N, mps).", validator=known_device)
    compute_dtype: Literal["float32", "float64", "bfloat16", "float16"] = option("float32", help="dtype kernels compute in.")
    threads: int | None = option(None, help="torch intra-op threads, >= 1 (default: torch's choice).", validator=at_least_one)
    progress: bool = option(True, help="Show progress bars on stderr.")


@attrs.frozen
class Choice:
    """A selected component: its registry entry and validated config."""

    kind: str
    name: str
    cls: type
    config: Any
    plugin: str

    def instantiate(self):
        return self.cls(self.config)

    def to_dict(self) -> dict:
        return {"name": self.name, **config_to_dict(self.config)}


@attrs.frozen
class RunConfig:
    method: Choice
    modelpool: Choice
    taskpool: Choice | None
    settings: RunSettings

    def to_dict(self) -> dict:
        out: dict[str, Any] = {
            "method": self.method.to_dict(),
            "modelpool": self.modelpool.to_dict(),
            "taskpool": self.taskpool.to_dict() if self.taskpool else None,
        }
        out.update(config_to_dict(self.settings))
        return out


def _settings_fields() -> set[str]:
    return {f.name for f in attrs.fields(RunSettings)}


def _as_component(value: Any, key: str) -> dict:
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, dict):
        return dict(value)
    if value is None:
        return {}
    raise ConfigError(f"{key}: expected a component name or a mapping with 'name', got {summarize(value)}")


def _merge_component(current: dict | None, new: dict) -> dict:
    """Later sources override fields; naming another component drops the earlier fields."""
    if current is None or ("name" in new and new["name"] != current.get("name")):
        return dict(new)
    merged = dict(current)
    merged.update(new)
    return merged


def _set_nested(target: dict, path: list[str], value: Any, full: str) -> None:
    node = target
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"cannot set {summarize(full)}: {summarize(part)} is not a mapping")
        node = child
    node[path[-1]] = value


def raw_run_config(sources: Iterable[Any] = (), overrides: Iterable[str] = ()) -> dict:
    """Merge YAML files/mappings and overrides into one raw (unvalidated) mapping."""
    raw: dict[str, Any] = {}
    allowed = set(COMPONENT_KEYS) | _settings_fields()
    for source in sources:
        data = source if isinstance(source, Mapping) else load_yaml_file(source)
        where = "config" if isinstance(source, Mapping) else os.fspath(source)
        for key, value in data.items():
            if key not in allowed:
                raise ConfigError(f"{where}: unknown key {summarize(key)}{did_you_mean(str(key)[:100], allowed)}")
            if key in COMPONENT_KEYS:
                raw[key] = _merge_component(raw.get(key), _as_component(value, key))
            else:
                raw[key] = value
    for arg in overrides:
        path, value = parse_override(arg)
        head = path[0]
        if head not in allowed:
            raise ConfigError(f"unknown key {summarize(head)} in override {summarize(arg)}{did_you_mean(head[:100], allowed)}")
        if head in COMPONENT_KEYS:
            if len(path) == 1:
                raw[head] = _merge_component(raw.get(head), _as_component(value, head))
            else:
                component = raw.setdefault(head, {})
                if path[1:] == ["name"]:
                    raw[head] = _merge_component(component, {"name": value})
                else:
                    _set_nested(component, path[1:], value, arg)
        elif len(path) > 1:
            raise ConfigError(f"{head!r} is a plain setting, it has no field {summarize('.'.join(path[1:]))} (override {summarize(arg)})")
        else:
            raw[head] = value
    return raw


def _named(raw: Mapping[str, Any], key: str) -> bool:
    return isinstance(raw.get(key), dict) and "name" in raw[key]


def _check_pools(raw: Mapping[str, Any], settings: RunSettings) -> bool:
    """Whether the run merges only (a model pool and no task pool); pools are never filled in unasked.

    A benchmark supplies both pools (``benchmark=NAME``, or ``mini`` when neither pool is named).
    A named model pool without a task pool merges only, which is refused unless the merged model
    is kept (``save_model=true``); a task pool without a model pool is refused.
    """
    if settings.benchmark is not None or _named(raw, "modelpool") == _named(raw, "taskpool"):
        return False
    if _named(raw, "taskpool"):
        raise ConfigError(
            f"taskpool {summarize(raw['taskpool']['name'])} is given without a modelpool; set modelpool=NAME "
            "(or benchmark=NAME to take the benchmark's models)"
        )
    pool = summarize(raw["modelpool"]["name"])
    if raw.get("taskpool"):
        fields = ", ".join(sorted(str(k) for k in raw["taskpool"]))
        raise ConfigError(f"taskpool fields ({summarize(fields)}) are given but no task pool; set taskpool=NAME")
    if not settings.save_model:
        raise ConfigError(
            f"modelpool {pool} is given without a taskpool, so nothing would be evaluated or kept; "
            "set taskpool=NAME to evaluate the merged model, or save_model=true to merge only and save it"
        )
    return True


MERGE_ONLY_NOTE = "note: no task pool: merging only, nothing is evaluated; the merged model is saved under output_dir/model"


def resolve_run_config(raw: Mapping[str, Any], registry) -> RunConfig:
    """Validate a raw mapping against the registry; fill in the benchmark's pools and method."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    settings = make_config(RunSettings, {k: v for k, v in raw.items() if k not in COMPONENT_KEYS}, where="run")

    merge_only = _check_pools(raw, settings)
    needs_bench = not _named(raw, "modelpool") or not _named(raw, "taskpool") or not raw.get("method", {}).get("name")
    if merge_only and not raw.get("method", {}).get("name"):
        raise ConfigError("no method given; set method=NAME (`fuse list methods` shows them)")
    bench_name = settings.benchmark or (DEFAULT_BENCHMARK if needs_bench and not merge_only else None)
    if bench_name is not None and needs_bench:
        if bench_name not in registry.entries["benchmark"]:
            hint = (
                "; install the embedded benchmark (pip install -e plugins/fusion-minibench) or give modelpool=... taskpool=..."
                if bench_name == DEFAULT_BENCHMARK
                else did_you_mean(str(bench_name)[:100], registry.names("benchmark"))
            )
            raise ConfigError(f"unknown benchmark {summarize(bench_name)}{hint}")
        bench = registry.entries["benchmark"][bench_name]
        for key, spec in (("modelpool", bench.modelpool), ("taskpool", bench.taskpool)):
            if key not in raw:
                raw[key] = dict(spec)
            elif "name" not in raw[key]:
                raw[key] = {**spec, **raw[key]}
        method = raw.get("method") or {}
        if not method.get("name"):
            if not bench.methods:
                raise ConfigError(f"benchmark {bench_name!r} has no default method; give method=NAME")
            raw["method"] = {**bench.methods[0], **method}

    choices = {}
    for key, kind in COMPONENT_KEYS.items():
        spec = raw.get(key)
        if not spec:
            if key == "taskpool":
                choices[key] = None
                continue
            raise ConfigError(f"no {key} given; set {key}=NAME (`fuse list {kind}s` shows them)")
        if "name" not in spec:
            raise ConfigError(f"{key}: no component name; set {key}=NAME")
        name = spec.pop("name")
        if not isinstance(name, str) or len(name) > 100:
            raise ConfigError(f"{key}.name: expected a component name, got {summarize(name)}; `fuse list {kind}s` shows them")
        entry = registry.get(kind, name)
        config = make_config(entry.cls.Config, spec, where=key)
        choices[key] = Choice(kind=kind, name=entry.name, cls=entry.cls, config=config, plugin=entry.plugin)
    return RunConfig(method=choices["method"], modelpool=choices["modelpool"], taskpool=choices["taskpool"], settings=settings)


def load_run_config(sources: Iterable[Any] = (), overrides: Iterable[str] = (), *, registry=None) -> RunConfig:
    """YAML files/mappings + overrides → validated RunConfig (builds a registry when none is given)."""
    if registry is None:
        from .plugins import get_plugin_manager
        from .registry import build_registry

        registry = build_registry(get_plugin_manager())
    return resolve_run_config(raw_run_config(sources, overrides), registry)
