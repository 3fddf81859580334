"""``fuse list``, ``fuse show`` and ``fuse plugins``: what is installed (no torch imported)."""

from __future__ import annotations

import json
import textwrap

import click

from ..registry import KIND_PLURALS
from ..tables import format_option

PLURAL_KINDS = {plural: kind for kind, plural in KIND_PLURALS.items()}


def _console():
    from ..consoles import console

    return console()


def _list_columns():
    from ..tables import Column

    return [Column("name", keep=True), Column("kind", drop=0), Column("plugin", drop=2), Column("summary", flex=True, keep=True, min_width=40),
            Column("flags", drop=1)]


@click.command("list")
@click.argument("what", required=False, type=click.Choice(sorted(PLURAL_KINDS)))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (same as --format json).")
@format_option
@click.pass_obj
def list_command(state, what, as_json, fmt):
    """List methods, model pools, task pools and benchmarks (name, plugin, summary, flags).

    On a terminal: one table per kind, fitted to its width; piped: one tab-separated record
    per line (name, kind, plugin, summary, flags).
    """
    from ..tables import default_format, emit

    registry = state.registry
    kinds = [PLURAL_KINDS[what]] if what else list(KIND_PLURALS)
    rows = {}
    for kind in kinds:
        rows[KIND_PLURALS[kind]] = [
            {
                "name": e.name,
                "kind": kind,
                "plugin": e.plugin,
                "summary": e.summary if kind == "benchmark" else e.cls.summary,
                "flags": [] if kind == "benchmark" else e.cls.capabilities.flags(),
            }
            for e in (registry.entries[kind][n] for n in registry.names(kind))
        ]
    fmt = "json" if as_json else fmt or default_format()
    columns = _list_columns()
    if fmt == "json":
        json_rows = {plural: [{k: v for k, v in r.items() if k != "kind"} for r in items] for plural, items in rows.items()}
        emit([], columns, "json", json_data=json_rows)
    elif fmt != "table":
        emit([r for items in rows.values() for r in items], columns, fmt)
    else:
        for title, items in rows.items():
            emit(items, [c for c in columns if c.key != "kind"], "table", title=title)


@click.command("show")
@click.argument("name")
@click.option("--kind", type=click.Choice(sorted(PLURAL_KINDS)), help="Disambiguate a name used by several kinds.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (same as --format json).")
@format_option
@click.pass_obj
def show_command(state, name, kind, as_json, fmt):
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
                    "reference": cls.reference_url, "fusionbench_config": cls.fusionbench_config,
                    "capabilities": cls.capabilities.flags(),
                    "fields": describe_fields(cls.Config), "doc": _cleandoc(cls.__doc__)}
        if as_json or fmt == "json":
            click.echo(json.dumps(info, indent=2, ensure_ascii=False))
            continue
        _render_show(info, fmt)


def _render_show(info: dict, fmt: str | None = None) -> None:
    from rich.markup import escape

    from ..tables import Column, emit

    columns = [Column("name", "field", keep=True), Column("type", keep=True), Column("default", keep=True),
               Column("help", flex=True, keep=True, min_width=30)]
    if fmt in ("plain", "csv") and info["kind"] != "benchmark":
        emit(info["fields"], columns, fmt)  # asked for records: the fields only
        return
    console = _console()
    console.print(f"[bold]{escape(info['name'])}[/] ({info['kind']}, plugin {escape(info['plugin'])}): {escape(info['summary'])}")
    if info["kind"] == "benchmark":
        console.print(f"modelpool: {info['modelpool']}\ntaskpool: {info['taskpool']}\nmethods: {info['methods']}")
        return
    if info.get("doc") and info["doc"] != info["summary"]:
        console.print(escape(info["doc"]))
    if info.get("reference"):
        console.print(f"reference: {info['reference']}")
    if info.get("fusionbench_config"):
        console.print(f"defaults: FusionBench's fusion_bench_config/method/{info['fusionbench_config']} (checked by the parity suite)")
    if info.get("capabilities"):
        console.print(f"capabilities: {' '.join(info['capabilities'])}")
    if not info["fields"]:
        console.print("no fields")
        return
    if console.width < 100:  # narrow: one block per field, its help indented below, instead of a squeezed table
        console.print("fields:")
        for f in info["fields"]:
            head = textwrap.wrap(f"{f['name']}: {f['type']} = {f['default']}", width=max(40, console.width - 1),
                                 initial_indent="  ", subsequent_indent="    ")  # a long default stays indented
            rest = "\n".join([head[0][2 + len(f["name"]):], *head[1:]])
            console.print(f"  [bold]{escape(f['name'])}[/]{escape(rest)}", highlight=False)
            wrapped = textwrap.fill(f["help"], width=max(40, console.width - 6), initial_indent="      ", subsequent_indent="      ")
            console.print(escape(wrapped), highlight=False)
        return
    from rich.table import Table

    table = Table(title="fields", title_justify="left")  # help wraps: it is the one long column here
    for col in ("field", "type", "default"):
        table.add_column(col, no_wrap=col == "field", overflow="fold")
    table.add_column("help", overflow="fold", ratio=1)
    for f in info["fields"]:
        table.add_row(*(escape(f[key]) for key in ("name", "type", "default", "help")))
    console.print(table)


@click.command("plugins")
@click.option("--all", "show_all", is_flag=True, help="Include the built-in plugins.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (same as --format json).")
@format_option
@click.pass_obj
def plugins_command(state, show_all, as_json, fmt):
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
            "load_seconds": round(record.load_seconds, 4),
        })
    from ..tables import Column, default_format, emit

    fmt = "json" if as_json else fmt or default_format()
    if fmt == "json":
        emit(rows, [], "json")
        return
    if not rows:
        click.echo("no plugins installed (use --all to see the built-ins)")
        return
    records = []
    for r in rows:
        counts: dict[str, int] = {}
        for item in r["registered"]:
            kind = item.split(":", 1)[0]
            counts[kind] = counts.get(kind, 0) + 1
        records.append({
            "name": r["name"], "distribution": r["distribution"] or "(built-in)", "version": r["version"] or "",
            "status": r["status"] if r["status"] != "failed" else f"failed: {r['error']}",
            "load": f"{r['load_seconds'] * 1000:.0f} ms" if r["status"] != "skipped" else "",
            "hooks": [h.removeprefix("fusion_register_") for h in r["hooks"]],
            # a table shows how many of each kind; records list every name
            "registered": ", ".join(f"{n} {KIND_PLURALS[k] if n > 1 else k}" for k, n in counts.items()) if fmt == "table"
                          else r["registered"],
        })
    columns = [Column("name", keep=True), Column("distribution", drop=2), Column("version", drop=1),
               Column("status", keep=True, flex=True, min_width=6), Column("hooks", drop=0), Column("registered", keep=True),
               Column("load", justify="right", drop=1)]
    emit(records, columns, fmt, title="plugins", styles=["red" if r["status"] == "failed" else None for r in rows])


def _cleandoc(doc: str | None) -> str:
    """A class docstring without its indentation, each paragraph on one line (the terminal wraps it)."""
    import inspect as pyinspect

    paragraphs = pyinspect.cleandoc(doc or "").split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)
