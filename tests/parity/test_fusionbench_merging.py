"""Data-free methods against FusionBench 0.2.33's own algorithm classes (run as its CLI would: the
class built from its config values, ``run(modelpool)``), on toy models and on tiny CLIP vision / GPT-2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fusion_bench")
sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make the shared helpers importable
from parity_kit import FROZEN, fusionbench_pool, max_abs_diff, ours, state, tiny_clip_vision, tiny_gpt2, toy_models  # noqa: E402

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
    _compare(
        parity_row, "linear_interpolation", "fusionbench", {"t": 0.3}, "fusion_bench.method.LinearInterpolationAlgorithm", {"t": 0.3},
        n=2, with_base=False,
    )


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


def test_frozen_block_stays_at_the_base_in_every_method(parity_row):
    """A tensor no expert changed comes out exactly as the base (issue item 10), whatever the method."""
    from fusion_core.plugins import build_registry, get_plugin_manager

    base, experts = toy_models(4)
    expected = state(base)
    registry = build_registry(get_plugin_manager())
    skip = {"linear_interpolation", "slerp", "layer_stack", "expo", "simple_average", "weighted_average"}
    names = [n for n in registry.names("method") if n not in skip]
    checked = []
    for name in names:
        entry = registry.get("method", name)
        from fusion_core.engine.kernel import KernelMethod

        if not issubclass(entry.cls, KernelMethod) or not entry.cls.capabilities.needs_base:
            continue
        got = ours(name, {}, base, experts)
        for key in expected:
            if key.startswith(FROZEN):
                assert torch.equal(got[key], expected[key]), (name, key)
        checked.append(name)
    assert {"ties", "dare", "multislerp", "karcher", "tsv_m", "magmax"} & set(checked)
