"""The registry: every component and benchmark the loaded plugins registered, with provenance."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import attrs

from .components import KINDS as _COMPONENT_KINDS
from .components import Component
from .errors import ConfigError, PluginError, did_you_mean
from .hookspecs import RegisterBenchmark, RegisterComponent

#: component kind → the base class its registered classes must subclass.  Executors (kind
#: ``executor``) belong to a plugin (fusion-lab): any :class:`Component` whose ``kind`` is
#: ``"executor"`` is accepted, so the core never imports the plugin that defines the base class.
KINDS = {**_COMPONENT_KINDS, "executor": Component}

_NAME = re.compile(r"^[a-z][a-z0-9_\-]*$")

#: hook name → component kind it registers
HOOK_KINDS = {
    "fusion_register_methods": "method",
    "fusion_register_model_pools": "model-pool",
    "fusion_register_task_pools": "task-pool",
    "fusion_register_executors": "executor",
}

KIND_PLURALS = {"method": "methods", "model-pool": "model-pools", "task-pool": "task-pools", "benchmark": "benchmarks",
                "executor": "executors"}


@attrs.frozen
class Entry:
    """A registered component class and the plugin that registered it."""

    kind: str
    name: str
    cls: type
    plugin: str
    dist: str | None = None


@attrs.frozen
class Benchmark:
    """A named model pool + task pool, with the default methods of ``fuse bench``."""

    name: str
    summary: str
    modelpool: dict
    taskpool: dict
    methods: tuple = ()
    plugin: str = ""
    dist: str | None = None
    kind: str = "benchmark"


@attrs.define
class Registry:
    entries: dict[str, dict[str, Any]] = attrs.field(factory=lambda: {k: {} for k in (*KINDS, "benchmark")})

    def add(self, entry: Entry | Benchmark) -> None:
        table = self.entries[entry.kind]
        other = table.get(entry.name)
        if other is not None:
            raise PluginError(
                f"duplicate {entry.kind} name {entry.name!r}: registered by plugin {other.plugin!r}"
                f"{f' ({other.dist})' if other.dist else ''} and by plugin {entry.plugin!r}"
                f"{f' ({entry.dist})' if entry.dist else ''}; uninstall or disable one (FUSE_DISABLE_PLUGINS)"
            )
        table[entry.name] = entry

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def get(self, kind: str, name: str):
        """The entry ``name`` of ``kind``; unknown names raise ConfigError listing close matches."""
        table = self.entries[kind]
        if name not in table:
            raise ConfigError(f"unknown {kind} {name!r}{did_you_mean(str(name), table)}; `fuse list {KIND_PLURALS[kind]}` shows them all")
        return table[name]

    def find(self, name: str) -> list:
        """Every entry called ``name``, whatever its kind."""
        return [table[name] for table in self.entries.values() if name in table]

    def all_names(self) -> list[str]:
        return sorted({n for table in self.entries.values() for n in table})


def _validate_component(cls: Any, kind: str, plugin: str) -> None:
    base = KINDS[kind]
    where = f"plugin {plugin!r}"
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PluginError(f"{where} registered {cls!r} as a {kind}, but it is not a subclass of {base.__module__}.{base.__name__}")
    if cls.kind != kind:
        raise PluginError(f"{where} registered {cls!r} as a {kind}, but it is a {cls.kind} (its class attribute kind is {cls.kind!r})")
    if not isinstance(cls.name, str) or not _NAME.match(cls.name):
        raise PluginError(f"{where}: {cls.__name__}.name must be a lowercase name like 'my_method', got {cls.name!r}")
    if not cls.summary or "\n" in cls.summary:
        raise PluginError(f"{where}: {kind} {cls.name!r} needs a one-line summary")
    if not attrs.has(cls.Config):
        raise PluginError(f"{where}: {kind} {cls.name!r}: Config must be an attrs class")
    if getattr(cls, "__abstractmethods__", None):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise PluginError(f"{where}: {kind} {cls.name!r} does not implement {missing}")


def _dist_of(pm, plugin: str) -> str | None:
    record = getattr(pm, "records", {}).get(plugin)
    return record.dist if record else None


def build_registry(pm) -> Registry:
    """Call every plugin's registration hooks, one plugin at a time, and collect the entries.

    A plugin whose hook raises is recorded as failed (and skipped) unless
    ``FUSE_STRICT_PLUGINS`` is set; duplicate names are always an error naming
    both providers.
    """
    from .plugins import env_flag

    strict, trace = env_flag("FUSE_STRICT_PLUGINS"), env_flag("FUSE_TRACE_PLUGINS")
    registry = Registry()

    def call(hook_name: str, make_register: Callable[[str], Callable]) -> None:
        caller = getattr(pm.hook, hook_name)
        for impl in caller.get_hookimpls():  # registration order
            plugin = impl.plugin_name
            pending: list = []
            kwargs = {"register": make_register(plugin, pending)} if "register" in impl.argnames else {}
            if plugin in getattr(pm, "records", {}):
                from .plugins import guarded  # stdout captured, any exception (SystemExit too) recorded

                with guarded(pm, plugin, hook_name, strict=strict) as record:
                    impl.function(**kwargs)
                if record.status != "ok":
                    continue
            else:
                try:
                    impl.function(**kwargs)
                except PluginError:
                    raise
                except Exception as exc:
                    raise PluginError(f"plugin {plugin!r} failed in {hook_name}: {type(exc).__name__}: {exc}") from exc
            if trace:
                import sys

                names = ", ".join(e.name for e in pending) or "nothing"
                print(f"[fuse trace] {hook_name} <- plugin {plugin!r}: {names}", file=sys.stderr)
            for entry in pending:
                registry.add(entry)

    for hook_name, kind in HOOK_KINDS.items():
        def make_register(plugin, pending, kind=kind) -> RegisterComponent:
            def register(cls: type[Component]) -> None:
                _validate_component(cls, kind, plugin)
                pending.append(Entry(kind=kind, name=cls.name, cls=cls, plugin=plugin, dist=_dist_of(pm, plugin)))

            return register

        call(hook_name, make_register)

    def make_bench_register(plugin, pending) -> RegisterBenchmark:
        def register(name: str, *, summary: str, modelpool: dict, taskpool: dict, methods=()) -> None:
            if not _NAME.match(name or ""):
                raise PluginError(f"plugin {plugin!r}: benchmark name must be lowercase, got {name!r}")
            for what, spec in (("modelpool", modelpool), ("taskpool", taskpool)):
                if not isinstance(spec, dict) or "name" not in spec:
                    raise PluginError(f"plugin {plugin!r}: benchmark {name!r}: {what} must be a mapping with a 'name'")
            pending.append(
                Benchmark(
                    name=name,
                    summary=summary,
                    modelpool=dict(modelpool),
                    taskpool=dict(taskpool),
                    methods=tuple(dict(m) if isinstance(m, dict) else {"name": m} for m in methods),
                    plugin=plugin,
                    dist=_dist_of(pm, plugin),
                )
            )

        return register

    call("fusion_register_benchmarks", make_bench_register)
    return registry
