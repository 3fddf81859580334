"""Scores and durations as a person reads them in fusion-lab's listings and messages.

Scores in [0, 1] of accuracy-like metrics are shown in percent with one decimal everywhere a
person reads them (:func:`format_score`).
"""

from __future__ import annotations

PERCENT_METRICS = ("accuracy", "acc", "top1", "f1", "asr")


def is_percent(metric: str | None) -> bool:
    return metric in PERCENT_METRICS


def format_score(value: float | None, metric: str | None, *, unit: bool = True) -> str:
    """``0.7`` of accuracy → ``70.0 %`` (``70.0`` without ``unit``); other metrics with 4 significant digits."""
    if value is None:
        return "–"
    if is_percent(metric):
        return f"{100 * value:.1f}{' %' if unit else ''}"
    return f"{value:.4g}"


def format_delta(value: float, metric: str | None) -> str:
    """A difference of two scores: ``0.023`` of accuracy → ``2.3 points``; other metrics with 4 significant digits."""
    return f"{100 * value:.1f} points" if is_percent(metric) else f"{value:.4g}"


def format_duration(seconds: float) -> str:
    """``75`` → ``1 min 15 s``; ``4000`` → ``1 h 07 min``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
