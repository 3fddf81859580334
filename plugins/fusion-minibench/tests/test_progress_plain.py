"""Building the mini benchmark piped (stderr not a terminal): plain log lines at each quarter, no bars."""

from __future__ import annotations

from fusion_minibench.recipe import _Progress


def test_piped_build_progress_is_plain_lines_at_each_quarter(capsys):
    with _Progress(True) as progress:  # under pytest stderr is captured: not a terminal
        advance = progress.task("teacher embeddings", 8)
        for _ in range(8):
            advance()
    lines = capsys.readouterr().err.splitlines()
    assert [line.rsplit(",", 1)[0] for line in lines] == [
        f"mini benchmark: teacher embeddings: {p}% ({n}/8)" for p, n in ((25, 2), (50, 4), (75, 6), (100, 8))]
    assert all(line.endswith("s") for line in lines)


def test_quiet_build_prints_nothing(capsys):
    with _Progress(False) as progress:
        progress.task("x", 4)(4)
    assert capsys.readouterr().err == ""
