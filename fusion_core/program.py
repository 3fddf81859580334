"""The run program: model pool → method → task pool → report (the same for the CLI and Python).

:func:`run` goes through its stages in order; :func:`setup` (instantiate and validate every
component, load nothing heavy) is shared with ``--dry-run`` (:func:`plan`), so both refuse
the same inputs.  Observers (loggers, the results database of fusion-lab) follow a run
through the lifecycle hooks ``fusion_run_start``, ``fusion_phase_end`` and ``fusion_run_end``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from .errors import InputError
from .output import atomic_output, check_output_path, write_json_atomic
from .report import build_report, is_state_dict, provenance
from .run_context import RunContext
from .runconfig import RunConfig, load_run_config


def default_output_dir(config: RunConfig) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"{config.method.name}-{stamp}")


@attrs.frozen
class Components:
    """The instantiated, validated components of a run (nothing heavy loaded yet)."""

    method: Any
    pool: Any
    taskpool: Any | None


def setup(config: RunConfig) -> Components:
    """Instantiate every component and check that they fit together, loading nothing heavy.

    Shared by :func:`run` and :func:`plan` (``--dry-run``): the pool's files exist, the
    method accepts the pool (:meth:`Method.check_inputs`), the task pool can score it.
    """
    pool = config.modelpool.instantiate()
    pool.validate()
    method = config.method.instantiate()
    method.check_inputs(len(pool.model_names), pool.has_base)
    taskpool = config.taskpool.instantiate() if config.taskpool is not None else None
    if taskpool is not None:
        taskpool.validate()
        taskpool.check_pool(pool)
    return Components(method=method, pool=pool, taskpool=taskpool)


def plan(config: RunConfig) -> dict:
    """Validate every component without loading anything heavy (``--dry-run``); describe the inputs."""
    parts = setup(config)
    described = {"method": config.method.to_dict(), "modelpool": parts.pool.describe()}
    if parts.taskpool is not None:
        described["taskpool"] = parts.taskpool.describe()
    else:
        described["taskpool"] = "none: merge only, nothing is evaluated (save_model keeps the merged model)"
    return described


def _resolve(config, overrides: Iterable[str], registry, plugin_manager):
    """The plugin manager, registry and validated config of a run (building what is not given)."""
    if plugin_manager is None and registry is None:
        from .plugins import get_plugin_manager

        plugin_manager = get_plugin_manager()
    if registry is None:
        from .registry import build_registry

        registry = build_registry(plugin_manager)
    if not isinstance(config, RunConfig):
        sources = [] if config is None else [config]
        config = load_run_config(sources, overrides, registry=registry)
    return config, registry, plugin_manager


class _Hooks:
    """The lifecycle hooks of one run (silent without a plugin manager)."""

    def __init__(self, plugin_manager) -> None:
        self.hook = plugin_manager.hook if plugin_manager is not None else None

    def run_start(self, config: RunConfig) -> None:
        if self.hook is not None:
            self.hook.fusion_run_start(config=config)

    def run_end(self, report: dict) -> None:
        if self.hook is not None:
            self.hook.fusion_run_end(report=report)

    @contextlib.contextmanager
    def phase(self, ctx: RunContext, name: str) -> Iterator[None]:
        before = ctx.timings.get(name, 0.0)
        try:
            with ctx.phase(name):
                yield
        finally:
            if self.hook is not None:
                self.hook.fusion_phase_end(name=name, seconds=ctx.timings[name] - before)


def run(
    config: RunConfig | Mapping | str | Path | None = None,
    *,
    overrides: Iterable[str] = (),
    registry=None,
    plugin_manager=None,
    overwrite: bool = False,
    dry_run: bool = False,
    write: bool = True,
) -> dict:
    """Run one experiment and return its report (also written as ``report.json``).

    :param config: a :class:`RunConfig`, a YAML path, a mapping, or ``None`` for the default
        (TIES on the embedded ``mini`` benchmark).
    :param overrides: ``key=value`` strings applied on top of ``config``.
    :param overwrite: replace an existing output directory.
    :param dry_run: validate everything and return the plan; load nothing heavy.
    :param write: write the output directory (report, model); ``False`` only returns the report.
    """
    config, registry, plugin_manager = _resolve(config, overrides, registry, plugin_manager)
    if dry_run:
        return {"dry_run": True, "config": config.to_dict(), "plan": plan(config)}
    settings = config.settings
    output_dir = Path(settings.output_dir or default_output_dir(config))
    # output_dir=runs/exp1 may create runs/ (one level), never a whole missing path
    guard = {"overwrite": overwrite, "inputs": config_paths(config.modelpool.to_dict()), "make_parent": True}
    if write:
        check_output_path(output_dir, **guard)

    hooks = _Hooks(plugin_manager)
    hooks.run_start(config)
    started = time.time()
    ctx = RunContext(seed=settings.seed, device=settings.device, compute_dtype=settings.compute_dtype, show_progress=settings.progress)
    with hooks.phase(ctx, "setup"):
        parts = _setup_run(config, ctx)
    with hooks.phase(ctx, "prepare"):
        parts.pool.materialize(ctx)
        if parts.taskpool is not None:
            parts.taskpool.materialize(ctx)
    with hooks.phase(ctx, "method"):
        outputs = _named_outputs(parts.method.run(parts.pool, ctx), parts.method)
    with hooks.phase(ctx, "evaluate"):
        models, results = _evaluate(outputs, parts, ctx, evaluate_inputs=settings.evaluate_inputs)

    report = build_report(config, results, parts.taskpool, ctx.timings, started, provenance(plugin_manager), ctx.extras,
                          capabilities=parts.method.capabilities)
    if write:
        _write_outputs(output_dir, report, models, parts.pool, ctx, hooks, guard=guard, save_model=settings.save_model)
    hooks.run_end(report)
    return report


def _setup_run(config: RunConfig, ctx: RunContext) -> Components:
    """Numerics (threads, torch's seed), then :func:`setup`; the task pool goes on the context."""
    import torch

    if config.settings.threads:
        torch.set_num_threads(config.settings.threads)
    torch.manual_seed(config.settings.seed)
    parts = setup(config)
    ctx.taskpool = parts.taskpool
    return parts


def config_paths(value: Any) -> list[str]:
    """Existing paths named by strings in a (model pool) config: what an output must never replace."""
    import os

    cwd = os.path.realpath(os.getcwd())
    found: list[str] = []
    if isinstance(value, Mapping):
        for item in value.values():
            found += config_paths(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            found += config_paths(item)
    elif isinstance(value, str) and value.strip() and len(value) < 4096 and "\x00" not in value:
        with_user = os.path.expanduser(value)
        real = os.path.realpath(with_user)
        if os.path.lexists(with_user) and not (cwd == real or cwd.startswith(real.rstrip("/") + "/")):
            found.append(with_user)
    return found


def _named_outputs(output: Any, method) -> dict[str, Any]:
    if method.capabilities.output == "models":
        if not isinstance(output, Mapping) or is_state_dict(output):
            raise InputError(f"method {method.name!r} declares several outputs but returned {type(output).__name__}")
        return {f"merged:{label}": value for label, value in output.items()}
    if method.capabilities.output == "per_task" and not (callable(getattr(output, "model_for", None)) and hasattr(output, "shared")):
        raise InputError(f"method {method.name!r} declares per-task models but returned {type(output).__name__}, not PerTaskModels")
    return {"merged": output}


def _evaluate(outputs: Mapping[str, Any], parts: Components, ctx: RunContext, *, evaluate_inputs: bool):
    """Each output as a model (state dicts through the pool), scored by the task pool; the inputs too.

    A ``per_task`` output (:class:`~fusion_core.adapters.PerTaskModels`) scores each task with its own
    model and keeps (saves) its shared model."""
    models, results = {}, {}
    pool, taskpool = parts.pool, parts.taskpool
    per_task = parts.method.capabilities.output == "per_task"
    for label, produced in outputs.items():
        if taskpool is not None and per_task:  # each task scored with its own model, built when its turn comes
            results[label] = {}
            for task in taskpool.task_names:
                own = produced.model_for(task)
                own = pool.model_from_state_dict(own) if is_state_dict(own) else own
                results[label].update(taskpool.evaluate(own, tasks=[task], ctx=ctx))
        shared = produced.shared if per_task else produced  # built after the per-task models (a pool may reuse its module)
        model = pool.model_from_state_dict(shared) if is_state_dict(shared) else shared
        models[label] = model
        if taskpool is not None and not per_task:
            results[label] = taskpool.evaluate(model, ctx=ctx)
    if taskpool is not None and evaluate_inputs:
        results.update(_evaluate_inputs(pool, taskpool, ctx))
    return models, results


def _evaluate_inputs(pool, taskpool, ctx: RunContext) -> dict[str, Any]:
    """Pretrained on every task; each fine-tuned model on its own task ("individual")."""
    out: dict[str, Any] = {}
    if pool.has_base:
        out["pretrained"] = taskpool.evaluate(pool.load_model(None), ctx=ctx)
    individual = {}
    tasks = set(taskpool.task_names)
    for name in pool.model_names:
        if name in tasks:
            individual.update(taskpool.evaluate(pool.load_model(name), tasks=[name], ctx=ctx))
    if individual:
        out["individual"] = individual
    return out


def _write_outputs(output_dir: Path, report: dict, models: Mapping[str, Any], pool, ctx: RunContext, hooks: _Hooks, *,
                   guard: Mapping[str, Any], save_model: bool) -> None:
    """The output directory (report, and the models when asked), complete or not at all.

    ``guard``: what :func:`~fusion_core.output.check_output_path` needs (overwrite, the inputs, make_parent).
    """
    with atomic_output(output_dir, **guard) as tmp:
        tmp.mkdir()
        if save_model:
            with hooks.phase(ctx, "save"):
                for label, model in models.items():
                    target = tmp / ("model" if label == "merged" else f"model-{label}")
                    pool.save_model(model, str(target), recipe=report["config"])
            report["timings"] = dict(ctx.timings)
        report["output_dir"] = str(output_dir)
        write_json_atomic(tmp / "report.json", report)
