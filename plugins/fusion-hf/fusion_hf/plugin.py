"""Registers the Hugging Face pools and the FusionBench CLIP benchmark through the public hooks."""

from __future__ import annotations

import fusion_core


@fusion_core.hookimpl
def fusion_register_model_pools(register):
    from .model_pools import POOLS

    for cls in POOLS:
        register(cls)


@fusion_core.hookimpl
def fusion_register_task_pools(register):
    from .task_pools import all_task_pools

    for cls in all_task_pools():
        register(cls)


@fusion_core.hookimpl
def fusion_register_benchmarks(register):
    from . import fusionbench

    fusionbench.register(register)
