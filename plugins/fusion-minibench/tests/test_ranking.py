"""The FusionBench ranking comparison: Kendall τ by hand, row matching, the bootstrap, the script."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
from fusion_minibench.ranking import FUSIONBENCH_CLIP_B32, Reference, Row, bootstrap_tau, compare, kendall, match, to_markdown

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_fusionbench.py"


def test_kendall_counts_pairs_by_hand():
    # pairs (0,1) (0,2) (0,3) (1,3) (2,3) agree; (1,2) is reversed: C = 5, D = 1 of 6
    k = kendall([10, 20, 30, 40], [1, 3, 2, 4])
    assert (k.pairs, k.concordant, k.discordant) == (6, 5, 1)
    assert k.tau_a == pytest.approx(4 / 6) and k.tau_b == pytest.approx(4 / 6)


def test_kendall_tau_b_corrects_for_ties():
    # (0,1) tied in x only; (0,2), (1,2) agree: τ-a = 2/3, τ-b = 2 / √((3 − 1)·3)
    k = kendall([1, 1, 2], [1, 2, 3])
    assert (k.concordant, k.discordant, k.tied_x, k.tied_y, k.tied_both) == (2, 0, 1, 0, 0)
    assert k.tau_a == pytest.approx(2 / 3)
    assert k.tau_b == pytest.approx(2 / math.sqrt(6))
    both = kendall([1, 1, 2], [5, 5, 7])  # tied in both: τ-b = 2 / √(2·2) = 1
    assert (both.tied_both, both.tau_b) == (1, pytest.approx(1.0))


def test_the_previous_leaderboard_gives_its_published_figure():
    """The bag-of-words leaderboard (before issue 12): 51 of 91 pairs, τ = 0.12 (LEADERBOARD.md of that time)."""
    ours = {"pretrained": 52.5, "individual": 80.1, "simple_average": 66.8, "task_arithmetic": 72.5, "ties": 70.0,
            "fisher_merging": 65.6, "regmean": 65.0, "regmean_plusplus": 64.4, "adamerging:task": 74.6,
            "adamerging:layer": 74.5, "wemoe": 73.1, "iso_c": 63.0, "iso_cts": 60.5, "simple_ensemble": 72.4}
    rows = []
    for key, value in ours.items():
        label, _, granularity = key.partition(":")
        rows.append(Row(label, f"granularity={granularity}" if granularity else "", {0: value}))
    result = compare(rows)
    assert (result.kendall.n, result.kendall.pairs, result.kendall.concordant, result.kendall.discordant) == (14, 91, 51, 40)
    assert round(result.kendall.tau_b, 2) == 0.12
    assert result.interval is None  # one unit per row: nothing to resample
    assert ("RegMean", "simple average") in result.disagreeing


def test_rows_match_by_label_and_fields_and_the_fewest_extra_fields_win():
    refs = [Reference("TW", 1.0, "adamerging", (("granularity", "task"),)),
            Reference("LW", 2.0, "adamerging", (("granularity", "layer"),)), Reference("TIES", 3.0, "ties")]
    rows = [Row("adamerging", "", {0: 5.0}, settings={"granularity": "layer", "steps": "100"}),
            Row("adamerging", "granularity=task", {0: 4.0}),
            Row("ties", "scaling_factor=1", {0: 1.0}), Row("ties", "", {0: 2.0})]
    pairs = match(rows, refs)
    assert [(ref.name, row.units[0]) for ref, row in pairs] == [("TW", 4.0), ("LW", 5.0), ("TIES", 2.0)]
    with pytest.raises(ValueError, match="several leaderboard rows"):
        match([Row("ties", "k=1", {0: 1.0}), Row("ties", "k=2", {0: 2.0})], refs)


def test_bootstrap_interval_resamples_each_rows_units():
    refs = [1.0, 2.0, 3.0]
    fixed = [Row("a", "", {0: 10.0, 1: 10.0}), Row("b", "", {0: 20.0}), Row("c", "", {0: 30.0, 1: 29.0})]
    assert bootstrap_tau(fixed, refs, resamples=200) == (pytest.approx(1.0), pytest.approx(1.0))
    # row a is 10 or 40 per unit: resampled means 10, 25, 40 give τ-b 1, 1/3, −1/3
    swinging = [Row("a", "", {0: 10.0, 1: 40.0}), Row("b", "", {0: 20.0}), Row("c", "", {0: 30.0})]
    lo, hi = bootstrap_tau(swinging, refs, resamples=2000, seed=1)
    assert (lo, hi) == (pytest.approx(-1 / 3), pytest.approx(1.0))
    assert bootstrap_tau(swinging, refs, resamples=2000, seed=1) == (lo, hi)  # seeded


def test_markdown_names_the_counts_the_interval_and_the_reversed_pairs():
    rows = [Row("pretrained", "", {0: 50.0}), Row("individual", "", {0: 80.0}),
            Row("simple_average", "", {0: 70.0, 1: 72.0}), Row("ties", "", {0: 69.0, 1: 69.2})]
    text = to_markdown(compare(rows, resamples=100))
    assert "**5 of 6**" in text and "τ-b = **0.67**" in text
    assert "bootstrap interval of τ-b: **[" in text
    assert "TIES-merging (λ = 0.3) > simple average" in text


def _script():
    spec = importlib.util.spec_from_file_location("compare_fusionbench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_reads_a_results_database_over_recipe_seeds(tmp_path, capsys):
    fusion_lab = pytest.importorskip("fusion_lab.results_db")
    db_path = tmp_path / "r.sqlite"
    scores = {"pretrained": (0.50, 0.52), "individual": (0.90, 0.88), "simple_average": (0.70, 0.66), "ties": (0.68, 0.69)}
    with fusion_lab.open_db(db_path) as db:
        for recipe in (0, 1):
            pools = {"modelpool": {"name": "minibench", "seed": recipe}, "taskpool": {"name": "minibench", "seed": recipe}}
            for label, values in scores.items():
                kind = "baseline" if label in ("pretrained", "individual") else "method"
                config = {**pools, "method": {"name": label}} if kind == "method" else pools
                cell = fusion_lab.Cell(kind=kind, config_hash=f"{label}{recipe}", pools_hash=f"p{recipe}", config=config,
                                       config_summary="", seed=0, benchmark="mini")
                value = values[recipe]
                db.record_ok(cell, {label: {"t1": {"accuracy": value - 0.01}, "t2": {"accuracy": value + 0.01}}},
                             metric="accuracy", versions=None, timings=None, duration_s=1.0)
    out = tmp_path / "cmp.md"
    assert _script().main(["--db", str(db_path), "--markdown", str(out), "--resamples", "50"]) == 0
    text = capsys.readouterr().out
    assert out.read_text() in text
    # means over recipe seeds: pretrained 51, individual 89, simple average 68, TIES 68.5: every pair agrees
    assert "**6 of 6**" in text and "recipe seeds, with replacement" in text
    assert "| simple average | 66.5 | 3 | simple_average | 68.0 | 3 | 2 |" in text


def test_script_reads_a_leaderboard_csv(tmp_path, capsys):
    csv = tmp_path / "lb.csv"
    csv.write_text("rank,method,kind,config,seeds,seed_list,average\n1,individual,baseline,,1,0,0.9\n"
                   "2,ties,method,,3,0 1 2,0.7\n3,simple_average,method,,3,0 1 2,0.72\n")
    assert _script().main(["--csv", str(csv)]) == 0
    text = capsys.readouterr().out
    assert "**2 of 3**" in text and "no bootstrap interval" in text
    assert len(FUSIONBENCH_CLIP_B32) == 18


def test_script_adds_recipe_seeds_measured_outside_the_database(tmp_path, capsys):
    fusion_lab = pytest.importorskip("fusion_lab.results_db")
    db_path = tmp_path / "r.sqlite"
    pools = {"modelpool": {"name": "minibench", "seed": 0}, "taskpool": {"name": "minibench", "seed": 0}}
    with fusion_lab.open_db(db_path) as db:
        for label, value in {"pretrained": 0.5, "individual": 0.9, "simple_average": 0.7, "ties": 0.68}.items():
            kind = "baseline" if label in ("pretrained", "individual") else "method"
            config = {**pools, "method": {"name": label}} if kind == "method" else pools
            cell = fusion_lab.Cell(kind=kind, config_hash=label, pools_hash="p0", config=config, config_summary="", seed=0, benchmark="mini")
            db.record_ok(cell, {label: {"t": {"accuracy": value}}}, metric="accuracy", versions=None, timings=None, duration_s=1.0)
    extra = tmp_path / "extra.csv"
    extra.write_text("label,config,recipe_seed,average\nsimple_average,,1,60.0\nsimple_average,,2,61.0\nties,,1,69.0\n")
    assert _script().main(["--db", str(db_path), "--extra-units", str(extra), "--resamples", "400"]) == 0
    text = capsys.readouterr().out
    # simple average over recipe seeds 0, 1, 2: (70 + 60 + 61) / 3 = 63.7; TIES (68 + 69) / 2 = 68.5
    assert "| simple average | 66.5 | 3 | simple_average | 63.7 | 3 | 3 |" in text
    assert "| TIES-merging (λ = 0.3) | 72.2 | 2 | ties | 68.5 | 2 | 2 |" in text
    assert "recipe seeds, with replacement" in text
