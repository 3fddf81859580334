"""Registers the data-free merge methods of fusion-merging through the public hook."""

from __future__ import annotations

import fusion_core


def all_methods() -> list[type]:
    """Every method class this plugin provides, module by module."""
    from . import basic, consensus, emr, geometric, mixtral, pruning, stacking, subspace, svc, task_arithmetic, wudi

    return [*basic.METHODS, *task_arithmetic.METHODS, *geometric.METHODS, *subspace.METHODS, *stacking.METHODS,
            *pruning.METHODS, *consensus.METHODS, *emr.METHODS, *mixtral.METHODS, *wudi.METHODS, *svc.METHODS]


@fusion_core.hookimpl
def fusion_register_methods(register):
    for cls in all_methods():
        register(cls)


def _load_mergekit(path, *, allow_pickle=False):
    from .mergekit.recipe import load

    return load(path, allow_pickle=allow_pickle)


@fusion_core.hookimpl
def fusion_register_recipe_formats(register):
    register("mergekit", _load_mergekit, summary="mergekit 0.1.5 YAML (mergekit-yaml configs)")


@fusion_core.hookimpl
def fusion_register_commands(cli):
    from .analyze import analyze_group
    from .extract_lora import extract_lora_command
    from .moe import moe_command

    cli.add_command(extract_lora_command)
    cli.add_command(moe_command)
    cli.add_command(analyze_group)
