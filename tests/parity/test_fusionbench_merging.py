"""Data-free methods against FusionBench 0.2.33's own algorithm classes (run as its CLI would: the
class built from its config values, ``run(modelpool)``), on toy models and on tiny CLIP vision / GPT-2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fusion_bench")
sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make the shared helpers importable
from parity_kit import fusionbench_pool, max_abs_diff, ours, state, tiny_clip_vision, tiny_gpt2, toy_models  # noqa: E402

PEER = "fusionbench"
TOL = 1e-5

MODELS = {"toy": toy_models, "clip": tiny_clip_vision, "gpt2": tiny_gpt2}


def _fb(cls_path: str, **kwargs):
    module, _, name = cls_path.rpartition(".")
    import importlib

    return getattr(importlib.import_module(module), name)(**kwargs)


def _compare(parity_row, method, convention, ours_config, fb_class, fb_kwargs, *, n=3, models=("toy", "clip", "gpt2"), note="", with_base=True):
    worst = 0.0
    for kind in models:
        base, experts = MODELS[kind](n)
        got = ours(method, ours_config, base if with_base else None, experts)
        algorithm = _fb(fb_class, **fb_kwargs)
        merged = algorithm.run(fusionbench_pool(base if with_base else None, experts) if with_base else fusionbench_pool(None, experts))
        expected = state(merged)
        worst = max(worst, max_abs_diff(expected, got))
    parity_row(method, PEER, convention, worst, note or f"{fb_class.rpartition('.')[2]} on toy, tiny CLIP vision, tiny GPT-2 (N={n})")
    assert worst <= TOL
    return worst


def test_simple_average(parity_row):
    _compare(parity_row, "simple_average", "fusionbench", {}, "fusion_bench.method.SimpleAverageAlgorithm", {}, with_base=False)


def test_weighted_average(parity_row):
    weights = [0.2, 0.5, 0.3]
    _compare(
        parity_row, "weighted_average", "fusionbench", {"weights": weights, "normalize": True},
        "fusion_bench.method.WeightedAverageAlgorithm", {"normalize": True, "weights": weights, "verbose": False}, with_base=False,
    )


def test_task_arithmetic_defaults(parity_row):
    _compare(parity_row, "task_arithmetic", "fusionbench", {}, "fusion_bench.method.TaskArithmeticAlgorithm", {"scaling_factor": 0.3})


@pytest.mark.parametrize("merge_func,divisor", [("sum", None), ("mean", "count")])
def test_ties_whole_model_trim(parity_row, merge_func, divisor):
    config = {} if divisor is None else {"divisor": divisor}
    _compare(
        parity_row, "ties", f"fusionbench (merge_func {merge_func})", config, "fusion_bench.method.TiesMergingAlgorithm",
        {"scaling_factor": 0.3, "threshold": 20, "remove_keys": [], "merge_func": merge_func},
        note="TiesMergingAlgorithm: whole flattened task vector trimmed (kthvalue, ≥), streamed exactly here",
    )


def test_ties_whole_model_trim_chunked_engine_is_the_same(parity_row):
    """Large tensors go through the engine's row blocks: same bytes as whole tensors."""
    base, experts = tiny_gpt2(4)
    whole = ours("ties", {}, base, experts)
    chunked = ours("ties", {}, base, experts, chunk_bytes=4096)
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)


def test_magmax(parity_row):
    _compare(parity_row, "magmax", "fusionbench", {}, "fusion_bench.method.MagMaxAlgorithm", {"scaling_factor": 0.5})


def test_expo(parity_row):
    # FusionBench's ExPO takes the pool's single fine-tuned model (its sft) and the base
    _compare(parity_row, "expo", "fusionbench", {}, "fusion_bench.method.ExPOAlgorithm", {"extrapolation_factor": 0.1}, n=1)


def test_linear_interpolation(parity_row):
    """FusionBench's class cannot run (it asserts ``all_model_names == 2``, a list against an int);
    its formula, ``state_dict_weighted_sum([θ₁, θ₂], [1 − t, t])``, is compared instead."""
    from fusion_bench.utils.state_dict_arithmetic import state_dict_weighted_sum

    base, experts = toy_models(2)
    with pytest.raises(AssertionError, match="exactly 2 models"):
        _fb("fusion_bench.method.LinearInterpolationAlgorithm", t=0.3).run(fusionbench_pool(None, experts))
    parity_row("linear_interpolation", PEER, "fusionbench (run)", None,
               "peer crashes: LinearInterpolationAlgorithm.run asserts `modelpool.all_model_names == 2` (a list compared with an int), always false")
    worst = 0.0
    for kind in MODELS:
        base, experts = MODELS[kind](2)
        expected = state_dict_weighted_sum([state(experts[0]), state(experts[1])], [0.7, 0.3])
        worst = max(worst, max_abs_diff(expected, ours("linear_interpolation", {"t": 0.3}, None, experts)))
    parity_row("linear_interpolation", PEER, "fusionbench (its formula)", worst,
               "state_dict_weighted_sum([θ₁, θ₂], [1 − t, t]), the line its run() would execute, on toy, CLIP, GPT-2")
    assert worst <= TOL


def test_slerp(parity_row):
    _compare(parity_row, "slerp", "fusionbench", {"t": 0.3}, "fusion_bench.method.SlerpMergeAlgorithm", {"t": 0.3}, n=2, with_base=False)


def test_tsv_m(parity_row):
    _compare(parity_row, "tsv_m", "fusionbench", {}, "fusion_bench.method.TaskSingularVectorMerging", {"alpha": 1.0})


def test_iso_c(parity_row):
    _compare(parity_row, "iso_c", "fusionbench", {}, "fusion_bench.method.ISO_C_Merge", {"scaling_factor": 1.0})


def test_iso_cts(parity_row):
    _compare(
        parity_row, "iso_cts", "fusionbench", {}, "fusion_bench.method.ISO_CTS_Merge", {"scaling_factor": 1.0, "common_space_fraction": 0.8}
    )


def test_model_stock(parity_row):
    _compare(parity_row, "model_stock", "fusionbench", {}, "fusion_bench.method.ModelStock", {}, n=2)


def test_model_stock_more_than_two_models_averages_angles(parity_row):
    _compare(parity_row, "model_stock", "fusionbench (N=4, angle average)", {}, "fusion_bench.method.ModelStock", {}, n=4,
             note="ModelStock, N=4: mean pairwise angle (degrees), then its cosine; toy, CLIP, GPT-2")


def test_ties_merge_func_max(parity_row):
    _compare(
        parity_row, "ties", "fusionbench (merge_func max)", {"divisor": "max"}, "fusion_bench.method.TiesMergingAlgorithm",
        {"scaling_factor": 0.3, "threshold": 20, "remove_keys": [], "merge_func": "max"},
        note="TiesMergingAlgorithm merge_func: max (fusion: divisor: max)",
    )


def test_tsv_m_more_models_than_rank(parity_row):
    _compare(parity_row, "tsv_m", "fusionbench (N=13 > rank 12 of fc2)", {}, "fusion_bench.method.TaskSingularVectorMerging",
             {"alpha": 1.0}, n=13, models=("toy",), note="TaskSingularVectorMerging, 13 models on toy: fc2 (12×24) gets no component, stays at the base")


@pytest.mark.parametrize("variant", ["linear", "ties"])
def test_dare(parity_row, variant):
    """Random masks cannot be shared (FusionBench draws ``torch.rand_like`` from the global generator):
    with nothing dropped the methods are deterministic and compared exactly; at FusionBench's
    sparsity 0.5 the kept fraction and unbiasedness (mean of the rescaled update) are compared."""
    fb_class = "fusion_bench.method.DareTaskArithmetic" if variant == "linear" else "fusion_bench.method.dare.DareTiesMerging"
    fb_kwargs = {"scaling_factor": 0.3 if variant == "linear" else 0.5, "only_on_linear_weights": False, "rescale": True}
    if variant == "ties":
        fb_kwargs.update(threshold=20, remove_keys=[], merge_func="sum")
    worst = 0.0
    for kind in MODELS:
        base, experts = MODELS[kind](3)
        got = ours("dare", {"variant": variant, "density": 1.0}, base, experts)
        expected = state(_fb(fb_class, sparsity_ratio=0.0, **fb_kwargs).run(fusionbench_pool(base, experts)))
        worst = max(worst, max_abs_diff(expected, got))
    # statistics at the defaults (FusionBench sparsity_ratio 0.5 = density 0.5), one model, linear merge
    base, experts = toy_models(1, scale=1.0, unequal=False)
    key = "embed.weight"
    tau = state(experts[0])[key] - state(base)[key]
    torch.manual_seed(0)
    fb = state(_fb("fusion_bench.method.DareTaskArithmetic", sparsity_ratio=0.5, **{**fb_kwargs, "scaling_factor": 1.0}).run(fusionbench_pool(base, experts)))[key] - state(base)[key]
    us = ours("dare", {"variant": "linear", "scaling_factor": 1.0}, base, experts)[key] - state(base)[key]
    kept_fb, kept_us = float((fb != 0).double().mean()), float((us != 0).double().mean())
    ratio_fb, ratio_us = float(fb.sum() / tau.sum()), float(us.sum() / tau.sum())
    note = (f"sparsity 0 (nothing dropped): exact{'' if variant == 'linear' else ' incl. the whole-model TIES trim'}; "
            f"defaults (density 0.5) on {key} ({tau.numel()} entries): kept {kept_us:.3f} (FusionBench {kept_fb:.3f}), "
            f"Σ rescaled / Σ τ {ratio_us:.3f} (FusionBench {ratio_fb:.3f}); masks differ (FusionBench: torch global RNG)")
    parity_row(f"dare ({variant})", PEER, "fusionbench (sparsity 0 exact + statistics)", worst, note)
    assert abs(kept_us - 0.5) < 0.06 and abs(kept_fb - 0.5) < 0.06
    assert worst <= TOL


@pytest.mark.parametrize("majority", ["-", "+"])
def test_ties_exactly_cancelling_votes_take_the_model_wide_majority(parity_row, majority):
    """FusionBench elects the model-wide majority sign where the trimmed votes sum to exactly 0
    (``resolve_sign``); so does fusion under ``convention: fusionbench`` (``zero_vote: majority``,
    one more streamed pass), on a pool built to cancel, whichever sign the majority has; with
    ``zero_vote: plus`` (fusion's other conventions) only the cancelled entries differ."""
    import copy

    base, experts = toy_models(2)
    b, first = state(base), state(experts[0])
    opposite = copy.deepcopy(experts[1])
    step = 1.0 if majority == "+" else -1.0
    with torch.no_grad():
        for name, p in opposite.named_parameters():
            if name == "fc1.weight":
                p.copy_(2 * b[name] - first[name])  # τ₂ = −τ₁ exactly: every vote cancels
            else:
                p.add_(step * (0.5 * p.abs() + 0.1))  # elsewhere mostly updates of one sign: the majority
    experts = [experts[0], opposite]
    expected = state(_fb("fusion_bench.method.TiesMergingAlgorithm", scaling_factor=0.3, threshold=99, remove_keys=[], merge_func="sum").run(fusionbench_pool(base, experts)))
    got = ours("ties", {"density": 0.99}, base, experts)
    worst = max_abs_diff(expected, got)
    plus = ours("ties", {"density": 0.99, "zero_vote": "plus"}, base, experts)
    elsewhere = max_abs_diff(expected, plus, [k for k in expected if k != "fc1.weight"])
    cancelled = max_abs_diff(expected, plus, ["fc1.weight"])
    parity_row("ties", PEER, f"fusionbench (votes that cancel exactly, majority {majority})", worst,
               "zero votes take the model-wide majority sign (FusionBench resolve_sign; zero_vote: majority, one more pass); "
               f"with zero_vote: plus the cancelled entries differ by {cancelled:.2g}" + (" (+ is the majority)" if majority == "+" else ""))
    assert worst <= TOL and elsewhere <= TOL
    assert (cancelled > 0) == (majority == "-")


def test_ties_threshold_100_crashes_in_fusionbench(parity_row):
    """``threshold: 100`` (keep everything) makes FusionBench ask ``kthvalue(0)``; fusion keeps every entry."""
    base, experts = toy_models(2)
    with pytest.raises(RuntimeError, match="kthvalue"):
        _fb("fusion_bench.method.TiesMergingAlgorithm", scaling_factor=0.3, threshold=100, remove_keys=[], merge_func="sum").run(
            fusionbench_pool(base, experts)
        )
    no_trim = ours("ties", {"density": 1.0}, base, experts)
    assert max_abs_diff(no_trim, ours("ties", {"density": 1.0, "trim": "tensor"}, base, experts)) == 0
    parity_row("ties", PEER, "fusionbench (threshold 100 = density 1)", None,
               "peer crashes: kthvalue(): selected number k out of range (it asks for the 0-th smallest); fusion keeps every entry")
