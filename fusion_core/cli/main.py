"""The ``fuse`` entry point: builds a fresh plugin manager, lets plugins add commands, runs click."""

from __future__ import annotations

import sys
import warnings

import click

from .. import __version__
from ..errors import FuseError


class State:
    """Per-invocation state on ``ctx.obj``: the plugin manager and a lazily built registry."""

    def __init__(self, pm, debug: bool = False) -> None:
        self.pm = pm
        self.debug = debug
        self._registry = None
        self.reported: set[str] = set()

    @property
    def registry(self):
        if self._registry is None:
            from ..registry import build_registry

            self._registry = build_registry(self.pm)
            report_plugin_failures(self.pm, self.reported)  # plugins whose registration hook raised
        return self._registry


def make_cli(pm) -> click.Group:
    """The root group with every command plugins registered (built-ins included)."""

    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, "--version", prog_name="fuse", message="%(prog)s (fusion-core) %(version)s")
    @click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
    @click.pass_context
    def cli(ctx: click.Context, debug: bool) -> None:
        """fusion: merge, ensemble and upscale fine-tuned models, and benchmark the methods.

        \b
        fuse run                       TIES on the embedded mini benchmark
        fuse run method=task_arithmetic method.scaling_factor=0.3
        fuse merge ties --base B --model M1 --model M2 --output out/
        fuse list methods              what the installed plugins provide
        """
        ctx.ensure_object(State)
        ctx.obj.debug = debug

    from ..plugins import guarded

    for impl in reversed(pm.hook.fusion_register_commands.get_hookimpls()):  # pluggy's order: built-ins last
        if impl.plugin_name in getattr(pm, "records", {}):
            with guarded(pm, impl.plugin_name, "fusion_register_commands"):
                impl.function(cli=cli)
        else:
            impl.function(cli=cli)
    return cli


def report_plugin_failures(pm, reported: set[str]) -> None:
    """One stderr line per failed, slow or printing plugin, once per invocation."""
    from ..config import clip
    from ..plugins import slow_plugins

    for record in pm.failures:
        if record.name in reported:
            continue
        reported.add(record.name)
        click.echo(
            f"warning: {record.describe()} failed to load: {record.error} "
            "(set FUSE_STRICT_PLUGINS=1 to make this fatal, FUSE_DISABLE_PLUGINS to skip it)",
            err=True,
        )
    for record in pm.records.values():
        if record.stdout and f"stdout:{record.name}" not in reported and record.name not in reported:
            reported.add(f"stdout:{record.name}")
            click.echo(f"warning: {record.describe()} printed to stdout while loading (kept out of fuse's output): "
                       f"{clip(record.stdout, 80)!r}", err=True)
    for record in slow_plugins(pm):
        if f"slow:{record.name}" not in reported and record.name not in reported:
            reported.add(f"slow:{record.name}")
            click.echo(f"note: {record.describe()} took {record.load_seconds:.1f} s to load "
                       f"(FUSE_DISABLE_PLUGINS={record.name} skips it; `fuse plugins --all` shows load times)", err=True)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
    from ..plugins import env_flag, get_plugin_manager

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or env_flag("FUSE_DEBUG")
    previous_showwarning = warnings.showwarning
    if not debug:
        warnings.showwarning = _one_line_warning
    try:
        pm = get_plugin_manager()
        state = State(pm, debug)
        cli = make_cli(pm)
        report_plugin_failures(pm, state.reported)  # import failures and those of fusion_register_commands
        return cli.main(args=argv, prog_name="fuse", obj=state, standalone_mode=False) or 0
    except FuseError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Abort as exc:  # click turns a KeyboardInterrupt inside a command into Abort
        from ..cleanup import Terminated

        if isinstance(exc.__cause__, Terminated):
            click.echo("terminated (SIGTERM); no partial output was kept", err=True)
            return 143
        click.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt as exc:
        from ..cleanup import Terminated

        terminated = isinstance(exc, Terminated)
        click.echo(f"{'terminated (SIGTERM)' if terminated else 'interrupted'}; no partial output was kept", err=True)
        return 143 if terminated else 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except OSError as exc:  # the last edge: a file system error nothing closer turned into a message
        if debug:
            raise
        from ..output import os_error_line

        click.echo(f"error: {os_error_line(exc, exc.filename or 'a file', 'access')}", err=True)
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    finally:
        warnings.showwarning = previous_showwarning


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings reach the user as one ``warning: ...`` line (file and line only with --debug)."""
    click.echo(f"warning: {message}", err=True)


def entry() -> None:  # pragma: no cover - console script
    sys.exit(main())
