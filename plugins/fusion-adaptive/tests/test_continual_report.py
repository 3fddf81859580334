"""fuse continual: per-step records of continual runs, the plot, and one-line errors."""

from __future__ import annotations

import json

import pytest
from fusion_adaptive.continual import ContinualTaskArithmetic, ContinualWeightAverage

from fusion_core.cli.main import main
from fusion_core.output import plain_data


def report_of(method_cls, world, path):
    ctx = world.ctx()
    method_cls(method_cls.Config(shuffle=False)).run(world.pool(), ctx)
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
