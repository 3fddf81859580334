"""The ``ray`` executor: registration, clear errors, the task protocol, and identical results to ``local``.

The sweep is task_arithmetic on two 2-d models (base [0, 0], a = [1, 0], b = [0, 1]; merged = λ·[1, 1])
scored by a task pool whose accuracy is ``1 - (w[i] - target)^2``, target 0.5 on val and 1.0 on test.
"""

from __future__ import annotations

import socket
import sys
import time
import types
from typing import Literal

import attrs
import pytest
import torch
from fusion_lab.executors import Job, LocalConfig, LocalExecutor, executor_from_options
from fusion_lab.results_db import open_db
from fusion_lab.sweep import plan_sweep, run_sweep
from fusion_ray.executor import RayConfig, RayExecutor, check_reachable, parse_address

import fusion_core
import fusion_core.plugins
from fusion_core.cli.main import main
from fusion_core.config import option
from fusion_core.errors import ConfigError, InputError, PluginError
from fusion_core.registry import build_registry


@attrs.frozen
class TargetConfig:
    split: Literal["val", "test"] = option("test", help="val: target 0.5; test: target 1.0.")


class Target(fusion_core.components.TaskPool):
    name = "target_ray"
    summary = "Accuracy 1 - (w[i] - target)^2; the target depends on the split."
    Config = TargetConfig

    @property
    def task_names(self):
        return ["a", "b"]

    def evaluate(self, model, *, tasks=None, ctx=None):
        target = 0.5 if self.config.split == "val" else 1.0
        w = model["w"]
        return {t: {"accuracy": 1.0 - (float(w[i]) - target) ** 2} for i, t in enumerate(self.task_names)
                if tasks is None or t in tasks}


class RayTestPlugin:
    """Registered as a class, so Ray workers re-import it from this file."""

    @fusion_core.hookimpl
    def fusion_register_task_pools(register):  # noqa: N805 - a plugin namespace, not an instance
        register(Target)


def make_pm(with_ray=True):
    import fusion_lab.plugin
    import fusion_merging.plugin
    import fusion_ray.plugin

    extra = [("lab", fusion_lab.plugin), ("merging", fusion_merging.plugin), ("ray-test", RayTestPlugin)]
    if with_ray:
        extra.append(("ray", fusion_ray.plugin))
    return fusion_core.plugins.get_plugin_manager(load_entrypoints=False, extra_plugins=extra)


@pytest.fixture
def exp(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "base.safetensors"))
    save_file({"w": torch.tensor([1.0, 0.0])}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.tensor([0.0, 1.0])}, str(tmp_path / "b.safetensors"))
    (tmp_path / "exp.yaml").write_text(
        "method: task_arithmetic\n"
        "modelpool: {name: files, base: base.safetensors, models: {a: a.safetensors, b: b.safetensors}}\n"
        "taskpool: target_ray\nthreads: 1\n")
    return "exp.yaml"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_plugin_registers_the_ray_executor():
    entry = build_registry(make_pm()).get("executor", "ray")
    assert entry.cls is RayExecutor and entry.plugin == "ray"
    executor = executor_from_options(build_registry(make_pm()), "ray", {"jobs": 3, "address": None})
    assert executor.config == RayConfig(address=None, jobs=3, connect_timeout_s=10.0) and executor.runs_out_of_process()


def test_without_the_plugin_the_ray_executor_names_it():
    with pytest.raises(ConfigError) as info:
        executor_from_options(build_registry(make_pm(with_ray=False)), "ray", {})
    assert str(info.value) == "unknown executor 'ray': install the fusion-ray plugin (pip install fusion-ray)"
    with pytest.raises(ConfigError, match=r"executor 'local' takes no --address \(its options: jobs\)"):
        executor_from_options(build_registry(make_pm()), "local", {"address": "x:1"})


def test_ray_not_installed_is_one_line_naming_what_to_install(exp, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(PluginError) as info:
        RayExecutor().check()
    assert str(info.value) == ("the ray executor (plugin fusion-ray) needs Ray, which is not installed: "
                               "pip install 'ray>=2.9' (or reinstall the plugin with its dependencies: pip install fusion-ray)")
    pm = make_pm()
    monkeypatch.setattr(fusion_core.plugins, "get_plugin_manager", lambda **kw: pm)
    code = main(["sweep", exp, "method.scaling_factor=0.1,0.5", "--executor", "ray"])
    assert code == 2 and capsys.readouterr().err.strip() == f"error: {info.value}"
    assert not (tmp_path / "runs").exists()


def test_addresses_parse_with_default_ports():
    assert parse_address("10.0.0.5:6380") == ("10.0.0.5", 6380)
    assert parse_address("head") == ("head", 6379)
    assert parse_address("ray://head") == ("head", 10001)
    assert parse_address("[::1]:7000") == ("::1", 7000)
    with pytest.raises(InputError, match="malformed Ray address 'head:x': the port 'x' is not a number"):
        parse_address("head:x")


def test_an_unreachable_cluster_fails_fast_in_one_line(exp, monkeypatch, capsys, tmp_path):
    port = closed_port()
    started = time.monotonic()
    with pytest.raises(InputError) as info:
        check_reachable(f"127.0.0.1:{port}", 2.0)
    assert time.monotonic() - started < 2.5
    assert str(info.value).startswith(f"cannot reach the Ray cluster at 127.0.0.1:{port} (127.0.0.1:{port}) within 2s: ")
    assert str(info.value).endswith("; check --address (the head node's host:port) or omit it to start a local Ray")
    pm = make_pm()
    monkeypatch.setattr(fusion_core.plugins, "get_plugin_manager", lambda **kw: pm)
    started = time.monotonic()
    code = main(["sweep", exp, "method.scaling_factor=0.1,0.5", "--executor", "ray", "--address", f"127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - started < 10
    assert err.startswith(f"error: cannot reach the Ray cluster at 127.0.0.1:{port}") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


class FakeRef:
    """An object reference: hashable by identity, like Ray's."""

    def __init__(self, fn, args, options):
        self.fn, self.args, self.options = fn, args, options


class FakeRay(types.ModuleType):
    """Ray's task API, run synchronously; records how it was used."""

    def __init__(self):
        super().__init__("ray")
        self.inits, self.shutdowns, self.cancelled, self.initialized = [], 0, [], False

    def is_initialized(self):
        return self.initialized

    def init(self, **kwargs):
        self.inits.append(kwargs)
        self.initialized = True

    def shutdown(self):
        self.shutdowns += 1
        self.initialized = False

    def remote(self, **options):
        def wrap(fn):
            return types.SimpleNamespace(remote=lambda *args: FakeRef(fn, args, options))

        return wrap

    def wait(self, refs, num_returns):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        if ref.args[0].key == "crash":
            raise RuntimeError("worker died\nRay traceback...")
        return {"status": "ok", "key": ref.args[0].key, "options": ref.options}

    def cancel(self, ref, force):
        self.cancelled.append(ref)


def test_map_sends_config_mappings_and_reports_each_result(monkeypatch):
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    seen = []
    jobs = [Job(key="one", config={"method": {"name": "m"}}), Job(key="crash", config={}), Job(key="two", config={})]
    RayExecutor(RayConfig(jobs=3)).map(jobs, None, lambda job, result: seen.append((job.key, result)))
    assert fake.inits == [{"include_dashboard": False, "log_to_driver": False, "logging_level": 40, "num_cpus": 3}]
    assert fake.shutdowns == 1
    assert seen == [("one", {"status": "ok", "key": "one", "options": {"num_cpus": 1, "max_retries": 0}}),
                    ("crash", {"status": "failed", "error": "RuntimeError: worker died"}),
                    ("two", {"status": "ok", "key": "two", "options": {"num_cpus": 1, "max_retries": 0}})]
    # an executor started once serves several map calls, joined to an address when given
    executor = RayExecutor(RayConfig(address="head:6379"))
    executor.start()
    executor.map(jobs[:1], None, lambda job, result: None)
    executor.map(jobs[2:], None, lambda job, result: None)
    executor.stop()
    assert fake.inits[1]["address"] == "head:6379" and "num_cpus" not in fake.inits[1] and fake.shutdowns == 2


def test_a_local_ray_gives_the_same_results_as_the_local_executor(exp):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'ray>=2.9'); the ray executor cannot run")
    args = ["method.scaling_factor=0.1,0.5,1.0"]
    reports = {}
    for name, executor in (("local", LocalExecutor(LocalConfig())), ("ray", RayExecutor(RayConfig(jobs=2)))):
        pm = make_pm()
        registry = build_registry(pm)
        plan = plan_sweep(registry, [exp], args)
        with open_db(f"{name}.sqlite") as db:
            reports[name] = run_sweep(plan, db, executor, registry=registry, plugin_manager=pm)
    local, ray = reports["local"], reports["ray"]
    assert ray["executor"] == "ray" and local["executor"] == "local"
    assert ray["counts"] == {"points": 3, "ok": 3, "failed": 0}
    assert ray["points"] == local["points"] and ray["final"] == local["final"] and ray["winner"] == local["winner"]
    assert ray["winner"]["overrides"] == {"method.scaling_factor": 0.5}
    assert ray["final"]["results"]["merged"] == {"a": {"accuracy": 0.75}, "b": {"accuracy": 0.75}}
    import ray as ray_module

    assert not ray_module.is_initialized()  # the sweep started its own Ray and shut it down
