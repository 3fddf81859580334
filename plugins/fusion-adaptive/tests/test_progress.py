"""Progress of long loops: plain lines (done, rate, ETA) off a terminal, and an up-front estimate after a few steps."""

from __future__ import annotations

import io

from fusion_adaptive.common import ESTIMATE_AFTER, progress

from fusion_core.run_context import RunContext


class Clock:
    """Each step takes 2 s (6 s for the first three): the estimate is made from those."""

    def __init__(self) -> None:
        self.now, self.calls = 0.0, 0

    def __call__(self) -> float:
        self.calls += 1
        if self.calls > 1:
            self.now += 6.0 if self.calls <= ESTIMATE_AFTER + 1 else 2.0
        return self.now


def test_plain_lines_when_not_a_terminal_with_rate_eta_and_an_estimate_after_three_steps():
    out = io.StringIO()
    items = list(progress(RunContext(show_progress=True), range(10), "adapting (x)", total=10, out=out, clock=Clock()))
    assert items == list(range(10))
    lines = out.getvalue().splitlines()
    assert lines[0] == "adapting (x): 2/10 steps, 0.167/s, ETA 48.0 s"  # 12 s after the start: 10 s since the last line
    assert lines[1] == "adapting (x): estimate 60.0 s for 10 steps (6.0 s per step, from the first 3)"
    assert lines[-1].startswith("adapting (x): 10/10 steps, ") and lines[-1].endswith("ETA 0.0 s")


def test_no_output_when_progress_is_off():
    out = io.StringIO()
    assert list(progress(RunContext(show_progress=False), range(5), "x", total=5, out=out, clock=Clock())) == list(range(5))
    assert out.getvalue() == ""
