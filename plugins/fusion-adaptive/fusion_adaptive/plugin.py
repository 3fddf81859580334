"""Registers the methods of fusion-adaptive through the public hook (no torch import here)."""

from __future__ import annotations

import fusion_core


def all_methods() -> list[type]:
    """Every method class this plugin provides, module by module."""
    from . import adamerging, concrete, doge, ensemble, ewemoe, fisher, opcm, regmean, safe, smile, wanda, wemoe

    return [*fisher.METHODS, *regmean.METHODS, *adamerging.METHODS, *wemoe.METHODS, *ewemoe.METHODS, *smile.METHODS,
            *ensemble.METHODS, *opcm.METHODS, *doge.METHODS, *wanda.METHODS,
            *concrete.METHODS, *safe.METHODS]


@fusion_core.hookimpl
def fusion_register_methods(register):
    for cls in all_methods():
        register(cls)
