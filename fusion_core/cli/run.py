"""``fuse run``: one experiment (model pool → method → task pool → report)."""

from __future__ import annotations

import json
import os

import click


def split_run_args(args: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Config files (``*.yaml`` or existing files) versus ``key=value`` overrides."""
    from ..config import parse_override

    files, overrides = [], []
    for arg in args:
        if arg.endswith((".yaml", ".yml")) and "=" not in arg:
            files.append(arg)
        elif "=" not in arg and os.path.isfile(arg):
            files.append(arg)
        else:
            parse_override(arg)  # malformed overrides fail here, with the argument named
            overrides.append(arg)
    return files, overrides


@click.command("run", context_settings={"ignore_unknown_options": False})
@click.argument("args", nargs=-1)
@click.option("--print-config", is_flag=True, help="Print the resolved config (YAML) and exit.")
@click.option("--dry-run", is_flag=True, help="Validate names, fields and files; load nothing heavy.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.pass_obj
def run_command(state, args, print_config, dry_run, overwrite, as_json):
    """Run a fusion experiment.

    ARGS are YAML config files and KEY=VALUE overrides, e.g.

    \b
      fuse run                                   # TIES on the embedded mini benchmark
      fuse run method=task_arithmetic method.scaling_factor=0.3
      fuse run experiment.yaml seed=1 output_dir=runs/exp1
      fuse run modelpool=files modelpool.base=base.safetensors \\
               'modelpool.models={a: a.safetensors, b: b.safetensors}' \\
               method=simple_average taskpool=weight_stats
    """
    from ..config import refuse_repeated_keys
    from ..runconfig import MERGE_ONLY_NOTE, load_run_config

    files, overrides = split_run_args(args)
    refuse_repeated_keys(overrides)
    config = load_run_config(files, overrides, registry=state.registry)
    if config.taskpool is None and not print_config:
        click.echo(MERGE_ONLY_NOTE, err=True)  # the same line for --dry-run and the run
    if print_config:
        from ..safe_yaml import dump

        click.echo(dump(config.to_dict(), sort_keys=False).rstrip())
        return
    from ..cleanup import terminate_as_interrupt
    from ..consoles import console
    from ..program import run
    from ..report import render_report

    with terminate_as_interrupt():
        report = run(config, registry=state.registry, plugin_manager=state.pm, overwrite=overwrite, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    elif dry_run:
        from ..safe_yaml import dump

        click.echo(dump(report["plan"], sort_keys=False).rstrip())
        click.echo("dry run: config, names and files are valid; nothing was loaded", err=True)
    else:
        render_report(report, console())
