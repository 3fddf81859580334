"""Recording a run through the core's lifecycle hooks (``fusion_phase_end``, ``fusion_run_end``).

:func:`recording` opens a recording for the runs started in the current context (thread or
task): fusion-lab's hook implementations (:mod:`fusion_lab.plugin`) fill it in, so the job
path of ``fuse bench``/``fuse sweep`` takes each run's report from the run's own
announcement rather than from the core.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator

import attrs


@attrs.define
class Recording:
    """What one run announced: its phases as they ended, then its report."""

    phases: list[tuple[str, float]] = attrs.field(factory=list)
    report: dict | None = None


_CURRENT: contextvars.ContextVar[Recording | None] = contextvars.ContextVar("fusion_lab_recording", default=None)
_REGISTERING = threading.Lock()


def current() -> Recording | None:
    """The recording open in this context, or ``None``."""
    return _CURRENT.get()


@contextlib.contextmanager
def recording(plugin_manager) -> Iterator[Recording]:
    """Record the runs started in this context with ``plugin_manager`` (fusion-lab's hooks registered on it)."""
    from . import plugin

    with _REGISTERING:
        if not plugin_manager.is_registered(plugin):
            plugin_manager.register(plugin, name="fusion_lab.recording")
    rec = Recording()
    token = _CURRENT.set(rec)
    try:
        yield rec
    finally:
        _CURRENT.reset(token)
