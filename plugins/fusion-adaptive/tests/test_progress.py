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


class Counting:
    """A re-iterable source that counts its passes (as a task pool that encodes its test split on every pass)."""

    def __init__(self, batches) -> None:
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


def test_test_batches_are_encoded_once_when_they_fit_and_re_read_otherwise():
    import itertools

    import torch
    from fusion_adaptive.common import cached_cycle

    source = Counting([torch.zeros(4, 3), torch.ones(4, 3)])
    got = list(itertools.islice(cached_cycle(source), 7))
    assert source.passes == 1 and [float(b[0, 0]) for b in got] == [0, 1, 0, 1, 0, 1, 0]
    big = Counting([torch.zeros(4, 3), torch.ones(4, 3)])
    got = list(itertools.islice(cached_cycle(big, budget=60), 7))  # one batch is 48 bytes: the pass does not fit
    assert big.passes >= 4 and [float(b[0, 0]) for b in got] == [0, 1, 0, 1, 0, 1, 0]


def test_a_short_loop_estimates_after_its_first_item():
    out = io.StringIO()
    list(progress(RunContext(show_progress=True), range(2), "Fisher (x)", total=2, unit="model", out=out, clock=Clock()))
    lines = out.getvalue().splitlines()
    assert lines[0] == "Fisher (x): estimate 12.0 s for 2 models (6.0 s per model, from the first 1)"
    assert lines[-1].startswith("Fisher (x): 2/2 models, ")


def test_progress_counted_by_hand_in_examples():
    from fusion_core import Progress

    out = io.StringIO()
    report = Progress("Fisher (x)", 64, unit="example", out=out, clock=Clock(), lines=True)
    for _ in range(4):
        report.advance(16)
    lines = out.getvalue().splitlines()
    assert "Fisher (x): estimate 24.0 s for 64 examples (0.4 s per example, from the first 48)" in lines  # after 3 of 4 batches
    assert lines[-1].startswith("Fisher (x): 64/64 examples, ")


def test_run_context_track_writes_plain_lines_off_a_terminal_for_long_phases_only(capsys, monkeypatch):
    import fusion_core.progress

    assert list(RunContext(show_progress=True).track(range(3), "evaluating t", total=3)) == [0, 1, 2]
    assert capsys.readouterr().err == ""  # a short phase stays quiet
    monkeypatch.setattr(fusion_core.progress, "LOG_EVERY_S", 0.0)
    assert list(RunContext(show_progress=True).track(range(3), "evaluating t", total=3)) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "evaluating t: estimate" in err and "evaluating t: 3/3 items" in err
