"""fusion-lab's hook implementations: the ``bench``/``sweep`` commands and the ``local`` executor."""

from __future__ import annotations

import fusion_core


@fusion_core.hookimpl
def fusion_register_commands(cli):
    from .cli.bench import bench_command
    from .cli.sweep import sweep_command

    cli.add_command(bench_command)
    cli.add_command(sweep_command)


@fusion_core.hookimpl
def fusion_register_executors(register):
    from .executors import LocalExecutor

    register(LocalExecutor)


@fusion_core.hookimpl
def fusion_phase_end(name, seconds):
    from .recording import current

    rec = current()
    if rec is not None:
        rec.phases.append((name, seconds))


@fusion_core.hookimpl
def fusion_run_end(report):
    from .recording import current

    rec = current()
    if rec is not None:
        rec.report = report
