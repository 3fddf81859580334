"""Hook implementations: the ``minibench`` pools and the ``mini`` benchmark (the default of ``fuse run``)."""

from __future__ import annotations

import fusion_core

from .pools import MiniBenchModelPool, MiniBenchTaskPool

MINI_METHODS = [
    {"name": "ties"},
    {"name": "simple_average"},
    {"name": "task_arithmetic", "scaling_factor": 0.3},
]
"""Default method list of ``fuse bench mini``; the first is ``fuse run``'s default.  Settings are
FusionBench's defaults (TIES: each model's whole task vector trimmed to its top 20 %, merge_func
sum, λ = 0.3; task arithmetic: λ = 0.3)."""


@fusion_core.hookimpl
def fusion_register_model_pools(register):
    register(MiniBenchModelPool)


@fusion_core.hookimpl
def fusion_register_task_pools(register):
    register(MiniBenchTaskPool)


@fusion_core.hookimpl
def fusion_register_benchmarks(register):
    register(
        "mini",
        summary="mini FusionBench: 6 real text tasks, the MiniLM transformer fine-tuned per task, fixed zero-shot heads (CPU, offline, cached)",
        modelpool={"name": "minibench"},
        taskpool={"name": "minibench"},
        methods=[dict(m) for m in MINI_METHODS],
    )
