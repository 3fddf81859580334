"""Tables a person reads, and records a program reads: one helper for every listing the CLI prints.

On a terminal, a rich table fitted to its width: columns that do not fit are dropped (least
important first) and the one flexible column (a summary) is cut with "…" instead of being
wrapped into a narrow strip.  Piped (stdout not a terminal), plain records: a header line,
then one tab-separated record per line, so ``grep``, ``cut`` and ``sort`` work.
``--format json|csv|plain|table`` picks one explicitly.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

FORMATS = ("table", "plain", "json", "csv")


def default_format(stream=None) -> str:
    """``table`` on a terminal, ``plain`` records when piped or redirected."""
    stream = sys.stdout if stream is None else stream
    try:
        return "table" if stream.isatty() else "plain"
    except (AttributeError, ValueError):
        return "plain"


@attrs.frozen
class Column:
    """A column: its record key, header, alignment, and how it gives way on a narrow terminal.

    ``keep``: never dropped.  ``drop``: the order columns are dropped in when the table is too
    wide (lower first).  ``flex``: this column takes the remaining width and is cut with "…".
    """

    key: str
    header: str | None = None
    justify: str = "left"
    keep: bool = False
    drop: int = 0
    flex: bool = False
    min_width: int = 12
    group: str | None = None  # columns of one group are dropped together (e.g. every per-task column)

    @property
    def title(self) -> str:
        return self.header if self.header is not None else self.key


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _plain_cell(value: Any) -> str:
    return " ".join(_cell(value).split())  # one line, no tabs


def to_plain(records: Sequence[Mapping], columns: Sequence[Column]) -> str:
    """A header line, then one tab-separated record per line."""
    lines = ["\t".join(c.title for c in columns)]
    lines += ["\t".join(_plain_cell(r.get(c.key)) for c in columns) for r in records]
    return "\n".join(lines)


def to_csv_text(records: Sequence[Mapping], columns: Sequence[Column]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([c.title for c in columns])
    for r in records:
        writer.writerow([_cell(r.get(c.key)) for c in columns])
    return buf.getvalue().rstrip("\n")


def fit_columns(records: Sequence[Mapping], columns: Sequence[Column], width: int) -> tuple[list[Column], dict[str, int]]:
    """The columns that fit ``width`` (dropping by ``drop`` order) and each one's width (flex: what is left)."""
    natural = {c.key: max([len(c.title)] + [len(line) for r in records for line in _cell(r.get(c.key)).splitlines() or [""]])
               for c in columns}

    def need(cols):  # rich's box: a border, then each column's 1+1 padding and its right border
        return 1 + sum(3 + (min(natural[c.key], c.min_width) if c.flex else natural[c.key]) for c in cols)

    shown = list(columns)
    for column in sorted((c for c in columns if not c.keep), key=lambda c: c.drop):
        if need(shown) <= width:
            break
        shown = [c for c in shown if c is not column and (column.group is None or c.group != column.group)]
    widths = {c.key: natural[c.key] for c in shown}
    flex = [c for c in shown if c.flex]
    if flex:
        rest = width - need([c for c in shown if not c.flex]) - 3 * len(flex)
        for c in flex:
            widths[c.key] = max(c.min_width, min(natural[c.key], rest // len(flex)))
    return shown, widths


def render_table(records: Sequence[Mapping], columns: Sequence[Column], console, *, title: str | None = None,
                 styles: Sequence[str | None] | None = None) -> list[Column]:
    """A rich table fitted to the console's width; returns the columns left out."""
    from rich.markup import escape
    from rich.table import Table

    shown, widths = fit_columns(records, columns, console.width)
    table = Table(title=title, title_justify="left")
    for c in shown:
        table.add_column(c.title, justify=c.justify, no_wrap=True, overflow="ellipsis",
                         max_width=widths[c.key] if c.flex else None, min_width=None)
    for i, r in enumerate(records):
        table.add_row(*(escape(_cell(r.get(c.key))) for c in shown), style=styles[i] if styles else None)
    console.print(table)
    return [c for c in columns if c not in shown]


def emit(records: Sequence[Mapping], columns: Sequence[Column], fmt: str | None = None, *, title: str | None = None,
         console=None, json_data: Any = None, styles: Sequence[str | None] | None = None) -> list[Column]:
    """Print ``records`` as ``fmt`` (default: :func:`default_format`); returns the columns a table left out.

    ``json_data``: what ``--format json`` prints (default: the records).
    """
    import click

    fmt = fmt or default_format()
    if fmt == "json":
        click.echo(json.dumps(list(records) if json_data is None else json_data, indent=2, ensure_ascii=False, default=str))
    elif fmt == "csv":
        click.echo(to_csv_text(records, columns))
    elif fmt == "plain":
        click.echo(to_plain(records, columns))
    else:
        if console is None:
            from .consoles import console as _console

            console = _console()
        return render_table(records, columns, console, title=title, styles=styles)
    return []


def format_option(func):
    """``--format table|plain|json|csv`` (default: table on a terminal, plain records when piped)."""
    import click

    return click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
                        help="Output format (default: a table on a terminal, tab-separated records when piped).")(func)
