"""What a running method can see: seed, device, dtype, the task pool, progress and timings."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

    from .components import TaskPool


@attrs.define
class RunContext:
    """Passed to :meth:`Method.run` and :meth:`TaskPool.evaluate`; holds no global state."""

    seed: int = 0
    device: str = "cpu"
    compute_dtype: str = "float32"
    taskpool: "TaskPool | None" = None
    console: "Console | None" = None
    show_progress: bool = True
    timings: dict[str, float] = attrs.field(factory=dict)
    extras: dict[str, Any] = attrs.field(factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase; the report lists every phase's seconds."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def track(self, iterable: Iterable, description: str, total: int | None = None) -> Iterator:
        """Iterate reporting progress when progress is on: a rich bar on a terminal, else plain lines on stderr
        (:mod:`fusion_core.progress`: done/total, rate, ETA, and an estimate of the whole after the first items)."""
        if not self.show_progress:
            yield from iterable
            return
        import sys

        from .progress import is_terminal, track_lines

        if not is_terminal(sys.stderr):
            yield from track_lines(iterable, description, total, unit="item")
            return
        from rich.progress import track

        from .consoles import error_console

        yield from track(iterable, description=description, total=total, console=error_console(), transient=True)

    def progress(self, description: str, total: int | None = None, *, unit: str = "step") -> Any:
        """A :class:`fusion_core.progress.Progress` for work counted by hand (``advance(n)``); silent when progress is off."""
        from .progress import Progress

        return Progress(description, total, unit=unit) if self.show_progress else _Silent()


class _Silent:
    total: int | None = None

    def advance(self, n: int = 1) -> None:
        """Nothing is shown: a silent run counts nothing."""
