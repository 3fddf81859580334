"""Registers ``fuse ui`` (the web stack is imported only when the command runs)."""

from __future__ import annotations

import click

import fusion_core


@click.command("ui")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but a loopback address needs --allow-remote.")
@click.option("--port", default=0, show_default=True, type=click.IntRange(0, 65535), help="Port (0: a free one).")
@click.option("--db", "db_path", default="runs/results.sqlite", show_default=True, metavar="PATH",
              help="Results database to browse (opened read-only).")
@click.option("--runs", "runs_dir", default="runs", show_default=True, metavar="DIR",
              help="Folder whose <run>/report.json files (written by fuse run) the Results page lists.")
@click.option("--allow-remote", is_flag=True, help="Allow binding a non-loopback address (the page can start runs: trusted networks only).")
@click.option("--open", "open_browser", is_flag=True, help="Also open the page in the default browser.")
@click.pass_obj
def ui_command(state, host, port, db_path, runs_dir, allow_remote, open_browser):
    """Serve the fusion page: compose a run (validated live), dry-run it, browse results.

    \b
      fuse ui                         # http://127.0.0.1:<free port>/
      fuse ui --port 8765 --db runs/results.sqlite
    """
    from .server import serve

    serve(state.pm, state.registry, host=host, port=port, db_path=db_path, allow_remote=allow_remote,
          open_browser=open_browser, runs_dir=runs_dir)


@fusion_core.hookimpl
def fusion_register_commands(cli):
    cli.add_command(ui_command)
