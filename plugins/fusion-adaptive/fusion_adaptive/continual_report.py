"""``fuse continual``: the per-step tables of continual-merging runs and the plot of accuracy against merged models.

A continual method (:mod:`fusion_adaptive.continual`) records ``extras.<method>.steps`` in its
run report: after step ``t`` (``t`` models merged) the results on the tasks of those ``t``
models and their ``average``.  This command reads one or more ``report.json`` files, prints one
row per step (the model that arrived, the average, each task's score as it is re-scored at every
later step) and with ``--png`` draws the average of each run against the number of merged
models (one line per report), as the figures of the OPCM and DOP papers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from fusion_core import InputError


def continual_steps(report: Mapping[str, Any], label: str) -> tuple[str, list[dict[str, Any]]]:
    """``(method name, steps)`` of a run report of a continual method, or an InputError naming ``label``."""
    method = (report.get("config") or {}).get("method", {}).get("name")
    steps = ((report.get("method_extras") or {}).get(method) or {}).get("steps") if method else None
    if not isinstance(steps, list) or not steps:
        raise InputError(f"{label}: no per-step results (method_extras.<method>.steps); run a continual method "
                         "(opcm, dop, continual_task_arithmetic, continual_ties, continual_weight_average) with a task pool")
    return method, steps


def step_records(method: str, steps: Sequence[Mapping[str, Any]], metric: str | None, run: str) -> tuple[list[dict[str, Any]], list[str]]:
    """One record per step (``run``, ``step``, ``model``, ``average`` and one key per task) and the tasks in arrival order."""
    tasks: list[str] = []
    for s in steps:
        tasks += [t for t in (s.get("results") or {}) if t not in tasks]
    percent = metric == "accuracy"

    def fmt(value: Any) -> str:
        if not isinstance(value, (int, float)):
            return "–"
        return f"{100 * value:.1f}" if percent else f"{value:.4g}"

    records = []
    for s in steps:
        results = s.get("results") or {}
        row = {"run": run, "step": str(s.get("step")), "model": str(s.get("model")), "average": fmt(s.get("average"))}
        for task in tasks:
            row[task] = fmt((results.get(task) or {}).get(metric)) if task in results else ""
        records.append(row)
    return records, tasks


def averages_png(runs: Sequence[tuple[str, Sequence[Mapping[str, Any]]]], metric: str | None, path: Path) -> None:
    """Average score against the number of merged models, one line per run (matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--png needs matplotlib: pip install matplotlib") from None
    from fusion_core import atomic_output

    percent = metric == "accuracy"
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    most = 1
    for label, steps in runs:
        points = [(int(s["step"]), float(s["average"]) * (100 if percent else 1)) for s in steps if isinstance(s.get("average"), (int, float))]
        if points:
            most = max(most, points[-1][0])
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("number of merged models")
    ax.set_ylabel(f"average {metric or 'score'} on the tasks seen{' (%)' if percent else ''}")
    ax.set_xticks(range(1, most + 1))
    ax.set_title("continual merging")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_output(path, overwrite=False) as tmp:
        fig.savefig(tmp, format="png", dpi=120, metadata={"Software": None})
    plt.close(fig)


def read_report(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the run report {path!r}: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a run report (a JSON object with config and method_extras)")
    return data


def mean_over_orders(runs: Sequence[tuple[str, str, Sequence[Mapping[str, Any]]]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Runs of one method (arrival orders drawn from different seeds) → per step the mean and spread of their averages."""
    import statistics

    grouped: dict[str, list[Sequence[Mapping[str, Any]]]] = {}
    for method, _, steps in runs:
        grouped.setdefault(method, []).append(steps)
    out = []
    for method, all_steps in grouped.items():
        rows = []
        for index in range(min(len(s) for s in all_steps)):
            values = [float(s[index]["average"]) for s in all_steps if isinstance(s[index].get("average"), (int, float))]
            if values:
                rows.append({"step": index + 1, "average": statistics.fmean(values), "std": statistics.pstdev(values),
                             "orders": len(values)})
        out.append((method, rows))
    return out


@click.command("continual")
@click.argument("reports", nargs=-1, required=True, metavar="REPORT.json...")
@click.option("--png", "png", default=None, metavar="FILE", help="Plot the average on the tasks seen against the number of merged models.")
@click.option("--mean", "mean", is_flag=True, help="Average the runs of each method (one per arrival order, e.g. order_seed 0..4) step by step.")
@click.option("--format", "fmt", type=click.Choice(["table", "plain", "json", "csv"]), default=None,
              help="Output format (default: a table on a terminal, tab-separated records when piped).")
def continual_command(reports, png, mean, fmt):
    """The per-step results of continual-merging runs (opcm, dop, continual_*): one row per merged model.

    \b
      fuse run method=dop output_dir=runs/dop && fuse continual runs/dop/report.json --png dop.png
      fuse continual runs/*/report.json --mean      # several order seeds per method: mean ± std per step
    """
    from fusion_core import Column, check_output_path, emit

    if png:
        check_output_path(png, overwrite=False, inputs=list(reports))
    runs, records, tasks, metric = [], [], [], None
    labels: list[str] = []
    for path in reports:
        report = read_report(path)
        method, steps = continual_steps(report, path)
        label = method if method not in labels else f"{method}#{len(labels)}"
        labels.append(label)
        metric = metric or report.get("primary_metric")
        rows, seen = step_records(method, steps, report.get("primary_metric"), label)
        records += rows
        tasks += [t for t in seen if t not in tasks]
        runs.append((method, label, steps))
    title = f"continual merging: {metric or 'score'} on the tasks seen after each step"
    if mean:
        means = mean_over_orders(runs)
        if png:
            averages_png(means, metric, Path(png))
        scale = 100 if metric == "accuracy" else 1
        records = [{"method": m, "step": str(r["step"]), "average": f"{scale * r['average']:.2f}", "std": f"{scale * r['std']:.2f}",
                    "orders": str(r["orders"])} for m, rows in means for r in rows]
        columns = [Column("method", keep=True), Column("step", justify="right", keep=True), Column("average", justify="right", keep=True),
                   Column("std", justify="right"), Column("orders", justify="right")]
        emit(records, columns, fmt, title=title + " (mean over runs)", json_data={m: rows for m, rows in means})
        return
    if png:
        averages_png([(label, steps) for _, label, steps in runs], metric, Path(png))
    columns = [Column("run", keep=True), Column("step", justify="right", keep=True), Column("model", keep=True),
               Column("average", justify="right", keep=True), *[Column(t, justify="right", drop=i + 1) for i, t in enumerate(tasks)]]
    if fmt == "json":
        emit([], columns, "json", json_data={label: steps for _, label, steps in runs})
        return
    emit(records, columns, fmt, title=title)
