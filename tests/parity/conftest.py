"""Parity suite support (minimal version: the parity helper's conftest, with the PARITY.md writer, replaces it).

``parity_row(method, peer, convention, max_abs_diff, note="")`` records one row of the table.
"""

from __future__ import annotations

import pytest

ROWS: list[dict] = []


@pytest.fixture
def parity_row():
    def record(method: str, peer: str, convention: str, max_abs_diff: float | None, note: str = "") -> None:
        ROWS.append({"method": method, "peer": peer, "convention": convention, "max_abs_diff": max_abs_diff, "note": note})

    return record


def pytest_terminal_summary(terminalreporter):
    for row in ROWS:
        diff = "—" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.2e}"
        terminalreporter.write_line(f"parity | {row['method']} | {row['peer']} | {row['convention']} | {diff} | {row['note']}")
