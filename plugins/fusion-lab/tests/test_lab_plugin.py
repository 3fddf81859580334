"""fusion-lab is an ordinary plugin: its commands and its ``local`` executor arrive through the public hooks."""

from __future__ import annotations

import json
import subprocess
import sys

import fusion_lab.plugin
from fusion_lab.executors import Executor, Job

import fusion_core
from fusion_core.plugins import get_plugin_manager
from fusion_core.registry import build_registry


def _manager_with(*plugins):
    extra = [("lab", fusion_lab.plugin)] + [(f"lab-test-{i}", p) for i, p in enumerate(plugins)]
    return get_plugin_manager(load_entrypoints=False, extra_plugins=extra)


def test_plugin_is_installed():
    out = subprocess.run([sys.executable, "-m", "fusion_core", "plugins", "--json"], capture_output=True, text=True, check=True)
    row = next(r for r in json.loads(out.stdout) if r["name"] == "lab")
    assert row["status"] == "ok" and row["distribution"] == "fusion-lab"
    assert row["registered"] == ["executor:local"]


def test_bench_and_sweep_are_commands_of_the_plugin():
    out = subprocess.run([sys.executable, "-m", "fusion_core", "--help"], capture_output=True, text=True, check=True)
    commands = {line.split()[0] for line in out.stdout.split("Commands:")[1].splitlines() if line.strip()}
    assert {"bench", "sweep", "run", "merge"} <= commands


def test_executors_register_through_the_hook():
    class Inline(Executor):
        name = "inline_test"
        summary = "Runs jobs in this process, last first."

        def runs_out_of_process(self):
            return False

        def map(self, jobs, env, on_result, *, plugin_manager=None, registry=None):
            for job in reversed(jobs):
                on_result(job, {"status": "ok", "key": job.key})

    class Plugin:
        @fusion_core.hookimpl
        def fusion_register_executors(self, register):
            register(Inline)

    registry = build_registry(_manager_with(Plugin()))
    assert registry.names("executor") == ["inline_test", "local"]  # fusion-lab's own executor is registered the same way
    entry = registry.get("executor", "inline_test")
    seen = []
    entry.cls().map([Job("a", {}), Job("b", {})], None, lambda job, result: seen.append(result["key"]))
    assert seen == ["b", "a"]
