"""Leaderboards from the results database: a rich table, Markdown, CSV and a PNG plot.

Rows are (label, config summary) pairs — a method with its non-default fields, or a
baseline — and columns are the tasks plus their average.  With several seeds each
cell is ``mean ± std`` over seeds (sample standard deviation); the average column is
the mean over seeds of each seed's task average.  Rows are sorted by average, best
first.  Accuracy-like metrics in [0, 1] are shown in percent.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs

from .formatting import PERCENT_METRICS
from .results_db import Row


@attrs.frozen
class Stat:
    mean: float
    std: float | None  # None with a single seed
    n: int


def _stat(values: Sequence[float]) -> Stat:
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Stat(mean, std, n)


@attrs.frozen
class LeaderboardRow:
    label: str
    kind: str
    config: str
    seeds: tuple[int, ...]
    tasks: dict  # task -> Stat
    average: Stat | None

    @property
    def name(self) -> str:
        return f"{self.label} ({self.config})" if self.config else self.label


@attrs.frozen
class Leaderboard:
    title: str
    metric: str
    tasks: tuple[str, ...]
    rows: tuple[LeaderboardRow, ...]

    @property
    def percent(self) -> bool:
        return self.metric in PERCENT_METRICS


def build_leaderboard(rows: Iterable[Row], *, title: str, metric: str | None = None, tasks: Sequence[str] | None = None) -> Leaderboard:
    """Aggregate ``ok`` rows into a leaderboard (failed rows are ignored).

    :param metric: the metric to show (default: the rows' primary metric).
    :param tasks: column order (default: tasks in order of first appearance).
    """
    ok = [r for r in rows if r.status == "ok"]
    if metric is None:
        metric = next((r.metric for r in ok if r.metric), "accuracy")
    order: list[str] = list(tasks or [])
    groups: dict[tuple[str, str, str], dict[int, dict[str, float]]] = {}
    kinds: dict[tuple[str, str, str], str] = {}
    for r in ok:
        value = r.metrics.get(metric, r.value if r.metric == metric else None)
        if value is None:
            continue
        if r.task not in order and tasks is None:
            order.append(r.task)
        key = (r.label, r.config_summary, r.config_hash)
        kinds[key] = r.kind
        groups.setdefault(key, {}).setdefault(r.seed, {})[r.task] = float(value)
    out = []
    for key, by_seed in groups.items():
        label, summary, _ = key
        per_task = {}
        for task in order:
            values = [seed_values[task] for seed_values in by_seed.values() if task in seed_values]
            if values:
                per_task[task] = _stat(values)
        seed_averages = []
        for seed_values in by_seed.values():
            shown = [v for t, v in seed_values.items() if t in order]
            if shown:
                seed_averages.append(math.fsum(shown) / len(shown))
        out.append(LeaderboardRow(label=label, kind=kinds[key], config=summary, seeds=tuple(sorted(by_seed)),
                                  tasks=per_task, average=_stat(seed_averages) if seed_averages else None))
    out.sort(key=lambda row: (-(row.average.mean if row.average else -math.inf), row.label, row.config))
    return Leaderboard(title=title, metric=metric, tasks=tuple(order), rows=tuple(out))


# --------------------------------------------------------------------------- formatting


def format_stat(stat: Stat | None, percent: bool) -> str:
    if stat is None:
        return "–"
    scale = 100.0 if percent else 1.0
    text = f"{scale * stat.mean:.1f}" if percent else f"{stat.mean:.4g}"
    if stat.std is not None:
        text += f" ± {scale * stat.std:.1f}" if percent else f" ± {stat.std:.2g}"
    return text


def _seed_text(row: LeaderboardRow) -> str:
    return str(len(row.seeds))


def to_markdown(board: Leaderboard) -> str:
    """A GitHub Markdown table (values in percent for accuracy-like metrics)."""
    unit = f"{board.metric} (%)" if board.percent else board.metric
    header = ["#", "method", "config", "seeds", *board.tasks, "average"]
    lines = [f"**{board.title}** — {unit}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join(["---:", "---", "---", "---:"] + ["---:"] * (len(board.tasks) + 1)) + "|"]
    for rank, row in enumerate(board.rows, 1):
        label = f"*{row.label}*" if row.kind == "baseline" else row.label
        cells = [str(rank), label, row.config or "–", _seed_text(row),
                 *[format_stat(row.tasks.get(t), board.percent) for t in board.tasks],
                 f"**{format_stat(row.average, board.percent)}**"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_markdown_side_by_side(boards: Sequence[Leaderboard]) -> str:
    """One Markdown table of several metrics of the same runs (e.g. clean accuracy and attack success rate).

    Rows are those of the first board, in its order; for each metric, its per-task columns and its average.
    """
    if len(boards) == 1:
        return to_markdown(boards[0])
    first = boards[0]
    lookup = [{(row.label, row.config): row for row in board.rows} for board in boards]
    header = ["#", "method", "config", "seeds"]
    for board in boards:
        header += [f"{board.metric}: {t}" for t in board.tasks] + [f"{board.metric}: average"]
    units = ", ".join(f"{b.metric} (%)" if b.percent else b.metric for b in boards)
    lines = [f"**{first.title}** — {units}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join(["---:", "---", "---", "---:"] + ["---:"] * (len(header) - 4)) + "|"]
    for rank, row in enumerate(first.rows, 1):
        label = f"*{row.label}*" if row.kind == "baseline" else row.label
        cells = [str(rank), label, row.config or "–", _seed_text(row)]
        for board, rows in zip(boards, lookup, strict=True):
            other = rows.get((row.label, row.config))
            cells += [format_stat(other.tasks.get(t) if other else None, board.percent) for t in board.tasks]
            cells.append(f"**{format_stat(other.average if other else None, board.percent)}**")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    return "" if value is None else repr(round(value, 6))


def to_csv(board: Leaderboard) -> str:
    """CSV with raw values (not percent): mean per task and average, then their std over seeds.

    ``seeds`` is how many seeds (as in the table), ``seed_list`` which ones.
    """
    import csv

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["rank", "method", "kind", "config", "seeds", "seed_list", *board.tasks, "average",
                     *[f"{t}_std" for t in board.tasks], "average_std"])
    for rank, row in enumerate(board.rows, 1):
        means = [_num(row.tasks[t].mean) if t in row.tasks else "" for t in board.tasks]
        stds = [_num(row.tasks[t].std) if t in row.tasks else "" for t in board.tasks]
        avg = row.average
        writer.writerow([rank, row.label, row.kind, row.config, _seed_text(row), " ".join(map(str, row.seeds)), *means,
                         _num(avg.mean if avg else None), *stds, _num(avg.std if avg else None)])
    return buf.getvalue()


def to_csv_long(boards: Sequence[Leaderboard]) -> str:
    """Several metrics in one CSV: :func:`to_csv` of each board with a leading ``metric`` column (tasks must agree)."""
    lines: list[str] = []
    for i, board in enumerate(boards):
        body = to_csv(board).splitlines()
        if i == 0:
            lines.append("metric," + body[0])
        lines += [f"{board.metric},{line}" for line in body[1:]]
    return "\n".join(lines) + "\n"


def render_rich(board: Leaderboard, console, fmt: str | None = None) -> None:
    """A table fitted to the terminal (per-task columns left out, all together, when they do not fit);
    piped, the title and then one tab-separated record per row (``fmt``: see :mod:`fusion_core.tables`)."""
    from fusion_core import Column, default_format, emit

    fmt = fmt or default_format()
    unit = f"{board.metric} (%)" if board.percent else board.metric
    if not board.rows:
        console.print(f"{board.title}: no results yet")
        return
    columns = [Column("#", justify="right", keep=True), Column("method", keep=True),
               Column("config", flex=True, keep=True, min_width=10), Column("seeds", justify="right", drop=1),
               *[Column(f"task:{t}", t, justify="right", drop=0, group="tasks") for t in board.tasks],
               Column("average", justify="right", keep=True)]
    records = [{"#": rank, "method": row.label, "config": row.config or "–", "seeds": _seed_text(row),
                **{f"task:{t}": format_stat(row.tasks.get(t), board.percent) for t in board.tasks},
                "average": format_stat(row.average, board.percent)} for rank, row in enumerate(board.rows, 1)]
    if fmt == "plain":
        console.print(f"{board.title} — {unit}", highlight=False, soft_wrap=True)
    left_out = emit(records, columns, fmt, title=f"{board.title} — {unit}", console=console,
                    styles=["dim" if row.kind == "baseline" else None for row in board.rows])
    if left_out:
        console.print(f"[dim]per-task columns left out at {console.width} columns; widen the terminal, "
                      "or pipe the output / use --markdown or --csv to see them[/]", highlight=False)


def plot_png(board: Leaderboard, path: str | os.PathLike) -> None:
    """Grouped bars: per task (and the average), one bar per leaderboard row, error bars over seeds."""
    try:
        import matplotlib
    except ImportError:
        from fusion_core import FuseError

        raise FuseError("--plot needs matplotlib: pip install matplotlib (or fusion-core[plot])") from None

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    groups = [*board.tasks, "average"]
    scale = 100.0 if board.percent else 1.0
    n = max(1, len(board.rows))
    width = 0.8 / n
    legend_width = 3.5  # inches beside the axes
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(groups) + 0.12 * n * len(groups)) + legend_width, 4.8))
    try:
        cmap = plt.get_cmap("tab20")
        for i, row in enumerate(board.rows):
            stats = [row.tasks.get(t) for t in board.tasks] + [row.average]
            xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
            heights = [scale * s.mean if s else 0.0 for s in stats]
            errors = [scale * s.std if s and s.std is not None else 0.0 for s in stats]
            ax.bar(xs, heights, width, yerr=errors if any(errors) else None, label=row.name, color=cmap(i % 20),
                   hatch="//" if row.kind == "baseline" else None, edgecolor="white", linewidth=0.3)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=30, ha="right")
        ax.set_ylabel(f"{board.metric} (%)" if board.percent else board.metric)
        ax.set_title(board.title)
        ax.legend(fontsize=7, ncol=2 if n > 8 else 1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
        os.close(fd)
        try:
            fig.savefig(tmp, format="png", dpi=120)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    finally:
        plt.close(fig)
