"""Building the plugin manager: built-in plugins plus entry points of the ``fusion`` group.

The manager is built by :func:`get_plugin_manager`, fresh for every CLI invocation
and every test; nothing is loaded at import time.  Each entry point is loaded on
its own: one that fails to import or that implements unknown hooks is recorded
(and reported once on stderr by the CLI) while the rest keep working.

Environment:

- ``FUSE_LOAD_PLUGINS=a,b``: only load these entry points (entry-point or
  distribution names); ``FUSE_LOAD_PLUGINS=`` (empty) loads none.
- ``FUSE_DISABLE_PLUGINS=a,b``: never load these.
- ``FUSE_STRICT_PLUGINS=1``: a broken plugin is a fatal error (for plugin authors).
- ``FUSE_TRACE_PLUGINS=1``: print every hook call with its arguments on stderr.
- ``FUSE_SLOW_PLUGIN_SECONDS=1``: a plugin whose import (or registration) takes longer is named
  in a one-line note on stderr; ``fuse plugins --all`` shows every load time.

Loading is guarded (:func:`guarded`): a plugin that raises anything at import or registration,
``SystemExit`` and a ``KeyboardInterrupt`` of its own included, is recorded as failed and skipped
(only a real Ctrl-C from the user stops the command), and what it prints on stdout is captured
so that machine-readable output (``--json``) stays clean.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
import time
from collections.abc import Iterable, Mapping

import attrs
import pluggy

from . import hookspecs
from .errors import PluginError, did_you_mean

DEFAULT_PLUGINS: tuple[str, ...] = (
    "fusion_core.builtins.methods",
    "fusion_core.builtins.model_pools",
    "fusion_core.builtins.task_pools",
    "fusion_core.cli.commands",
)


@attrs.define
class PluginRecord:
    """What the loader knows about one plugin."""

    name: str
    module: str
    dist: str | None = None
    version: str | None = None
    builtin: bool = False
    status: str = "ok"  # ok | failed | skipped
    error: str | None = None
    load_seconds: float = 0.0  # import + registration hooks
    stdout: str = ""  # what it printed while loading (kept out of fuse's own output)

    def describe(self) -> str:
        where = f"{self.dist} {self.version}" if self.dist else self.module
        return f"plugin {self.name!r} ({where})"


class FusionPluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers where each plugin came from and what failed."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}

    @property
    def failures(self) -> list[PluginRecord]:
        return [r for r in self.records.values() if r.status == "failed"]

    def record_failure(self, name: str, error: BaseException | str) -> PluginRecord:
        record = self.records[name]
        record.status = "failed"
        record.error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        if self.get_plugin(name) is not None:
            self.unregister(name=name)
        return record


class _UserInterrupts:
    """While a plugin loads, tell a real Ctrl-C (SIGINT) from a ``KeyboardInterrupt`` the plugin raises itself."""

    def __init__(self) -> None:
        self.seen = False
        self.previous = None

    def _handler(self, signum, frame):
        self.seen = True
        if callable(self.previous):
            self.previous(signum, frame)
        raise KeyboardInterrupt

    def __enter__(self):
        import signal

        try:
            current = signal.getsignal(signal.SIGINT)
            if current not in (signal.SIG_IGN, None):
                self.previous = current
                signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: every KeyboardInterrupt counts as the user's
            self.seen = True
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


@contextlib.contextmanager
def guarded(pm: FusionPluginManager, name: str, stage: str = "import", *, strict: bool | None = None):
    """Run a plugin's import or hook: stdout captured, time added up, any exception recorded as its failure.

    A real Ctrl-C propagates; ``SystemExit``, a plugin's own ``KeyboardInterrupt`` and every other
    exception mark the plugin failed (re-raised as :class:`PluginError` when ``strict``, by default
    under ``FUSE_STRICT_PLUGINS``).  Yields the record; ``record.status`` tells whether it went through.
    """
    record = pm.records[name]
    strict = env_flag("FUSE_STRICT_PLUGINS") if strict is None else strict
    buffer = io.StringIO()
    started = time.perf_counter()
    with _UserInterrupts() as watcher:
        try:
            with contextlib.redirect_stdout(buffer):
                yield record
        except KeyboardInterrupt as exc:
            if watcher.seen:
                raise
            _fail(pm, name, stage, exc, strict)
        except PluginError:
            raise
        except BaseException as exc:  # noqa: BLE001 - SystemExit, GeneratorExit and errors of a broken plugin
            _fail(pm, name, stage, exc, strict)
        finally:
            record.load_seconds += time.perf_counter() - started
            record.stdout += buffer.getvalue()


def _fail(pm: FusionPluginManager, name: str, stage: str, exc: BaseException, strict: bool) -> None:
    from .config import clip

    text = clip(str(exc), 200)
    what = f"{type(exc).__name__}({text})" if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if stage != "import":
        what = f"{what} in {stage}"
    record = pm.record_failure(name, what)
    if strict:
        raise PluginError(f"{record.describe()} failed to load: {what}") from exc


def slow_plugins(pm: FusionPluginManager, environ: Mapping[str, str] | None = None) -> list[PluginRecord]:
    """Plugins whose loading took longer than ``FUSE_SLOW_PLUGIN_SECONDS`` (default 1 s)."""
    environ = os.environ if environ is None else environ
    try:
        limit = float(environ.get("FUSE_SLOW_PLUGIN_SECONDS", "1"))
    except ValueError:
        limit = 1.0
    return [r for r in pm.records.values() if r.load_seconds > limit]


def _env_list(environ: Mapping[str, str], key: str) -> list[str] | None:
    if key not in environ:
        return None
    return [item.strip() for item in environ[key].split(",") if item.strip()]


def env_flag(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment variable ``name`` is set to 1/true/yes/on (any case)."""
    value = (os.environ if environ is None else environ).get(name)
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _check_hooks(pm: FusionPluginManager, name: str, strict: bool) -> None:
    """Refuse hookimpls whose names are not hooks (misspellings), naming the plugin."""
    plugin = pm.get_plugin(name)
    known = [n for n in dir(hookspecs) if n.startswith("fusion_")]
    try:
        pm.check_pending()
    except pluggy.PluginValidationError:
        bad = [
            attr
            for attr in dir(plugin)
            if attr.startswith("fusion_") and attr not in known and pm.parse_hookimpl_opts(plugin, attr) is not None
        ]
        hook = bad[0] if bad else "?"
        message = f"unknown hook {hook!r}{did_you_mean(hook, known)}"
        record = pm.record_failure(name, message)
        if strict:
            raise PluginError(f"{record.describe()}: {message}") from None


def get_plugin_manager(
    *,
    load_entrypoints: bool = True,
    environ: Mapping[str, str] | None = None,
    entry_points: Iterable | None = None,
    extra_plugins: Iterable[tuple[str, object]] = (),
) -> FusionPluginManager:
    """Build a fresh plugin manager.

    :param load_entrypoints: load the ``fusion`` entry-point group (off in some tests).
    :param environ: environment to read ``FUSE_*`` settings from (default ``os.environ``).
    :param entry_points: entry points to load instead of the installed ones (tests).
    :param extra_plugins: ``(name, module_or_object)`` pairs registered after the built-ins.
    """
    environ = os.environ if environ is None else environ
    strict = env_flag("FUSE_STRICT_PLUGINS", environ)
    pm = FusionPluginManager()

    for modname in DEFAULT_PLUGINS:
        short = modname.rsplit(".", 1)[-1]
        name = f"fusion_core.{short}" if not modname.startswith("fusion_core.cli") else "fusion_core.commands"
        pm.records[name] = PluginRecord(name=name, module=modname, dist="fusion-core", version=_core_version(), builtin=True)
        started = time.perf_counter()
        pm.register(importlib.import_module(modname), name=name)
        pm.records[name].load_seconds = time.perf_counter() - started

    for name, obj in extra_plugins:
        pm.records[name] = PluginRecord(name=name, module=getattr(obj, "__name__", repr(obj)))
        pm.register(obj, name=name)
        _check_hooks(pm, name, strict)

    if load_entrypoints:
        _load_entrypoints(pm, environ, entry_points, strict)

    if env_flag("FUSE_TRACE_PLUGINS", environ):
        def before(hook_name, hook_impls, kwargs):
            print(f"[fuse trace] {hook_name}({', '.join(kwargs)}) -> {[i.plugin_name for i in hook_impls]}", file=sys.stderr)

        def after(outcome, hook_name, hook_impls, kwargs):
            print(f"[fuse trace] {hook_name} done", file=sys.stderr)

        pm.add_hookcall_monitoring(before, after)
    return pm


def _load_entrypoints(pm: FusionPluginManager, environ, entry_points, strict: bool) -> None:
    if entry_points is None:
        from importlib.metadata import entry_points as _eps

        entry_points = _eps(group=hookspecs.PROJECT)
    allow = _env_list(environ, "FUSE_LOAD_PLUGINS")
    deny = _env_list(environ, "FUSE_DISABLE_PLUGINS") or []
    seen: set[str] = set()
    for ep in sorted(entry_points, key=lambda e: e.name):
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else None
        version = dist.version if dist is not None else None
        names = {ep.name, dist_name}
        if ep.name in seen:
            continue
        seen.add(ep.name)
        record = PluginRecord(name=ep.name, module=ep.value, dist=dist_name, version=version)
        pm.records[ep.name] = record
        if (allow is not None and not names & set(allow)) or names & set(deny):
            record.status = "skipped"
            continue
        with guarded(pm, ep.name, strict=strict):  # a broken plugin must not take the CLI down
            pm.register(ep.load(), name=ep.name)
        if record.status == "ok":
            _check_hooks(pm, ep.name, strict)


def _core_version() -> str:
    from . import __version__

    return __version__


def plugin_versions(pm: FusionPluginManager) -> dict[str, str | None]:
    """``{distribution: version}`` of every loaded plugin, for reports."""
    out: dict[str, str | None] = {"fusion-core": _core_version()}
    for record in pm.records.values():
        if record.status == "ok" and record.dist:
            out[record.dist] = record.version
    return out
