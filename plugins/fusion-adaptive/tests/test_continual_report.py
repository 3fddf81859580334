"""fuse continual: per-step records of continual runs, the plot, and one-line errors."""

from __future__ import annotations

import json

import pytest
from fusion_adaptive.continual import ContinualTaskArithmetic, ContinualWeightAverage

from fusion_core.cli.main import main
from fusion_core.output import plain_data


def report_of(method_cls, world, path, **config):
    ctx = world.ctx()
    method_cls(method_cls.Config(**{"shuffle": False, **config})).run(world.pool(), ctx)
    report = {"config": {"method": {"name": method_cls.name}}, "primary_metric": "accuracy", "method_extras": plain_data(ctx.extras)}
    path.write_text(json.dumps(report))
    return report


def test_records_one_row_per_step_with_the_tasks_seen(world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ta = report_of(ContinualTaskArithmetic, world, tmp_path / "ta.json")
    report_of(ContinualWeightAverage, world, tmp_path / "wa.json")
    assert main(["continual", "ta.json", "wa.json", "--format", "plain"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == ["run", "step", "model", "average", "alpha", "beta", "gamma"]
    assert [row[:3] for row in lines[1:]] == [[m, str(s), t] for m in ("continual_task_arithmetic", "continual_weight_average")
                                              for s, t in zip((1, 2, 3), ("alpha", "beta", "gamma"), strict=True)]
    steps = ta["method_extras"]["continual_task_arithmetic"]["steps"]
    assert lines[1][4:] == [f"{100 * steps[0]['results']['alpha']['accuracy']:.1f}", "", ""]  # step 1: only alpha was scored
    assert lines[3][3] == f"{100 * steps[2]['average']:.1f}"
    pytest.importorskip("matplotlib")
    assert main(["continual", "ta.json", "wa.json", "--png", "steps.png", "--format", "json"]) == 0
    assert (tmp_path / "steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(json.loads(capsys.readouterr().out)) == ["continual_task_arithmetic", "continual_weight_average"]
    assert main(["continual", "ta.json", "--png", "steps.png"]) == 2  # an existing output is never replaced


def test_a_report_without_steps_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "plain.json"
    path.write_text(json.dumps({"config": {"method": {"name": "ties"}}, "method_extras": {}}))
    assert main(["continual", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no per-step results" in err[0] and "continual_ties" in err[0]
    assert main(["continual", str(tmp_path / "missing.json")]) == 2


def test_mean_averages_the_runs_of_each_method_step_by_step(world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reports = [report_of(ContinualTaskArithmetic, world, tmp_path / f"ta{s}.json", shuffle=True, order_seed=s) for s in (0, 1, 2)]
    report_of(ContinualWeightAverage, world, tmp_path / "wa.json")
    assert main(["continual", "ta0.json", "ta1.json", "ta2.json", "wa.json", "--mean", "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert list(shown) == ["continual_task_arithmetic", "continual_weight_average"]
    for index, row in enumerate(shown["continual_task_arithmetic"]):
        values = [r["method_extras"]["continual_task_arithmetic"]["steps"][index]["average"] for r in reports]
        mean = sum(values) / 3
        assert row["orders"] == 3 and row["step"] == index + 1 and row["average"] == pytest.approx(mean)
        assert row["std"] == pytest.approx((sum((v - mean) ** 2 for v in values) / 3) ** 0.5)
    assert shown["continual_weight_average"][0]["orders"] == 1 and shown["continual_weight_average"][0]["std"] == 0.0
    pytest.importorskip("matplotlib")
    assert main(["continual", "ta0.json", "ta1.json", "--mean", "--png", "mean.png", "--format", "plain"]) == 0
    assert (tmp_path / "mean.png").read_bytes()[:4] == b"\x89PNG"
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("\t") == ["method", "step", "average", "std", "orders"] and len(lines) == 4
