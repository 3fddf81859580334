"""Sweeps: a grid (or a list of points) of overrides on one config, selection on validation, final test.

Grid axes are written ``key=a,b,c`` (each item typed like YAML) or
``key=range(start, stop, step)`` (start included, stop excluded, computed in
decimal so ``range(0.1, 0.5, 0.1)`` is exactly 0.1, 0.2, 0.3, 0.4); a YAML file of
explicit points (a list of ``{key: value}`` mappings) is crossed with the axes.

Selection never reads the test split: for a task pool whose Config has a ``split``
field, every point is evaluated with ``taskpool.split`` set to the validation
split, the best point (by ``--select-metric`` averaged over tasks) wins, and only
that point is evaluated once more on the test split.  A task pool without a
``split`` field cannot be selected on honestly: the sweep refuses unless
``select_on="test"`` is asked for explicitly, and the report then says so.

Every point is validated before any run starts; results go to the results
database as they finish (keyed by config hash), so a rerun skips finished points
and an interrupted sweep loses nothing that finished.
"""

from __future__ import annotations

import decimal
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from fusion_core import ConfigError, did_you_mean, read_yaml

VAL_SPLITS = ("val", "validation", "valid", "dev")
TEST_SPLITS = ("test",)
_RANGE = re.compile(r"^\s*range\s*\((.*)\)\s*$", re.S)
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


# --------------------------------------------------------------------------- grid syntax


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets, braces, parentheses and quotes."""
    parts, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts




def parse_range(text: str, where: str) -> list:
    """``range(start, stop[, step])`` → values (start included, stop excluded; exact decimal steps)."""
    match = _RANGE.match(text)
    if not match:
        raise ConfigError(f"{where}: malformed range {text!r}: expected range(start, stop, step)")
    args = [a.strip() for a in match.group(1).split(",")]
    if len(args) == 2:
        args.append("1")
    if len(args) != 3 or not all(_NUMBER.match(a) for a in args):
        raise ConfigError(f"{where}: malformed range {text!r}: expected range(start, stop, step) with numbers")
    start, stop, step = (decimal.Decimal(a) for a in args)
    if step == 0:
        raise ConfigError(f"{where}: range step is 0 in {text!r}")
    integral = all(re.match(r"^[+-]?\d+$", a) for a in args)
    values = []
    value = start
    while (value < stop) if step > 0 else (value > stop):
        values.append(int(value) if integral else float(value))
        value += step
        if len(values) > 100_000:
            raise ConfigError(f"{where}: range {text!r} has more than 100000 values")
    return values


def parse_axis(arg: str) -> tuple[str, list]:
    """``key=a,b,range(0,1,0.5)`` → ``("key", ["a", "b", 0.0, 0.5])`` (YAML-typed items)."""
    from fusion_core import parse_override, parse_value

    if "=" not in arg:
        raise ConfigError(f"malformed grid axis {arg!r}: expected key=a,b,c or key=range(start, stop, step)")
    key, _, raw = arg.partition("=")
    parse_override(f"{key}=0")  # checks the key's syntax, naming the argument
    key = key.strip()
    values: list = []
    for item in split_top_level(raw):
        if _RANGE.match(item):
            values.extend(parse_range(item, key))
        else:
            values.append(parse_value(item.strip()))
    return key, values


def load_points(path: str) -> list[dict]:
    """A YAML list of points, each a mapping ``{dotted.key: value}`` (or nested mappings)."""

    data = read_yaml(path, what="points file")
    if isinstance(data, dict) and "points" in data:
        data = data["points"]
    if data is None:
        data = []
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a list of points ({{key: value}} mappings), got {type(data).__name__}")
    points = []
    for i, item in enumerate(data, 1):
        if not isinstance(item, dict) or not item:
            raise ConfigError(f"{path}: point #{i} must be a non-empty mapping of key: value, got {item!r}")
        points.append(_flatten(item))
    return points


def _flatten(mapping: Mapping, prefix: str = "") -> dict:
    """``{method: {density: 0.2}}`` → ``{"method.density": 0.2}``; a ``name`` stays a component selection."""
    out = {}
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and full in ("method", "modelpool", "taskpool"):
            out.update(_flatten(value, f"{full}."))
        else:
            out[full] = value
    return out


# --------------------------------------------------------------------------- points


@attrs.frozen
class Point:
    """One point of the sweep: its position and the overrides it applies (in order)."""

    index: int
    overrides: tuple[tuple[str, Any], ...]

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={override_value_text(v)}" for k, v in self.overrides) or "(base config)"

    def as_dict(self) -> dict:
        return dict(self.overrides)


def override_value_text(value: Any) -> str:
    """A value written so that YAML reads it back identically (``'0.1'`` stays a string)."""
    from fusion_core import dump_yaml as dump
    from fusion_core import parse_value

    text = dump(value, default_flow_style=True, width=10**9).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")].strip()
    elif text.endswith("..."):
        text = text[:-3].strip()
    if parse_value(text) != value:  # pragma: no cover - a YAML corner we do not expect
        raise ConfigError(f"cannot write value {value!r} as an override")
    return text


def expand(axes: Sequence[tuple[str, list]], points: Sequence[dict] | None = None) -> list[Point]:
    """The cartesian product of the axes, crossed with each explicit point (when given)."""
    import itertools

    for key, values in axes:
        if not values:
            raise ConfigError(f"empty grid: axis {key!r} has no values")
    keys = [k for k, _ in axes]
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    if duplicated:
        raise ConfigError(f"grid axis {duplicated[0]!r} is given twice; give its values once, comma-separated")
    bases = list(points) if points is not None else [{}]
    if not bases:
        raise ConfigError("empty grid: the points file lists no points")
    if not axes and bases == [{}]:
        raise ConfigError("empty grid: give axes like key=a,b,c or key=range(start, stop, step), or --points FILE.yaml")
    out = []
    for base in bases:
        clash = sorted(set(base) & set(keys))
        if clash:
            raise ConfigError(f"key {clash[0]!r} is set both by a point of the points file and by a grid axis")
        for combo in itertools.product(*[values for _, values in axes]):
            overrides = tuple(base.items()) + tuple(zip(keys, combo, strict=True))
            out.append(Point(index=len(out), overrides=overrides))
    return out


# --------------------------------------------------------------------------- splits


@attrs.frozen
class Splits:
    """How the sweep evaluates: the split used to select, the split of the final evaluation."""

    select: str | None  # taskpool.split value for selection; None = the task pool has no split field
    final: str | None
    honest: bool  # False when selecting on the test split


def splits_for(run_config, select_on: str) -> Splits:
    """Validation/test values of the task pool's ``split`` field; refuses selection without one unless asked."""
    from fusion_core import config_fields

    taskpool = run_config.taskpool
    if taskpool is None:
        raise ConfigError("the sweep's config has no task pool: nothing to select on; set taskpool=NAME")
    field = next((f for f in config_fields(taskpool.cls.Config) if f.name == "split"), None)
    if select_on == "test":
        if field is None:
            return Splits(select=None, final=None, honest=False)
        test = _split_value(field, TEST_SPLITS, taskpool.name, "test")
        return Splits(select=test, final=test, honest=False)
    if field is None:
        raise ConfigError(
            f"task pool {taskpool.name!r} has no 'split' field, so points cannot be selected on a validation split; "
            "use a task pool with a split field, or pass --select-on test to select on the test split (the report says so)")
    return Splits(select=_split_value(field, VAL_SPLITS, taskpool.name, "validation"),
                  final=_split_value(field, TEST_SPLITS, taskpool.name, "test"), honest=True)


def _split_value(field, names: Sequence[str], taskpool: str, what: str) -> str:
    allowed = [a for a in typing.get_args(field.type) if isinstance(a, str)] if typing.get_origin(field.type) is typing.Literal else None
    if allowed is None:
        return names[0]
    for name in names:
        if name in allowed:
            return name
    raise ConfigError(f"task pool {taskpool!r}: its split field accepts {', '.join(map(repr, allowed))}, none of them a {what} split")


# --------------------------------------------------------------------------- resolving points


def resolve_point(sources: Sequence[Any], fixed: Sequence[str], point: Point, registry, *, split: str | None,
                  settings: Mapping[str, Any] | None = None):
    """The RunConfig of ``point``: config files, then fixed overrides, the point, the split and settings."""
    from fusion_core import raw_run_config, resolve_run_config

    overrides = [*fixed, *(f"{k}={override_value_text(v)}" for k, v in point.overrides)]
    if split is not None:
        overrides.append(f"taskpool.split={override_value_text(split)}")
    for key, value in (settings or {}).items():
        overrides.append(f"{key}={override_value_text(value)}")
    try:
        return resolve_run_config(raw_run_config(sources, overrides), registry)
    except ConfigError as exc:
        raise ConfigError(f"point {point.index + 1} ({point.label}): {exc}") from None


def check_keys(sources: Sequence[Any], fixed: Sequence[str], keys: Sequence[str], registry,
               varying: Sequence[str] = ()) -> None:
    """Every swept key exists in the config (did-you-mean otherwise), checked once per key, before any point.

    Fields of a component that itself varies (``method=ties,dare``) are checked per point instead.
    """
    from fusion_core import COMPONENT_KEYS, RunSettings, config_fields, raw_run_config, resolve_run_config

    allowed = set(COMPONENT_KEYS) | {f.name for f in attrs.fields(RunSettings)}
    try:
        base = resolve_run_config(raw_run_config(sources, fixed), registry)
    except ConfigError:
        base = None  # the base alone may need the grid's values; each point is still fully validated
    for key in keys:
        head, _, rest = key.partition(".")
        if head not in allowed:
            raise ConfigError(f"unknown key {key!r} in the grid{did_you_mean(head, allowed)}")
        if head == "taskpool" and rest == "split":
            raise ConfigError("taskpool.split is set by the sweep itself (validation split to select, test split for the "
                              "final evaluation); remove it from the grid")
        if rest and head in COMPONENT_KEYS:
            field = rest.split(".")[0]
            choice = getattr(base, head) if base is not None else None
            if choice is None or field == "name":
                continue
            if any(k == head or k == f"{head}.name" for k in varying):  # the component itself is swept
                continue
            names = {f.name for f in config_fields(choice.cls.Config)}
            if field not in names:
                raise ConfigError(f"unknown key {key!r} in the grid: {head} {choice.name!r} has no field {field!r}"
                                  f"{did_you_mean(field, names)}")
        elif rest:
            raise ConfigError(f"unknown key {key!r} in the grid: {head!r} is a plain setting with no fields")


# --------------------------------------------------------------------------- selection


@attrs.frozen
class Scored:
    point: Point
    score: float


def score(results: Mapping[str, Mapping[str, float]], metric: str) -> float:
    """Mean of ``metric`` over tasks; raises ConfigError when no task reports it."""
    values = [m[metric] for m in results.values() if metric in m]
    if not values:
        reported = sorted({k for m in results.values() for k in m})
        raise ConfigError(f"metric {metric!r} is not reported by the task pool{did_you_mean(metric, reported)}")
    return sum(values) / len(values)


def select(scored: Sequence[Scored], *, minimize: bool = False) -> tuple[Scored, Scored | None]:
    """Best and runner-up (ties: the earlier point wins)."""
    if not scored:
        raise ConfigError("no point of the sweep finished; nothing to select (see the errors above)")
    ordered = sorted(scored, key=lambda s: (s.score if minimize else -s.score, s.point.index))
    return ordered[0], (ordered[1] if len(ordered) > 1 else None)


# --------------------------------------------------------------------------- the program


@attrs.frozen
class SweepPlan:
    sweep_id: str
    sources: tuple
    fixed: tuple[str, ...]
    axes: tuple
    points: tuple[Point, ...]
    configs: tuple  # RunConfig per point (selection split)
    config_dicts: tuple  # job config mapping per point
    summaries: tuple
    splits: Splits
    metric: str | None
    minimize: bool


def plan_sweep(registry, sources: Sequence[Any], args: Sequence[str], *, points_file: str | None = None,
               select_on: str = "val", metric: str | None = None, minimize: bool = False) -> SweepPlan:
    """Parse the grid, validate every point (before anything runs) and decide the splits.

    :param args: ``key=a,b,c`` axes (a single value is a fixed override of every point).
    """
    import hashlib

    from .results_db import canonical_json, config_hash, method_summary

    if select_on not in ("val", "test"):
        raise ConfigError(f"select_on must be 'val' or 'test', got {select_on!r}")
    axes = [parse_axis(a) for a in args]
    fixed = tuple(f"{k}={override_value_text(v[0])}" for k, v in axes if len(v) == 1)
    swept = [(k, v) for k, v in axes if len(v) != 1]
    points = expand(swept, load_points(points_file) if points_file else None) if (swept or points_file) else []
    if not points:
        raise ConfigError("empty grid: give axes like key=a,b,c or key=range(start, stop, step), or --points FILE.yaml")
    varying = sorted({k for p in points for k, _ in p.overrides})
    check_keys(sources, fixed, [k for k, _ in axes] + varying, registry, varying)
    first = resolve_point(sources, fixed, points[0], registry, split=None)
    splits = splits_for(first, select_on)
    settings = {"progress": False, "evaluate_inputs": False, "output_dir": None}
    configs = [resolve_point(sources, fixed, p, registry, split=splits.select, settings=settings) for p in points]
    for point, config in zip(points, configs, strict=True):
        if config.taskpool is None or config.taskpool.cls is not first.taskpool.cls:
            raise ConfigError(f"point {point.index + 1} ({point.label}): every point must use task pool {first.taskpool.name!r}")
    dicts = [c.to_dict() for c in configs]
    if splits.final is not None and splits.final != splits.select:
        for point in points:  # the final evaluation's config must validate too
            resolve_point(sources, fixed, point, registry, split=splits.final, settings=settings)
    ident = {"points": [(config_hash(d), d.get("seed", 0)) for d in dicts], "select_on": select_on, "metric": metric,
             "minimize": minimize}
    sweep_id = hashlib.sha256(canonical_json(ident).encode()).hexdigest()[:12]
    return SweepPlan(sweep_id=sweep_id, sources=tuple(sources), fixed=fixed, axes=tuple(swept), points=tuple(points),
                     configs=tuple(configs), config_dicts=tuple(dicts), summaries=tuple(method_summary(c) for c in configs),
                     splits=splits, metric=metric, minimize=minimize)


def run_sweep(plan: SweepPlan, db, executor, *, registry, plugin_manager,
              on_point: Callable[[Point, str, str | None], None] | None = None) -> dict:
    """Run the plan's unfinished points on ``executor``, select, evaluate the winner on test; return the report.

    Each result is committed to ``db`` as it arrives.  ``on_point(point, status, detail)``
    is called with ``status`` in ``resumed``/``ok``/``failed``.
    """

    from .cells import PlannedCell, run_cells

    executor.check()
    cells = [PlannedCell(cd, plan.summaries[point.index]) for point, cd in zip(plan.points, plan.config_dicts, strict=True)]
    point_of = {}
    for point, cell in zip(plan.points, cells, strict=True):
        point_of.setdefault(cell.key, point)  # two points with the same resolved config run once

    def report(cell, status, result):
        if on_point:
            on_point(point_of[cell.key], "resumed" if status == "skipped" else status,
                     result["error"] if status == "failed" else None)

    executor.start()
    try:
        run_cells(cells, db, executor, registry=registry, plugin_manager=plugin_manager, source="sweep", sweep=plan.sweep_id,
                  on_cell=report)
        return _select_and_finish(plan, db, executor, registry, plugin_manager)
    finally:
        executor.stop()


def _select_and_finish(plan: SweepPlan, db, executor, registry, plugin_manager) -> dict:
    from .results_db import config_hash

    rows, scored = [], []
    metric = plan.metric
    for point, cd in zip(plan.points, plan.config_dicts, strict=True):
        key, seed = config_hash(cd), cd.get("seed", 0)
        entry = {"index": point.index + 1, "label": point.label, "overrides": point.as_dict(), "config_hash": key,
                 "seed": seed}
        results = db.cell_results(key, seed)
        label = cd["method"]["name"]
        if results is None:
            entry.update(status="failed", score=None, error=db.cell_error(key, seed) or "no result stored")
        elif label not in results:
            entry.update(status="failed", score=None, error=f"the run produced no {label!r} result (several outputs?)")
        else:
            if metric is None:
                metric = _primary_metric(db, key, seed)
            try:
                value = score(results[label], metric)
            except ConfigError as exc:
                entry.update(status="failed", score=None, error=str(exc))
            else:
                entry.update(status="ok", score=value, error=None)
                scored.append(Scored(point, value))
        rows.append(entry)
    best, runner_up = select(scored, minimize=plan.minimize)
    final = _final_evaluation(plan, best.point, db, executor, registry, plugin_manager)
    split_note = (f"selected on the {plan.splits.select!r} split; the final score is on {plan.splits.final!r}"
                  if plan.splits.honest else
                  "selected on the TEST split (explicitly requested with --select-on test): the final score is optimistic")
    margin = None if runner_up is None else abs(best.score - runner_up.score)
    direction = "lowest" if plan.minimize else "highest"
    from .formatting import format_delta, format_score

    why = (f"point {best.point.index + 1} ({best.point.label}) has the {direction} mean {metric} on the "
           f"{plan.splits.select or 'test'} split: {format_score(best.score, metric)}"
           + (f", {format_delta(margin, metric)} ahead of point {runner_up.point.index + 1} ({runner_up.point.label}, "
              f"{format_score(runner_up.score, metric)})" if runner_up else " (the only point that finished)"))
    return {
        "fusion_sweep": 1,
        "sweep": plan.sweep_id,
        "config": [s if isinstance(s, str) else dict(s) for s in plan.sources],
        "fixed_overrides": list(plan.fixed),
        "grid": {k: v for k, v in plan.axes},
        "selection": {"split": plan.splits.select or "test", "final_split": plan.splits.final or "test",
                      "metric": metric, "mode": "min" if plan.minimize else "max", "honest": plan.splits.honest,
                      "note": split_note},
        "points": rows,
        "winner": {"index": best.point.index + 1, "label": best.point.label, "overrides": best.point.as_dict(),
                   "score": best.score},
        "runner_up": None if runner_up is None else {"index": runner_up.point.index + 1, "label": runner_up.point.label,
                                                     "score": runner_up.score},
        "margin": margin,
        "why": why,
        "final": final,
        "counts": {"points": len(rows), "ok": len(scored), "failed": sum(r["status"] == "failed" for r in rows)},
        "executor": executor.name,
        "db": str(db.path),
    }


def _primary_metric(db, key: str, seed: int) -> str:
    rows = db.rows("config_hash = ? AND seed = ? AND status = 'ok'", (key, seed))
    metric = next((r.metric for r in rows if r.metric), None)
    if metric is None:
        raise ConfigError("the task pool reports no primary metric; pass --select-metric NAME")
    return metric


def _final_evaluation(plan: SweepPlan, point: Point, db, executor, registry, plugin_manager) -> dict:
    """The winner on the test split (reused when selection already ran on test, or when stored)."""
    from fusion_core import averages

    from .cells import PlannedCell, run_cells
    from .results_db import config_hash, pools_hash

    if not plan.splits.honest:
        cd = plan.config_dicts[point.index]
        reused = True
    else:
        config = resolve_point(plan.sources, plan.fixed, point, registry, split=plan.splits.final,
                               settings={"progress": False, "output_dir": None})
        cd = config.to_dict()
        reused = False
    key, seed = config_hash(cd), cd.get("seed", 0)
    label = cd["method"]["name"]
    if not reused:  # the same job path as the points; the baselines come with it when none are stored
        outcome: dict = {}
        run_cells([PlannedCell(cd, plan.summaries[point.index])], db, executor, registry=registry,
                  plugin_manager=plugin_manager, source="sweep", sweep=plan.sweep_id, baselines=True,
                  on_cell=lambda cell, status, result: outcome.update(result or {}, status=status))
        if outcome.get("status") not in ("ok", "skipped"):
            error = outcome.get("error", "no result")
            return {"split": plan.splits.final or "test", "status": "failed", "error": error, "config_hash": key}
    results = dict(db.cell_results(key, seed) or {})
    results.update(db.baseline_results(pools_hash(cd)))
    results = {("merged" if k == label else k): v for k, v in results.items()}
    metric = _primary_metric(db, key, seed)
    return {"split": plan.splits.final or "test", "status": "ok", "config_hash": key, "reused_selection_run": reused,
            "metric": metric, "results": results, "averages": averages(results, metric)}
