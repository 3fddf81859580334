"""Scores in percent, durations in minutes: what fusion-lab's messages and listings print."""

import pytest
from fusion_lab.formatting import format_delta, format_duration, format_score


@pytest.mark.parametrize(("value", "metric", "text"), [(0.7, "accuracy", "70.0 %"), (0.69532, "f1", "69.5 %"),
                                                       (12.3456, "perplexity", "12.35"), (None, "accuracy", "–")])
def test_scores_read_in_percent(value, metric, text):
    assert format_score(value, metric) == text


@pytest.mark.parametrize(("seconds", "text"), [(4.2, "4.2 s"), (42, "42 s"), (75, "1 min 15 s"), (4000, "1 h 06 min")])
def test_durations(seconds, text):
    assert format_duration(seconds) == text


def test_deltas_in_points():
    assert format_delta(0.023, "accuracy") == "2.3 points" and format_delta(-1.5, "perplexity") == "-1.5"
