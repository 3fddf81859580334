"""The results database of ``fuse bench`` and ``fuse sweep``: SQLite, one row per cell × task.

A *cell* is one run of one configuration with one seed.  Its rows are labelled
with the method's name (``name:output`` for methods with several outputs), or
``pretrained``/``individual`` for the baselines a run evaluates from its inputs
(stored as a cell of their own).  A finished cell has one row per label × task
(``status='ok'``); a failed cell has a single row with ``task=''``
(``status='failed'``, with its one-line error).  Every row carries its provenance:
code versions (JSON), the config hash, the full resolved config, seed, timings,
duration and creation time.

Hashes: :func:`config_hash` is the sha256 of the canonical JSON of the resolved
config without the settings that do not change results (output directory,
progress bars, seed — the seed has its own column — ...).  Baselines are keyed by
:func:`pools_hash` (model pool + task pool + numerics), so they are stored once per
benchmark configuration whatever the method.

Concurrency: WAL journal, a busy timeout, and each cell written in its own short
``BEGIN IMMEDIATE`` transaction that first deletes the cell's older rows; two
processes writing the same file lose no rows, and a cell written twice is kept
once (the later write wins).

Schema versions live in the ``schema_version`` table.  This is version 1, the first;
a file with another version, or with tables but no ``schema_version``, is refused
with a message naming the file and the fix (nothing is modified).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from fusion_core import InputError

SCHEMA_VERSION = 1
DEFAULT_DB = os.path.join("runs", "results.sqlite")
BUSY_TIMEOUT_MS = 60_000

#: run settings that do not change the numbers a run produces (left out of config hashes)
NON_RESULT_SETTINGS = ("output_dir", "progress", "save_model", "evaluate_inputs", "threads", "seed", "benchmark")
BASELINE_LABELS = ("pretrained", "individual")

_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,            -- 'bench' or 'sweep'
    benchmark TEXT,                  -- the benchmark name, when the run used one
    sweep TEXT,                      -- the sweep id, for sweep points
    label TEXT NOT NULL,             -- method name, or 'pretrained' / 'individual'
    kind TEXT NOT NULL CHECK (kind IN ('method', 'baseline')),
    config_summary TEXT NOT NULL,    -- the method's non-default fields, 'k=v, k=v'
    config_hash TEXT NOT NULL,       -- sha256 of the canonical resolved config (pools_hash for baselines)
    pools_hash TEXT NOT NULL,        -- sha256 of model pool + task pool + numerics
    config_json TEXT NOT NULL,
    seed INTEGER NOT NULL,
    split TEXT,                      -- the task pool's split field, when it has one
    task TEXT NOT NULL,              -- '' for a failed cell
    metric TEXT,                     -- the task pool's primary metric
    value REAL,                      -- its value on this task
    metrics_json TEXT,               -- every metric of this task
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    error TEXT,
    versions_json TEXT NOT NULL,
    timings_json TEXT,
    duration_s REAL,
    created_at TEXT NOT NULL,
    UNIQUE (config_hash, label, seed, task)
);
CREATE INDEX results_pools ON results (pools_hash, status);
"""


# --------------------------------------------------------------------------- hashes and summaries


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _sha256(data: Any) -> str:
    return hashlib.sha256(canonical_json(data).encode("utf-8")).hexdigest()


def result_config(config_dict: Mapping[str, Any]) -> dict:
    """The resolved config without the settings that do not change results."""
    return {k: v for k, v in config_dict.items() if k not in NON_RESULT_SETTINGS}


def config_hash(config_dict: Mapping[str, Any]) -> str:
    """Stable sha256 of a resolved config (``RunConfig.to_dict()``), seed and output settings excluded."""
    return _sha256(result_config(config_dict))


def pools_hash(config_dict: Mapping[str, Any]) -> str:
    """Stable sha256 of what the baselines depend on: model pool, task pool, device and dtype."""
    keys = ("modelpool", "taskpool", "device", "compute_dtype")
    return _sha256({k: config_dict.get(k) for k in keys})


def method_summary(run_config) -> str:
    """The method's fields that differ from their defaults, as ``k=v, k=v`` (``''`` for all defaults)."""
    from fusion_core import config_to_dict

    cls = run_config.method.cls
    current = config_to_dict(run_config.method.config)
    try:
        defaults = config_to_dict(cls.Config())
    except Exception:  # a Config with required fields has no defaults to compare with
        defaults = {}
    parts = [f"{k}={_short(v)}" for k, v in current.items() if k not in defaults or defaults[k] != v]
    return ", ".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def task_split(config_dict: Mapping[str, Any]) -> str | None:
    taskpool = config_dict.get("taskpool") or {}
    split = taskpool.get("split")
    return None if split is None else str(split)


# --------------------------------------------------------------------------- records


@attrs.frozen
class Cell:
    """One run of one configuration with one seed, and where it came from.

    Method cells are keyed by ``config_hash``; baseline cells (``kind='baseline'``)
    by the pools hash (``config_hash == pools_hash``).  A cell may hold several row
    labels (a method with several outputs; ``pretrained`` and ``individual``).
    """

    kind: str
    config_hash: str
    pools_hash: str
    config: Mapping[str, Any]
    config_summary: str
    seed: int
    source: str = "bench"
    benchmark: str | None = None
    sweep: str | None = None

    @property
    def split(self) -> str | None:
        return task_split(self.config)


@attrs.frozen
class Row:
    """One stored row (one task of one cell, or a failed cell)."""

    label: str
    kind: str
    config_summary: str
    config_hash: str
    pools_hash: str
    seed: int
    task: str
    metric: str | None
    value: float | None
    metrics: dict
    status: str
    error: str | None
    benchmark: str | None
    sweep: str | None
    split: str | None
    config: dict
    versions: dict
    timings: dict
    duration_s: float | None
    created_at: str


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- the database


class ResultsDB:
    """A results database file; open with :func:`open_db`."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "ResultsDB":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------- writing

    @contextlib.contextmanager
    def _write(self):
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _db_error(self.path, exc) from None
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):  # a damaged file may refuse the rollback too
                self.conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise _db_error(self.path, exc) from None
            raise

    def _query(self, sql: str, params: Iterable[Any] = ()) -> tuple[list[tuple], list[str]]:
        """All rows of a read; every SQLite error (locked, damaged page...) becomes one line naming the file."""
        try:
            cur = self.conn.execute(sql, tuple(params))
            return cur.fetchall(), [d[0] for d in cur.description or ()]
        except sqlite3.Error as exc:
            raise _db_error(self.path, exc) from None

    def _delete_cell(self, conn, cell: Cell) -> None:
        conn.execute("DELETE FROM results WHERE config_hash = ? AND seed = ? AND kind = ?",
                     (cell.config_hash, cell.seed, cell.kind))

    def _common(self, cell: Cell, versions, timings, duration_s, created) -> dict:
        return {
            "source": cell.source, "benchmark": cell.benchmark, "sweep": cell.sweep, "kind": cell.kind,
            "config_summary": cell.config_summary, "config_hash": cell.config_hash, "pools_hash": cell.pools_hash,
            "config_json": canonical_json(cell.config), "seed": cell.seed, "split": cell.split,
            "versions_json": canonical_json(versions or {}), "timings_json": canonical_json(timings or {}),
            "duration_s": duration_s, "created_at": created,
        }

    def record_ok(self, cell: Cell, results: Mapping[str, Mapping[str, Mapping[str, float]]], *, metric: str | None,
                  versions: Mapping | None, timings: Mapping | None, duration_s: float | None) -> int:
        """Store a finished cell: ``results`` is ``{label: {task: {metric: value}}}`` (one row per label × task).

        Older rows of the same cell are replaced in the same transaction.  Returns the number of rows written.
        """
        common = self._common(cell, versions, timings, duration_s, _now())
        rows = []
        for label, per_task in results.items():
            for task, metrics in per_task.items():
                value = metrics.get(metric) if metric else None
                rows.append({**common, "label": label, "task": task, "metric": metric, "value": value,
                             "metrics_json": canonical_json(dict(metrics)), "status": "ok", "error": None})
        with self._write() as conn:
            self._delete_cell(conn, cell)
            _insert(conn, rows)
        return len(rows)

    def record_failed(self, cell: Cell, label: str, error: str, *, versions: Mapping | None, duration_s: float | None) -> None:
        """Store a failed cell (one row, ``task=''``) with its one-line error, replacing older rows of the cell."""
        row = {**self._common(cell, versions, {}, duration_s, _now()), "label": label, "task": "", "metric": None,
               "value": None, "metrics_json": None, "status": "failed", "error": error}
        with self._write() as conn:
            self._delete_cell(conn, cell)
            _insert(conn, [row])

    # ----------------------------------------------------------------------- reading

    def is_done(self, config_hash: str, seed: int) -> bool:
        """Whether the cell finished successfully (failed cells are not done: a rerun retries them)."""
        rows, _ = self._query(
            "SELECT 1 FROM results WHERE config_hash = ? AND seed = ? AND status = 'ok' LIMIT 1", (config_hash, seed))
        return bool(rows)

    def has_baselines(self, pools: str) -> bool:
        rows, _ = self._query(
            "SELECT 1 FROM results WHERE pools_hash = ? AND kind = 'baseline' AND status = 'ok' LIMIT 1", (pools,))
        return bool(rows)

    def cell_results(self, config_hash: str, seed: int) -> dict[str, dict[str, dict[str, float]]] | None:
        """``{label: {task: metrics}}`` of a finished cell, or ``None``."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for r in self.rows("config_hash = ? AND seed = ? AND status = 'ok'", (config_hash, seed)):
            out.setdefault(r.label, {})[r.task] = r.metrics
        return out or None

    def cell_error(self, config_hash: str, seed: int) -> str | None:
        """The stored one-line error of a failed cell, or ``None``."""
        rows = self.rows("config_hash = ? AND seed = ? AND status = 'failed'", (config_hash, seed))
        return rows[-1].error if rows else None

    def baseline_results(self, pools: str) -> dict[str, dict[str, dict[str, float]]]:
        """``{label: {task: metrics}}`` of the latest stored baselines of a pools hash."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for r in self.rows("pools_hash = ? AND kind = 'baseline' AND status = 'ok'", (pools,)):
            out.setdefault(r.label, {})[r.task] = r.metrics
        return out

    def rows(self, where: str = "1", params: Iterable[Any] = ()) -> list[Row]:
        """Rows matching an SQL condition, oldest first."""
        fetched, names = self._query(f"SELECT * FROM results WHERE {where} ORDER BY id", params)
        out = []
        for values in fetched:
            r = dict(zip(names, values, strict=True))
            out.append(Row(
                label=r["label"], kind=r["kind"], config_summary=r["config_summary"], config_hash=r["config_hash"],
                pools_hash=r["pools_hash"], seed=r["seed"], task=r["task"], metric=r["metric"], value=r["value"],
                metrics=json.loads(r["metrics_json"]) if r["metrics_json"] else {}, status=r["status"],
                error=r["error"], benchmark=r["benchmark"], sweep=r["sweep"], split=r["split"],
                config=json.loads(r["config_json"]), versions=json.loads(r["versions_json"]),
                timings=json.loads(r["timings_json"]) if r["timings_json"] else {}, duration_s=r["duration_s"],
                created_at=r["created_at"],
            ))
        return out

    def count(self) -> int:
        rows, _ = self._query("SELECT COUNT(*) FROM results")
        return rows[0][0]


def _insert(conn, rows: list[dict]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    sql = f"INSERT INTO results ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})"
    conn.executemany(sql, [tuple(r[c] for c in cols) for r in rows])


def _db_error(path: Path, exc: Exception) -> InputError:
    text = str(exc)
    if "malformed" in text:
        return InputError(f"results database {path} is damaged ({text}); move it aside (mv {path} {path}.damaged) "
                          "and rerun to start a new database, or pass --db with another path")
    if "readonly" in text or "read-only" in text or "unable to open" in text or "disk I/O" in text:
        return InputError(f"results database {path} is not writable ({text}); choose another location with --db PATH")
    if "locked" in text or "busy" in text:
        return InputError(f"results database {path} stayed locked for {BUSY_TIMEOUT_MS // 1000}s by another writer ({text}); retry")
    return InputError(f"results database {path}: {text}")


def _check_writable(path: Path) -> None:
    probe = path.parent if str(path.parent) else Path(".")
    while not probe.exists():
        probe = probe.parent
    if path.exists():
        if not path.is_file():
            raise InputError(f"results database {path} is not a file; choose another location with --db PATH")
        if not os.access(path, os.R_OK | os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
            raise InputError(f"results database {path} is read-only (the file or its folder); choose another location with --db PATH")
        return
    if not probe.is_dir():
        raise InputError(f"cannot create results database {path}: {probe} is not a folder; choose another location with --db PATH")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"cannot create results database {path}: {probe} is read-only; choose another location with --db PATH")


def _schema_version(conn, path: Path) -> int | None:
    """The stored version, ``None`` for an empty file; refuses files that are not results databases."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    tables.discard("sqlite_sequence")
    if not tables:
        return None
    if "schema_version" not in tables:
        raise InputError(
            f"{path} is not a fusion results database (no schema_version table; it has {', '.join(sorted(tables))}); "
            "pass --db with another path, or move the file aside")
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    if row is None or row[0] is None:
        raise InputError(f"{path} has an empty schema_version table; move the file aside and rerun to start a new database")
    return int(row[0])


def open_db(path: str | os.PathLike | None = None, *, readonly: bool = False) -> ResultsDB:
    """Open (creating it when absent, unless ``readonly``) the results database at ``path``.

    Refuses, with one line naming the file and the fix: a location that cannot be
    written, a file that is not SQLite or not a results database, or another schema version.
    """
    path = Path(path or DEFAULT_DB)
    if readonly:
        if not path.is_file():
            raise InputError(f"no results database at {path}; run `fuse bench` first or pass --db PATH")
    else:
        _check_writable(path)
        path.parent.mkdir(parents=True, exist_ok=True)
    with _init_lock(path, enabled=not readonly):  # two processes creating one file at once: one at a time
        try:
            conn, version = _connect_readonly(path) if readonly else _connect(path, "")
        except sqlite3.Error as exc:
            if "not a database" in str(exc):
                raise InputError(f"{path} is not an SQLite database ({exc}); pass --db with another path, or move the file aside") from None
            raise _db_error(path, exc) from None
        if version is not None and version != SCHEMA_VERSION:
            conn.close()
            if version > SCHEMA_VERSION:
                raise InputError(
                    f"results database {path} has schema version {version}, newer than this fusion-core understands "
                    f"({SCHEMA_VERSION}); upgrade fusion-core, or pass --db with another path")
            raise InputError(
                f"results database {path} has schema version {version}, which cannot be migrated to {SCHEMA_VERSION}; "
                f"move it aside (mv {path} {path}.v{version}) and rerun to start a new database")
        if not readonly:
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if version is None:
                    _create(conn)
            except sqlite3.Error as exc:
                conn.close()
                raise _db_error(path, exc) from None
            if str(mode).lower() != "wal":
                conn.close()
                raise InputError(f"results database {path}: cannot switch to WAL journaling (got {mode}); put it on a local disk")
        elif version is None:
            conn.close()
            raise InputError(f"{path} is an empty file, not a results database; run `fuse bench` first or pass --db PATH")
    return ResultsDB(path, conn)


def _connect(path: Path, query: str) -> tuple[sqlite3.Connection, int | None]:
    """A connection (``query``: URI parameters, e.g. ``mode=ro``) and the stored schema version."""
    target = f"{path.resolve().as_uri()}?{query}" if query else str(path)
    conn = sqlite3.connect(target, uri=bool(query), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        return conn, _schema_version(conn, path)
    except BaseException:
        conn.close()
        raise


def _connect_readonly(path: Path) -> tuple[sqlite3.Connection, int | None]:
    """Read only; a WAL database in a place we cannot write (no ``-shm`` can be made) is read as immutable."""
    try:
        return _connect(path, "mode=ro")
    except sqlite3.OperationalError as exc:
        if "readonly" not in str(exc) and "unable to open" not in str(exc):
            raise
        return _connect(path, "mode=ro&immutable=1")


@contextlib.contextmanager
def _init_lock(path: Path, *, enabled: bool):
    """Serialise opening (WAL switch, schema creation) across processes with ``flock`` on ``<db>.lock``.

    Without it two processes creating a new database can deadlock in rollback-journal mode,
    and SQLite then answers "database is locked" at once instead of waiting.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: rely on SQLite's busy timeout
        fcntl = None
    if not enabled or fcntl is None:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _create(conn) -> None:
    """Create the schema in one transaction (two processes creating it at once: one wins, the other sees it)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        exists = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_version'").fetchone()
        if not exists:
            for statement in _SCHEMA.split(";"):
                sql = "\n".join(line.split("--")[0] for line in statement.splitlines()).strip()
                if sql:
                    conn.execute(sql)
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


# --------------------------------------------------------------------------- runs → cells


def method_label(row_label: str, method: str) -> str:
    """A run's result row (``merged``, ``merged:x``) → the stored label (``method``, ``method:x``)."""
    if row_label == "merged":
        return method
    if row_label.startswith("merged:"):
        return f"{method}:{row_label.split(':', 1)[1]}"
    return row_label


def method_cell(config_dict: Mapping[str, Any], *, summary: str, source: str, benchmark: str | None = None,
                sweep: str | None = None) -> Cell:
    return Cell(kind="method", config_hash=config_hash(config_dict), pools_hash=pools_hash(config_dict),
                config=result_config(config_dict), config_summary=summary, seed=int(config_dict.get("seed", 0)),
                source=source, benchmark=benchmark, sweep=sweep)


def baseline_cell(config_dict: Mapping[str, Any], *, source: str, benchmark: str | None = None,
                  sweep: str | None = None) -> Cell:
    pools = pools_hash(config_dict)
    config = {k: config_dict.get(k) for k in ("modelpool", "taskpool", "device", "compute_dtype")}
    return Cell(kind="baseline", config_hash=pools, pools_hash=pools, config=config, config_summary="",
                seed=int(config_dict.get("seed", 0)), source=source, benchmark=benchmark, sweep=sweep)


def store_report(db: ResultsDB, report: Mapping[str, Any], config_dict: Mapping[str, Any], *, summary: str,
                 source: str, benchmark: str | None = None, sweep: str | None = None) -> int:
    """Store a run's report: its method rows as one cell, its baselines (if evaluated) as another.

    ``config_dict`` is the driver's resolved config (the cell key); returns the rows written.
    """
    method = config_dict["method"]["name"]
    results = report.get("results") or {}
    metric = report.get("primary_metric")
    timings = dict(report.get("timings") or {})
    if report.get("peak_rss_mb") is not None:  # the run's peak memory travels with its timings
        timings["peak_rss_mb"] = report["peak_rss_mb"]
    prov = {"versions": report.get("versions") or {}, "timings": timings, "duration_s": report.get("duration_s")}
    merged = {method_label(k, method): v for k, v in results.items() if k not in BASELINE_LABELS}
    written = db.record_ok(method_cell(config_dict, summary=summary, source=source, benchmark=benchmark, sweep=sweep),
                           merged, metric=metric, **prov)
    baselines = {k: results[k] for k in BASELINE_LABELS if k in results}
    if baselines:
        written += db.record_ok(baseline_cell(config_dict, source=source, benchmark=benchmark, sweep=sweep),
                                baselines, metric=metric, **prov)
    return written


def store_failure(db: ResultsDB, config_dict: Mapping[str, Any], error: str, *, summary: str, source: str,
                  versions: Mapping | None, duration_s: float | None, benchmark: str | None = None,
                  sweep: str | None = None) -> None:
    cell = method_cell(config_dict, summary=summary, source=source, benchmark=benchmark, sweep=sweep)
    db.record_failed(cell, config_dict["method"]["name"], error, versions=versions, duration_s=duration_s)
