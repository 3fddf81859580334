"""The run program end to end on the built-in files pool and weight_stats task pool."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

import fusion_core
from fusion_core.cli.main import main
from fusion_core.components import Method
from fusion_core.errors import InputError
from fusion_core.output import MARKER


@pytest.fixture
def files(tmp_path, write_safetensors):
    base = write_safetensors(tmp_path / "base.safetensors", {"w": torch.tensor([1.0, 2.0, 2.0]), "b": torch.tensor([4.0])})
    a = write_safetensors(tmp_path / "a.safetensors", {"w": torch.tensor([3.0, 0.0, 0.0]), "b": torch.tensor([0.0])})
    return base, a


def config(files, tmp_path, **extra):
    base, a = files
    return {"method": "dummy", "modelpool": {"name": "files", "base": base, "models": {"weights": a}},
            "taskpool": "weight_stats", "output_dir": str(tmp_path / "out"), "progress": False, **extra}


def test_run_reports_closed_form_numbers_and_provenance(files, tmp_path):
    report = fusion_core.run(config(files, tmp_path, seed=3))
    # base = [1, 2, 2, 4]: L2 = 5, mean = 9/4; the model "weights" = [3, 0, 0, 0]: L2 = 3
    assert report["results"]["merged"]["weights"] == {"parameters": 4.0, "l2_norm": 5.0, "mean": 2.25}
    assert report["results"]["pretrained"]["weights"]["l2_norm"] == 5.0
    assert report["results"]["individual"] == {"weights": {"parameters": 4.0, "l2_norm": 3.0, "mean": 0.75}}
    assert report["averages"] == {"merged": 5.0, "pretrained": 5.0, "individual": 3.0}
    assert report["seed"] == 3 and report["config"]["method"] == {"name": "dummy"}
    assert report["transductive"] is False and report["method_extras"] == {}
    assert report["versions"]["fusion-core"] == fusion_core.__version__ and "torch" in report["versions"]
    assert set(report["timings"]) >= {"setup", "prepare", "method", "evaluate"} and report["peak_rss_mb"] > 0
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["results"] == report["results"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp leftovers


def test_existing_output_is_refused_unless_overwrite(files, tmp_path):
    fusion_core.run(config(files, tmp_path))
    with pytest.raises(InputError, match=r"output .*out already exists; pass --overwrite"):
        fusion_core.run(config(files, tmp_path))
    fusion_core.run(config(files, tmp_path), overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARKER, "report.json"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(InputError, match=r"output .*mine already exists and was not written by fuse"):
        fusion_core.run(config(files, tmp_path, output_dir=str(tmp_path / "mine")), overwrite=True)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["keep.txt"]


def test_unwritable_output_location(files, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root): permissions are not enforced")
        with pytest.raises(InputError, match="output location not writable"):
            fusion_core.run(config(files, tmp_path, output_dir=str(locked / "out")))
    finally:
        locked.chmod(0o700)


def test_unwritable_output_location_via_a_file_parent(files, tmp_path):
    (tmp_path / "afile").write_text("")
    code = main(["run", "method=dummy", "modelpool=files", f"modelpool.base={files[0]}",
                 f"modelpool.models={{a: {files[1]}}}", "taskpool=weight_stats", f"output_dir={tmp_path}/afile/out"])
    assert code == 2


def test_interrupted_run_leaves_nothing(files, tmp_path, monkeypatch):
    from fusion_core.builtins.methods import Dummy

    def explode(self, pool, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(Dummy, "run", explode)
    with pytest.raises(KeyboardInterrupt):
        fusion_core.run(config(files, tmp_path))
    assert list(tmp_path.iterdir()) == [tmp_path / "a.safetensors", tmp_path / "base.safetensors"] or not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_error_while_writing_leaves_no_output(files, tmp_path, monkeypatch):
    import fusion_core.program as api

    def broken(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(api, "write_json_atomic", broken)
    with pytest.raises(InputError, match=r"cannot write .*out: disk full"):
        fusion_core.run(config(files, tmp_path))
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_dry_run_validates_files_without_loading(files, tmp_path):
    plan = fusion_core.run(config(files, tmp_path), dry_run=True)
    assert plan["dry_run"] and plan["plan"]["modelpool"]["models"] == {"weights": files[1]}
    assert not (tmp_path / "out").exists()
    cfg = config(files, tmp_path)
    cfg["modelpool"]["models"]["gone"] = str(tmp_path / "gone.safetensors")
    with pytest.raises(InputError, match=r"model 'gone': path not found: .*gone.safetensors"):
        fusion_core.run(cfg, dry_run=True)


def test_cli_run_prints_table_and_print_config(files, tmp_path, capsys):
    args = ["run", "method=dummy", "modelpool=files", f"modelpool.base={files[0]}", f"modelpool.models={{weights: {files[1]}}}",
            "taskpool=weight_stats", f"output_dir={tmp_path / 'cli'}", "progress=false"]
    assert main([*args, "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "method:\n  name: dummy\nmodelpool:\n  name: files" in out
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "dummy on files" in out and "average" in out and "5" in out
    assert (tmp_path / "cli" / "report.json").exists()


def test_save_model_writes_a_safetensors_folder(files, tmp_path):
    report = fusion_core.run(config(files, tmp_path, save_model=True))
    from safetensors.torch import load_file

    saved = tmp_path / "out" / "model"
    tensors = {}
    for f in saved.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    assert torch.equal(tensors["w"], torch.tensor([1.0, 2.0, 2.0])) and "save" in report["timings"]
    card = (saved / "README.md").read_text()
    assert "made with `fuse run` (fusion) using the method **dummy**" in card
    assert f"base_model:\n- {files[0]}" in card and "seed: 0" in card


def _manager_with(cls, plugin: str):
    """A plugin manager (no entry points) with one extra plugin registering method ``cls``."""
    from fusion_core.plugins import get_plugin_manager

    class Plugin:
        @fusion_core.hookimpl
        def fusion_register_methods(self, register):
            register(cls)

    return get_plugin_manager(load_entrypoints=False, extra_plugins=[(plugin, Plugin())])


def test_method_returning_several_models_is_evaluated_per_label(files, tmp_path):
    from fusion_core.components import Capabilities

    class Sweep(Method):
        name = "sweep_test"
        summary = "Scaled copies of the base."
        capabilities = Capabilities(output="models")

        def run(self, pool, ctx):
            base = pool.load_model(None)
            return {f"x{k}": {n: t * k for n, t in base.items()} for k in (1, 2)}

    pm = _manager_with(Sweep, "undo-sweep")
    report = fusion_core.run(config(files, tmp_path, method="sweep_test", evaluate_inputs=False), plugin_manager=pm)
    assert math.isclose(report["results"]["merged:x2"]["weights"]["l2_norm"], 10.0)
    assert report["results"]["merged:x1"]["weights"]["l2_norm"] == 5.0


def test_the_report_names_the_instances_output_kind_where_a_config_changes_it(files, tmp_path):
    import attrs

    from fusion_core.components import Capabilities

    class MaybeSweep(Method):
        name = "maybe_sweep_test"
        summary = "One scaled copy of the base, or one per factor of a list."
        capabilities = Capabilities()

        @attrs.frozen
        class Config:
            factor: float | list[float] = 1.0

        def __init__(self, config=None):
            super().__init__(config)
            if isinstance(self.config.factor, list):
                self.capabilities = attrs.evolve(type(self).capabilities, output="models")

        def run(self, pool, ctx):
            base = pool.load_model(None)
            if isinstance(self.config.factor, list):
                return {f"x{k:g}": {n: t * k for n, t in base.items()} for k in self.config.factor}
            return {n: t * self.config.factor for n, t in base.items()}

    pm = _manager_with(MaybeSweep, "undo-maybe-sweep")
    one = fusion_core.run(config(files, tmp_path / "a", method="maybe_sweep_test", evaluate_inputs=False), plugin_manager=pm)
    assert "output=models" not in one["method_capabilities"] and set(one["results"]) == {"merged"}
    cfg = config(files, tmp_path / "b", method={"name": "maybe_sweep_test", "factor": [1.0, 2.0]}, evaluate_inputs=False)
    several = fusion_core.run(cfg, plugin_manager=pm)
    assert "output=models" in several["method_capabilities"] and set(several["results"]) == {"merged:x1", "merged:x2"}


def test_per_task_output_scores_each_task_with_its_own_model_and_saves_the_shared_one(files, tmp_path):
    from safetensors.torch import load_file

    from fusion_core.adapters import PerTaskModels
    from fusion_core.components import Capabilities

    built = []

    class Modulated(Method):
        name = "per_task_test"
        summary = "The base scaled by 3 for its task; the base itself shared."
        capabilities = Capabilities(output="per_task")

        def run(self, pool, ctx):
            base = pool.load_model(None)

            def build(task):
                built.append(task)
                return {n: t * 3 for n, t in base.items()}

            return PerTaskModels(base, build, ["weights"])

    pm = _manager_with(Modulated, "undo-per-task")
    report = fusion_core.run(config(files, tmp_path, method="per_task_test", evaluate_inputs=False, save_model=True), plugin_manager=pm)
    assert math.isclose(report["results"]["merged"]["weights"]["l2_norm"], 15.0)  # 3 · ‖(1, 2, 2, 4)‖ = 3 · 5
    assert built == ["weights"]
    saved = load_file(str(tmp_path / "out" / "model" / "model.safetensors"))
    assert saved["w"].tolist() == [1.0, 2.0, 2.0]  # the shared model is what is kept


def test_per_task_output_must_be_per_task_models(files, tmp_path):
    from fusion_core.components import Capabilities

    class Wrong(Method):
        name = "per_task_wrong"
        summary = "Declares per-task models, returns a state dict."
        capabilities = Capabilities(output="per_task")

        def run(self, pool, ctx):
            return pool.load_model(None)

    pm = _manager_with(Wrong, "undo-per-task-wrong")
    with pytest.raises(InputError, match="PerTaskModels"):
        fusion_core.run(config(files, tmp_path, method="per_task_wrong", evaluate_inputs=False), plugin_manager=pm)


def test_task_pool_can_refuse_the_model_pool_before_anything_loads(files, tmp_path, monkeypatch):
    from fusion_core.builtins.task_pools import WeightStats
    from fusion_core.errors import ConfigError

    seen = []

    def refuse(self, pool):
        seen.append(pool.name)
        raise ConfigError("this task pool cannot score that pool")

    monkeypatch.setattr(WeightStats, "check_pool", refuse)
    with pytest.raises(ConfigError, match="cannot score that pool"):
        fusion_core.run(config(files, tmp_path), dry_run=True)
    with pytest.raises(ConfigError, match="cannot score that pool"):
        fusion_core.run(config(files, tmp_path))
    assert seen == ["files", "files"] and not (tmp_path / "out").exists()
