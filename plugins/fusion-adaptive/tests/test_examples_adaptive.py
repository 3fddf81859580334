"""The examples under examples/ (SMILE, WEMoE / E-WEMoE, continual merging) run as their READMEs say.

Each config is validated as shipped (``fuse run CONFIG --dry-run`` on the mini benchmark, nothing
loaded), then run for real with its ``benchmark: mini`` swapped for a tiny synthetic pool (the
fixtures' three-task world, registered for the test as ``example_world``), adaptation steps cut to
a few; the continual example also goes through ``fuse continual`` with its PNG.
"""

from __future__ import annotations

import json
import pathlib

import attrs
import pytest
import yaml
from adaptive_fixtures import MemoryPool, MemoryTaskPool, World

import fusion_core
from fusion_core import option
from fusion_core.cli.main import main
from fusion_core.plugins import get_plugin_manager

EXAMPLES = pathlib.Path(__file__).resolve().parents[3] / "examples"
_WORLD: list[World] = []


def world() -> World:
    if not _WORLD:
        _WORLD.append(World(hidden=8))  # every layer 8 wide: one shared router fits (E-WEMoE)
    return _WORLD[0]


@attrs.frozen
class WorldConfig:
    tasks: int = option(3, help="tasks of the synthetic world (fixed: 3)")


class ExampleWorldPool(MemoryPool):
    name = "example_world"
    summary = "the fixtures' synthetic world (base, three fine-tunes, their data)"
    Config = WorldConfig

    def __init__(self, config=None) -> None:
        w = world()
        super().__init__(w.base, w.models, w.data())
        self.config = config if config is not None else WorldConfig()


class ExampleWorldTasks(MemoryTaskPool):
    name = "example_world"
    summary = "the synthetic world's three tasks"
    Config = WorldConfig

    def __init__(self, config=None) -> None:
        super().__init__(world().tasks)
        self.config = config if config is not None else WorldConfig()


class _Plugin:
    @fusion_core.hookimpl
    def fusion_register_model_pools(self, register):
        register(ExampleWorldPool)

    @fusion_core.hookimpl
    def fusion_register_task_pools(self, register):
        register(ExampleWorldTasks)


def on_tiny_world(path: pathlib.Path, out: pathlib.Path, **method_overrides) -> dict:
    """The example's config with the mini benchmark replaced by the synthetic world, run and written to ``out`` (a new folder)."""
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert config.pop("benchmark") == "mini"
    config["method"] = {**config["method"], **method_overrides}
    config.update(modelpool={"name": "example_world"}, taskpool={"name": "example_world"}, output_dir=str(out), progress=False)
    pm = get_plugin_manager(extra_plugins=[("example-world", _Plugin())])
    return fusion_core.run(config, plugin_manager=pm)


@pytest.mark.parametrize("name", ["smile_upscaling/smile.yaml", "wemoe/wemoe.yaml", "wemoe/e_wemoe.yaml", "continual_merging/dop.yaml"])
def test_every_example_config_validates_as_shipped_and_its_readme_runs_it(name, capsys):
    pytest.importorskip("fusion_minibench", reason="the examples run on the mini benchmark (plugins/fusion-minibench)")
    path = EXAMPLES / name
    assert main(["run", str(path), "--dry-run"]) == 0
    assert "nothing was loaded" in capsys.readouterr().err
    readme = (path.parent / "README.md").read_text(encoding="utf-8")
    assert f"fuse run examples/{name}" in readme


def test_smile_example_runs_and_beats_the_pretrained_model(tmp_path):
    report = on_tiny_world(EXAMPLES / "smile_upscaling/smile.yaml", tmp_path / "run")
    avg = report["averages"]
    assert report["config"]["method"]["name"] == "smile" and avg["merged"] > avg["pretrained"]
    assert (tmp_path / "run" / "report.json").is_file()


@pytest.mark.parametrize("name", ["wemoe/wemoe.yaml", "wemoe/e_wemoe.yaml"])
def test_wemoe_examples_run_and_adapt(name, tmp_path):
    report = on_tiny_world(EXAMPLES / name, tmp_path / "run", steps=15, lr=0.01)
    extras = report["method_extras"][report["config"]["method"]["name"]]
    assert extras["steps"] == 15 and extras["loss_last"] < extras["loss_first"]
    assert report["transductive"] and report["averages"]["merged"] > report["averages"]["pretrained"]


def test_continual_example_runs_and_the_readme_plot_is_drawn(tmp_path, capsys, monkeypatch):
    runs = {}
    for method in ("dop", "continual_task_arithmetic"):
        overrides = {"num_steps": 20} if method == "dop" else {"name": method, "scaling_factor": 0.3}
        path = EXAMPLES / "continual_merging/dop.yaml"
        if method != "dop":  # the README's `method=<name> method.order_seed=0`
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
            config["method"] = {"name": method, "order_seed": 0}
            path = tmp_path / f"{method}.yaml"
            path.write_text(yaml.safe_dump(config))
            overrides = {}
        runs[method] = on_tiny_world(path, tmp_path / method, **overrides)
    orders = [r["method_extras"][m]["order"] for m, r in runs.items()]
    assert orders[0] == orders[1] and sorted(orders[0]) == ["alpha", "beta", "gamma"]  # one arrival order per seed
    steps = runs["dop"]["method_extras"]["dop"]["steps"]
    assert [len(s["results"]) for s in steps] == [1, 2, 3]
    monkeypatch.chdir(tmp_path)
    pytest.importorskip("matplotlib")
    assert main(["continual", "dop/report.json", "continual_task_arithmetic/report.json", "--png", "continual.png", "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert list(shown) == ["dop", "continual_task_arithmetic"] and (tmp_path / "continual.png").stat().st_size > 0
