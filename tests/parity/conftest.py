"""The parity suite: our methods against FusionBench's and mergekit's own code.

Every test records one or more rows through the ``parity_row`` fixture::

    parity_row(method, peer, convention, max_abs_diff, note="", statistics=False)

``max_abs_diff`` is the largest absolute difference between the peer's output and ours
(``None`` when the peer itself is broken: say why in ``note``).  ``statistics=True`` marks a
random method compared on its statistics (kept fraction, unbiasedness) because the peer draws
its masks from torch's global generator: ``max_abs_diff`` is then the largest difference of
those statistics, checked by the test against its own statistical bound (the note says which).  At the end of a session
the rows of each peer are merged (by method × convention) into
``parity-results/<peer>.json`` at the repository root, and ``PARITY.md`` is rendered from
every JSON file present there.  So runs in different environments (one per peer) add up
to one table; ``rm -r parity-results`` before a run starts the table afresh.

Tests skip unless their peer is importable (``pytest.importorskip``), so the default test
run does not need the peers and writes nothing.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import pytest

_ROWS: list[dict] = []


@pytest.fixture
def parity_row(request):
    """``parity_row(method, peer, convention, max_abs_diff, note="", statistics=False)``: record one row of PARITY.md."""

    def record(method: str, peer: str, convention: str, max_abs_diff: float | None, note: str = "",
               statistics: bool = False) -> None:
        _ROWS.append(
            {
                "method": str(method),
                "peer": str(peer),
                "convention": str(convention),
                "max_abs_diff": None if max_abs_diff is None else float(max_abs_diff),
                "note": str(note),
                "statistics": bool(statistics),
                "test": request.node.nodeid,
            }
        )

    return record


def pytest_sessionfinish(session, exitstatus):
    if not _ROWS:
        return
    command = os.environ.get("PARITY_COMMAND") or "python -m pytest " + " ".join(sys.argv[1:])
    write(repo_root(), _ROWS, command)


# ---------------------------------------------------------------------------------------
# the writer

TOLERANCE = 1e-5
"""A deterministic method matches its peer when the max abs difference is at most this."""

PEER_DISTRIBUTIONS = {"fusionbench": "fusion-bench", "mergekit": "mergekit"}


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def status(row: dict) -> str:
    diff = row.get("max_abs_diff")
    if diff is None:
        return "peer defect"
    if row.get("statistics"):
        return "statistics match"
    return "match" if diff <= TOLERANCE else "DIFFERS"


def write(root: Path, rows: list[dict], command: str) -> Path:
    """Merge ``rows`` into the per-peer JSON files under ``root/parity-results`` and re-render ``PARITY.md``."""
    folder = root / "parity-results"
    folder.mkdir(exist_ok=True)
    for peer in sorted({r["peer"] for r in rows}):
        path = folder / f"{peer}.json"
        old = json.loads(path.read_text()) if path.exists() else {"rows": []}
        def key(r: dict) -> tuple:
            return r["method"], r["convention"], r.get("test", ""), r.get("note", "").split(":")[0]

        merged = {key(r): r for r in old.get("rows", [])}
        for r in rows:
            if r["peer"] == peer:
                merged[key(r)] = r
        data = {
            "peer": peer,
            "peer_version": _version(PEER_DISTRIBUTIONS.get(peer, peer)),
            "torch": _version("torch"),
            "python": platform.python_version(),
            "command": command,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "rows": sorted(merged.values(), key=lambda r: (r["method"], r["convention"])),
        }
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
    return render(root)


def _fmt(diff: float | None) -> str:
    return "—" if diff is None else f"{diff:.1e}" if diff else "0"


def render(root: Path) -> Path:
    """Write ``PARITY.md`` from every ``parity-results/*.json``."""
    runs = [json.loads(p.read_text()) for p in sorted((root / "parity-results").glob("*.json"))]
    rows = sorted((r for run in runs for r in run["rows"]), key=lambda r: (r["method"], r["peer"], r["convention"]))
    counts = {s: sum(status(r) == s for r in rows) for s in ("match", "statistics match", "DIFFERS", "peer defect")}
    lines = [
        "# Parity with FusionBench and mergekit",
        "",
        "Each row runs the peer's own code (its classes or merge functions, as its CLI would) and ours on the",
        "same inputs (tiny models built from configs, or toy state dicts) and reports the largest absolute",
        f"difference of the outputs. *match*: ≤ {TOLERANCE:g}; *statistics match*: a random method whose masks cannot be",
        "shared (the peer draws from torch's global generator), compared on its statistics within the test's bound;",
        f"*DIFFERS*: above {TOLERANCE:g} (the note says why); *peer defect*:",
        "the peer itself crashes or is wrong there (the note says how). Random methods are compared with the",
        "same masks or on their statistics (the note says which). Generated by the parity suite (`tests/parity/`);",
        "do not edit by hand.",
        "",
        f"{len(rows)} rows: {counts['match']} match, {counts['statistics match']} match on statistics, "
        f"{counts['DIFFERS']} differ, {counts['peer defect']} peer defects.",
        "",
        "| method | peer | convention | max abs diff | status | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = r.get("note", "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['method']} | {r['peer']} | {r['convention']} | {_fmt(r['max_abs_diff'])} | {status(r)} | {note} |")
    lines += ["", "## Runs", "", "| peer | version | torch | python | date | command |", "|---|---|---|---|---|---|"]
    for run in runs:
        lines.append(
            f"| {run['peer']} | {run['peer_version']} | {run['torch']} | {run['python']} | {run['date']} | `{run['command']}` |"
        )
    path = root / "PARITY.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path
