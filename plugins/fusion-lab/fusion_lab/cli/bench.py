"""``fuse bench``: run methods on a benchmark, store every result, render the leaderboard.

The program (:func:`plan_bench`, :func:`run_bench`, :func:`bench_leaderboard`) is
separate from the click command so Python code and tests can drive it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import click

from fusion_core.config import read_yaml, split_top_level

# --------------------------------------------------------------------------- method specs




def parse_method_spec(text: str) -> dict:
    """``ties:density=0.2,scaling_factor=1.0`` → ``{"name": "ties", "density": 0.2, "scaling_factor": 1.0}``."""
    from fusion_core.config import parse_value
    from fusion_core.errors import ConfigError

    name, _, fields = text.partition(":")
    name = name.strip()
    if not name:
        raise ConfigError(f"malformed --method {text!r}: expected NAME or NAME:key=value,key=value")
    spec: dict[str, Any] = {"name": name}
    if fields.strip():
        for item in split_top_level(fields):
            key, eq, raw = item.partition("=")
            key = key.strip()
            if not eq or not key.isidentifier():
                raise ConfigError(f"malformed --method {text!r}: {item.strip()!r} is not key=value (e.g. ties:density=0.2)")
            spec[key] = parse_value(raw)
    return spec


def load_methods_file(path: str) -> list[dict]:
    """A YAML list (or ``{methods: [...]}``) of ``NAME``, ``NAME:k=v`` strings or ``{name: ..., field: ...}`` mappings."""

    from fusion_core.errors import ConfigError

    data = read_yaml(path, what="methods file")
    if isinstance(data, dict) and "methods" in data:
        data = data["methods"]
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{path}: expected a non-empty list of methods (NAME, 'NAME:k=v' or {{name: NAME, k: v}})")
    specs = []
    for i, item in enumerate(data, 1):
        if isinstance(item, str):
            specs.append(parse_method_spec(item))
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            specs.append(dict(item))
        else:
            raise ConfigError(f"{path}: method #{i} must be a name or a mapping with 'name', got {item!r}")
    return specs


# --------------------------------------------------------------------------- the program


@attrs.frozen
class BenchCell:
    """One planned run: a method config on the benchmark with one seed."""

    config: Any  # RunConfig
    config_dict: dict
    summary: str
    config_hash: str
    pools_hash: str

    @property
    def method(self) -> str:
        return self.config.method.name

    @property
    def seed(self) -> int:
        return self.config.settings.seed

    @property
    def name(self) -> str:
        return f"{self.method} ({self.summary})" if self.summary else self.method


@attrs.frozen
class BenchPlan:
    benchmark: str
    cells: tuple[BenchCell, ...]
    pools_hash: str


def resolve_benchmark(registry, name: str):
    from fusion_core.errors import ConfigError, did_you_mean
    from fusion_core.runconfig import DEFAULT_BENCHMARK

    if name not in registry.entries["benchmark"]:
        hint = (" (install the embedded benchmark: pip install -e plugins/fusion-minibench)"
                if name == DEFAULT_BENCHMARK and not registry.entries["benchmark"]
                else did_you_mean(name, registry.names("benchmark")))
        raise ConfigError(f"unknown benchmark {name!r}{hint}; `fuse list benchmarks` shows them all")
    return registry.entries["benchmark"][name]


def plan_bench(registry, benchmark: str, methods: Sequence[dict] | None = None, seeds: Sequence[int] = (0,),
               settings: dict | None = None, *, cells: bool = True) -> BenchPlan:
    """Resolve and validate every cell (method × seed) before anything runs.

    :param methods: method specs ``{"name": ..., field: value}``; default: the benchmark's own list.
    :param settings: extra run settings (``device``, ``compute_dtype``, ``progress``...).
    :param cells: ``False`` only resolves the benchmark (for ``--show-only``).
    """
    from fusion_core.errors import ConfigError
    from fusion_core.runconfig import resolve_run_config

    from ..results_db import config_hash, method_summary, pools_hash

    bench = resolve_benchmark(registry, benchmark)
    base = {**(settings or {}), "benchmark": benchmark}
    pools_config = resolve_run_config({**base, "method": {"name": "dummy"}}, registry)
    if pools_config.taskpool is None:
        raise ConfigError(f"benchmark {benchmark!r} has no task pool; nothing to rank")
    pools = pools_hash(pools_config.to_dict())
    if not cells:
        return BenchPlan(benchmark=benchmark, cells=(), pools_hash=pools)
    specs = list(methods) if methods else [dict(m) for m in bench.methods]
    if not specs:
        raise ConfigError(f"benchmark {benchmark!r} lists no default methods; give --method NAME (`fuse list methods`)")
    for spec in specs:  # unknown names first, each with did-you-mean, before any field is checked
        registry.get("method", str(spec.get("name")))
    planned = []
    seen = set()
    for spec in specs:
        for seed in seeds:
            try:
                config = resolve_run_config({**base, "seed": seed, "method": dict(spec)}, registry)
            except ConfigError as exc:
                raise ConfigError(f"method {spec.get('name')!r}: {exc}") from None
            cd = config.to_dict()
            key = (config_hash(cd), seed)
            if key in seen:
                continue
            seen.add(key)
            planned.append(BenchCell(config=config, config_dict=cd, summary=method_summary(config),
                                     config_hash=key[0], pools_hash=pools_hash(cd)))
    return BenchPlan(benchmark=benchmark, cells=tuple(planned), pools_hash=pools)


@attrs.frozen
class CellOutcome:
    cell: BenchCell
    status: str  # ok | skipped | failed
    seconds: float = 0.0
    error: str | None = None
    average: float | None = None


def run_bench(plan: BenchPlan, db, *, force: bool = False, registry=None, plugin_manager=None,
              on_cell: Callable[[int, int, CellOutcome], None] | None = None) -> list[CellOutcome]:
    """Run every cell not already done (all with ``force``), committing each as it finishes.

    A failing cell is recorded with its one-line error and the rest continue.
    Baselines (pretrained, individual) are evaluated once per pools hash: by the first
    cell that runs while none are stored (with ``force``: once per invocation).
    """
    from fusion_core.program import run
    from fusion_core.report import provenance

    from ..executors import one_line
    from ..results_db import store_failure, store_report

    need_baselines = force or not db.has_baselines(plan.pools_hash)
    outcomes = []
    total = len(plan.cells)
    for i, cell in enumerate(plan.cells, 1):
        if not force and db.is_done(cell.config_hash, cell.seed):
            outcome = CellOutcome(cell, "skipped")
        else:
            settings = attrs.evolve(cell.config.settings, evaluate_inputs=need_baselines, output_dir=None)
            config = attrs.evolve(cell.config, settings=settings)
            started = time.time()
            try:
                report = run(config, registry=registry, plugin_manager=plugin_manager, write=False)
            except Exception as exc:  # recorded; the other cells still run
                seconds = time.time() - started
                error = one_line(exc)
                store_failure(db, cell.config_dict, error, summary=cell.summary, source="bench", benchmark=plan.benchmark,
                              versions=provenance(plugin_manager)["versions"], duration_s=round(seconds, 3))
                outcome = CellOutcome(cell, "failed", seconds, error)
            else:
                seconds = time.time() - started
                store_report(db, report, cell.config_dict, summary=cell.summary, source="bench", benchmark=plan.benchmark)
                if any(k in report["results"] for k in ("pretrained", "individual")):
                    need_baselines = False
                outcome = CellOutcome(cell, "ok", seconds, average=report.get("averages", {}).get("merged"))
        outcomes.append(outcome)
        if on_cell is not None:
            on_cell(i, total, outcome)
    return outcomes


def bench_leaderboard(db, plan_or_benchmark: BenchPlan, *, metric: str | None = None):
    """The leaderboard of every finished cell stored for this benchmark configuration (any source, all seeds)."""
    from ..leaderboard import build_leaderboard

    rows = db.rows("pools_hash = ? AND status = 'ok'", (plan_or_benchmark.pools_hash,))
    return build_leaderboard(rows, title=f"{plan_or_benchmark.benchmark} leaderboard", metric=metric)


def failed_cells(db, plan: BenchPlan) -> list:
    """Stored failures of this benchmark configuration that have no successful result."""
    rows = db.rows("pools_hash = ? AND status = 'failed'", (plan.pools_hash,))
    return [r for r in rows if not db.is_done(r.config_hash, r.seed)]


# --------------------------------------------------------------------------- the command


def _progress_line(i: int, total: int, outcome: CellOutcome) -> None:
    from fusion_core.console import error_console

    cell = outcome.cell
    where = f"[{i}/{total}] {cell.name} seed {cell.seed}"
    if outcome.status == "skipped":
        text = f"{where}: done before, skipped (--force reruns it)"
    elif outcome.status == "failed":
        text = f"[red]{where}: failed after {outcome.seconds:.1f}s: {outcome.error}[/]"
    else:
        avg = "" if outcome.average is None else f" average {outcome.average:.4g},"
        text = f"{where}:{avg} {outcome.seconds:.1f}s"
    error_console().print(text, markup=True, highlight=False)


@click.command("bench")
@click.argument("benchmark", required=False, default="mini")
@click.option("--method", "methods", multiple=True, metavar="NAME[:k=v,...]",
              help="A method to run, with fields (repeatable); default: the benchmark's own list.")
@click.option("--methods-file", type=click.Path(dir_okay=False), help="YAML list of methods (NAME, 'NAME:k=v' or mappings).")
@click.option("--db", "db_path", default=None, metavar="PATH", help="Results database (default runs/results.sqlite).")
@click.option("--force", is_flag=True, help="Rerun cells that are already in the database.")
@click.option("--seed", "seeds", multiple=True, type=int, help="Seed (repeatable; mean ± std over seeds). Default 0.")
@click.option("--markdown", type=click.Path(dir_okay=False), help="Also write the leaderboard as Markdown here.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write the leaderboard as CSV here.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Also write a PNG plot (per-task score by method) here.")
@click.option("--show-only", is_flag=True, help="Run nothing: render the leaderboard stored in the database.")
@click.pass_obj
def bench_command(state, benchmark, methods, methods_file, db_path, force, seeds, markdown, csv_path, plot, show_only):
    """Run methods on a benchmark, store every result in SQLite and show the leaderboard.

    \b
      fuse bench                                  # every default method on the mini benchmark
      fuse bench mini --method ties:density=0.2 --method task_arithmetic:scaling_factor=0.3
      fuse bench mini --seed 0 --seed 1 --seed 2 --markdown LEADERBOARD.md --plot leaderboard.png
      fuse bench mini --show-only --csv leaderboard.csv
    """
    from fusion_core.console import console

    from ..leaderboard import plot_png, render_rich, to_csv, to_markdown, write_text_atomic
    from ..results_db import open_db

    registry = state.registry
    specs = (load_methods_file(methods_file) if methods_file else []) + [parse_method_spec(m) for m in methods]
    plan = plan_bench(registry, benchmark, specs or None, seeds or (0,), cells=not show_only)
    outcomes: list[CellOutcome] = []
    with open_db(db_path, readonly=show_only) as db:
        if not show_only:
            outcomes = run_bench(plan, db, force=force, registry=registry, plugin_manager=state.pm, on_cell=_progress_line)
        board = bench_leaderboard(db, plan)
        render_rich(board, console())
        for row in failed_cells(db, plan):
            summary = f" ({row.config_summary})" if row.config_summary else ""
            console().print(f"[red]failed[/]: {row.label}{summary} seed {row.seed}: {row.error}", highlight=False)
        if markdown:
            write_text_atomic(markdown, to_markdown(board))
        if csv_path:
            write_text_atomic(csv_path, to_csv(board))
        if plot:
            plot_png(board, plot)
        console().print(f"[dim]results: {db.path}[/]")
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "skipped", "failed")}
    if outcomes:
        from fusion_core.console import error_console

        error_console().print(f"{counts['ok']} run, {counts['skipped']} skipped, {counts['failed']} failed", highlight=False)
    if counts["failed"]:
        raise click.exceptions.Exit(1)
