"""The run program: model pool → method → task pool → report (the same for the CLI and Python)."""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import InputError
from .output import atomic_dir, check_output_path, write_json_atomic
from .report import build_report, is_state_dict, provenance
from .run_context import RunContext
from .runconfig import RunConfig, load_run_config


def default_output_dir(config: RunConfig) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"{config.method.name}-{stamp}")


def plan(config: RunConfig) -> dict:
    """Instantiate and validate every component without loading anything heavy (``--dry-run``)."""
    pool = config.modelpool.instantiate()
    pool.validate()
    method = config.method.instantiate()
    if hasattr(method, "check_inputs"):
        method.check_inputs(len(pool.model_names), pool.has_base)
    elif method.capabilities.needs_base and not pool.has_base:
        raise InputError(f"method {method.name!r} needs a base model but model pool {pool.name!r} has none")
    described = {"method": config.method.to_dict(), "modelpool": pool.describe()}
    if config.taskpool is not None:
        taskpool = config.taskpool.instantiate()
        taskpool.validate()
        taskpool.check_pool(pool)
        described["taskpool"] = taskpool.describe()
    return described


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
    if plugin_manager is None and registry is None:
        from .plugins import get_plugin_manager

        plugin_manager = get_plugin_manager()
    if registry is None:
        from .registry import build_registry

        registry = build_registry(plugin_manager)
    if not isinstance(config, RunConfig):
        sources = [] if config is None else [config]
        config = load_run_config(sources, overrides, registry=registry)
    settings = config.settings

    if dry_run:
        return {"dry_run": True, "config": config.to_dict(), "plan": plan(config)}

    output_dir = Path(settings.output_dir or default_output_dir(config))
    guard = {"overwrite": overwrite, "inputs": config_paths(config.modelpool.to_dict()), "make_parent": not settings.output_dir}
    if write:
        check_output_path(output_dir, **guard)

    started = time.time()
    ctx = RunContext(seed=settings.seed, device=settings.device, compute_dtype=settings.compute_dtype, show_progress=settings.progress)
    with ctx.phase("setup"):
        import torch

        if settings.threads:
            torch.set_num_threads(settings.threads)
        torch.manual_seed(settings.seed)
        pool = config.modelpool.instantiate()
        pool.validate()
        method = config.method.instantiate()
        if hasattr(method, "check_inputs"):
            method.check_inputs(len(pool.model_names), pool.has_base)
        taskpool = config.taskpool.instantiate() if config.taskpool else None
        if taskpool is not None:
            taskpool.validate()
            taskpool.check_pool(pool)
        ctx.taskpool = taskpool

    with ctx.phase("prepare"):
        pool.materialize(ctx)
        if taskpool is not None:
            taskpool.materialize(ctx)

    with ctx.phase("method"):
        output = method.run(pool, ctx)
    outputs = _named_outputs(output, method)

    results: dict[str, Any] = {}
    models = {}
    with ctx.phase("evaluate"):
        for label, produced in outputs.items():
            model = pool.model_from_state_dict(produced) if is_state_dict(produced) else produced
            models[label] = model
            if taskpool is not None:
                results[label] = taskpool.evaluate(model, ctx=ctx)
        if taskpool is not None and settings.evaluate_inputs:
            results.update(_evaluate_inputs(pool, taskpool, ctx))

    report = build_report(config, results, taskpool, ctx.timings, started, provenance(plugin_manager), ctx.extras)
    if not write:
        return report
    with atomic_dir(output_dir, **guard) as tmp:
        if settings.save_model:
            with ctx.phase("save"):
                for label, model in models.items():
                    target = tmp / ("model" if label == "merged" else f"model-{label}")
                    pool.save_model(model, str(target), recipe=report["config"])
            report["timings"] = dict(ctx.timings)
        report["output_dir"] = str(output_dir)
        write_json_atomic(tmp / "report.json", report)
    return report


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
    return {"merged": output}


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
