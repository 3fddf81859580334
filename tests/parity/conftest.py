"""Parity suite fixtures (minimal version: the parity branch owns the full one and the PARITY.md writer)."""

from __future__ import annotations

import json
import os

import pytest

_ROWS: list[dict] = []


@pytest.fixture
def parity_row():
    """``parity_row(method, peer, convention, max_abs_diff, note="")`` records one row of PARITY.md."""

    def record(method: str, peer: str, convention: str, max_abs_diff: float | None, note: str = "") -> None:
        _ROWS.append(
            {"method": method, "peer": peer, "convention": convention, "max_abs_diff": max_abs_diff, "note": note}
        )

    return record


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("FUSE_PARITY_ROWS")
    if path and _ROWS:
        with open(path, "a") as fh:
            for row in _ROWS:
                fh.write(json.dumps(row) + "\n")
