"""``fuse sweep``: a grid of runs on one config, selected on validation, the winner evaluated on test."""

from __future__ import annotations

import json
import os

import click


def _point_line(point, status: str, detail: str | None) -> None:
    from fusion_core import error_console

    text = {
        "resumed": f"point {point.index + 1} ({point.label}): finished before, skipped",
        "ok": f"point {point.index + 1} ({point.label}): done",
        "failed": f"[red]point {point.index + 1} ({point.label}): failed: {detail}[/]",
    }[status]
    error_console().print(text, highlight=False)


def render_sweep(report: dict, console) -> None:
    """The points (score on the selection split) and the winner's final evaluation."""
    from rich.markup import escape
    from rich.table import Table

    from ..formatting import format_score, is_percent

    sel = report["selection"]
    unit = " (%)" if is_percent(sel["metric"]) else ""
    table = Table(title=f"sweep {report['sweep']} — mean {sel['metric']}{unit} on the {sel['split']!r} split")
    for col, justify in (("#", "right"), ("point", "left"), ("status", "left"), ("score", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    winner = report["winner"]["index"]
    for p in report["points"]:
        score = format_score(p["score"], sel["metric"], unit=False)
        status = p["status"] if p["status"] == "ok" else f"[red]failed: {escape(str(p['error']))}[/]"
        style = "bold green" if p["index"] == winner else None
        table.add_row(str(p["index"]), escape(p["label"]), status, score, style=style)
    console.print(table)
    console.print(f"winner: {escape(report['why'])}", highlight=False)
    console.print(f"[dim]{sel['note']}[/]", highlight=False)
    final = report["final"]
    if final["status"] == "ok":
        avgs = final["averages"]
        parts = ", ".join(f"{label} {format_score(value, final['metric'])}" for label, value in avgs.items())
        console.print(f"final evaluation on {final['split']!r}: mean {final['metric']}: {parts}", highlight=False)
    else:
        console.print(f"[red]final evaluation on {final['split']!r} failed: {final['error']}[/]", highlight=False)


@click.command("sweep", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, required=True)
@click.option("--points", "points_file", type=click.Path(dir_okay=False), help="YAML list of explicit points ({key: value}).")
@click.option("--select-metric", default=None, metavar="NAME", help="Metric averaged over tasks to select on (default: the task pool's primary metric).")
@click.option("--minimize", is_flag=True, help="Select the lowest score instead of the highest.")
@click.option("--select-on", type=click.Choice(["val", "test"]), default="val", show_default=True,
              help="Split to select on; 'test' only for task pools without a split field (the report says so).")
@click.option("--jobs", type=int, default=None, help="Runs at once (local: worker processes; ray: CPUs of a local Ray).")
@click.option("--executor", "executor_name", default="local", show_default=True, help="Where runs execute: local, or ray (fusion-ray plugin).")
@click.option("--address", default=None, metavar="ADDR", help="Cluster address for the executor (ray: host:port of the head).")
@click.option("--db", "db_path", default=None, metavar="PATH", help="Results database (default runs/results.sqlite).")
@click.option("--report", "report_path", default=None, metavar="PATH", help="Where the JSON report goes (default runs/sweeps/<id>.json).")
@click.pass_obj
def sweep_command(state, args, points_file, select_metric, minimize, select_on, jobs, executor_name, address, db_path, report_path):
    """Sweep a config over a grid: select on the validation split, evaluate the winner on test.

    ARGS are YAML config files and KEY=VALUES axes (comma lists typed like YAML,
    or range(start, stop, step) with stop excluded); a single value is an ordinary override.

    \b
      fuse sweep exp.yaml method.scaling_factor=0.1,0.3,0.5,1.0
      fuse sweep exp.yaml method=ties method.density=range(0.1,0.5,0.1) method.scaling_factor=0.5,1.0 --jobs 2
      fuse sweep exp.yaml --points points.yaml --executor ray --address head:6379
    """
    from fusion_core import console, write_text_atomic

    from ..executors import executor_from_options
    from ..results_db import open_db
    from ..sweep import plan_sweep, run_sweep

    files = [a for a in args if "=" not in a]
    axes = [a for a in args if "=" in a]
    for f in files:
        if not os.path.isfile(f):
            raise click.UsageError(f"{f!r} is neither a config file nor a key=values axis")
    registry = state.registry
    plan = plan_sweep(registry, files, axes, points_file=points_file, select_on=select_on, metric=select_metric,
                      minimize=minimize)
    executor = executor_from_options(registry, executor_name, {"jobs": jobs, "address": address})
    executor.check()  # a missing package or an unreachable cluster fails before anything is written
    click.echo(f"sweep {plan.sweep_id}: {len(plan.points)} points on {executor_name}", err=True)
    with open_db(db_path) as db:
        report = run_sweep(plan, db, executor, registry=registry, plugin_manager=state.pm, on_point=_point_line)
    path = report_path or os.path.join("runs", "sweeps", f"{plan.sweep_id}.json")
    report["report"] = path
    write_text_atomic(path, json.dumps(report, indent=2, default=str) + "\n")
    render_sweep(report, console())
    console().print(f"[dim]report: {path}; results: {report['db']}[/]", highlight=False)
    if report["counts"]["failed"] or report["final"]["status"] != "ok":
        raise click.exceptions.Exit(1)
