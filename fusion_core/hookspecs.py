"""The plugin API of fusion: every hook a plugin may implement.

A plugin is a module (named by an entry point in the ``fusion`` group, or one of
the built-in modules) holding functions decorated with ``@fusion_core.hookimpl``
whose names are the hooks below.  Hooks are called once per plugin manager,
when a registry is built (each ``fuse`` invocation builds a fresh one); a hook
may take a subset of the arguments listed.

Registration hooks receive a ``register`` callable: call it once per component
class.  The core stamps each component with the plugin that registered it,
validates it (name, summary, ``Config``) and refuses duplicate names, naming
both providers.

.. code-block:: python

    import fusion_core

    @fusion_core.hookimpl
    def fusion_register_methods(register):
        register(MyMethod)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import click

    from .components import Component
    from .runconfig import RunConfig


class RegisterComponent(Protocol):
    """The ``register`` callable of the component hooks: one call per component class."""

    def __call__(self, cls: "type[Component]") -> None: ...


class RegisterBenchmark(Protocol):
    """The ``register`` callable of :func:`fusion_register_benchmarks`: one call per benchmark."""

    def __call__(self, name: str, *, summary: str, modelpool: Mapping, taskpool: Mapping,
                 methods: Sequence[str | Mapping] = ()) -> None: ...

PROJECT = "fusion"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def fusion_register_methods(register: RegisterComponent) -> None:
    """Register fusion methods.

    :param register: call ``register(cls)`` with a subclass of
        :class:`fusion_core.components.Method` (or of
        :class:`fusion_core.engine.kernel.KernelMethod` for per-tensor kernels).
        ``cls.name`` is the name configs use (``method=NAME``).

    Called when the registry is built: by ``fuse list``/``show``/``run``/``merge``
    and by :func:`fusion_core.program.run`.  Must be cheap: do not import torch here.
    """


@hookspec
def fusion_register_model_pools(register: RegisterComponent) -> None:
    """Register model pools.

    :param register: call ``register(cls)`` with a subclass of
        :class:`fusion_core.components.ModelPool`; ``cls.name`` is used as
        ``modelpool=NAME``.

    Called when the registry is built, like :func:`fusion_register_methods`.
    """


@hookspec
def fusion_register_task_pools(register: RegisterComponent) -> None:
    """Register task pools.

    :param register: call ``register(cls)`` with a subclass of
        :class:`fusion_core.components.TaskPool`; ``cls.name`` is used as
        ``taskpool=NAME``.

    Called when the registry is built, like :func:`fusion_register_methods`.
    """


@hookspec
def fusion_register_benchmarks(register: RegisterBenchmark) -> None:
    """Register benchmarks: named pairs of a model pool and a task pool with their settings.

    :param register: call ``register(name, summary=..., modelpool={"name": ..., **fields},
        taskpool={"name": ..., **fields}, methods=[{"name": ..., **fields}, ...])``.
        ``methods`` is the default method list of ``fuse bench NAME``.

    ``fuse run benchmark=NAME`` and ``fuse bench NAME`` use them; ``fuse run``
    with no arguments runs the benchmark called ``mini`` with its first method.
    """


@hookspec
def fusion_register_executors(register: RegisterComponent) -> None:
    """Register executors: where the runs of ``fuse sweep`` and ``fuse bench`` execute.

    :param register: call ``register(cls)`` with a component class whose ``kind`` is
        ``"executor"`` (in practice a subclass of ``fusion_lab.executors.Executor``);
        ``cls.name`` is used as ``--executor NAME``.  fusion-lab registers ``local``
        (sequential, or ``--jobs N`` processes); ``fusion-ray`` adds ``ray``.

    Called when the registry is built, like :func:`fusion_register_methods`.
    Must be cheap: import the distributed engine inside the executor's methods.
    """


@hookspec
def fusion_register_commands(cli: "click.Group") -> None:
    """Add subcommands to the ``fuse`` CLI.

    :param cli: the root ``click.Group``; call ``cli.add_command(cmd)`` or use
        ``@cli.command()``.  Built-in commands (``run``, ``list``, ...) are added
        through this same hook.

    Called once per CLI invocation, before the arguments are parsed.
    """


# --------------------------------------------------------------------------- lifecycle (observers of a run)


@hookspec
def fusion_run_start(config: "RunConfig") -> None:
    """A run is about to start (after validation, before anything heavy is loaded).

    :param config: the resolved :class:`fusion_core.runconfig.RunConfig`.

    Called by the run program (``fuse run``, :func:`fusion_core.run`, every job of
    ``fuse bench``/``fuse sweep``) in the process that runs it, with the run's plugin
    manager.  Observers (loggers, trackers, the results database) implement it; the
    return value is ignored.  Not called for ``--dry-run``.
    """


@hookspec
def fusion_phase_end(name: str, seconds: float) -> None:
    """A phase of the run finished (``setup``, ``prepare``, ``method``, ``evaluate``, ``save``).

    :param name: the phase's name, as in the report's ``timings``.
    :param seconds: its wall time (this occurrence).

    Called by the run program at the end of every phase, also when the phase raised.
    """


@hookspec
def fusion_run_end(report: dict) -> None:
    """A run finished: its report is complete (and written, when the run writes one).

    :param report: the report, as :func:`fusion_core.run` returns it.

    Called by the run program once per successful run; fusion-lab records results
    through it.  A failing run raises instead (no call).
    """


# --------------------------------------------------------------------------- foreign recipes


@hookspec
def fusion_register_recipe_formats(register: Callable[..., None]) -> None:
    """Register readers of foreign merge recipes (e.g. mergekit YAML) for ``fuse merge``.

    :param register: call ``register(name, load, summary=...)``.  ``load(path, *,
        allow_pickle)`` reads the recipe file and returns a
        :class:`fusion_core.recipes.ImportedMerge` (a ready method instance, the
        opened inputs, the output dtype, what the model card records, and an
        optional step that completes the output folder).  It raises
        :class:`~fusion_core.errors.ConfigError` naming whatever it cannot honour.

    Called by ``fuse merge``: ``--mergekit-config FILE`` uses the format named
    ``mergekit``, ``--recipe FORMAT:FILE`` any registered one.  Must be cheap: import
    torch inside ``load``.
    """
