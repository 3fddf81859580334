"""How the mini leaderboard ranks methods compared with FusionBench's CLIP-ViT-B/32 eight-task table.

Pure Python (no torch): :func:`compare` takes, for each leaderboard row, its average score per
*unit* (a recipe seed, or a run seed) and returns the rows both tables have, the pairs of rows
ordered the same way, Kendall's τ-b and a percentile bootstrap interval of τ-b in which each
row's units are resampled with replacement (independently per row) and the row's score is the
mean of the resampled units.

Scores are compared at the precision both tables are published at (0.1 point): our means are
rounded to one decimal of a percent before ranking, so two rows that the leaderboard shows with
the same value are a tie, as in FusionBench's table.  τ-b corrects for ties in either table;
with no ties it equals τ-a = (concordant − discordant) / pairs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

import attrs


@attrs.frozen
class Reference:
    """A row of FusionBench's table and how to find it on the mini leaderboard.

    ``label`` is the method name (or ``pretrained``/``individual``); ``fields`` the method
    fields that pick the row (the leaderboard's config summary must contain them).
    """

    name: str
    score: float
    label: str
    fields: tuple[tuple[str, str], ...] = ()


FUSIONBENCH_SOURCE = ("FusionBench 0.2.33, docs/modelpool/clip_vit.md, 'Experimental Results', "
                      "CLIP-ViT-B/32 on eight tasks, average accuracy (%)")

FUSIONBENCH_CLIP_B32: tuple[Reference, ...] = (
    Reference("pretrained (zero-shot)", 48.2, "pretrained"),
    Reference("individual (fine-tuned)", 90.3, "individual"),
    Reference("simple average", 66.5, "simple_average"),
    Reference("task arithmetic (λ = 0.3)", 68.0, "task_arithmetic"),
    Reference("TIES-merging (λ = 0.3)", 72.2, "ties"),
    Reference("Fisher merging", 70.6, "fisher_merging"),
    Reference("RegMean", 82.4, "regmean"),
    Reference("RegMean++", 84.4, "regmean_plusplus"),
    Reference("task-wise AdaMerging", 68.7, "adamerging", (("granularity", "task"),)),
    Reference("layer-wise AdaMerging", 82.6, "adamerging", (("granularity", "layer"),)),
    Reference("WEMoE", 89.2, "wemoe"),
    Reference("E-WEMoE (90 %)", 89.1, "e_wemoe"),
    Reference("Iso-C (α = 1.5)", 82.8, "iso_c"),
    Reference("Iso-CTS (α = 1.5)", 82.7, "iso_cts"),
    Reference("simple ensemble", 75.8, "simple_ensemble"),
    Reference("Concrete TA (λ = 0.3)", 77.6, "concrete_task_arithmetic"),
    Reference("WUDI-merging", 84.5, "wudi"),
    Reference("Concrete layer-wise AdaMerging", 84.4, "concrete_adamerging", (("granularity", "layer"),)),
)
"""FusionBench's CLIP-ViT-B/32 eight-task averages (TSV-M has no B/32 eight-task figure there)."""


# --------------------------------------------------------------------------- Kendall's τ


@attrs.frozen
class Kendall:
    n: int
    pairs: int
    concordant: int
    discordant: int
    tied_x: int  # pairs tied in x only
    tied_y: int  # pairs tied in y only
    tied_both: int

    @property
    def tau_a(self) -> float:
        return (self.concordant - self.discordant) / self.pairs if self.pairs else math.nan

    @property
    def tau_b(self) -> float:
        """(C − D) / √((P − Tx)(P − Ty)), Tx/Ty counting every pair tied in x/y (also those tied in both)."""
        nx = self.pairs - self.tied_x - self.tied_both
        ny = self.pairs - self.tied_y - self.tied_both
        return (self.concordant - self.discordant) / math.sqrt(nx * ny) if nx and ny else math.nan


def kendall(xs: Sequence[float], ys: Sequence[float]) -> Kendall:
    """Pair counts and τ of two paired score lists (exact comparisons: round before, if needed)."""
    if len(xs) != len(ys):
        raise ValueError(f"kendall: {len(xs)} x values but {len(ys)} y values")
    c = d = tx = ty = tb = 0
    n = len(xs)
    for i in range(n):
        for j in range(i + 1, n):
            sx = (xs[i] > xs[j]) - (xs[i] < xs[j])
            sy = (ys[i] > ys[j]) - (ys[i] < ys[j])
            if sx == 0 and sy == 0:
                tb += 1
            elif sx == 0:
                tx += 1
            elif sy == 0:
                ty += 1
            elif sx == sy:
                c += 1
            else:
                d += 1
    return Kendall(n=n, pairs=n * (n - 1) // 2, concordant=c, discordant=d, tied_x=tx, tied_y=ty, tied_both=tb)


# --------------------------------------------------------------------------- matching rows


@attrs.frozen
class Row:
    """A leaderboard row: its label, config summary (``k=v, k=v``: the non-default fields) and average
    score per unit (percent); ``settings``: every field of its resolved method config, when known."""

    label: str
    config: str
    units: Mapping[object, float]
    settings: Mapping[str, str] | None = None

    @property
    def fields(self) -> dict[str, str]:
        out = {}
        for item in self.config.split(", ") if self.config else ():
            key, _, value = item.partition("=")
            out[key.strip()] = value.strip()
        return out

    @property
    def mean(self) -> float:
        return math.fsum(self.units.values()) / len(self.units)


def match(rows: Sequence[Row], references: Sequence[Reference] = FUSIONBENCH_CLIP_B32) -> list[tuple[Reference, Row]]:
    """The (reference, row) pairs both tables have.

    A row matches a reference when its label is the reference's label and its settings (else its
    config summary) give the reference's fields.  Of several matching rows, the one with the fewest
    other non-default fields wins (a tie is an error naming them: make the methods file unambiguous).
    """
    out = []
    for ref in references:
        candidates = []
        for row in rows:
            if row.label != ref.label:
                continue
            fields = {**row.fields, **{k: str(v) for k, v in (row.settings or {}).items()}}
            if all(fields.get(k) == v for k, v in ref.fields):
                extra = len([k for k in row.fields if k not in dict(ref.fields)])
                candidates.append((extra, row))
        if not candidates:
            continue
        candidates.sort(key=lambda item: item[0])
        if len(candidates) > 1 and candidates[0][0] == candidates[1][0]:
            names = ", ".join(f"{r.label} ({r.config or 'defaults'})" for e, r in candidates if e == candidates[0][0])
            raise ValueError(f"FusionBench row {ref.name!r} matches several leaderboard rows: {names}")
        out.append((ref, candidates[0][1]))
    return out


# --------------------------------------------------------------------------- the comparison


@attrs.frozen
class Comparison:
    matched: tuple[tuple[Reference, Row], ...]
    ours: tuple[float, ...]  # rounded means, in matched order
    kendall: Kendall
    interval: tuple[float, float] | None
    resamples: int
    level: float
    unit: str

    @property
    def disagreeing(self) -> list[tuple[str, str]]:
        """The pairs ordered differently (FusionBench's higher row first)."""
        out = []
        rows = self.matched
        for i in range(len(rows)):
            for j in range(i + 1, len(rows)):
                fb = rows[i][0].score - rows[j][0].score
                us = self.ours[i] - self.ours[j]
                if fb * us < 0 or (fb == 0) != (us == 0):
                    hi, lo = (i, j) if fb >= 0 else (j, i)
                    out.append((rows[hi][0].name, rows[lo][0].name))
        return out


def rounded(value: float, digits: int = 1) -> float:
    return round(value, digits)


def bootstrap_tau(rows: Sequence[Row], references: Sequence[float], *, resamples: int = 2000, seed: int = 0,
                  level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of τ-b when each row's units are resampled with replacement (rows independently).

    ``None`` when no row has two units (nothing to resample).
    """
    if not any(len(r.units) > 1 for r in rows):
        return None
    rng = random.Random(seed)
    values = [list(r.units.values()) for r in rows]
    taus = []
    for _ in range(resamples):
        ours = [rounded(math.fsum(rng.choice(v) for _ in v) / len(v)) for v in values]
        tau = kendall(ours, references).tau_b
        if not math.isnan(tau):
            taus.append(tau)
    taus.sort()
    alpha = (1.0 - level) / 2
    lo = taus[max(0, math.floor(alpha * len(taus)))]
    hi = taus[min(len(taus) - 1, math.ceil((1 - alpha) * len(taus)) - 1)]
    return lo, hi


def compare(rows: Sequence[Row], references: Sequence[Reference] = FUSIONBENCH_CLIP_B32, *, unit: str = "run seed",
            resamples: int = 2000, seed: int = 0, level: float = 0.95) -> Comparison:
    matched = match(rows, references)
    if len(matched) < 2:
        raise ValueError(f"only {len(matched)} leaderboard row(s) match FusionBench's table; nothing to rank")
    ours = tuple(rounded(row.mean) for _, row in matched)
    theirs = [ref.score for ref, _ in matched]
    return Comparison(matched=tuple(matched), ours=ours, kendall=kendall(ours, theirs),
                      interval=bootstrap_tau([r for _, r in matched], theirs, resamples=resamples, seed=seed, level=level),
                      resamples=resamples, level=level, unit=unit)


def to_markdown(result: Comparison) -> str:
    """The table of matched rows (both ranks), then pairs agreeing, τ and its interval, then the disagreeing pairs."""
    fb_rank = _ranks([ref.score for ref, _ in result.matched])
    our_rank = _ranks(list(result.ours))
    lines = ["| FusionBench row | FusionBench | rank | mini row | mini | rank | units |",
             "|---|---:|---:|---|---:|---:|---:|"]
    order = sorted(range(len(result.matched)), key=lambda i: -result.matched[i][0].score)
    for i in order:
        ref, row = result.matched[i]
        name = f"{row.label} ({row.config})" if row.config else row.label
        lines.append(f"| {ref.name} | {ref.score:.1f} | {fb_rank[i]:g} | {name} | {result.ours[i]:.1f} | {our_rank[i]:g} | {len(row.units)} |")
    k = result.kendall
    ties = k.tied_x + k.tied_y + k.tied_both
    lines += ["", f"- rows in both tables: {k.n}; pairs ordered the same way: **{k.concordant} of {k.pairs}** "
                  f"({k.discordant} opposite, {ties} tied in one table or both)",
              f"- Kendall τ-b = **{k.tau_b:.2f}** (τ-a = {k.tau_a:.2f}; τ-b corrects for ties, equal to τ-a without any)"]
    if result.interval is not None:
        lo, hi = result.interval
        lines.append(f"- {round(100 * result.level)} % bootstrap interval of τ-b: **[{lo:.2f}, {hi:.2f}]** "
                     f"({result.resamples} resamples of each row's {result.unit}s, with replacement)")
    else:
        lines.append(f"- no bootstrap interval: no row has more than one {result.unit}")
    pairs = result.disagreeing
    if pairs:
        lines += ["", "Pairs ordered differently (FusionBench's higher row first): "
                      + "; ".join(f"{a} > {b}" for a, b in pairs) + "."]
    return "\n".join(lines) + "\n"


def _ranks(values: Sequence[float]) -> list[float]:
    """1 = highest; tied values share the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks
