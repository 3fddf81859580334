"""Built-in commands, added through the same hook third-party plugins use."""

from __future__ import annotations

from ..hookspecs import hookimpl


@hookimpl
def fusion_register_commands(cli):
    from .inspect import list_command, plugins_command, show_command
    from .merge import merge_command
    from .run import run_command

    for command in (run_command, list_command, show_command, plugins_command, merge_command):
        cli.add_command(command)
