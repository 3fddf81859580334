"""Listings a person reads at 80 columns, and plain records when piped (fusion_core.tables)."""

from __future__ import annotations

import csv
import io
import json

import pytest

from fusion_core.cli.main import main
from fusion_core.tables import Column, fit_columns


@pytest.fixture
def narrow_terminal(monkeypatch):
    """The rich console as an 80-column terminal; returns a function giving what was printed."""
    from rich.console import Console

    import fusion_core.consoles as console_module

    buf = io.StringIO()
    term = Console(file=buf, width=80, force_terminal=True, color_system=None)
    monkeypatch.setattr(console_module, "console", lambda: term)
    return buf.getvalue


def test_piped_list_is_one_tab_separated_record_per_line(capsys):
    assert main(["list", "methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "name\tkind\tplugin\tsummary\tflags"
    records = [line.split("\t") for line in lines[1:]]
    assert all(len(r) == 5 for r in records)
    ties = next(r for r in records if r[0] == "ties")
    assert ties[1:3] == ["method", "merging"] and ties[3].startswith("TIES-Merging") and ties[4] == "needs-base"
    assert main(["list", "methods", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["name"] for r in rows} == {r[0] for r in records}


def test_list_at_80_columns_cuts_summaries_instead_of_wrapping(narrow_terminal):
    assert main(["list", "methods", "--format", "table"]) == 0
    lines = narrow_terminal().splitlines()
    assert max(len(line) for line in lines) <= 80
    body = [line for line in lines if line.startswith("│")]
    assert any(line.startswith("│ ties ") for line in body)
    assert len(body) == len({line.split("│")[1].strip() for line in body})  # one line per method, none wrapped
    assert any("…" in line for line in body)


def test_plugins_piped_and_at_80_columns(capsys, narrow_terminal):
    assert main(["plugins", "--all", "--format", "plain"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "name\tdistribution\tversion\tstatus\thooks\tregistered\tload"
    merging = next(line.split("\t") for line in lines if line.startswith("merging\t"))
    assert merging[1] == "fusion-merging" and merging[3] == "ok" and "methods" in merging[4].split(", ")
    assert "method:ties" in merging[5].split(", ") and merging[6].endswith(" ms")
    assert main(["plugins", "--all", "--format", "table"]) == 0
    table = narrow_terminal().splitlines()
    assert max(len(line) for line in table) <= 80
    assert any(line.startswith("│ merging ") and "methods" in line for line in table)
    assert main(["plugins", "--json"]) == 0  # unchanged JSON
    assert any(r["name"] == "merging" for r in json.loads(capsys.readouterr().out))


def test_fit_columns_drops_least_important_first_and_gives_flex_the_rest():
    records = [{"name": "ties", "plugin": "merging", "summary": "x" * 200, "flags": "needs-base random"}]
    columns = [Column("name", keep=True), Column("plugin", drop=2), Column("summary", flex=True, keep=True, min_width=20),
               Column("flags", drop=1)]
    shown, widths = fit_columns(records, columns, 80)
    assert [c.key for c in shown] == ["name", "plugin", "summary", "flags"]
    assert 1 + sum(3 + w for w in widths.values()) == 80  # exactly the width
    shown, widths = fit_columns(records, columns, 50)
    assert [c.key for c in shown] == ["name", "plugin", "summary"] and 1 + sum(3 + w for w in widths.values()) == 50
