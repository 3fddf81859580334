"""Run reports: provenance, results, averages, and their rich rendering."""

from __future__ import annotations

import platform
import resource
import sys
import time
from collections.abc import Mapping
from typing import Any

from . import __version__
from .output import plain_data


def is_state_dict(obj: Any) -> bool:
    """A mapping of tensor names to tensors (not a dict of named models)."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    first = next(iter(obj.values()))
    return type(first).__name__ in {"Tensor", "Parameter"}


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MiB (Linux reports KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


def versions(plugin_manager=None) -> dict[str, Any]:
    """Versions of Python, the core, every loaded plugin and the heavy libraries in use (reports, model cards)."""
    out: dict[str, Any] = {"python": platform.python_version(), "fusion-core": __version__}
    if plugin_manager is not None:
        from .plugins import plugin_versions

        out.update(plugin_versions(plugin_manager))
    for lib in ("torch", "transformers", "datasets", "safetensors"):
        module = sys.modules.get(lib)
        version = getattr(module, "__version__", None) if module is not None else None
        if module is not None:
            out[lib] = None if version is None else str(version)  # plain text (torch's is a str subclass)
    return out


def provenance(plugin_manager=None) -> dict:
    """:func:`versions` and the platform, for reports."""
    return {"versions": versions(plugin_manager), "platform": platform.platform()}


def averages(results: Mapping[str, Mapping[str, Mapping[str, float]]], metric: str) -> dict[str, float]:
    """Mean of ``metric`` over tasks, per row of results."""
    out = {}
    for label, per_task in results.items():
        values = [m[metric] for m in per_task.values() if metric in m]
        if values:
            out[label] = sum(values) / len(values)
    return out


def build_report(config, results, taskpool, timings, started: float, prov: dict, extras: Mapping | None = None,
                 capabilities=None) -> dict:
    """The run's report; ``capabilities``: the method instance's (a config may change its output kind), else its class's."""
    metric = taskpool.primary_metric() if taskpool is not None else None
    caps = capabilities if capabilities is not None else config.method.cls.capabilities
    return {
        "fusion_report": 1,
        "config": config.to_dict(),
        "seed": config.settings.seed,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 3),
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "primary_metric": metric,
        "results": results,
        "averages": averages(results, metric) if metric else {},
        "method_capabilities": caps.flags(),
        "transductive": caps.transductive,
        "method_extras": plain_data(extras or {}),
        **prov,
    }




ROW_ORDER = ("pretrained", "individual")


def render_report(report: Mapping, console) -> None:
    """Print a per-task table (rows: tasks + average; columns: pretrained, individual, merged...)."""
    from rich.table import Table

    results = report.get("results") or {}
    metric = report.get("primary_metric")
    method = report["config"]["method"]["name"]
    if not results or not metric:
        console.print(f"[bold]{method}[/]: no task pool, nothing evaluated")
        return
    columns = [c for c in ROW_ORDER if c in results] + [c for c in results if c not in ROW_ORDER]
    tasks: list[str] = []
    for col in columns:
        tasks += [t for t in results[col] if t not in tasks]
    percent = metric == "accuracy"
    title = f"{method} on {report['config']['modelpool']['name']} — {metric}{' (%)' if percent else ''}"
    table = Table(title=title)
    table.add_column("task")
    for col in columns:
        table.add_column(col if col != "merged" else f"{method}", justify="right")

    def fmt(value):
        if value is None:
            return "–"
        return f"{100 * value:.1f}" if percent else f"{value:.4g}"

    for task in tasks:
        table.add_row(task, *[fmt(results[col].get(task, {}).get(metric)) for col in columns])
    avgs = report.get("averages", {})
    table.add_section()
    table.add_row("[bold]average[/]", *[f"[bold]{fmt(avgs.get(col))}[/]" for col in columns])
    console.print(table)
    if report.get("transductive"):
        console.print("[yellow]transductive: the method adapted on unlabelled test inputs[/]")
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in report.get("timings", {}).items())
    console.print(f"[dim]{timing}; peak RSS {report.get('peak_rss_mb')} MiB[/]")
    if report.get("output_dir"):
        console.print(f"report: {report['output_dir']}/report.json")
