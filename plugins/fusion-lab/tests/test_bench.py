"""``fuse bench``: cells stored with provenance, skip/--force, failures, exact leaderboards, bad inputs.

The benchmark is made of tiny safetensors files and a test task pool whose accuracy is a closed
form of the weights: task ``i`` scores ``1 - (w[i] - 1)^2`` (base w = [0, 0]; models a = [1, 0],
b = [0, 1]), so every number in the leaderboard is known in advance.
"""

from __future__ import annotations

import sqlite3
import threading
from typing import ClassVar, Literal

import attrs
import pytest
import torch
from fusion_lab.results_db import config_hash, open_db

import fusion_core
import fusion_core.plugins
from fusion_core.cli.main import main
from fusion_core.components import Capabilities, Method, TaskPool
from fusion_core.config import option


@attrs.frozen
class ClosenessConfig:
    split: Literal["val", "test"] = option("test", help="val: target 0.5; test: target 1.0.")


class Closeness(TaskPool):
    name = "closeness_test"
    summary = "Accuracy 1 - (w[i] - target)^2 per task (a closed form of the weights)."
    Config = ClosenessConfig

    @property
    def task_names(self):
        return ["a", "b"]

    def evaluate(self, model, *, tasks=None, ctx=None):
        target = 0.5 if self.config.split == "val" else 1.0
        w = model["w"]
        return {t: {"accuracy": 1.0 - (float(w[i]) - target) ** 2} for i, t in enumerate(self.task_names)
                if tasks is None or t in tasks}


@attrs.frozen
class ShiftConfig:
    step: float = option(0.1, help="w = 0.5 + step * seed.")


class Shift(Method):
    name = "shift_test"
    summary = "Base + 0.5 + step * seed (a seed-dependent method)."
    Config = ShiftConfig
    capabilities = Capabilities(needs_base=True, random=True)
    calls: ClassVar[int] = 0

    def run(self, pool, ctx):
        type(self).calls += 1
        return {"w": pool.load_model(None)["w"] + 0.5 + self.config.step * ctx.seed}


class Explode(Method):
    name = "explode_test"
    summary = "Always fails."
    calls: ClassVar[int] = 0

    def run(self, pool, ctx):
        type(self).calls += 1
        raise RuntimeError("boom\nsecond line of the error")


@pytest.fixture
def bench_pm(tmp_path, write_safetensors, monkeypatch):
    """A plugin manager with fusion-merging, the test components and the benchmark ``tiny``; used by ``fuse``."""
    import fusion_lab.plugin
    import fusion_merging.plugin

    base = write_safetensors(tmp_path / "base.safetensors", {"w": torch.zeros(2)})
    a = write_safetensors(tmp_path / "a.safetensors", {"w": torch.tensor([1.0, 0.0])})
    b = write_safetensors(tmp_path / "b.safetensors", {"w": torch.tensor([0.0, 1.0])})

    class Plugin:
        @fusion_core.hookimpl
        def fusion_register_methods(self, register):
            register(Shift)
            register(Explode)

        @fusion_core.hookimpl
        def fusion_register_task_pools(self, register):
            register(Closeness)

        @fusion_core.hookimpl
        def fusion_register_benchmarks(self, register):
            register("tiny", summary="Two 2-d models.", taskpool={"name": "closeness_test"},
                     modelpool={"name": "files", "base": base, "models": {"a": a, "b": b}},
                     methods=[{"name": "task_arithmetic", "scaling_factor": 0.5}, "simple_average"])

    pm = fusion_core.plugins.get_plugin_manager(
        load_entrypoints=False, extra_plugins=[("lab", fusion_lab.plugin), ("merging", fusion_merging.plugin), ("bench-test", Plugin())])
    monkeypatch.setattr(fusion_core.plugins, "get_plugin_manager", lambda **kw: pm)
    monkeypatch.chdir(tmp_path)
    Shift.calls = Explode.calls = 0
    return pm


def fuse(capsys, *args):
    code = main(["bench", *args])
    out, err = capsys.readouterr()
    return code, out, err


def rows(db="runs/results.sqlite", where="1"):
    with open_db(db, readonly=True) as handle:
        return handle.rows(where)


EXPECTED_MD = """\
**tiny leaderboard** — accuracy (%)

| # | method | config | seeds | a | b | average |
|---:|---|---|---:|---:|---:|---:|
| 1 | *individual* | – | 1 | 100.0 | 100.0 | **100.0** |
| 2 | shift_test | – | 2 | 83.0 ± 11.3 | 83.0 ± 11.3 | **83.0 ± 11.3** |
| 3 | simple_average | – | 2 | 75.0 ± 0.0 | 75.0 ± 0.0 | **75.0 ± 0.0** |
| 4 | task_arithmetic | scaling_factor=0.5 | 2 | 75.0 ± 0.0 | 75.0 ± 0.0 | **75.0 ± 0.0** |
| 5 | *pretrained* | – | 1 | 0.0 | 0.0 | **0.0** |
"""

EXPECTED_CSV = """\
rank,method,kind,config,seeds,seed_list,a,b,average,a_std,b_std,average_std
1,individual,baseline,,1,0,1.0,1.0,1.0,,,
2,shift_test,method,,2,0 2,0.83,0.83,0.83,0.113137,0.113137,0.113137
3,simple_average,method,,2,0 2,0.75,0.75,0.75,0.0,0.0,0.0
4,task_arithmetic,method,scaling_factor=0.5,2,0 2,0.75,0.75,0.75,0.0,0.0,0.0
5,pretrained,baseline,,1,0,0.0,0.0,0.0,,,
"""

METHODS = ("--method", "task_arithmetic:scaling_factor=0.5", "--method", "simple_average", "--method", "shift_test")
SEEDS = ("--seed", "0", "--seed", "2")


def test_bench_stores_every_cell_and_writes_exact_markdown_csv_and_png(bench_pm, capsys, tmp_path):
    code, out, err = fuse(capsys, "tiny", *METHODS, *SEEDS, "--markdown", "lb.md", "--csv", "lb.csv", "--plot", "lb.png")
    assert code == 0, err
    assert (tmp_path / "lb.md").read_text() == EXPECTED_MD
    assert (tmp_path / "lb.csv").read_text() == EXPECTED_CSV
    png = (tmp_path / "lb.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "tiny leaderboard" in out and "6 run, 0 skipped, 0 failed" in err
    stored = rows()
    # 3 methods × 2 seeds × 2 tasks, + baselines once: pretrained (2 tasks) + individual (a on a, b on b)
    assert len(stored) == 16 and {r.status for r in stored} == {"ok"}
    assert sorted((r.label, r.seed) for r in stored if r.kind == "baseline") == [
        ("individual", 0), ("individual", 0), ("pretrained", 0), ("pretrained", 0)]
    shift = {(r.seed, r.task): r.value for r in stored if r.label == "shift_test"}
    assert shift[(0, "a")] == 0.75 and shift[(2, "b")] == pytest.approx(0.91, abs=1e-6)
    ta = next(r for r in stored if r.label == "task_arithmetic")
    assert ta.config_hash == config_hash({**ta.config, "seed": 0})
    assert ta.config["method"]["scaling_factor"] == 0.5 and ta.config["taskpool"] == {"name": "closeness_test", "split": "test"}
    assert ta.versions["fusion-core"] == fusion_core.__version__ and ta.versions["torch"] == torch.__version__
    assert set(ta.timings) >= {"setup", "method", "evaluate"} and ta.duration_s > 0 and ta.split == "test"
    assert ta.benchmark == "tiny" and ta.metric == "accuracy"


def test_rerun_skips_done_cells_and_force_reruns_them(bench_pm, capsys):
    fuse(capsys, "tiny", *METHODS, *SEEDS)
    assert Shift.calls == 2
    before = {(r.label, r.seed, r.task): r.created_at for r in rows()}
    ids = sqlite3.connect("runs/results.sqlite").execute("SELECT id FROM results ORDER BY id").fetchall()

    code, out, err = fuse(capsys, "tiny", *METHODS, *SEEDS, "--markdown", "again.md")
    assert code == 0 and Shift.calls == 2
    assert "0 run, 6 skipped, 0 failed" in err and err.count("done before, skipped") == 6
    assert open("again.md").read() == EXPECTED_MD  # the leaderboard comes from the database
    assert sqlite3.connect("runs/results.sqlite").execute("SELECT id FROM results ORDER BY id").fetchall() == ids

    code, _, err = fuse(capsys, "tiny", *METHODS, *SEEDS, "--force", "--markdown", "forced.md")
    assert code == 0 and Shift.calls == 4 and "6 run, 0 skipped, 0 failed" in err
    after = rows()
    assert len(after) == 16 and {(r.label, r.seed, r.task) for r in after} == set(before)
    new_ids = sqlite3.connect("runs/results.sqlite").execute("SELECT id FROM results ORDER BY id").fetchall()
    assert min(new_ids) > max(ids)  # every row was rewritten
    assert open("forced.md").read() == EXPECTED_MD


def test_default_methods_come_from_the_benchmark(bench_pm, capsys):
    code, _, err = fuse(capsys, "tiny")
    assert code == 0 and "2 run, 0 skipped, 0 failed" in err
    assert sorted({r.label for r in rows() if r.kind == "method"}) == ["simple_average", "task_arithmetic"]


def test_a_failing_cell_is_recorded_and_the_rest_continue(bench_pm, capsys):
    code, out, err = fuse(capsys, "tiny", "--method", "explode_test", "--method", "simple_average", "--csv", "lb.csv")
    assert code == 1
    assert "[1/2] explode_test seed 0: failed after" in err and "RuntimeError: boom" in err
    assert "1 run, 0 skipped, 1 failed" in err
    assert "failed: explode_test seed 0: RuntimeError: boom" in out  # listed under the leaderboard
    failed = rows(where="status = 'failed'")
    assert [(r.label, r.task, r.error) for r in failed] == [("explode_test", "", "RuntimeError: boom")]
    assert failed[0].versions["fusion-core"] == fusion_core.__version__
    board = open("lb.csv").read().splitlines()
    assert [line.split(",")[1] for line in board[1:]] == ["individual", "simple_average", "pretrained"]
    # a rerun retries the failed cell only
    code, _, err = fuse(capsys, "tiny", "--method", "explode_test", "--method", "simple_average")
    assert code == 1 and Explode.calls == 2 and "0 run, 1 skipped, 1 failed" in err
    assert len(rows(where="status = 'failed'")) == 1


def test_methods_file_and_method_fields(bench_pm, capsys, tmp_path):
    (tmp_path / "methods.yaml").write_text("- simple_average\n- task_arithmetic:scaling_factor=0.5\n- {name: shift_test, step: 0.2}\n")
    code, _, err = fuse(capsys, "tiny", "--methods-file", "methods.yaml", "--seed", "1")
    assert code == 0, err
    values = {(r.label, r.config_summary): r.value for r in rows() if r.kind == "method" and r.task == "a"}
    # shift with step 0.2, seed 1: w = 0.7 → 1 - 0.3² = 0.91
    assert values == {("simple_average", ""): 0.75, ("task_arithmetic", "scaling_factor=0.5"): 0.75,
                      ("shift_test", "step=0.2"): pytest.approx(0.91, abs=1e-6)}


def test_show_only_renders_the_stored_leaderboard_without_running(bench_pm, capsys):
    code, _, err = fuse(capsys, "tiny", "--show-only")
    assert code == 2 and err.strip().startswith("error: no results database at runs/results.sqlite")
    fuse(capsys, "tiny", *METHODS, *SEEDS)
    calls = Shift.calls
    code, out, err = fuse(capsys, "tiny", "--show-only", "--markdown", "shown.md")
    assert code == 0 and Shift.calls == calls and "skipped" not in err
    assert open("shown.md").read() == EXPECTED_MD


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("tiyn",), "error: unknown benchmark 'tiyn' (did you mean 'tiny'?); `fuse list benchmarks` shows them all"),
        (("tiny", "--method", "task_arithmetc"),
         "error: unknown method 'task_arithmetc' (did you mean 'task_arithmetic'?); `fuse list methods` shows them all"),
        (("tiny", "--method", "simple_average", "--method", "ties:densty=0.2"),
         "error: method 'ties': unknown field method.densty (did you mean 'density'?)"),
        (("tiny", "--method", "ties:density"),
         "error: malformed --method 'ties:density': 'density' is not key=value (e.g. ties:density=0.2)"),
    ],
)
def test_bad_names_fail_in_one_line_before_anything_runs(bench_pm, capsys, tmp_path, args, message):
    code, out, err = fuse(capsys, *args)
    assert code == 2 and err.strip() == message
    assert not (tmp_path / "runs").exists() and Shift.calls == 0


def test_database_of_another_schema_is_refused_before_running(bench_pm, capsys, tmp_path):
    open_db("old.sqlite").close()
    conn = sqlite3.connect("old.sqlite")
    conn.execute("UPDATE schema_version SET version = 7")
    conn.commit()
    conn.close()
    code, _, err = fuse(capsys, "tiny", "--method", "shift_test", "--db", "old.sqlite")
    assert code == 2 and Shift.calls == 0
    assert err.strip() == ("error: results database old.sqlite has schema version 7, newer than this fusion-core "
                           "understands (1); upgrade fusion-core, or pass --db with another path")


def test_unwritable_database_location_is_one_line(bench_pm, capsys, tmp_path):
    (tmp_path / "afile").write_text("")
    code, _, err = fuse(capsys, "tiny", "--method", "shift_test", "--db", "afile/results.sqlite")
    assert code == 2 and Shift.calls == 0
    assert err.strip() == ("error: cannot create results database afile/results.sqlite: afile is not a folder; "
                           "choose another location with --db PATH")


def test_two_bench_runs_on_one_database_at_once_lose_no_rows(bench_pm, tmp_path):
    from fusion_lab.cli.bench import plan_bench, run_bench

    from fusion_core.registry import build_registry

    registry = build_registry(bench_pm)
    plans = [plan_bench(registry, "tiny", [{"name": "shift_test", "step": step}], seeds=range(4)) for step in (0.01, 0.02)]
    open_db("shared.sqlite").close()
    outcomes = {}

    def bench(i):
        with open_db("shared.sqlite") as db:
            outcomes[i] = run_bench(plans[i], db, registry=registry, plugin_manager=bench_pm)

    threads = [threading.Thread(target=bench, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [o.status for i in (0, 1) for o in outcomes[i]] == ["ok"] * 8
    stored = rows("shared.sqlite", "kind = 'method'")
    assert len(stored) == 2 * 4 * 2
    assert {(r.config_summary, r.seed) for r in stored} == {(f"step={s}", seed) for s in (0.01, 0.02) for seed in range(4)}
    # both runs may have evaluated the baselines; the cell is kept once
    assert len(rows("shared.sqlite", "kind = 'baseline'")) == 4


def test_progress_reads_in_percent_with_an_estimate_and_piped_leaderboard_is_records(bench_pm, capsys):
    code, out, err = fuse(capsys, "tiny", "--method", "simple_average", *SEEDS)
    assert code == 0, err
    lines = [line for line in err.splitlines() if line]
    assert lines[0] == "bench tiny: 2 cells, 2 to run, 0 done before (results: runs/results.sqlite)"
    # simple average of a and b: w = [0.5, 0.5] → accuracy 1 - 0.25 = 75.0 % on both tasks
    assert lines[1].startswith("[1/2] simple_average seed 0: average 75.0 %, ")
    assert "s; about " in lines[1] and lines[1].endswith("s left (1 more × " + lines[1].split("× ")[1])
    assert lines[2].startswith("[2/2] simple_average seed 2: average 75.0 %, ") and "left" not in lines[2]
    out_lines = out.splitlines()
    assert out_lines[0] == "tiny leaderboard — accuracy (%)"
    assert out_lines[1] == "#\tmethod\tconfig\tseeds\ta\tb\taverage"
    assert out_lines[2] == "1\tindividual\t–\t1\t100.0\t100.0\t100.0"
    assert out_lines[3] == "2\tsimple_average\t–\t2\t75.0 ± 0.0\t75.0 ± 0.0\t75.0 ± 0.0"


def test_leaderboard_at_80_columns_leaves_out_every_task_column_together():
    import io

    from fusion_lab.leaderboard import Leaderboard as Board
    from fusion_lab.leaderboard import LeaderboardRow, Stat, render_rich
    from rich.console import Console

    tasks = ("rt_sentiment", "rt_subjectivity", "debate_party", "convention_party", "chatter_topic", "language_id")
    row = LeaderboardRow(label="task_arithmetic", kind="method", config="scaling_factor=0.3", seeds=(0, 1, 2),
                         tasks={t: Stat(0.7, 0.01, 3) for t in tasks}, average=Stat(0.725, 0.004, 3))
    board = Board(title="mini leaderboard", metric="accuracy", tasks=tasks, rows=(row,))
    buf = io.StringIO()
    render_rich(board, Console(file=buf, width=80, force_terminal=True, color_system=None), fmt="table")
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "task_arithmetic" in text and "scaling_factor=0.3" in text and "72.5 ± 0.4" in text
    assert not any(t[:6] in text for t in tasks)  # no task column, not even cut to "rt_…"
    assert "per-task columns left out at 80 columns" in text
    wide = io.StringIO()
    render_rich(board, Console(file=wide, width=200, force_terminal=True, color_system=None), fmt="table")
    assert "rt_sentiment" in wide.getvalue() and "left out" not in wide.getvalue()


def test_a_damaged_database_is_one_line(bench_pm, capsys):
    fuse(capsys, "tiny", *METHODS, *SEEDS)
    with open("runs/results.sqlite", "r+b") as fh:  # scribble over every page but the first (the schema)
        size = fh.seek(0, 2)
        fh.seek(4096)
        fh.write(b"\xa5" * (size - 4096))
    for args in (("--show-only",), ("--method", "simple_average", "--force")):
        code, out, err = fuse(capsys, "tiny", *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith("error: results database runs/results.sqlite is damaged (") and lines[0].endswith(
            "); move it aside (mv runs/results.sqlite runs/results.sqlite.damaged) and rerun to start a new database, "
            "or pass --db with another path")


def test_show_only_reads_a_read_only_database(bench_pm, capsys, tmp_path):
    """A database in a folder nobody may write (no -shm file can be created) is still shown."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    fuse(capsys, "tiny", *METHODS, *SEEDS)
    folder = tempfile.mkdtemp(prefix="fuse-ro-", dir="/tmp")
    try:
        shutil.copy("runs/results.sqlite", folder)
        os.chmod(os.path.join(folder, "results.sqlite"), 0o444)
        os.chmod(folder, 0o555)
        script = ("from fusion_lab.results_db import open_db; "
                  f"print(len(open_db({os.path.join(folder, 'results.sqlite')!r}, readonly=True).rows()))")
        command = [sys.executable, "-c", script]
        if os.geteuid() == 0:  # root may write anywhere: read as nobody so the permissions bite
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv: cannot drop privileges")
            command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
        out = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == "16", out.stderr
        assert sorted(os.listdir(folder)) == ["results.sqlite"]  # nothing written beside it
    finally:
        os.chmod(folder, 0o755)
        shutil.rmtree(folder)


GET_PLUGIN_MANAGER = fusion_core.plugins.get_plugin_manager  # before any fixture replaces it


class ParallelBenchPlugin:
    """The ``tiny`` benchmark with paths relative to the working directory, registered as a class so that
    worker processes can re-import it."""

    @fusion_core.hookimpl
    def fusion_register_methods(register):  # noqa: N805 - a plugin namespace, not an instance
        register(Shift)
        register(Explode)

    @fusion_core.hookimpl
    def fusion_register_task_pools(register):  # noqa: N805
        register(Closeness)

    @fusion_core.hookimpl
    def fusion_register_benchmarks(register):  # noqa: N805
        register("tiny", summary="Two 2-d models.", taskpool={"name": "closeness_test"},
                 modelpool={"name": "files", "base": "base.safetensors",
                            "models": {"a": "a.safetensors", "b": "b.safetensors"}},
                 methods=[{"name": "task_arithmetic", "scaling_factor": 0.5}, "simple_average"])


def test_jobs_run_cells_in_worker_processes_with_the_same_results(bench_pm, capsys, tmp_path, monkeypatch):
    import fusion_lab.plugin
    import fusion_merging.plugin

    pm = GET_PLUGIN_MANAGER(load_entrypoints=False, extra_plugins=[
        ("lab", fusion_lab.plugin), ("merging", fusion_merging.plugin), ("bench-test", ParallelBenchPlugin)])
    monkeypatch.setattr(fusion_core.plugins, "get_plugin_manager", lambda **kw: pm)
    code, out, err = fuse(capsys, "tiny", *METHODS, *SEEDS, "--jobs", "2", "--markdown", "lb.md")
    assert code == 0, err
    assert (tmp_path / "lb.md").read_text() == EXPECTED_MD
    assert "6 run, 0 skipped, 0 failed" in err and Shift.calls == 0  # every cell ran in a worker
    stored = rows()
    assert len(stored) == 16 and {r.status for r in stored} == {"ok"}
    code, _, err = fuse(capsys, "tiny", *METHODS, *SEEDS, "--jobs", "2")
    assert code == 0 and "0 run, 6 skipped, 0 failed" in err  # the same skip logic as in-process


def test_set_changes_the_pools_of_every_cell_and_refuses_the_method(bench_pm, capsys):
    code, _, err = fuse(capsys, "tiny", "--method", "simple_average")
    assert code == 0, err
    # fields of both pools, neither named: both come from the benchmark, with these fields on top
    code, out, err = fuse(capsys, "tiny", "--method", "simple_average", "--set", "taskpool.split=val", "--set", "modelpool.allow_pickle=true")
    assert code == 0, err
    assert "1 cells, 1 to run" in err  # another pools configuration: nothing is reused
    stored = [r for r in rows() if r.label == "simple_average"]
    # w = (0.5, 0.5): 1 − (0.5 − 1)² = 0.75 against the test target, 1 − 0 = 1.0 against the val target
    assert sorted((r.split, r.value) for r in stored if r.task == "a") == [("test", 0.75), ("val", 1.0)]
    assert len({r.pools_hash for r in stored}) == 2
    code, _, err = fuse(capsys, "tiny", "--set", "method.scaling_factor=0.3")
    assert code == 2 and "--set cannot set the method" in err


def test_bench_seeds_limit_a_method_to_some_seeds(bench_pm, capsys, tmp_path):
    (tmp_path / "methods.yaml").write_text("- shift_test\n- simple_average:bench_seeds=[0]\n- {name: task_arithmetic, bench_seeds: 2}\n")
    code, out, err = fuse(capsys, "tiny", "--methods-file", "methods.yaml", *SEEDS, "--csv", "lb.csv")
    assert code == 0, err
    assert "4 cells, 4 to run" in err
    assert sorted({(r.label, r.seed) for r in rows() if r.kind == "method"}) == [
        ("shift_test", 0), ("shift_test", 2), ("simple_average", 0), ("task_arithmetic", 2)]
    seeds = {line.split(",")[1]: line.split(",")[4] for line in (tmp_path / "lb.csv").read_text().splitlines()[1:]}
    assert seeds == {"individual": "1", "shift_test": "2", "simple_average": "1", "task_arithmetic": "1", "pretrained": "1"}
    code, _, err = fuse(capsys, "tiny", "--method", "simple_average:bench_seeds=zero")
    assert code == 2 and "bench_seeds must be a seed or a list of seeds" in err


def test_a_cell_stored_meanwhile_by_another_run_is_not_repeated(bench_pm):
    from fusion_lab.cli.bench import plan_bench, run_bench

    from fusion_core.registry import build_registry

    registry = build_registry(bench_pm)
    plan = plan_bench(registry, "tiny", [{"name": "shift_test"}], seeds=[0, 1])
    other = plan_bench(registry, "tiny", [{"name": "shift_test"}], seeds=[1])

    def meanwhile(i, total, outcome):  # after the first cell, another run on the database stores the second
        if i == 1:
            with open_db("runs/results.sqlite") as db2:
                run_bench(other, db2, registry=registry, plugin_manager=bench_pm)

    with open_db("runs/results.sqlite") as db:
        outcomes = run_bench(plan, db, registry=registry, plugin_manager=bench_pm, on_cell=meanwhile)
    assert [(o.cell.seed, o.status) for o in outcomes] == [(0, "ok"), (1, "skipped")]
    assert Shift.calls == 2  # seed 0 here, seed 1 in the other run: none twice
