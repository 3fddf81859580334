"""The results database, read-only: the leaderboard, one run's record, two runs' config diff.

The only module of this plugin that touches the results DB and leaderboard modules (those of
the ``fusion_lab`` plugin, the experiment platform).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fusion_lab import leaderboard as _lb
from fusion_lab import results_db as _db

from fusion_core import FuseError

BASELINES = tuple(_db.BASELINE_LABELS)


def open_readonly(path: str | Path):
    """The database at ``path`` opened read-only (never created or modified); FuseError when absent or invalid."""
    return _db.open_db(path, readonly=True)


def _where(benchmark: str | None, method: str | None, seed: int | None) -> tuple[str, list]:
    clauses, params = ["status = 'ok'"], []
    if benchmark:
        clauses.append("benchmark = ?")
        params.append(benchmark)
    if seed is not None:
        clauses.append("seed = ?")
        params.append(seed)
    if method:  # the method's rows, and the baselines they are compared with
        clauses.append("(label = ? OR label LIKE ? OR kind = 'baseline')")
        params += [method, f"{method}:%"]
    return " AND ".join(clauses), params


def _stat(stat) -> dict | None:
    return None if stat is None else {"mean": stat.mean, "std": stat.std, "n": stat.n}


def cell_id(config_hash: str, seed: int) -> str:
    return f"{config_hash}:{seed}"


def results(path: str | Path, *, benchmark: str | None = None, method: str | None = None, seed: int | None = None) -> dict:
    """The leaderboard under the filters, the runs (cells) it is made of, and the values the filters can take."""
    try:
        db = open_readonly(path)
    except FuseError as exc:
        return {"missing": str(exc), "db": str(path)}
    with db:
        every = db.rows("status = 'ok'")
        where, params = _where(benchmark, method, seed)
        rows = db.rows(where, params)
        failed = db.rows("status = 'failed'")
    board = _lb.build_leaderboard(rows, title=benchmark or "all benchmarks")
    cells: dict[str, dict] = {}
    for r in rows:
        cid = cell_id(r.config_hash, r.seed)
        cell = cells.setdefault(cid, {"id": cid, "label": r.label, "kind": r.kind, "config": r.config_summary,
                                      "seed": r.seed, "benchmark": r.benchmark, "created_at": r.created_at, "duration_s": r.duration_s, "values": []})
        if r.value is not None:
            cell["values"].append(r.value)
    for cell in cells.values():
        values = cell.pop("values")
        cell["average"] = sum(values) / len(values) if values else None
    return {
        "db": str(path),
        "title": board.title,
        "metric": board.metric,
        "percent": board.percent,
        "tasks": list(board.tasks),
        "rows": [{"label": r.label, "kind": r.kind, "config": r.config, "name": r.name, "seeds": list(r.seeds),
                  "tasks": {t: _stat(s) for t, s in r.tasks.items()}, "average": _stat(r.average)} for r in board.rows],
        "runs": sorted(cells.values(), key=lambda c: c["created_at"], reverse=True),
        "failed": [{"label": r.label, "config": r.config_summary, "seed": r.seed, "error": r.error} for r in failed],
        "filters": {
            "benchmarks": sorted({r.benchmark for r in every if r.benchmark}),
            "methods": sorted({r.label.split(":")[0] for r in every if r.kind == "method"}),
            "seeds": sorted({r.seed for r in every}),
        },
    }


def _parse_id(cid: str) -> tuple[str, int]:
    config_hash, _, seed = str(cid).rpartition(":")
    try:
        return config_hash, int(seed)
    except ValueError:
        raise FuseError(f"malformed run id {cid!r}: expected CONFIG_HASH:SEED") from None


def run_record(path: str | Path, cid: str) -> dict:
    """One stored run: its config, versions, timings, duration, peak memory (when recorded), per-task results,
    and the pretrained/individual baselines of the same pools."""
    config_hash, seed = _parse_id(cid)
    with open_readonly(path) as db:
        rows = db.rows("config_hash = ? AND seed = ?", (config_hash, seed))
        if not rows:
            raise FuseError(f"no run {cid!r} in {path}")
        first = rows[0]
        baselines = db.baseline_results(first.pools_hash) if first.kind == "method" else {}
    metric = first.metric or next((r.metric for r in rows if r.metric), None)
    results: dict[str, dict[str, float | None]] = {}
    for r in rows:
        if r.status == "ok":
            results.setdefault(r.label, {})[r.task] = r.metrics.get(metric, r.value) if metric else r.value
    for label, per_task in baselines.items():
        if label not in results:
            results[label] = {task: metrics.get(metric) for task, metrics in per_task.items()}
    timings = dict(first.timings)
    peak = timings.pop("peak_rss_mb", None) or getattr(first, "peak_rss_mb", None)
    return {
        "id": cid, "label": first.label, "kind": first.kind, "config_summary": first.config_summary,
        "benchmark": first.benchmark, "sweep": first.sweep, "seed": first.seed, "status": first.status,
        "error": first.error, "config": first.config, "versions": first.versions, "timings": timings,
        "duration_s": first.duration_s, "peak_rss_mb": peak, "created_at": first.created_at,
        "metric": metric, "percent": metric in _lb.PERCENT_METRICS, "results": results,
    }


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"method": {"density": 0.2}}`` → ``{"method.density": 0.2}`` (lists stay values)."""
    if isinstance(data, Mapping) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def diff(path: str | Path, a: str, b: str) -> dict:
    """The keys where two runs' resolved configs differ (and the seed), side by side."""
    left, right = run_record(path, a), run_record(path, b)
    fa, fb = flatten({**left["config"], "seed": left["seed"]}), flatten({**right["config"], "seed": right["seed"]})
    rows = []
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key, "(absent)"), fb.get(key, "(absent)")
        if va != vb:
            rows.append({"key": key, "a": json.dumps(va, ensure_ascii=False), "b": json.dumps(vb, ensure_ascii=False)})
    return {"a": {"id": a, "label": left["label"], "config": left["config_summary"]},
            "b": {"id": b, "label": right["label"], "config": right["config_summary"]},
            "differences": rows, "same": len(fa) - sum(1 for r in rows if r["key"] in fa)}


# --------------------------------------------------------------------------- reports of `fuse run` (runs/*/report.json)

MAX_REPORT_BYTES = 20 * 2**20


def _report_path(runs_dir: str | Path, name: str) -> Path:
    """``runs_dir/name/report.json`` for a plain folder name only (no separators, no dot-folders)."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.:+-]*", name or ""):
        raise FuseError(f"not a run folder name: {name!r}")
    return Path(runs_dir) / name / "report.json"


def _read_report(path: Path) -> dict | None:
    try:
        if not path.is_file() or path.stat().st_size > MAX_REPORT_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("fusion_report") else None


def _labelled(results: Mapping, method: str) -> dict:
    return {_db.method_label(label, method): per_task for label, per_task in (results or {}).items()}


def reports(runs_dir: str | Path) -> list[dict]:
    """The reports ``fuse run`` wrote under ``runs_dir`` (one folder per run), newest first."""
    root = Path(runs_dir)
    out = []
    if not root.is_dir():
        return out
    for folder in sorted(root.iterdir()):
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        report = _read_report(folder / "report.json")
        if report is None:
            continue
        config = report.get("config") or {}
        method = (config.get("method") or {}).get("name", "?")
        averages = _labelled(report.get("averages") or {}, method)
        out.append({"name": folder.name, "method": method, "benchmark": config.get("benchmark"), "seed": report.get("seed"),
                    "started": report.get("started"), "duration_s": report.get("duration_s"),
                    "peak_rss_mb": report.get("peak_rss_mb"), "metric": report.get("primary_metric"),
                    "percent": report.get("primary_metric") in _lb.PERCENT_METRICS, "average": averages.get(method)})
    return sorted(out, key=lambda r: str(r["started"]), reverse=True)


def report_record(runs_dir: str | Path, name: str) -> dict:
    """One ``fuse run`` report in the shape of :func:`run_record` (peak memory included)."""
    report = _read_report(_report_path(runs_dir, name))
    if report is None:
        raise FuseError(f"no readable report.json in {Path(runs_dir) / name}")
    config = report.get("config") or {}
    method = (config.get("method") or {}).get("name", "?")
    metric = report.get("primary_metric")
    results = {label: {task: (metrics or {}).get(metric) for task, metrics in per_task.items()}
               for label, per_task in _labelled(report.get("results") or {}, method).items()}
    return {
        "id": name, "label": method, "kind": "method", "config_summary": "", "benchmark": config.get("benchmark"),
        "sweep": None, "seed": report.get("seed"), "status": "ok", "error": None, "config": config,
        "versions": report.get("versions") or {}, "timings": report.get("timings") or {},
        "duration_s": report.get("duration_s"), "peak_rss_mb": report.get("peak_rss_mb"),
        "created_at": report.get("started") or "", "metric": metric, "percent": metric in _lb.PERCENT_METRICS,
        "results": results,
    }
