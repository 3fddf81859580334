"""The results database: schema, hashes, cells, refusals of foreign/old files, concurrent writers."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest
from fusion_lab.results_db import (
    SCHEMA_VERSION,
    Cell,
    config_hash,
    open_db,
    pools_hash,
    store_failure,
    store_report,
)

from fusion_core.errors import InputError


def config(method="m", factor=1.0, seed=0, **extra):
    return {"method": {"name": method, "factor": factor}, "modelpool": {"name": "files", "base": "b"},
            "taskpool": {"name": "tp", "split": "test"}, "seed": seed, "output_dir": None, "progress": True,
            "device": "cpu", "compute_dtype": "float32", **extra}


def report(cd, results, duration=1.5):
    return {"config": cd, "seed": cd["seed"], "results": results, "primary_metric": "accuracy",
            "versions": {"fusion-core": "0.1.0", "torch": "2.13.0"}, "timings": {"method": 0.5}, "duration_s": duration}


def test_fresh_database_has_schema_version_and_wal(tmp_path):
    path = tmp_path / "sub" / "r.sqlite"
    with open_db(path) as db:
        assert db.count() == 0
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)] == [(1,)]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_config_hash_is_canonical_and_ignores_non_result_settings():
    cd = config(factor=0.5)
    expected = hashlib.sha256(
        b'{"compute_dtype":"float32","device":"cpu","method":{"factor":0.5,"name":"m"},'
        b'"modelpool":{"base":"b","name":"files"},"taskpool":{"name":"tp","split":"test"}}'
    ).hexdigest()
    assert config_hash(cd) == expected
    reordered = dict(reversed(list(cd.items())))
    assert config_hash(reordered) == expected
    assert config_hash({**cd, "seed": 7, "output_dir": "x", "progress": False, "threads": 1}) == expected
    assert config_hash(config(factor=0.25)) != expected
    # baselines do not depend on the method
    assert pools_hash(config(method="a")) == pools_hash(config(method="b", factor=3.0))
    assert pools_hash(config()) != pools_hash({**config(), "taskpool": {"name": "tp", "split": "val"}})


def test_report_is_stored_per_label_and_task_with_provenance(tmp_path):
    cd = config(seed=3)
    results = {"merged": {"a": {"accuracy": 0.5, "loss": 2.0}, "b": {"accuracy": 0.25}},
               "pretrained": {"a": {"accuracy": 0.1}, "b": {"accuracy": 0.2}}, "individual": {"a": {"accuracy": 0.9}}}
    with open_db(tmp_path / "r.sqlite") as db:
        written = store_report(db, report(cd, results), cd, summary="factor=1", source="bench", benchmark="tiny")
        assert written == 5
        rows = db.rows()
        merged = [r for r in rows if r.label == "m"]
        assert [(r.task, r.value, r.metrics) for r in merged] == [("a", 0.5, {"accuracy": 0.5, "loss": 2.0}),
                                                                  ("b", 0.25, {"accuracy": 0.25})]
        r = merged[0]
        assert (r.kind, r.config_hash, r.seed, r.split, r.status, r.error) == ("method", config_hash(cd), 3, "test", "ok", None)
        assert r.versions == {"fusion-core": "0.1.0", "torch": "2.13.0"} and r.timings == {"method": 0.5}
        assert r.duration_s == 1.5 and r.benchmark == "tiny" and r.config_summary == "factor=1"
        assert r.config["method"] == {"name": "m", "factor": 1.0} and "seed" not in r.config and "output_dir" not in r.config
        assert r.created_at.endswith("+00:00")
        base = [r for r in rows if r.kind == "baseline"]
        assert sorted((r.label, r.task) for r in base) == [("individual", "a"), ("pretrained", "a"), ("pretrained", "b")]
        assert {r.config_hash for r in base} == {pools_hash(cd)}
        assert db.is_done(config_hash(cd), 3) and not db.is_done(config_hash(cd), 0)
        assert db.cell_results(config_hash(cd), 3) == {"m": {"a": {"accuracy": 0.5, "loss": 2.0}, "b": {"accuracy": 0.25}}}
        assert db.has_baselines(pools_hash(cd))


def test_peak_memory_of_a_report_is_stored_with_its_timings(tmp_path):
    cd = config()
    with open_db(tmp_path / "r.sqlite") as db:
        store_report(db, {**report(cd, {"merged": {"a": {"accuracy": 0.5}}}), "peak_rss_mb": 532.8}, cd, summary="", source="bench")
        (row,) = db.rows()
        assert row.timings == {"method": 0.5, "peak_rss_mb": 532.8}


def test_rewriting_a_cell_replaces_it_and_failed_cells_are_not_done(tmp_path):
    cd = config()
    key = config_hash(cd)
    with open_db(tmp_path / "r.sqlite") as db:
        store_failure(db, cd, "RuntimeError: boom", summary="", source="bench", versions={"fusion-core": "0.1.0"}, duration_s=0.2)
        assert not db.is_done(key, 0) and db.cell_error(key, 0) == "RuntimeError: boom"
        (row,) = db.rows()
        assert (row.task, row.status, row.value, row.duration_s) == ("", "failed", None, 0.2)
        store_report(db, report(cd, {"merged": {"a": {"accuracy": 0.5}}}), cd, summary="", source="bench")
        store_report(db, report(cd, {"merged": {"a": {"accuracy": 0.75}}}), cd, summary="", source="bench")
        assert [(r.status, r.value) for r in db.rows()] == [("ok", 0.75)]
        assert db.is_done(key, 0) and db.cell_error(key, 0) is None


def _refused(path, pattern):
    before = path.read_bytes()
    with pytest.raises(InputError, match=pattern) as info:
        open_db(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert path.read_bytes() == before  # nothing was modified
    return str(info.value)


def test_newer_schema_is_refused_naming_the_file_and_the_fix(tmp_path):
    path = tmp_path / "r.sqlite"
    open_db(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE schema_version SET version = 2")
    conn.commit()
    conn.close()
    msg = _refused(path, r"schema version 2, newer than this fusion-core understands \(1\)")
    assert msg.endswith("upgrade fusion-core, or pass --db with another path")


def test_older_schema_is_refused_with_the_move_aside_fix(tmp_path):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE schema_version (version INTEGER); INSERT INTO schema_version VALUES (0);"
                       "CREATE TABLE results (x);")
    conn.close()
    msg = _refused(path, "schema version 0, which cannot be migrated to 1")
    assert f"move it aside (mv {path} {path}.v0) and rerun" in msg


def test_foreign_sqlite_and_non_sqlite_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign.sqlite"
    conn = sqlite3.connect(foreign)
    conn.executescript("CREATE TABLE people (name TEXT); INSERT INTO people VALUES ('x');")
    conn.close()
    _refused(foreign, r"is not a fusion results database \(no schema_version table; it has people\)")
    text = tmp_path / "notes.sqlite"
    text.write_text("these are not the rows you are looking for\n" * 100)
    _refused(text, "is not an SQLite database")


def test_unwritable_locations_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    with pytest.raises(InputError, match=r"cannot create results database .*afile is not a folder; choose another location with --db PATH"):
        open_db(tmp_path / "afile" / "r.sqlite")
    existing = tmp_path / "r.sqlite"
    open_db(existing).close()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(str(tmp_path)) else real_access(p, mode))
    with pytest.raises(InputError, match=r"results database .*r.sqlite is read-only \(the file or its folder\)"):
        open_db(existing)
    with pytest.raises(InputError, match=r"cannot create results database .*new.sqlite: .* is read-only"):
        open_db(tmp_path / "new.sqlite")
    with pytest.raises(InputError, match="no results database at .*missing.sqlite; run `fuse bench` first"):
        open_db(tmp_path / "missing.sqlite", readonly=True)


def test_readonly_open_reads_without_writing(tmp_path):
    path = tmp_path / "r.sqlite"
    cd = config()
    with open_db(path) as db:
        store_report(db, report(cd, {"merged": {"a": {"accuracy": 0.5}}}), cd, summary="", source="bench")
    with open_db(path, readonly=True) as db:
        assert [r.value for r in db.rows()] == [0.5]
        with pytest.raises(InputError, match="not writable"):
            store_report(db, report(cd, {"merged": {"a": {"accuracy": 0.6}}}), cd, summary="", source="bench")


WRITER = textwrap.dedent("""
    import sys
    from fusion_lab.results_db import Cell, open_db
    path, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open_db(path) as db:
        for i in range(n):
            cell = Cell(kind="method", config_hash=f"{who}-{i}", pools_hash="p", config={"i": i}, config_summary="",
                        seed=0, source="bench")
            db.record_ok(cell, {who: {"a": {"accuracy": i / n}, "b": {"accuracy": 1.0}}}, metric="accuracy",
                         versions={}, timings={}, duration_s=0.0)
""")


def test_two_processes_writing_at_once_lose_no_rows(tmp_path):
    path = tmp_path / "r.sqlite"
    n = 150
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), who, str(n)], stderr=subprocess.PIPE)
             for who in ("first", "second")]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    with open_db(path) as db:
        rows = db.rows()
    assert len(rows) == 2 * n * 2
    assert {(r.label, r.config_hash, r.task) for r in rows} == {
        (who, f"{who}-{i}", t) for who in ("first", "second") for i in range(n) for t in ("a", "b")}


def test_threads_rewriting_the_same_cells_keep_exactly_one_copy(tmp_path):
    path = tmp_path / "r.sqlite"
    open_db(path).close()

    def write(value):
        with open_db(path) as db:
            for i in range(40):
                cell = Cell(kind="method", config_hash=f"c{i}", pools_hash="p", config={}, config_summary="", seed=0)
                db.record_ok(cell, {"m": {"a": {"accuracy": value}, "b": {"accuracy": value}}}, metric="accuracy",
                             versions={}, timings={}, duration_s=None)

    threads = [threading.Thread(target=write, args=(v,)) for v in (0.25, 0.75)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open_db(path) as db:
        rows = db.rows()
    assert len(rows) == 80
    for i in range(40):  # each cell holds one writer's rows, never a mix
        assert len({r.value for r in rows if r.config_hash == f"c{i}"}) == 1
