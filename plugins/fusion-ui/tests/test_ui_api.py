"""fuse ui's server: the catalog, composing and validating with the core's own messages, the dry run,
the results endpoints, and the request guard (Host / Origin)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from fusion_core.cli.main import main
from fusion_core.config import make_config
from fusion_core.errors import ConfigError
from fusion_core.runconfig import load_run_config

TIES_ON_MINI = {"mode": "benchmark", "benchmark": "mini", "method": "ties", "values": {"method": {"density": "0.3"}}}


def test_plugin_is_installed(capsys):
    assert main(["plugins", "--json"]) == 0
    row = next(r for r in json.loads(capsys.readouterr().out) if r["name"] == "ui")
    assert (row["distribution"], row["status"], row["hooks"]) == ("fusion-ui", "ok", ["fusion_register_commands"])


def test_help_imports_neither_torch_nor_the_web_stack():
    code = ("import sys; from fusion_core.cli.main import main; main(['--help']); main(['ui', '--help']); "
            "print(sorted(m for m in ('torch', 'starlette', 'uvicorn', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert "--db PATH" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_catalog_groups_components_by_plugin_with_typed_fields(client):
    catalog = client.get("/api/catalog").json()
    methods = {item["name"]: (group["plugin"], item) for group in catalog["sections"]["method"] for item in group["items"]}
    plugin, ties = methods["ties"]
    assert plugin == "merging" and ties["data_free"] is True
    assert ties["fusionbench_config"] == "ties_merging.yaml" and methods["example_median"][1]["fusionbench_config"] is None
    density = next(f for f in ties["fields"] if f["name"] == "density")
    # unset (an empty input, left out of the command): the convention fills it; the page shows its value
    assert (density["default"], density["widget"], density["required"]) == ("", "text", False)
    assert density["default_by"] == {
        "field": "convention", "values": {"fusionbench": "0.2", "mergekit": "1.0", "paper": "0.2"}, "cases": [],
        "value": "0.2", "text": "0.2 (convention fusionbench; mergekit: 1.0, paper: 0.2)"}
    trim = next(f for f in ties["fields"] if f["name"] == "trim")
    assert (trim["widget"], trim["choices"], trim["default"]) == ("choice", ["model", "tensor"], "")
    assert trim["default_by"]["text"] == "model (convention fusionbench; mergekit: tensor, paper: tensor)"
    convention = next(f for f in ties["fields"] if f["name"] == "convention")
    assert (convention["default"], convention["default_by"]) == ("fusionbench", None)
    dare_scaling = next(f for f in methods["dare"][1]["fields"] if f["name"] == "scaling_factor")
    assert dare_scaling["default_by"]["cases"] == [{"choice": "fusionbench", "when": "variant", "equals": "ties", "value": "0.5"}]
    assert "fraction of each task vector" in density["help"]
    # the template's method, a third-party plugin, shows with its field
    plugin, template = methods["example_median"]
    assert plugin == "example" and [f["name"] for f in template["fields"]] == ["use_base"]
    assert template["fields"][0]["widget"] == "bool" and template["fields"][0]["default"] == "false"
    assert "mini" in [b["name"] for b in catalog["benchmarks"]]
    compute = next(f for f in catalog["settings"] if f["name"] == "compute_dtype")
    assert compute["widget"] == "choice" and compute["choices"] == ["float32", "float64", "bfloat16", "float16"]


def test_compose_gives_the_command_yaml_and_merge_the_core_accepts(client, registry_and_pm):
    data = client.post("/api/compose", json=TIES_ON_MINI).json()
    assert data["ok"], data
    assert data["command"] == "fuse run benchmark=mini method=ties method.density=0.3"
    assert yaml.safe_load(data["yaml"]) == {"benchmark": "mini", "method": {"name": "ties", "density": 0.3}}
    registry, _ = registry_and_pm
    expected = load_run_config([], ["benchmark=mini", "method=ties", "method.density=0.3"], registry=registry).to_dict()
    assert yaml.safe_load(data["resolved"]) == expected
    assert data["merge"] == "fuse merge ties --base BASE --model MODEL_A --model MODEL_B --set density=0.3 --output merged/"
    # a value typed back to its default drops out of the command
    same = client.post("/api/compose", json={**TIES_ON_MINI, "values": {"method": {"density": " null "}}}).json()
    assert same["command"] == "fuse run benchmark=mini method=ties"
    # the page as it loads: convention-filled fields empty, the convention at its default; another convention alone
    fields = {"convention": "fusionbench", "trim": "", "density": "", "scaling_factor": "", "sign_election": "", "divisor": ""}
    unchanged = client.post("/api/compose", json={**TIES_ON_MINI, "values": {"method": fields}}).json()
    assert unchanged["ok"] and unchanged["command"] == "fuse run benchmark=mini method=ties"
    mergekit = client.post("/api/compose", json={**TIES_ON_MINI, "values": {"method": {**fields, "convention": "mergekit"}}}).json()
    assert mergekit["command"] == "fuse run benchmark=mini method=ties method.convention=mergekit"
    assert "density: 1.0" in mergekit["resolved"] and "divisor: weights" in mergekit["resolved"]


def test_bad_values_get_the_core_s_own_message_next_to_the_field(client, registry_and_pm):
    registry, _ = registry_and_pm
    data = client.post("/api/compose", json={**TIES_ON_MINI, "values": {"method": {"density": "1.5"}}}).json()
    with pytest.raises(ConfigError) as core:
        make_config(registry.get("method", "ties").cls.Config, {"density": 1.5}, where="method")
    assert not data["ok"] and data["field_errors"] == {"method.density": str(core.value)}
    assert "density must be in [0" in data["error"]
    wrong_type = client.post("/api/compose", json={**TIES_ON_MINI, "values": {"method": {"density": "high"}}}).json()
    assert wrong_type["field_errors"]["method.density"] == "method.density: expected float | list[float], got 'high' (str)"
    unknown = client.post("/api/compose", json={**TIES_ON_MINI, "method": "tiess"}).json()
    assert not unknown["ok"] and "did you mean" in unknown["error"] and "'ties'" in unknown["error"]
    setting = client.post("/api/compose", json={**TIES_ON_MINI, "values": {"settings": {"seed": "1.5"}}}).json()
    assert setting["field_errors"] == {"settings.seed": "run.seed: expected int, got 1.5 (float)"}


def test_extra_arguments_are_validated_with_did_you_mean(client):
    typo = client.post("/api/compose", json={**TIES_ON_MINI, "extra": "method.densty=0.5"}).json()
    assert not typo["ok"] and typo["error"] == "unknown field method.densty (did you mean 'density'?)"
    assert typo["field_errors"]["extra.overrides"] == typo["error"]
    setting = client.post("/api/compose", json={**TIES_ON_MINI, "extra": "sed=3"}).json()
    assert "unknown key 'sed'" in setting["error"] and "did you mean 'seed'" in setting["error"]
    good = client.post("/api/compose", json={**TIES_ON_MINI, "extra": "'method.weights=[0.6, 0.4]' seed=2"}).json()
    assert good["ok"] and good["command"].endswith("method.density=0.3 'method.weights=[0.6, 0.4]' seed=2")
    malformed = client.post("/api/compose", json={**TIES_ON_MINI, "extra": "justaword"}).json()
    assert malformed["field_errors"] == {"extra.overrides": "malformed override 'justaword': expected key=value (e.g. method.density=0.2)"}


def test_pools_mode_with_files_pool_fills_the_merge_command(client):
    state = {"mode": "pools", "modelpool": "files", "taskpool": "weight_stats", "method": "task_arithmetic",
             "values": {"modelpool": {"base": "b.safetensors", "models": "{a: a.safetensors, b: b.safetensors}"},
                        "method": {"scaling_factor": "0.5"}, "settings": {"seed": "3"}}}
    data = client.post("/api/compose", json=state).json()
    assert data["ok"], data
    assert data["command"] == ("fuse run modelpool=files taskpool=weight_stats method=task_arithmetic "
                               "modelpool.base=b.safetensors 'modelpool.models={a: a.safetensors, b: b.safetensors}' "
                               "method.scaling_factor=0.5 seed=3")
    assert data["merge"] == ("fuse merge task_arithmetic --base b.safetensors --model a.safetensors --model b.safetensors "
                             "--set scaling_factor=0.5 --seed 3 --output merged/")


def test_pools_mode_without_a_task_pool_merges_only(client):
    state = {"mode": "pools", "modelpool": "files", "taskpool": "", "method": "simple_average",
             "values": {"modelpool": {"models": "{a: a.safetensors, b: b.safetensors}"}}}
    refused = client.post("/api/compose", json=state).json()
    assert not refused["ok"] and "without a taskpool" in refused["error"]
    state["values"]["settings"] = {"save_model": "true"}
    data = client.post("/api/compose", json=state).json()
    assert data["ok"], data
    assert data["command"] == ("fuse run modelpool=files taskpool=null method=simple_average "
                               "'modelpool.models={a: a.safetensors, b: b.safetensors}' save_model=true")
    assert yaml.safe_load(data["resolved"])["taskpool"] is None


def test_dry_run_runs_the_core_s_dry_run_in_process(client, tmp_path):
    data = client.post("/api/dry-run", json=TIES_ON_MINI).json()
    assert data["ok"], data
    plan = yaml.safe_load(data["plan"])
    assert (plan["method"]["name"], plan["method"]["density"]) == ("ties", 0.3)
    assert plan["modelpool"]["has_base"] is True and len(plan["taskpool"]["tasks"]) == 6
    missing = {"mode": "pools", "modelpool": "files", "taskpool": "weight_stats", "method": "ties",
               "values": {"modelpool": {"base": str(tmp_path / "nope.safetensors"), "models": "{a: a.safetensors}"}}}
    failed = client.post("/api/dry-run", json=missing).json()
    assert not failed["ok"] and "nope.safetensors" in failed["error"]


def test_results_leaderboard_run_record_and_diff(client):
    data = client.get("/api/results").json()
    assert data["metric"] == "accuracy" and data["percent"] is True
    assert data["tasks"] == ["rt_sentiment", "language_id"]
    averages = [(r["label"], r["config"], round(r["average"]["mean"], 4)) for r in data["rows"]]
    assert averages == [("individual", "", 0.85), ("ties", "density=0.2", 0.825), ("ties", "density=0.4", 0.78),
                        ("pretrained", "", 0.635)]
    assert data["filters"] == {"benchmarks": ["mini"], "methods": ["ties"], "seeds": [0]}
    ties = next(r for r in data["runs"] if r["config"] == "density=0.4")
    record = client.get("/api/run", params={"id": ties["id"]}).json()
    assert record["results"] == {"ties": {"rt_sentiment": 0.66, "language_id": 0.90},
                                 "pretrained": {"rt_sentiment": 0.64, "language_id": 0.63},
                                 "individual": {"rt_sentiment": 0.74, "language_id": 0.96}}
    assert record["timings"] == {"setup": 1.5, "method": 2.0, "evaluate": 0.5} and record["duration_s"] == 4.0
    assert record["versions"]["fusion-core"] == "0.1.0" and record["config"]["method"]["density"] == 0.4
    other = next(r for r in data["runs"] if r["config"] == "density=0.2")
    diff = client.get("/api/diff", params={"a": other["id"], "b": ties["id"]}).json()
    assert diff["differences"] == [{"key": "method.density", "a": "0.2", "b": "0.4"}]
    filtered = client.get("/api/results", params={"method": "ties", "seed": "0"}).json()
    assert len(filtered["rows"]) == 4
    assert client.get("/api/run", params={"id": "nope"}).json()["ok"] is False


def test_results_db_is_opened_read_only(client, results_db, monkeypatch):
    import sqlite3

    before = results_db.read_bytes()
    opened = []
    real_connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda target, *a, **k: opened.append(target) or real_connect(target, *a, **k))
    assert client.get("/api/results").json()["rows"]
    assert opened and all(str(t).endswith("?mode=ro") for t in opened)
    assert results_db.read_bytes() == before


def test_missing_db_is_a_message_not_a_crash(registry_and_pm, tmp_path):
    from fusion_ui.server import allowed_hosts_for, create_app
    from starlette.testclient import TestClient

    registry, pm = registry_and_pm
    app = create_app(pm, registry, db_path=str(tmp_path / "none.sqlite"), allowed_hosts=allowed_hosts_for("127.0.0.1", 80))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        data = c.get("/api/results").json()
    assert "no results database" in data["missing"] and not (tmp_path / "none.sqlite").exists()


@pytest.mark.parametrize(("headers", "reason"), [
    ({"Host": "evil.example:8765"}, "Host"),             # DNS rebinding: a foreign name resolving to 127.0.0.1
    ({"Origin": "http://evil.example"}, "Origin"),       # a cross-site POST
    ({"Origin": None}, "Origin"),                        # no Origin on a state-changing request
    ({"Content-Type": "text/plain"}, "JSON"),            # a "simple" cross-site form post
])
def test_guard_refuses_foreign_hosts_and_origins(client, headers, reason):
    headers = {"Content-Type": "application/json", **headers}
    if headers.get("Origin", "") is None:
        client.headers.pop("Origin")
        headers.pop("Origin")
    response = client.post("/api/dry-run", content=json.dumps(TIES_ON_MINI), headers=headers)
    assert response.status_code == 403 and reason in response.json()["error"]


def test_pages_forbid_framing_and_foreign_scripts(client):
    response = client.get("/")
    assert response.status_code == 200 and "<title>fusion</title>" in response.text
    assert response.headers["x-frame-options"] == "DENY"
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200


def test_non_loopback_host_needs_allow_remote(capsys):
    assert main(["ui", "--host", "0.0.0.0"]) == 2
    assert "not a loopback address" in capsys.readouterr().err


def _wait_run(client, timeout=120):
    import time

    deadline, lines = time.time() + timeout, []
    while True:
        status = client.get("/api/runs/status", params={"since": len(lines)}).json()
        lines += status["lines"]
        if status["state"] != "running" or time.time() > deadline:
            return status, lines
        time.sleep(0.2)


def test_run_from_the_page_runs_the_validated_command_and_streams_its_log(client, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    base, a, b = (str(tmp_path / f"{n}.safetensors") for n in ("base", "a", "b"))
    for path, value in ((base, 0.0), (a, 2.0), (b, 4.0)):
        save_file({"w": torch.full((4,), value)}, path)
    state = {"mode": "pools", "modelpool": "files", "taskpool": "weight_stats", "method": "simple_average",
             "values": {"modelpool": {"base": base, "models": f"{{a: {a}, b: {b}}}"},
                        "settings": {"output_dir": "runs/page", "progress": "false"}}}
    started = client.post("/api/runs/start", json=state).json()
    assert started["state"] == "running" and started["command"].startswith("fuse run modelpool=files taskpool=weight_stats")
    assert client.post("/api/runs/start", json=state).json() == {"ok": False, "error": "a run is already going; stop it first"}
    status, lines = _wait_run(client)
    assert status["state"] == "finished" and status["returncode"] == 0, lines
    report = json.loads((tmp_path / "runs" / "page" / "report.json").read_text())
    # simple average of [2, 2, 2, 2] and [4, 4, 4, 4] = 3 everywhere: L2 norm 6
    assert report["results"]["merged"]["weights"]["l2_norm"] == pytest.approx(6.0)
    assert any("report: runs/page/report.json" in line for line in lines)
    bad = client.post("/api/runs/start", json={**state, "method": "no_such_method"}).json()
    assert bad["ok"] is False and "unknown method 'no_such_method'" in bad["error"]


def test_stop_ends_a_run_from_the_page(client, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FUSE_CACHE_DIR", str(tmp_path / "cache"))  # an empty cache: the run builds mini (minutes)
    assert client.post("/api/runs/start", json=TIES_ON_MINI).json()["state"] == "running"
    stopped = client.post("/api/runs/stop", json={}).json()
    assert stopped["state"] == "stopped" and stopped["returncode"] != 0
    assert client.post("/api/runs/stop", json={}).json() == {"ok": False, "error": "no run is going"}
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_runs_are_refused_when_served_beyond_localhost(registry_and_pm, results_db):
    from fusion_ui.server import allowed_hosts_for, create_app
    from starlette.testclient import TestClient

    registry, pm = registry_and_pm
    app = create_app(pm, registry, db_path=str(results_db), allowed_hosts=allowed_hosts_for("10.0.0.5", 8765), allow_runs=False)
    with TestClient(app, base_url="http://10.0.0.5:8765") as c:
        response = c.post("/api/runs/start", json=TIES_ON_MINI, headers={"Origin": "http://10.0.0.5:8765"})
        assert c.get("/api/catalog").json()["runs"] is False
    assert response.status_code == 400 and "only from a page served on 127.0.0.1" in response.json()["error"]


def test_reports_of_fuse_run_are_listed_with_peak_memory_and_confined(registry_and_pm, tmp_path, capsys):
    import torch
    from fusion_ui.server import allowed_hosts_for, create_app
    from safetensors.torch import save_file
    from starlette.testclient import TestClient

    paths = {}
    for name, value in (("base", 0.0), ("a", 2.0), ("b", 4.0)):
        paths[name] = str(tmp_path / f"{name}.safetensors")
        save_file({"w": torch.full((4,), value)}, paths[name])
    runs = tmp_path / "runs"
    assert main(["run", "modelpool=files", f"modelpool.base={paths['base']}",
                 f"modelpool.models={{a: {paths['a']}, b: {paths['b']}}}", "taskpool=weight_stats", "method=simple_average",
                 "progress=false", f"output_dir={runs / 'avg-1'}", "--json"]) == 0
    capsys.readouterr()
    (runs / ".avg-2.tmp-x").mkdir()  # a run still being written: not listed
    registry, pm = registry_and_pm
    app = create_app(pm, registry, db_path=str(tmp_path / "none.sqlite"), allowed_hosts=allowed_hosts_for("127.0.0.1", 80),
                     runs_dir=str(runs))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        listed = c.get("/api/reports").json()["reports"]
        record = c.get("/api/report", params={"name": "avg-1"}).json()
        outside = [c.get("/api/report", params={"name": n}).json() for n in ("../avg-1", ".avg-2.tmp-x", "/etc")]
    assert [r["name"] for r in listed] == ["avg-1"] and listed[0]["method"] == "simple_average"
    assert listed[0]["peak_rss_mb"] > 0 and record["peak_rss_mb"] == listed[0]["peak_rss_mb"]
    # simple average of [2]*4 and [4]*4 = [3]*4: L2 norm 6 (weight_stats' primary metric)
    assert record["metric"] == "l2_norm" and record["results"]["simple_average"] == {"weights": pytest.approx(6.0)}
    assert record["config"]["method"]["name"] == "simple_average" and "setup" in record["timings"]
    assert all(o["ok"] is False and "not a run folder name" in o["error"] for o in outside)
