"""Registers the ``ray`` executor through the public hook (Ray itself is imported only when used)."""

from __future__ import annotations

import fusion_core


@fusion_core.hookimpl
def fusion_register_executors(register):
    from .executor import RayExecutor

    register(RayExecutor)
