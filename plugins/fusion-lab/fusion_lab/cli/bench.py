"""``fuse bench``: run methods on a benchmark, store every result, render the leaderboard.

The program (:func:`plan_bench`, :func:`run_bench`, :func:`bench_leaderboard`) is
separate from the click command so Python code and tests can drive it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import click

from fusion_core import read_yaml

# --------------------------------------------------------------------------- method specs




def parse_method_spec(text: str) -> dict:
    """``ties:density=0.2,scaling_factor=1.0`` → ``{"name": "ties", "density": 0.2, "scaling_factor": 1.0}``."""
    from fusion_core import ConfigError, parse_value

    from ..sweep import split_top_level

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
    """A YAML list (or ``{methods: [...]}``) of ``NAME``, ``NAME:k=v`` strings or ``{name: ..., field: ...}`` mappings.

    Besides the method's fields, ``bench_seeds`` (a seed or a list) runs that method on those of the
    bench's seeds only."""

    from fusion_core import ConfigError

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
    from fusion_core import DEFAULT_BENCHMARK, ConfigError, did_you_mean

    if name not in registry.entries["benchmark"]:
        hint = (" (install the embedded benchmark: pip install -e plugins/fusion-minibench)"
                if name == DEFAULT_BENCHMARK and not registry.entries["benchmark"]
                else did_you_mean(name, registry.names("benchmark")))
        raise ConfigError(f"unknown benchmark {name!r}{hint}; `fuse list benchmarks` shows them all")
    return registry.entries["benchmark"][name]


BENCH_SEEDS = "bench_seeds"
"""Key of a method spec limiting it to some of the bench's seeds (``adamerging:steps=100,bench_seeds=[0]``):
for a method that draws no random number and is costly, whose other seeds would repeat the first."""


def _bench_seeds(spec: dict) -> set[int] | None:
    from fusion_core import ConfigError

    value = spec.get(BENCH_SEEDS)
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"method {spec.get('name')!r}: {BENCH_SEEDS} must be a seed or a list of seeds, got {value!r}")
    return set(values)


def plan_bench(registry, benchmark: str, methods: Sequence[dict] | None = None, seeds: Sequence[int] = (0,),
               settings: dict | None = None, *, cells: bool = True) -> BenchPlan:
    """Resolve and validate every cell (seed × method, in that order) before anything runs.

    :param methods: method specs ``{"name": ..., field: value}``; default: the benchmark's own list.
    :param settings: extra run settings (``device``, ``compute_dtype``, ``progress``...).
    :param cells: ``False`` only resolves the benchmark (for ``--show-only``).
    """
    from fusion_core import ConfigError, resolve_run_config

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
    only = {i: _bench_seeds(spec) for i, spec in enumerate(specs)}
    planned = []
    seen = set()
    for seed in seeds:  # seed-major: every method's first seed is done before any method's second
        for i, spec in enumerate(specs):
            if only[i] is not None and seed not in only[i]:
                continue
            method = {k: v for k, v in spec.items() if k != BENCH_SEEDS}
            try:
                config = resolve_run_config({**base, "seed": seed, "method": method}, registry)
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
    metric: str | None = None


def run_bench(plan: BenchPlan, db, *, force: bool = False, registry=None, plugin_manager=None, executor=None,
              on_cell: Callable[[int, int, CellOutcome], None] | None = None) -> list[CellOutcome]:
    """Run every cell not already done (all with ``force``) on ``executor``, committing each as it finishes.

    The same job path as ``fuse sweep`` (:func:`fusion_lab.cells.run_cells`): a failing cell is
    recorded with its one-line error and the rest continue; baselines (pretrained, individual)
    are evaluated once per pools hash while none are stored (with ``force``: once per invocation).
    ``executor`` defaults to ``local`` in this process.
    """
    from ..cells import PlannedCell, run_cells
    from ..executors import LocalConfig, LocalExecutor

    if plugin_manager is None:
        from fusion_core import get_plugin_manager

        plugin_manager = get_plugin_manager()
    executor = executor or LocalExecutor(LocalConfig())
    planned = {id(cell): PlannedCell(cell.config_dict, cell.summary) for cell in plan.cells}
    by_key = {planned[id(cell)].key: cell for cell in plan.cells}
    outcomes: list[CellOutcome] = []

    def done(planned_cell, status: str, result: dict | None) -> None:
        cell = by_key[planned_cell.key]
        if status == "skipped":
            outcome = CellOutcome(cell, "skipped")
        elif status == "failed":
            outcome = CellOutcome(cell, "failed", result.get("duration_s") or 0.0, result["error"])
        else:
            report = result["report"]
            outcome = CellOutcome(cell, "ok", report.get("duration_s") or 0.0, average=report.get("averages", {}).get("merged"),
                                  metric=report.get("primary_metric"))
        outcomes.append(outcome)
        if on_cell is not None:
            on_cell(len(outcomes), len(plan.cells), outcome)

    executor.check()
    executor.start()
    try:
        run_cells([planned[id(cell)] for cell in plan.cells], db, executor, registry=registry, plugin_manager=plugin_manager,
                  source="bench", benchmark=plan.benchmark, force=force, baselines=True, on_cell=done)
    finally:
        executor.stop()
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


def bench_settings(overrides: Sequence[str]) -> dict:
    """``--set KEY=VALUE`` arguments as the raw settings of every cell (pool fields, run settings; not the method)."""
    from fusion_core import ConfigError, raw_run_config

    raw = raw_run_config((), overrides)
    if "method" in raw:
        raise ConfigError("--set cannot set the method; give methods with --method NAME:k=v or --methods-file")
    return raw


class Progress:
    """One plain line per cell on stderr (readable piped), with the time left once a cell has run.

    The estimate is cells still to run × the mean time of the cells run so far (leaving out the
    first once there are others: it also builds the pools and evaluates the baselines).
    """

    def __init__(self, to_run: int) -> None:
        self.to_run = to_run
        self.ran: list[float] = []

    def __call__(self, i: int, total: int, outcome: CellOutcome) -> None:
        from fusion_core import error_console

        from ..formatting import format_duration, format_score

        cell = outcome.cell
        where = f"[{i}/{total}] {cell.name} seed {cell.seed}"
        if outcome.status == "skipped":
            text = f"{where}: done before, skipped (--force reruns it)"
        else:
            self.ran.append(outcome.seconds)
            if outcome.status == "failed":
                text = f"[red]{where}: failed after {outcome.seconds:.1f}s: {outcome.error}[/]"
            else:
                avg = "" if outcome.average is None else f" average {format_score(outcome.average, outcome.metric)},"
                text = f"{where}:{avg} {outcome.seconds:.1f}s"
            left = self.to_run - len(self.ran)
            if left > 0:
                times = self.ran[1:] or self.ran
                each = sum(times) / len(times)
                text += f"; about {format_duration(left * each)} left ({left} more × {each:.1f}s)"
        error_console().print(text, markup=True, highlight=False, soft_wrap=True)


@click.command("bench")
@click.argument("benchmark", required=False, default="mini")
@click.option("--method", "methods", multiple=True, metavar="NAME[:k=v,...]",
              help="A method to run, with fields (repeatable); default: the benchmark's own list.")
@click.option("--methods-file", type=click.Path(dir_okay=False),
              help="YAML list of methods (NAME, 'NAME:k=v' or mappings); 'bench_seeds=[0]' runs a method on those seeds only.")
@click.option("--db", "db_path", default=None, metavar="PATH", help="Results database (default runs/results.sqlite).")
@click.option("--force", is_flag=True, help="Rerun cells that are already in the database.")
@click.option("--seed", "seeds", multiple=True, type=int, help="Seed (repeatable; mean ± std over seeds). Default 0.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="A pool field or run setting for every cell (repeatable), e.g. --set modelpool.seed=1 --set taskpool.seed=1.")
@click.option("--markdown", type=click.Path(dir_okay=False), help="Also write the leaderboard as Markdown here.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write the leaderboard as CSV here.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Also write a PNG plot (per-task score by method) here.")
@click.option("--show-only", is_flag=True, help="Run nothing: render the leaderboard stored in the database.")
@click.option("--jobs", type=int, default=None, help="Cells at once (local: worker processes; ray: CPUs of a local Ray).")
@click.option("--executor", "executor_name", default="local", show_default=True, help="Where cells run: local, or ray (fusion-ray plugin).")
@click.option("--address", default=None, metavar="ADDR", help="Cluster address for the executor (ray: host:port of the head).")
@click.option("--metric", "metrics", multiple=True, metavar="NAME",
              help="Metric to show (repeatable: one table per metric, Markdown side by side, e.g. --metric accuracy --metric asr). "
                   "Default: the task pool's primary metric.")
@click.pass_obj
def bench_command(state, benchmark, methods, methods_file, db_path, force, seeds, overrides, markdown, csv_path, plot, show_only,
                  jobs, executor_name, address, metrics):
    """Run methods on a benchmark, store every result in SQLite and show the leaderboard.

    \b
      fuse bench                                  # every default method on the mini benchmark
      fuse bench mini --method ties:density=0.2 --method task_arithmetic:scaling_factor=0.3
      fuse bench mini --seed 0 --seed 1 --seed 2 --markdown LEADERBOARD.md --plot leaderboard.png --jobs 2
      fuse bench mini --show-only --csv leaderboard.csv
      fuse bench mini-backdoor --metric accuracy --metric asr --markdown BACKDOOR.md
      fuse bench mini --set modelpool.seed=1 --set taskpool.seed=1   # the benchmark built with another recipe seed
    """
    from fusion_core import console, write_text_atomic

    from ..leaderboard import plot_png, render_rich, to_csv, to_csv_long, to_markdown_side_by_side
    from ..results_db import open_db

    registry = state.registry
    specs = (load_methods_file(methods_file) if methods_file else []) + [parse_method_spec(m) for m in methods]
    plan = plan_bench(registry, benchmark, specs or None, seeds or (0,), bench_settings(overrides), cells=not show_only)
    executor = None
    if not show_only:
        from ..executors import executor_from_options

        executor = executor_from_options(registry, executor_name, {"jobs": jobs, "address": address})
        executor.check()  # a missing package or an unreachable cluster fails before anything is written
    outcomes: list[CellOutcome] = []
    with open_db(db_path, readonly=show_only) as db:
        if not show_only:
            to_run = sum(1 for c in plan.cells if force or not db.is_done(c.config_hash, c.seed))
            click.echo(f"bench {benchmark}: {len(plan.cells)} cells, {to_run} to run, "
                       f"{len(plan.cells) - to_run} done before (results: {db.path})", err=True)
            outcomes = run_bench(plan, db, force=force, registry=registry, plugin_manager=state.pm, executor=executor,
                                 on_cell=Progress(to_run))
        boards = [bench_leaderboard(db, plan, metric=m) for m in metrics] or [bench_leaderboard(db, plan)]
        board = boards[0]
        for shown in boards:
            render_rich(shown, console())
        for row in failed_cells(db, plan):
            summary = f" ({row.config_summary})" if row.config_summary else ""
            console().print(f"[red]failed[/]: {row.label}{summary} seed {row.seed}: {row.error}", highlight=False)
        if markdown:
            write_text_atomic(markdown, to_markdown_side_by_side(boards))
        if csv_path:
            write_text_atomic(csv_path, to_csv(board) if len(boards) == 1 else to_csv_long(boards))
        if plot:
            plot_png(board, plot)
        console().print(f"[dim]results: {db.path}[/]")
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "skipped", "failed")}
    if outcomes:
        from fusion_core import error_console

        error_console().print(f"{counts['ok']} run, {counts['skipped']} skipped, {counts['failed']} failed", highlight=False)
    if counts["failed"]:
        raise click.exceptions.Exit(1)
