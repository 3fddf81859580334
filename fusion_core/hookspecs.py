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

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import click

PROJECT = "fusion"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def fusion_register_methods(register: Callable[[type], None]) -> None:
    """Register fusion methods.

    :param register: call ``register(cls)`` with a subclass of
        :class:`fusion_core.components.Method` (or of
        :class:`fusion_core.engine.kernel.KernelMethod` for per-tensor kernels).
        ``cls.name`` is the name configs use (``method=NAME``).

    Called when the registry is built: by ``fuse list``/``show``/``run``/``merge``
    and by :func:`fusion_core.api.run`.  Must be cheap: do not import torch here.
    """


@hookspec
def fusion_register_model_pools(register: Callable[[type], None]) -> None:
    """Register model pools.

    :param register: call ``register(cls)`` with a subclass of
        :class:`fusion_core.components.ModelPool`; ``cls.name`` is used as
        ``modelpool=NAME``.

    Called when the registry is built, like :func:`fusion_register_methods`.
    """


@hookspec
def fusion_register_task_pools(register: Callable[[type], None]) -> None:
    """Register task pools.

    :param register: call ``register(cls)`` with a subclass of
        :class:`fusion_core.components.TaskPool`; ``cls.name`` is used as
        ``taskpool=NAME``.

    Called when the registry is built, like :func:`fusion_register_methods`.
    """


@hookspec
def fusion_register_benchmarks(register: Callable[..., None]) -> None:
    """Register benchmarks: named pairs of a model pool and a task pool with their settings.

    :param register: call ``register(name, summary=..., modelpool={"name": ..., **fields},
        taskpool={"name": ..., **fields}, methods=[{"name": ..., **fields}, ...])``.
        ``methods`` is the default method list of ``fuse bench NAME``.

    ``fuse run benchmark=NAME`` and ``fuse bench NAME`` use them; ``fuse run``
    with no arguments runs the benchmark called ``mini`` with its first method.
    """


@hookspec
def fusion_register_executors(register: Callable[[type], None]) -> None:
    """Register executors: where the runs of ``fuse sweep`` execute.

    :param register: call ``register(cls)`` with a subclass of
        :class:`fusion_core.executors.Executor`; ``cls.name`` is used as
        ``fuse sweep --executor NAME``.  The core registers ``local``
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
