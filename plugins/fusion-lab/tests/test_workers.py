"""Worker processes of ``--jobs N`` die with their driver, however it dies (SIGTERM, kill -9), even mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

SLEEPERS = '''
import os, time

import attrs

import fusion_core
from fusion_core.components import Method, ModelPool
from fusion_core.config import option


@attrs.frozen
class SleepConfig:
    folder: str = option("", help="Where each worker writes its pid.")


class Sleep(Method):
    name = "sleep_test"
    summary = "Writes its pid, then sleeps for two minutes."
    Config = SleepConfig

    def run(self, pool, ctx):
        with open(os.path.join(self.config.folder, f"{os.getpid()}.pid"), "w") as fh:
            fh.write("running")
        time.sleep(120)


class Empty(ModelPool):
    name = "empty_test"
    summary = "No models."

    @property
    def model_names(self):
        return []

    def load_model(self, name=None):
        return {}


@fusion_core.hookimpl
def fusion_register_methods(register):
    register(Sleep)


@fusion_core.hookimpl
def fusion_register_model_pools(register):
    register(Empty)
'''

DRIVER = '''
import sys

sys.path.insert(0, sys.argv[1])
import fusion_lab.plugin
import sleepers

from fusion_core.plugins import get_plugin_manager
from fusion_core.registry import build_registry
from fusion_lab.executors import Job, LocalConfig, LocalExecutor, WorkerEnv

if __name__ == "__main__":  # spawned workers import this file again
    pm = get_plugin_manager(load_entrypoints=False, extra_plugins=[("lab", fusion_lab.plugin), ("sleepers", sleepers)])
    registry = build_registry(pm)
    jobs = [Job(f"j{i}", {"method": {"name": "sleep_test", "folder": sys.argv[1]}, "modelpool": "empty_test", "taskpool": None, "save_model": True, "seed": i,
                          "progress": False}) for i in range(2)]
    LocalExecutor(LocalConfig(jobs=2)).map(jobs, WorkerEnv.from_plugin_manager(pm), lambda job, result: print(result, file=sys.stderr),
                                           plugin_manager=pm, registry=registry)
'''


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as fh:
            state = next(line for line in fh if line.startswith("State:"))
    except (FileNotFoundError, ProcessLookupError):
        return False
    return " Z " not in state and "zombie" not in state  # an unreaped zombie has exited


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process states from /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_workers_exit_when_the_driver_dies(tmp_path, sig):
    (tmp_path / "sleepers.py").write_text(textwrap.dedent(SLEEPERS))
    (tmp_path / "driver.py").write_text(textwrap.dedent(DRIVER))
    driver = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240  # two spawned workers import torch first
        while len(list(tmp_path.glob("*.pid"))) < 2:
            assert driver.poll() is None, driver.stderr.read().decode()
            assert time.monotonic() < deadline, "the workers never started their jobs"
            time.sleep(0.2)
        workers = [int(p.stem) for p in tmp_path.glob("*.pid")]
        assert all(_alive(pid) for pid in workers)
        driver.send_signal(sig)
        driver.wait(timeout=30)
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in workers if _alive(pid)], "workers outlived their driver"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for p in tmp_path.glob("*.pid"):
            if _alive(int(p.stem)):
                os.kill(int(p.stem), signal.SIGKILL)


THREAD_REPORTERS = SLEEPERS.replace('"Writes its pid, then sleeps for two minutes."', '"Writes its torch thread count."').replace(
    '''        with open(os.path.join(self.config.folder, f"{os.getpid()}.pid"), "w") as fh:
            fh.write("running")
        time.sleep(120)''',
    '''        import torch

        with open(os.path.join(self.config.folder, f"{os.getpid()}.threads"), "w") as fh:
            fh.write(str(torch.get_num_threads()))''')


def test_threads_per_worker_shares_the_cpus_out():
    from fusion_lab.executors import threads_per_worker

    assert [threads_per_worker(w, cpus=16) for w in (1, 2, 3, 16, 40)] == [16, 8, 5, 1, 1]
    assert threads_per_worker(2, cpus=2) == 1


@pytest.mark.parametrize("preset", [None, "3"], ids=["default", "user-set"])
def test_workers_share_the_cpus_unless_the_user_set_threads(tmp_path, monkeypatch, preset):
    """Two workers on this machine: each one's torch uses CPUs // 2 threads (a user's OMP_NUM_THREADS is kept)."""
    from fusion_lab.executors import THREAD_VARIABLES, threads_per_worker

    reporters = THREAD_REPORTERS
    assert reporters != SLEEPERS and "get_num_threads" in reporters
    (tmp_path / "sleepers.py").write_text(textwrap.dedent(reporters))
    (tmp_path / "driver.py").write_text(textwrap.dedent(DRIVER))
    for variable in THREAD_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    if preset:
        monkeypatch.setenv("OMP_NUM_THREADS", preset)
    subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(tmp_path)], check=True, timeout=240,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    counts = sorted(int(p.read_text()) for p in tmp_path.glob("*.threads"))
    probe = "import torch; print(torch.get_num_threads())"  # what torch makes of the user's setting here
    expected = int(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout) if preset \
        else threads_per_worker(2)
    assert counts == [expected, expected]
