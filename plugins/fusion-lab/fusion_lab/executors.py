"""Executors: where the runs of a sweep execute (in this process, a local process pool, a cluster).

An executor is a registered component (kind ``executor``, hook
``fusion_register_executors``) with a :meth:`Executor.map` that runs *jobs* and hands
each result back to the driver as soon as it is finished, so the driver can commit
it (an interrupted sweep loses nothing that finished).

A job is plain data: a resolved config mapping (models and datasets referenced by
path, never as objects) and a key.  Out-of-process workers rebuild the plugin
manager from a :class:`WorkerEnv` (which entry points and extra plugin modules to
load) and call :func:`run_job`, an ordinary :func:`fusion_core.program.run` with
``write=False``.

fusion-lab ships ``local``: sequential in this process by default, or a pool of
``jobs`` processes (each job a separate process).  ``fusion-ray`` adds ``ray``.
"""

from __future__ import annotations

import abc
import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from fusion_core import Component, ConfigError, option, positive

#: called in the driver with (job, result) as each job finishes
OnResult = Callable[["Job", dict], None]


@attrs.frozen
class Job:
    """One run: a key (the driver's name for it) and a resolved config mapping (plain data)."""

    key: str
    config: Mapping[str, Any]


@attrs.frozen
class WorkerEnv:
    """What a worker process needs to rebuild the driver's plugin manager.

    :ivar entrypoints: names of the ``fusion`` entry points to load (none: load none).
    :ivar extra_plugins: ``(plugin name, module, attribute or None, file or None)`` of
        plugins registered by object (tests, scripts): re-imported in the worker.
    :ivar cwd: the driver's working directory, so relative paths in configs resolve
        the same way (skipped where it does not exist, e.g. on another node).
    """

    entrypoints: tuple[str, ...] = ()
    extra_plugins: tuple[tuple[str, str, str | None, str | None], ...] = ()
    cwd: str | None = None

    @classmethod
    def from_plugin_manager(cls, pm) -> "WorkerEnv":
        """Describe ``pm``'s plugins so a worker can load the same ones; refuses plain objects."""
        entrypoints, extras = [], []
        for name, record in pm.records.items():
            if record.builtin or record.status != "ok":
                continue
            obj = pm.get_plugin(name)
            if record.dist is not None:
                entrypoints.append(name)
            elif isinstance(obj, types.ModuleType):
                extras.append((name, obj.__name__, None, getattr(obj, "__file__", None)))
            elif isinstance(obj, type) and "<locals>" not in obj.__qualname__:
                module = sys.modules.get(obj.__module__)
                extras.append((name, obj.__module__, obj.__qualname__, getattr(module, "__file__", None)))
            else:
                raise ConfigError(
                    f"plugin {name!r} was registered as an object ({type(obj).__name__}); workers in other processes can "
                    "only re-load plugins that are modules or module-level classes (use the local executor with --jobs 1)"
                )
        return cls(entrypoints=tuple(entrypoints), extra_plugins=tuple(extras), cwd=os.getcwd())

    def plugin_manager(self):
        """Rebuild the plugin manager in a worker."""
        from fusion_core import get_plugin_manager

        extras = [(name, _load_object(module, attr, path)) for name, module, attr, path in self.extra_plugins]
        environ = {k: v for k, v in os.environ.items() if k != "FUSE_DISABLE_PLUGINS"}
        environ["FUSE_LOAD_PLUGINS"] = ",".join(self.entrypoints)
        return get_plugin_manager(load_entrypoints=bool(self.entrypoints), environ=environ, extra_plugins=extras)


def _load_object(module_name: str, attr: str | None, path: str | None):
    module = sys.modules.get(module_name)
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            if not path:
                raise
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
    obj = module
    for part in (attr.split(".") if attr else []):
        obj = getattr(obj, part)
    return obj


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (for results databases and reports)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def run_job(job: Job, env: WorkerEnv | None = None, *, plugin_manager=None, registry=None) -> dict:
    """Run one job; never raises for a failing run.

    :returns: ``{"status": "ok", "report": report}`` or
        ``{"status": "failed", "error": "Type: message", "duration_s": seconds}``.

    The report is the one the run announced through ``fusion_run_end`` (recorded by
    :mod:`fusion_lab.recording`).
    """
    import time

    from fusion_core import run

    from .recording import recording

    started = time.time()
    try:
        if plugin_manager is None:
            if registry is None and env is not None and env.cwd and os.path.isdir(env.cwd):
                os.chdir(env.cwd)
            plugin_manager = (env or WorkerEnv()).plugin_manager()
        with recording(plugin_manager) as rec:
            run(dict(job.config), plugin_manager=plugin_manager, registry=registry, write=False)
    except Exception as exc:  # one failing point must not stop the others
        return {"status": "failed", "error": one_line(exc), "duration_s": round(time.time() - started, 3)}
    return {"status": "ok", "report": rec.report}


class Executor(Component):
    """Runs jobs and reports each result to the driver as it finishes.

    Subclasses set ``name``, ``summary``, ``Config`` and implement :meth:`map`.
    Options of ``fuse sweep`` map onto Config fields of the same name
    (``--jobs`` → ``jobs``, ``--address`` → ``address``).
    """

    kind = "executor"

    def runs_out_of_process(self) -> bool:
        """Whether jobs run in other processes (then the driver's plugins must be re-loadable there)."""
        return True

    def check(self) -> None:
        """Fail fast (one line) when the executor cannot run here: a missing package, an unreachable cluster."""

    def start(self) -> None:
        """Acquire what several :meth:`map` calls share (a cluster connection); ``map`` works without it too."""

    def stop(self) -> None:
        """Release what :meth:`start` acquired."""

    @abc.abstractmethod
    def map(self, jobs: Sequence[Job], env: WorkerEnv | None, on_result: OnResult, *, plugin_manager=None, registry=None) -> None:
        """Run ``jobs`` and call ``on_result(job, result)`` in the calling process as each finishes.

        :param env: how workers rebuild the plugin manager (``None`` for in-process executors).
        :param plugin_manager: the driver's plugin manager, for executors that run in-process.
        """


@attrs.frozen
class LocalConfig:
    jobs: int = option(1, help="Runs at once: 1 = one after another in this process; N > 1 = a pool of N processes.",
                       validator=positive)


class LocalExecutor(Executor):
    """Sequential in this process, or ``jobs`` worker processes (spawned, each run a separate process)."""

    name = "local"
    summary = "Runs on this machine: sequentially in-process, or --jobs N worker processes."
    Config = LocalConfig

    def runs_out_of_process(self) -> bool:
        return self.config.jobs > 1

    def map(self, jobs, env, on_result, *, plugin_manager=None, registry=None):
        if self.config.jobs <= 1:
            for job in jobs:
                on_result(job, run_job(job, env, plugin_manager=plugin_manager, registry=registry))
            return
        import concurrent.futures as cf
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # no forked torch threads or locks
        workers = min(self.config.jobs, max(1, len(jobs)))
        pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=init_worker,
                                      initargs=(os.getpid(), threads_per_worker(workers)))
        futures = {pool.submit(run_job, job, env): job for job in jobs}
        try:
            for future in cf.as_completed(futures):
                job = futures[future]
                try:
                    result = future.result()
                except Exception as exc:  # the worker process died (killed, out of memory)
                    result = {"status": "failed", "error": one_line(exc)}
                on_result(job, result)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # Ctrl-C: do not wait for the queue
            raise
        pool.shutdown(wait=True)


PARENT_CHECK_S = 0.5
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def threads_per_worker(workers: int, cpus: int | None = None) -> int:
    """The intra-op threads each of ``workers`` processes gets by default: the CPUs shared out, at least 1.

    Without this each worker's torch would start one thread per CPU, so N workers run N × CPUs
    threads on CPUs threads' worth of cores; OpenMP's spinning threads then slow every run many
    times over (measured on a 2-core machine, two AdaMerging cells of ``mini`` at once, the same
    steps: 12 s a step with two threads each, 2.6 s with one).  A run's own ``threads`` setting
    still wins.
    """
    cpus = cpus if cpus is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return max(1, cpus // max(1, workers))


def init_worker(parent_pid: int, threads: int) -> None:
    """A worker process's start: exit with the driver; default intra-op threads to ``threads``.

    Where the user set ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS``, both are left as they are (torch
    takes the smaller of the two, so setting only the missing one would override the user's).
    """
    if not any(variable in os.environ for variable in THREAD_VARIABLES):
        os.environ.update({variable: str(threads) for variable in THREAD_VARIABLES})
    exit_with_parent(parent_pid)


def exit_with_parent(parent_pid: int) -> None:
    """In a worker process: exit as soon as ``parent_pid`` (the driver) is gone, whatever killed it.

    A watchdog thread compares the parent's pid every :data:`PARENT_CHECK_S` seconds (an
    orphan is re-parented), so a driver stopped by SIGTERM or ``kill -9`` leaves no worker
    behind, even one in the middle of a run.
    """
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_S)
        os._exit(1)

    threading.Thread(target=watch, name="fuse-parent-watch", daemon=True).start()


def executor_from_options(registry, name: str, options: Mapping[str, Any]) -> Executor:
    """Instantiate executor ``name`` from CLI options given as ``{field: value}`` (``None`` = not given).

    Options the executor's Config has no field for are refused, naming the executor.
    """
    from fusion_core import config_fields, make_config

    if name not in registry.entries["executor"] and name == "ray":
        raise ConfigError("unknown executor 'ray': install the fusion-ray plugin (pip install fusion-ray)")
    entry = registry.get("executor", name)
    fields = {f.name for f in config_fields(entry.cls.Config)}
    given = {k: v for k, v in options.items() if v is not None}
    extra = sorted(set(given) - fields)
    if extra:
        flags = ", ".join(f"--{k}" for k in extra)
        raise ConfigError(f"executor {name!r} takes no {flags} (its options: {', '.join(sorted(fields)) or 'none'})")
    return entry.cls(make_config(entry.cls.Config, given, where=f"executor {name}"))
