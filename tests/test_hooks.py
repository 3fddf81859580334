"""One test per hook (``test_hook_<name>``), and a check that no hook goes untested or undocumented."""

from __future__ import annotations

import sys

import attrs
import click
import pytest

import fusion_core
from fusion_core import hookspecs
from fusion_core.components import Method, ModelPool, TaskPool
from fusion_core.config import option
from fusion_core.plugins import get_plugin_manager
from fusion_core.registry import build_registry

HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("fusion_"))


def test_every_hook_has_a_test():
    module = sys.modules[__name__]
    missing = [h for h in HOOKS if not hasattr(module, f"test_hook_{h}")]
    assert not missing, f"hooks without a test_hook_<name>: {missing}"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_documents_its_parameters(hook):
    doc = getattr(hookspecs, hook).__doc__ or ""
    import inspect

    for param in inspect.signature(getattr(hookspecs, hook)).parameters:
        assert f":param {param}:" in doc, f"{hook} does not document {param}"
    assert "Called" in doc or "called" in doc or "use them" in doc


def _manager_with(plugin):
    return get_plugin_manager(load_entrypoints=False, extra_plugins=[("undo-test-plugin", plugin)])


@attrs.frozen
class ScaleConfig:
    factor: float = option(2.0, help="Multiplier.")


class Scale(Method):
    name = "scale_test"
    summary = "Multiply the base by a factor."
    Config = ScaleConfig

    def run(self, pool, ctx):
        return {k: v * self.config.factor for k, v in pool.load_model(None).items()}


class ListPool(ModelPool):
    name = "list_test"
    summary = "A pool of in-memory state dicts."

    @property
    def model_names(self):
        return ["a"]

    def load_model(self, name=None):
        import torch

        return {"w": torch.ones(2)}


class CountTasks(TaskPool):
    name = "count_test"
    summary = "Counts tensors."

    @property
    def task_names(self):
        return ["count"]

    def evaluate(self, model, *, tasks=None, ctx=None):
        return {"count": {"accuracy": float(len(model))}}


def test_hook_fusion_register_methods():
    class Plugin:
        @fusion_core.hookimpl
        def fusion_register_methods(self, register):
            register(Scale)

    entry = build_registry(_manager_with(Plugin())).get("method", "scale_test")
    assert entry.cls is Scale and entry.plugin == "undo-test-plugin"


def test_hook_fusion_register_model_pools():
    class Plugin:
        @fusion_core.hookimpl
        def fusion_register_model_pools(self, register):
            register(ListPool)

    assert build_registry(_manager_with(Plugin())).get("model-pool", "list_test").cls is ListPool


def test_hook_fusion_register_task_pools():
    class Plugin:
        @fusion_core.hookimpl
        def fusion_register_task_pools(self, register):
            register(CountTasks)

    assert build_registry(_manager_with(Plugin())).get("task-pool", "count_test").cls is CountTasks


def test_hook_fusion_register_benchmarks():
    class Plugin:
        @fusion_core.hookimpl
        def fusion_register_benchmarks(self, register):
            register("tiny", summary="A tiny benchmark.", modelpool={"name": "files"}, taskpool={"name": "weight_stats"},
                     methods=["dummy", {"name": "dummy"}])

    bench = build_registry(_manager_with(Plugin())).get("benchmark", "tiny")
    assert bench.modelpool == {"name": "files"} and bench.methods == ({"name": "dummy"}, {"name": "dummy"})


def test_hook_fusion_register_commands():
    from click.testing import CliRunner

    from fusion_core.cli.main import State, make_cli

    class Plugin:
        @fusion_core.hookimpl
        def fusion_register_commands(self, cli):
            @cli.command("hello")
            @click.argument("who")
            def hello(who):
                click.echo(f"hello {who}")

    pm = _manager_with(Plugin())
    result = CliRunner().invoke(make_cli(pm), ["hello", "fusion"], obj=State(pm))
    assert result.exit_code == 0 and result.output == "hello fusion\n"


class Observer:
    """Components of a tiny run, and every lifecycle call it receives, in order."""

    def __init__(self, fail_in=None):
        self.calls = []
        self.fail_in = fail_in

    @fusion_core.hookimpl
    def fusion_register_methods(self, register):
        register(Scale)

    @fusion_core.hookimpl
    def fusion_register_model_pools(self, register):
        register(ListPool)

    @fusion_core.hookimpl
    def fusion_register_task_pools(self, register):
        register(CountTasks)

    @fusion_core.hookimpl
    def fusion_run_start(self, config):
        self.calls.append(("start", config.method.name, config.settings.seed))

    @fusion_core.hookimpl
    def fusion_phase_end(self, name, seconds):
        assert seconds >= 0
        self.calls.append(("phase", name))

    @fusion_core.hookimpl
    def fusion_run_end(self, report):
        self.calls.append(("end", report["results"]["merged"]["count"]["accuracy"], report["output_dir"]))


def test_registered_components_run_end_to_end(tmp_path):
    pm = _manager_with(Observer())  # registers Scale, ListPool and CountTasks
    report = fusion_core.run(
        {"method": {"name": "scale_test", "factor": 3}, "modelpool": "list_test", "taskpool": "count_test",
         "output_dir": str(tmp_path / "out"), "evaluate_inputs": False, "progress": False},
        plugin_manager=pm,
    )
    assert report["results"] == {"merged": {"count": {"accuracy": 1.0}}}
    assert report["config"]["method"] == {"name": "scale_test", "factor": 3.0}


def test_hook_fusion_register_executors():
    """The core keeps the executor kind (its base class lives in fusion-lab): any component of kind ``executor``."""
    from fusion_core.components import Component

    class Inline(Component):
        kind = "executor"
        name = "inline_test"
        summary = "Runs jobs in this process, last first."

        def map(self, jobs, env, on_result, *, plugin_manager=None, registry=None):
            for job in reversed(jobs):
                on_result(job, {"status": "ok", "key": job})

    class Plugin:
        @fusion_core.hookimpl
        def fusion_register_executors(self, register):
            register(Inline)

    registry = build_registry(_manager_with(Plugin()))
    entry = registry.get("executor", "inline_test")
    assert entry.cls is Inline and entry.plugin == "undo-test-plugin"
    assert registry.names("executor") == ["inline_test"]  # the core registers none itself (fusion-lab adds local)
    seen = []
    entry.cls().map(["a", "b"], None, lambda job, result: seen.append(result["key"]))
    assert seen == ["b", "a"]

    class NotAnExecutor(Method):
        name = "oops"
        summary = "A method registered as an executor."

        def run(self, pool, ctx):
            return None

    class Wrong:
        @fusion_core.hookimpl
        def fusion_register_executors(self, register):
            register(NotAnExecutor)

    from fusion_core.errors import PluginError

    with pytest.raises(PluginError, match="registered .* as a executor, but it is a method"):
        build_registry(_manager_with(Wrong()))


def _observed_run(tmp_path, observer, **settings):
    return fusion_core.run(
        {"method": {"name": "scale_test", "factor": 3}, "modelpool": "list_test", "taskpool": "count_test", "seed": 4,
         "output_dir": str(tmp_path / "out"), "evaluate_inputs": False, "progress": False, **settings},
        plugin_manager=_manager_with(observer),
    )


def test_hook_fusion_run_start(tmp_path):
    observer = Observer()
    _observed_run(tmp_path, observer)
    assert observer.calls[0] == ("start", "scale_test", 4)
    dry = Observer()
    fusion_core.run({"method": "scale_test", "modelpool": "list_test", "taskpool": "count_test"},
                    plugin_manager=_manager_with(dry), dry_run=True)
    assert dry.calls == []  # a dry run is not a run


def test_hook_fusion_phase_end(tmp_path, monkeypatch):
    observer = Observer()
    _observed_run(tmp_path, observer, save_model=True)
    assert [c[1] for c in observer.calls if c[0] == "phase"] == ["setup", "prepare", "method", "evaluate", "save"]

    def explode(self, pool, ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(Scale, "run", explode)
    failing = Observer()
    with pytest.raises(RuntimeError, match="boom"):
        _observed_run(tmp_path / "again", failing)
    # the failing phase still ends (timed), and the run does not
    assert failing.calls == [("start", "scale_test", 4), ("phase", "setup"), ("phase", "prepare"), ("phase", "method")]


def test_hook_fusion_run_end(tmp_path):
    observer = Observer()
    report = _observed_run(tmp_path, observer)
    assert observer.calls[-1] == ("end", 1.0, str(tmp_path / "out")) and report["results"]["merged"]["count"]["accuracy"] == 1.0
    assert (tmp_path / "out" / "report.json").is_file()  # written before observers hear of it


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_in_the_plugin_guide(hook):
    import inspect
    import pathlib

    guide = (pathlib.Path(__file__).resolve().parents[1] / "CONTRIBUTING.md").read_text()
    signature = f"{hook}({', '.join(inspect.signature(getattr(hookspecs, hook)).parameters)})"
    assert signature in guide, f"CONTRIBUTING.md does not document {signature}"


def test_hook_fusion_register_recipe_formats(tmp_path, capsys, monkeypatch):
    """A plugin's recipe format drives `fuse merge --recipe FORMAT:FILE`; the core names no method."""
    import torch
    from safetensors.torch import load_file

    import fusion_core.plugins as plugins
    from fusion_core.cli.main import main
    from fusion_core.engine.kernel import KernelMethod
    from fusion_core.engine.readers import StateDictReader
    from fusion_core.errors import PluginError
    from fusion_core.recipes import ImportedMerge, recipe_formats

    class Half(KernelMethod):
        name = "half_test"
        summary = "Half of the base plus half of the model."

        @attrs.frozen
        class Config:
            pass

        def kernel(self, name, base, tensors, ctx):
            return (base + tensors[0]) / 2

    finished = []

    def load(path, *, allow_pickle=False):
        scale = float(open(path).read())
        base = StateDictReader({"w": torch.ones(2, 3)}, label="base")
        model = StateDictReader({"w": torch.full((2, 3), scale)}, label="model")
        return ImportedMerge(Half(Half.Config()), base, [model], record={"method": "half_test"}, finish=finished.append)

    class Formats:
        @fusion_core.hookimpl
        def fusion_register_recipe_formats(self, register):
            register("toy", load, summary="a number")

    original = plugins.get_plugin_manager
    monkeypatch.setattr(
        plugins, "get_plugin_manager", lambda **kw: original(**{**kw, "load_entrypoints": False, "extra_plugins": [("toy", Formats())]})
    )
    recipe = tmp_path / "r.txt"
    recipe.write_text("3")
    assert main(["merge", "--recipe", f"toy:{recipe}", "-o", str(tmp_path / "out.safetensors"), "-q"]) == 0
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["w"], torch.full((2, 3), 2.0))
    assert main(["merge", "--recipe", f"toy:{recipe}", "-o", str(tmp_path / "dir"), "-q"]) == 0
    assert finished and finished[0].name.startswith(".dir.fuse-tmp-")  # the folder before its rename
    capsys.readouterr()
    assert main(["merge", "--recipe", f"tyo:{recipe}", "-o", str(tmp_path / "x")]) == 2
    assert "unknown recipe format 'tyo' (did you mean 'toy'?)" in capsys.readouterr().err
    pm = _manager_with(Formats())
    pm.register(Formats(), name="toy-again")
    with pytest.raises(PluginError, match="recipe format 'toy' is registered by both"):
        recipe_formats(pm)
