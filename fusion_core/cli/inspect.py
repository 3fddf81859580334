"""``fuse list``, ``fuse show`` and ``fuse plugins``: what is installed (no torch imported)."""

from __future__ import annotations

import json

import click

from ..registry import KIND_PLURALS

PLURAL_KINDS = {plural: kind for kind, plural in KIND_PLURALS.items()}


def _console():
    from ..console import console

    return console()


@click.command("list")
@click.argument("what", required=False, type=click.Choice(sorted(PLURAL_KINDS)))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def list_command(state, what, as_json):
    """List methods, model pools, task pools and benchmarks (name, plugin, summary, flags)."""
    registry = state.registry
    kinds = [PLURAL_KINDS[what]] if what else list(KIND_PLURALS)
    rows = {}
    for kind in kinds:
        rows[KIND_PLURALS[kind]] = [
            {
                "name": e.name,
                "plugin": e.plugin,
                "summary": e.summary if kind == "benchmark" else e.cls.summary,
                "flags": [] if kind == "benchmark" else e.cls.capabilities.flags(),
            }
            for e in (registry.entries[kind][n] for n in registry.names(kind))
        ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.markup import escape
    from rich.table import Table

    for title, items in rows.items():
        table = Table(title=title, title_justify="left")
        table.add_column("name", no_wrap=True)
        table.add_column("plugin", no_wrap=True)
        table.add_column("summary", overflow="fold", ratio=1)
        table.add_column("flags", overflow="fold")
        for item in items:
            table.add_row(*(escape(v) for v in (item["name"], item["plugin"], item["summary"], " ".join(item["flags"]))))
        _console().print(table)


@click.command("show")
@click.argument("name")
@click.option("--kind", type=click.Choice(sorted(PLURAL_KINDS)), help="Disambiguate a name used by several kinds.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def show_command(state, name, kind, as_json):
    """Show a component's fields (type, default, help), capabilities and reference."""
    from ..config import describe_fields
    from ..errors import ConfigError, did_you_mean

    registry = state.registry
    entries = [registry.get(PLURAL_KINDS[kind], name)] if kind else registry.find(name)
    if not entries:
        raise ConfigError(f"nothing is registered as {name!r}{did_you_mean(name, registry.all_names())}")
    for entry in entries:
        if entry.kind == "benchmark":
            info = {"kind": "benchmark", "name": entry.name, "plugin": entry.plugin, "summary": entry.summary,
                    "modelpool": entry.modelpool, "taskpool": entry.taskpool, "methods": list(entry.methods)}
        else:
            cls = entry.cls
            info = {"kind": entry.kind, "name": entry.name, "plugin": entry.plugin, "summary": cls.summary,
                    "reference": cls.reference_url, "capabilities": cls.capabilities.flags(),
                    "fields": describe_fields(cls.Config), "doc": _cleandoc(cls.__doc__)}
        if as_json:
            click.echo(json.dumps(info, indent=2))
            continue
        _render_show(info)


def _render_show(info: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = _console()
    console.print(f"[bold]{escape(info['name'])}[/] ({info['kind']}, plugin {escape(info['plugin'])}): {escape(info['summary'])}")
    if info["kind"] == "benchmark":
        console.print(f"modelpool: {info['modelpool']}\ntaskpool: {info['taskpool']}\nmethods: {info['methods']}")
        return
    if info.get("doc") and info["doc"] != info["summary"]:
        console.print(escape(info["doc"]))
    if info.get("reference"):
        console.print(f"reference: {info['reference']}")
    if info.get("capabilities"):
        console.print(f"capabilities: {' '.join(info['capabilities'])}")
    table = Table(title="fields", title_justify="left")
    for col in ("field", "type", "default", "help"):
        table.add_column(col, overflow="fold")
    for f in info["fields"]:
        table.add_row(*(escape(f[key]) for key in ("name", "type", "default", "help")))
    console.print(table if info["fields"] else "no fields")


@click.command("plugins")
@click.option("--all", "show_all", is_flag=True, help="Include the built-in plugins.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def plugins_command(state, show_all, as_json):
    """Installed plugins: distribution, version, hooks, what each registered, status."""
    pm = state.pm
    registered: dict[str, list[str]] = {}
    try:
        registry = state.registry
    except Exception as exc:  # a clash between plugins must not hide the listing
        click.echo(f"warning: {exc}", err=True)
        registry = None
    if registry is not None:
        for kind, table in registry.entries.items():
            for entry in table.values():
                registered.setdefault(entry.plugin, []).append(f"{kind}:{entry.name}")
    rows = []
    for record in pm.records.values():
        if record.builtin and not show_all:
            continue
        plugin = pm.get_plugin(record.name)
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin)) if plugin is not None else []
        rows.append({
            "name": record.name, "distribution": record.dist, "version": record.version, "module": record.module,
            "builtin": record.builtin, "status": record.status, "error": record.error,
            "hooks": hooks, "registered": sorted(registered.get(record.name, [])),
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="plugins", title_justify="left")
    for col in ("name", "distribution", "version", "hooks", "registered", "status"):
        table.add_column(col, overflow="fold")
    for r in rows:
        status = r["status"] if r["status"] != "failed" else f"[red]failed: {escape(r['error'])}[/]"
        table.add_row(escape(r["name"]), r["distribution"] or "", r["version"] or "", "\n".join(r["hooks"]),
                      escape(", ".join(r["registered"])), status)
    _console().print(table if rows else "no plugins installed (use --all to see the built-ins)")


def _cleandoc(doc: str | None) -> str:
    """A class docstring without its indentation, each paragraph on one line (the terminal wraps it)."""
    import inspect as pyinspect

    paragraphs = pyinspect.cleandoc(doc or "").split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)
