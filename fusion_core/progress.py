"""Progress of long phases as plain lines, for logs and pipes (a terminal gets rich's bar instead).

A :class:`Progress` counts work as it is done (``advance(n)``) and writes to stderr:

- once, after the first few advances (:data:`ESTIMATE_AFTER`, fewer when the whole phase has fewer),
  an estimate of the whole phase: ``<description>: estimate 4.2 min for 1000 steps (0.25 s per step,
  from the first 3)``;
- off a terminal, at most every :data:`LOG_EVERY_S` seconds and at the end:
  ``<description>: <done>/<total> <unit>s, <rate>/s, ETA <time>``.

A phase shorter than :data:`LOG_EVERY_S` (estimated, then measured) prints nothing.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

ESTIMATE_AFTER = 3
"""Advances timed before the estimate of the whole phase (fewer when the phase has fewer)."""
LOG_EVERY_S = 10.0
"""Seconds between plain progress lines."""


def format_seconds(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def is_terminal(out: Any) -> bool:
    return bool(getattr(out, "isatty", lambda: False)())


class Progress:
    """Work done in one long phase, reported as plain lines (``lines=False``: the estimate only, e.g. under a bar).

    ``total`` (in ``unit``s) may be ``None`` (unknown: no ETA, no estimate) or set later, once known.
    """

    def __init__(self, description: str, total: int | None = None, *, unit: str = "step", out: Any = None,
                 clock: Callable[[], float] | None = None, lines: bool | None = None) -> None:
        self.description, self.total, self.unit = description, total, unit
        self.out = sys.stderr if out is None else out
        self.clock = clock or time.perf_counter
        self.lines = not is_terminal(self.out) if lines is None else lines
        self.start = self.last = self.clock()
        self.done = self.calls = 0
        self.estimated = False

    def advance(self, n: int = 1) -> None:
        self.done += n
        self.calls += 1
        now = self.clock()
        rate = self.done / max(now - self.start, 1e-9)
        total = self.total
        if total and not self.estimated and 0 < self.done < total:
            expected_calls = math.ceil(total * self.calls / self.done)
            per = (now - self.start) / self.done
            if self.calls >= min(ESTIMATE_AFTER, expected_calls - 1) and total * per >= LOG_EVERY_S:
                self.estimated = True
                print(f"{self.description}: estimate {format_seconds(total * per)} for {total} {self.unit}s "
                      f"({format_seconds(per)} per {self.unit}, from the first {self.done})", file=self.out, flush=True)
        if self.lines and (now - self.last >= LOG_EVERY_S or (total and self.done >= total and now - self.start >= LOG_EVERY_S)):
            self.last = now
            left = f", ETA {format_seconds(max(total - self.done, 0) / rate)}" if total else ""
            print(f"{self.description}: {self.done}{f'/{total}' if total else ''} {self.unit}s, {rate:.3g}/s{left}",
                  file=self.out, flush=True)


def track_lines(items: Iterable, description: str, total: int | None = None, *, unit: str = "step", out: Any = None,
                clock: Callable[[], float] | None = None, lines: bool | None = None) -> Iterator:
    """Iterate ``items``, one :meth:`Progress.advance` per item."""
    progress = Progress(description, total, unit=unit, out=out, clock=clock, lines=lines)
    for item in items:
        yield item
        progress.advance()
