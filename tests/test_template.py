"""The plugin template in examples/ is a real, working plugin: exposed as a distribution, listed, runnable."""

from __future__ import annotations

import importlib
import json
import pathlib
import sys

import pytest

from fusion_core.cli.main import main

TEMPLATE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "plugin-template"


@pytest.fixture
def template_dist(tmp_path, monkeypatch):
    """Expose examples/plugin-template as an installed distribution (dist-info from its pyproject)."""
    import tomllib

    project = tomllib.loads((TEMPLATE / "pyproject.toml").read_text())["project"]
    site = tmp_path / "site"
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    eps = project["entry-points"]["fusion"]
    (info / "entry_points.txt").write_text("[fusion]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(TEMPLATE))
    monkeypatch.setenv("FUSE_LOAD_PLUGINS", "example")
    importlib.invalidate_caches()
    yield project
    sys.modules.pop("fusion_example", None)


def test_template_is_listed_with_its_distribution(template_dist, capsys):
    assert main(["list", "methods", "--json"]) == 0
    median = next(m for m in json.loads(capsys.readouterr().out)["methods"] if m["name"] == "example_median")
    assert median["plugin"] == "example"
    assert main(["plugins", "--json"]) == 0
    row = next(r for r in json.loads(capsys.readouterr().out) if r["name"] == "example")
    assert (row["distribution"], row["version"], row["status"]) == ("fusion-example", "0.1.0", "ok")
    assert row["registered"] == ["method:example_median"] and row["hooks"] == ["fusion_register_methods"]


def test_template_method_runs_through_fuse_run(template_dist, tmp_path, capsys, write_safetensors):
    import torch

    base = write_safetensors(tmp_path / "b.safetensors", {"w": torch.zeros(3)})
    paths = [write_safetensors(tmp_path / f"m{i}.safetensors", {"w": torch.tensor(v)}) for i, v in
             enumerate(([1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [30.0, -4.0, 2.5]))]
    models = "{" + ", ".join(f"m{i}: {p}" for i, p in enumerate(paths)) + "}"
    code = main(["run", "method=example_median", "modelpool=files", f"modelpool.base={base}", f"modelpool.models={models}",
                 "taskpool=weight_stats", "evaluate_inputs=false", "progress=false", f"output_dir={tmp_path / 'out'}", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    # median per element: [2, 2, 2.5] → L2 = sqrt(4 + 4 + 6.25)
    assert report["results"]["merged"]["weights"]["l2_norm"] == pytest.approx(14.25 ** 0.5)
