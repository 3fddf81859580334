"""``fuse sweep``: grid syntax, validation before any run, selection on validation, resumability, executors.

The sweep runs fusion-merging's task_arithmetic on tiny safetensors files: base w = [0, 0],
models a = [1, 0] and b = [0, 1], so the merged model is λ·[1, 1].  The test task pool scores
task i as ``1 - (w[i] - target)^2`` with target 0.5 on the validation split and 1.0 on test, so
λ = 0.5 wins on validation (score 1.0, runner-up λ = 0.1 at 0.84) although λ = 1.0 would win on
test: a sweep that peeked at the test split would pick another point.
"""

from __future__ import annotations

import json
import sqlite3
from typing import ClassVar, Literal

import attrs
import fusion_lab.plugin
import pytest
import torch
from fusion_lab.executors import LocalConfig, LocalExecutor
from fusion_lab.results_db import open_db
from fusion_lab.sweep import expand, load_points, parse_axis, parse_range, plan_sweep, run_sweep

import fusion_core
import fusion_core.plugins
from fusion_core.cli.main import main
from fusion_core.components import TaskPool
from fusion_core.config import option
from fusion_core.errors import ConfigError
from fusion_core.registry import build_registry

TARGETS = {"val": 0.5, "test": 1.0}


@attrs.frozen
class ClosenessConfig:
    split: Literal["val", "test"] = option("test", help="Evaluation split: val (target 0.5) or test (target 1.0).")
    fail_on: float | None = option(None, help="Raise when asked to score w == [fail_on, fail_on] (a failing point).")


class Closeness(TaskPool):
    name = "closeness_sweep"
    summary = "Accuracy 1 - (w[i] - target)^2 per task; the target depends on the split."
    Config = ClosenessConfig
    evaluated: ClassVar[list] = []  # (split, w[0]) of every evaluation in this process

    @property
    def task_names(self):
        return ["a", "b"]

    def evaluate(self, model, *, tasks=None, ctx=None):
        w = model["w"]
        type(self).evaluated.append((self.config.split, round(float(w[0]), 6)))
        if self.config.fail_on is not None and all(abs(float(v) - self.config.fail_on) < 1e-6 for v in w):
            raise RuntimeError(f"cannot score w={self.config.fail_on}")
        target = TARGETS[self.config.split]
        return {t: {"accuracy": 1.0 - (float(w[i]) - target) ** 2} for i, t in enumerate(self.task_names)
                if tasks is None or t in tasks}


class SweepPlugin:
    """Registered as a class so worker processes can re-import it."""

    @fusion_core.hookimpl
    def fusion_register_task_pools(register):  # noqa: N805 - a plugin namespace, not an instance
        register(Closeness)


def make_pm():
    import fusion_merging.plugin

    return fusion_core.plugins.get_plugin_manager(
        load_entrypoints=False, extra_plugins=[("lab", fusion_lab.plugin), ("merging", fusion_merging.plugin), ("sweep-test", SweepPlugin)])


@pytest.fixture
def exp(tmp_path, write_safetensors, monkeypatch):
    """A config file (paths relative to the working directory, which is tmp_path)."""
    monkeypatch.chdir(tmp_path)
    write_safetensors(tmp_path / "base.safetensors", {"w": torch.zeros(2)})
    write_safetensors(tmp_path / "a.safetensors", {"w": torch.tensor([1.0, 0.0])})
    write_safetensors(tmp_path / "b.safetensors", {"w": torch.tensor([0.0, 1.0])})
    (tmp_path / "exp.yaml").write_text(
        "method: task_arithmetic\n"
        "modelpool: {name: files, base: base.safetensors, models: {a: a.safetensors, b: b.safetensors}}\n"
        "taskpool: closeness_sweep\nthreads: 1\n")
    Closeness.evaluated.clear()
    return "exp.yaml"


@pytest.fixture
def cli_pm(monkeypatch):
    pm = make_pm()
    monkeypatch.setattr(fusion_core.plugins, "get_plugin_manager", lambda **kw: pm)
    return pm


def sweep(pm, sources, args, db, *, jobs=1, **kwargs):
    registry = build_registry(pm)
    plan = plan_sweep(registry, sources, args, **kwargs)
    with open_db(db) as handle:
        return run_sweep(plan, handle, LocalExecutor(LocalConfig(jobs=jobs)), registry=registry, plugin_manager=pm)


LAMBDAS = ["method.scaling_factor=0.1,0.5,1.0"]


# --------------------------------------------------------------------------- grid syntax


def test_axis_items_are_typed_like_yaml():
    assert parse_axis("method.x=0.1,abc,[1, 2],'3',null,true,{a: 1, b: 2}") == (
        "method.x", [0.1, "abc", [1, 2], "3", None, True, {"a": 1, "b": 2}])
    assert parse_axis("seed=0,range(1,4)") == ("seed", [0, 1, 2, 3])
    with pytest.raises(ConfigError, match=r"malformed override 'method\.=0': empty key segment"):
        parse_axis("method.=1,2")


def test_range_excludes_stop_and_is_exact_in_decimal():
    assert parse_range("range(0.1, 0.5, 0.1)", "k") == [0.1, 0.2, 0.3, 0.4]
    assert parse_range("range(0, 1, 0.3)", "k") == [0.0, 0.3, 0.6, 0.9]
    assert parse_range("range(0,10,3)", "k") == [0, 3, 6, 9] and all(type(v) is int for v in parse_range("range(0,10,3)", "k"))
    assert parse_range("range(1, 0, -0.25)", "k") == [1.0, 0.75, 0.5, 0.25]
    assert parse_range("range(1e-3, 3e-3, 1e-3)", "k") == [0.001, 0.002]
    assert parse_range("range(1, 1, 1)", "k") == []
    with pytest.raises(ConfigError, match=r"k: range step is 0 in 'range\(0, 1, 0\)'"):
        parse_range("range(0, 1, 0)", "k")
    with pytest.raises(ConfigError, match="malformed range 'range\\(a, 1, 1\\)'"):
        parse_range("range(a, 1, 1)", "k")


def test_grid_is_a_product_crossed_with_explicit_points(tmp_path):
    points = expand([("a", [1, 2]), ("b", ["x", "y"])])
    assert [p.as_dict() for p in points] == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    assert points[1].label == "a=1, b=y" and [p.index for p in points] == [0, 1, 2, 3]
    (tmp_path / "points.yaml").write_text("- {method: ties, method.density: 0.2}\n- method: {name: dare, density: 0.5}\n")
    explicit = load_points(str(tmp_path / "points.yaml"))
    assert explicit == [{"method": "ties", "method.density": 0.2}, {"method.name": "dare", "method.density": 0.5}]
    crossed = expand([("seed", [0, 1])], explicit)
    assert [p.label for p in crossed] == ["method=ties, method.density=0.2, seed=0", "method=ties, method.density=0.2, seed=1",
                                          "method.name=dare, method.density=0.5, seed=0", "method.name=dare, method.density=0.5, seed=1"]
    with pytest.raises(ConfigError, match="key 'seed' is set both by a point of the points file and by a grid axis"):
        expand([("seed", [0])], [{"seed": 1}])
    with pytest.raises(ConfigError, match="empty grid: axis 'a' has no values"):
        expand([("a", [])])
    (tmp_path / "none.yaml").write_text("[]\n")
    with pytest.raises(ConfigError, match="empty grid: the points file lists no points"):
        expand([], load_points(str(tmp_path / "none.yaml")))


# --------------------------------------------------------------------------- selection


def test_selection_uses_validation_and_only_the_winner_sees_test(exp, tmp_path):
    report = sweep(make_pm(), [exp], LAMBDAS, "r.sqlite")
    assert [(p["label"], p["status"]) for p in report["points"]] == [
        ("method.scaling_factor=0.1", "ok"), ("method.scaling_factor=0.5", "ok"), ("method.scaling_factor=1.0", "ok")]
    scores = [p["score"] for p in report["points"]]
    assert scores == pytest.approx([1 - 0.4**2, 1.0, 1 - 0.5**2], abs=1e-6)
    assert report["winner"]["index"] == 2 and report["winner"]["overrides"] == {"method.scaling_factor": 0.5}
    assert report["runner_up"]["index"] == 1 and report["margin"] == pytest.approx(0.16, abs=1e-6)
    assert report["selection"] == {"split": "val", "final_split": "test", "metric": "accuracy", "mode": "max",
                                   "honest": True, "note": "selected on the 'val' split; the final score is on 'test'"}
    assert report["why"].startswith("point 2 (method.scaling_factor=0.5) has the highest mean accuracy on the val split: 100.0 %, 16.0 points")
    final = report["final"]
    assert final["status"] == "ok" and final["split"] == "test" and not final["reused_selection_run"]
    assert final["results"]["merged"] == {"a": {"accuracy": 0.75}, "b": {"accuracy": 0.75}}
    assert final["averages"] == {"merged": 0.75, "pretrained": 0.0, "individual": 1.0}
    # the test split was read only for the winner (w = 0.5) and the baselines (0 = base, 1 = model a, 0 = model b)
    assert sorted(w for split, w in Closeness.evaluated if split == "test") == [0.0, 0.0, 0.5, 1.0]
    assert sorted(w for split, w in Closeness.evaluated if split == "val") == [0.1, 0.5, 1.0]
    conn = sqlite3.connect("r.sqlite")
    assert conn.execute("SELECT split, label, COUNT(*) FROM results GROUP BY split, label ORDER BY split, label").fetchall() == [
        ("test", "individual", 2), ("test", "pretrained", 2), ("test", "task_arithmetic", 2), ("val", "task_arithmetic", 6)]
    assert {r[0] for r in conn.execute("SELECT DISTINCT sweep FROM results")} == {report["sweep"]}


def test_without_a_split_field_selection_is_refused_unless_asked_on_test(exp):
    args = [*LAMBDAS, "taskpool=weight_stats"]
    with pytest.raises(ConfigError) as info:
        sweep(make_pm(), [exp], args, "r.sqlite")
    assert str(info.value) == (
        "task pool 'weight_stats' has no 'split' field, so points cannot be selected on a validation split; use a task "
        "pool with a split field, or pass --select-on test to select on the test split (the report says so)")
    report = sweep(make_pm(), [exp], args, "r.sqlite", select_on="test", minimize=True)
    # weight_stats' metric is the L2 norm of λ·[1, 1] = λ·√2: the smallest λ wins when minimizing
    assert report["winner"]["index"] == 1 and report["winner"]["score"] == pytest.approx(0.1 * 2**0.5, rel=1e-6)
    assert report["selection"]["honest"] is False and report["selection"]["metric"] == "l2_norm"
    assert "selected on the TEST split (explicitly requested with --select-on test)" in report["selection"]["note"]
    assert report["final"]["reused_selection_run"] is True and report["final"]["results"]["merged"]["weights"]["l2_norm"] == \
        pytest.approx(0.1 * 2**0.5, rel=1e-6)


# --------------------------------------------------------------------------- validation before any run


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["method.scaling_factr=0.1,0.5"],
         "unknown key 'method.scaling_factr' in the grid: method 'task_arithmetic' has no field 'scaling_factr' "
         "(did you mean 'scaling_factor'?)"),
        (["metod.scaling_factor=0.1,0.5"], "unknown key 'metod.scaling_factor' in the grid (did you mean 'method'?)"),
        ([], "empty grid: give axes like key=a,b,c or key=range(start, stop, step), or --points FILE.yaml"),
        (["method.scaling_factor=range(1,1,0.1)"], "empty grid: axis 'method.scaling_factor' has no values"),
        (["taskpool.split=val,test"], "taskpool.split is set by the sweep itself (validation split to select, test split "
                                      "for the final evaluation); remove it from the grid"),
        (["method.weights=[1,-1]", "method.normalize=false,true"],
         "point 2 (method.normalize=true): method: task_arithmetic: weights [1.0, -1.0] sum to 0, so normalize=true "
         "cannot divide by the sum; change the weights or set normalize=false"),
        (["method.scaling_factor=0.5,fast"],
         "point 2 (method.scaling_factor=fast): method.scaling_factor: expected float, got 'fast' (str)"),
    ],
)
def test_bad_grids_fail_in_one_line_before_any_run(exp, cli_pm, capsys, tmp_path, args, message):
    code = main(["sweep", exp, *args])
    _, err = capsys.readouterr()
    assert code == 2 and err.strip() == f"error: {message}"
    assert Closeness.evaluated == [] and not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- CLI, resuming, failures


def test_cli_sweep_writes_its_report_and_a_rerun_resumes(exp, cli_pm, capsys, tmp_path):
    code = main(["sweep", exp, *LAMBDAS, "--report", "sweep.json", "--db", "r.sqlite"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert report["winner"]["label"] == "method.scaling_factor=0.5" and report["db"] == "r.sqlite"
    assert "winner: point 2 (method.scaling_factor=0.5)" in " ".join(out.split())
    # scores in percent with one decimal: λ = 0.1, 0.5, 1.0 score 1 - 0.4², 1, 1 - 0.5² on val
    assert "mean accuracy (%)" in out and all(f" {s} │" in out for s in ("84.0", "100.0", "75.0"))
    assert err.count(": done") == 3
    evaluations = len(Closeness.evaluated)
    code = main(["sweep", exp, *LAMBDAS, "--report", "again.json", "--db", "r.sqlite"])
    out, err = capsys.readouterr()
    assert code == 0 and err.count("finished before, skipped") == 3 and len(Closeness.evaluated) == evaluations
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["points"] == report["points"] and again["final"] == report["final"]


def test_a_failing_point_is_recorded_and_the_rest_continue(exp, cli_pm, capsys, tmp_path):
    code = main(["sweep", exp, *LAMBDAS, "taskpool.fail_on=1.0", "--report", "sweep.json"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "point 3 (method.scaling_factor=1.0): failed: RuntimeError: cannot score w=1.0" in err
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert report["counts"] == {"points": 3, "ok": 2, "failed": 1}
    assert report["points"][2]["error"] == "RuntimeError: cannot score w=1.0" and report["winner"]["index"] == 2
    conn = sqlite3.connect("runs/results.sqlite")
    assert conn.execute("SELECT status, error FROM results WHERE status = 'failed'").fetchall() == [
        ("failed", "RuntimeError: cannot score w=1.0")]
    Closeness.evaluated.clear()
    code = main(["sweep", exp, *LAMBDAS, "taskpool.fail_on=1.0"])
    _, err = capsys.readouterr()
    assert code == 1 and err.count("finished before, skipped") == 2
    assert Closeness.evaluated == [("val", 1.0)]  # only the failed point was retried


def test_an_interrupted_sweep_keeps_finished_points(exp, monkeypatch):
    original = Closeness.evaluate
    calls = []

    def interrupt_second(self, model, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, model, **kw)

    monkeypatch.setattr(Closeness, "evaluate", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        sweep(make_pm(), [exp], LAMBDAS, "r.sqlite")
    with open_db("r.sqlite") as db:
        stored = db.rows()
    assert [(r.config["method"]["scaling_factor"], r.task) for r in stored] == [(0.1, "a"), (0.1, "b")]
    monkeypatch.setattr(Closeness, "evaluate", original)
    Closeness.evaluated.clear()
    report = sweep(make_pm(), [exp], LAMBDAS, "r.sqlite")
    assert report["winner"]["index"] == 2
    assert sorted(w for split, w in Closeness.evaluated if split == "val") == [0.5, 1.0]  # 0.1 was not rerun


def test_worker_processes_give_the_same_results_as_in_process(exp):
    sequential = sweep(make_pm(), [exp], LAMBDAS, "seq.sqlite")
    parallel = sweep(make_pm(), [exp], LAMBDAS, "par.sqlite", jobs=2)
    assert parallel["points"] == sequential["points"] and parallel["final"] == sequential["final"]
    assert parallel["winner"] == sequential["winner"] and parallel["margin"] == sequential["margin"]
    # only the sequential sweep evaluated in this process: the parallel one ran in worker processes
    assert sorted(w for split, w in Closeness.evaluated if split == "val") == [0.1, 0.5, 1.0]
    rows = sqlite3.connect("par.sqlite").execute("SELECT label, task, value FROM results ORDER BY label, task, value").fetchall()
    assert rows == sqlite3.connect("seq.sqlite").execute("SELECT label, task, value FROM results ORDER BY label, task, value").fetchall()


def test_plugins_registered_as_objects_cannot_go_to_worker_processes(exp):
    class Inline:
        @fusion_core.hookimpl
        def fusion_register_methods(self, register):
            pass

    pm = fusion_core.plugins.get_plugin_manager(
        load_entrypoints=False, extra_plugins=[("lab", fusion_lab.plugin), ("merging", __import__("fusion_merging.plugin").plugin),
                                               ("sweep-test", SweepPlugin), ("inline", Inline())])
    with pytest.raises(ConfigError, match=r"plugin 'inline' was registered as an object \(Inline\); workers in other processes"):
        sweep(pm, [exp], LAMBDAS, "r.sqlite", jobs=2)


def test_points_file_gives_the_points(exp, cli_pm, capsys, tmp_path):
    (tmp_path / "points.yaml").write_text("- method.scaling_factor: 0.1\n- {method: {scaling_factor: 0.5}}\n")
    code = main(["sweep", exp, "--points", "points.yaml", "--report", "sweep.json"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert [p["label"] for p in report["points"]] == ["method.scaling_factor=0.1", "method.scaling_factor=0.5"]
    assert report["winner"]["index"] == 2 and report["grid"] == {}
