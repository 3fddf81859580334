"""Registers the methods of fusion-adaptive through the public hook (no torch import here)."""

from __future__ import annotations

import fusion_core


def all_methods() -> list[type]:
    """Every method class this plugin provides, module by module."""
    from . import (
        adamerging,
        concrete,
        continual,
        doge,
        dop,
        ensemble,
        ewemoe,
        fisher,
        frank_wolfe,
        opcm,
        rankone_moe,
        regmean,
        safe,
        smile,
        sparsegpt,
        surgery,
        trust_region,
        wanda,
        wemoe,
    )

    return [*fisher.METHODS, *regmean.METHODS, *adamerging.METHODS, *wemoe.METHODS, *ewemoe.METHODS, *smile.METHODS,
            *ensemble.METHODS, *opcm.METHODS, *continual.METHODS, *dop.METHODS, *doge.METHODS, *wanda.METHODS,
            *sparsegpt.METHODS, *rankone_moe.METHODS, *trust_region.METHODS, *frank_wolfe.METHODS, *surgery.METHODS,
            *concrete.METHODS, *safe.METHODS]


@fusion_core.hookimpl
def fusion_register_methods(register):
    for cls in all_methods():
        register(cls)


@fusion_core.hookimpl
def fusion_register_commands(cli):
    from .continual_report import continual_command

    cli.add_command(continual_command)
