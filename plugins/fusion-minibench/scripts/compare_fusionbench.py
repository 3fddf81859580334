"""Rank the mini leaderboard against FusionBench's CLIP-ViT-B/32 eight-task table.

Reads the results database of ``fuse bench mini`` (every stored cell of the benchmark: all run
seeds, and all recipe seeds, i.e. ``modelpool.seed``/``taskpool.seed``) or the CSV of
``fuse bench --csv``, and prints the rows both tables have, the pairs ordered the same way,
Kendall's τ-b and a bootstrap interval of τ-b (see ``fusion_minibench.ranking``)::

    python plugins/fusion-minibench/scripts/compare_fusionbench.py --db runs/mini-leaderboard.sqlite
    python plugins/fusion-minibench/scripts/compare_fusionbench.py --csv runs/mini-lb.csv      # no interval

The bootstrap resamples *recipe seeds* (a row's score per recipe seed is its mean over run
seeds) when some compared row has results on several recipe seeds, else *run seeds* of the
first recipe seed (``--unit`` forces either).  Rows with one unit keep their value in every
resample.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict

from fusion_minibench.ranking import FUSIONBENCH_CLIP_B32, FUSIONBENCH_SOURCE, Row, compare, to_markdown


def _without_seed(component) -> str:
    """A pool config without the fields that name the recipe seed's build (``seed``, ``cache_dir``)."""
    return json.dumps({k: v for k, v in (component or {}).items() if k not in ("seed", "cache_dir")}, sort_keys=True, default=str)


def read_extra(path: str | None) -> dict[tuple[str, str], dict[int, float]]:
    """``--extra-units``: a CSV ``label,config,recipe_seed,average`` (average in percent) of results measured
    outside the database (e.g. ``measure.py --seeds 1 2``), as (label, config) → recipe seed → average."""
    out: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    if path:
        with open(path, newline="") as handle:
            for r in csv.DictReader(handle):
                out[(r["label"], r.get("config") or "")][int(r["recipe_seed"])] = float(r["average"])
    return out


def rows_from_db(path: str, benchmark: str, unit: str, extra: dict | None = None) -> tuple[list[Row], str]:
    """Leaderboard rows with their per-unit averages, from every ``ok`` cell of ``benchmark`` in the database
    (and ``extra`` averages per recipe seed, see :func:`read_extra`)."""
    from fusion_lab.results_db import open_db

    with open_db(path, readonly=True) as db:
        stored = db.rows("benchmark = ? AND status = 'ok'", (benchmark,))
    if not stored:
        raise SystemExit(f"{path}: no finished cells of benchmark {benchmark!r}; run `fuse bench {benchmark} --db {path}` first")
    # the pools may differ only in their recipe seed (and where it is built); keep the family with the most rows
    families: dict[str, list] = defaultdict(list)
    for r in stored:
        families[_without_seed(r.config.get("modelpool")) + _without_seed(r.config.get("taskpool"))].append(r)
    stored = max(families.values(), key=len)
    if len(families) > 1:
        print(f"note: {len(families)} pool configurations besides their seed; using the one with the most rows", file=sys.stderr)
    # (label, summary, method settings) -> (recipe seed, run seed) -> task -> value
    cells: dict[tuple, dict[tuple, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    settings: dict[tuple, dict] = {}
    for r in stored:
        method = {k: v for k, v in (r.config.get("method") or {}).items() if k != "name"} if r.kind == "method" else {}
        key = (r.label, r.config_summary, json.dumps(method, sort_keys=True, default=str))
        settings[key] = method
        recipe = (r.config.get("modelpool") or {}).get("seed", 0)
        cells[key][(recipe, r.seed)][r.task] = 100.0 * float(r.value)
    extra = extra or {}
    if unit == "auto":
        unit = "recipe" if extra or any(len({rc for rc, _ in by_unit}) > 1 for by_unit in cells.values()) else "run"
    rows = []
    for key, by_unit in cells.items():
        averages = {u: math.fsum(t.values()) / len(t) for u, t in by_unit.items()}
        if unit == "recipe":
            per_recipe: dict[int, list[float]] = defaultdict(list)
            for (recipe, _), value in averages.items():
                per_recipe[recipe].append(value)
            units = {rc: math.fsum(v) / len(v) for rc, v in per_recipe.items()}
            units.update({rc: v for rc, v in extra.get(key[:2], {}).items() if rc not in units})
        else:  # run seeds of the first recipe seed the row has
            first = min(rc for rc, _ in averages)
            units = {s: v for (rc, s), v in averages.items() if rc == first}
        label, summary, _ = key
        rows.append(Row(label=label, config=summary, units=units, settings={k: str(v) for k, v in settings[key].items()}))
    return rows, "recipe seed" if unit == "recipe" else "run seed"


def rows_from_csv(path: str) -> list[Row]:
    """Rows of ``fuse bench --csv`` (one unit each: the mean over seeds; values are fractions)."""
    with open(path, newline="") as handle:
        return [Row(label=r["method"], config=r["config"], units={0: 100.0 * float(r["average"])})
                for r in csv.DictReader(handle) if r.get("average")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--db", help="results database of `fuse bench mini` (e.g. runs/mini-leaderboard.sqlite)")
    source.add_argument("--csv", help="CSV of `fuse bench --csv` (means only: no interval)")
    parser.add_argument("--benchmark", default="mini")
    parser.add_argument("--unit", choices=("auto", "recipe", "run"), default="auto",
                        help="what the bootstrap resamples (default: recipe seeds when there are several, else run seeds)")
    parser.add_argument("--extra-units", help="CSV label,config,recipe_seed,average (%%) of results measured outside the database")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--markdown", help="also write the comparison here")
    args = parser.parse_args(argv)
    if args.db:
        rows, unit = rows_from_db(args.db, args.benchmark, args.unit, read_extra(args.extra_units))
    else:
        rows, unit = rows_from_csv(args.csv), "row mean"
    try:
        result = compare(rows, FUSIONBENCH_CLIP_B32, unit=unit, resamples=args.resamples, seed=args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = f"Against {FUSIONBENCH_SOURCE}.\n\n" + to_markdown(result)
    missing = [ref.name for ref in FUSIONBENCH_CLIP_B32 if ref not in {m[0] for m in result.matched}]
    if missing:
        text += f"\nFusionBench rows without a mini row here: {', '.join(missing)}.\n"
    print(text, end="")
    if args.markdown:
        from fusion_core import write_text_atomic

        write_text_atomic(args.markdown, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
