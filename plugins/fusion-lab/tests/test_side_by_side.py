"""Several metrics of the same runs side by side (``fuse bench --metric accuracy --metric asr``)."""

from __future__ import annotations

from fusion_lab.leaderboard import Leaderboard, LeaderboardRow, Stat, to_csv_long, to_markdown_side_by_side


def board(metric: str, values: dict[str, tuple[float, float]]) -> Leaderboard:
    rows = tuple(LeaderboardRow(label=label, kind="baseline" if label == "pretrained" else "method", config="", seeds=(0,),
                                tasks={"a": Stat(a, None, 1), "b": Stat(b, None, 1)}, average=Stat((a + b) / 2, None, 1))
                 for label, (a, b) in values.items())
    return Leaderboard(title="mini-backdoor leaderboard", metric=metric, tasks=("a", "b"), rows=rows)


def test_side_by_side_markdown_keeps_the_first_boards_order_and_shows_both_metrics_in_percent():
    accuracy = board("accuracy", {"ties": (0.8, 0.6), "pretrained": (0.5, 0.5)})
    asr = board("asr", {"pretrained": (0.1, 0.0), "ties": (0.9, 0.2)})  # another order: rows are matched by name
    text = to_markdown_side_by_side([accuracy, asr])
    lines = text.splitlines()
    assert lines[0] == "**mini-backdoor leaderboard** — accuracy (%), asr (%)"
    assert lines[2] == "| # | method | config | seeds | accuracy: a | accuracy: b | accuracy: average | asr: a | asr: b | asr: average |"
    assert lines[4] == "| 1 | ties | – | 1 | 80.0 | 60.0 | **70.0** | 90.0 | 20.0 | **55.0** |"
    assert lines[5] == "| 2 | *pretrained* | – | 1 | 50.0 | 50.0 | **50.0** | 10.0 | 0.0 | **5.0** |"


def test_long_csv_has_a_metric_column():
    text = to_csv_long([board("accuracy", {"ties": (0.8, 0.6)}), board("asr", {"ties": (0.9, 0.2)})])
    lines = text.splitlines()
    assert lines[0].startswith("metric,rank,method,")
    assert lines[1].startswith("accuracy,1,ties,") and lines[2].startswith("asr,1,ties,")
    assert len(lines) == 3
