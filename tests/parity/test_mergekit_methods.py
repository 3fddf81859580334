"""Merge methods against mergekit 0.1.5's own merge-method functions (``mergekit.merge_methods.api.
merge_state_dicts``, the code its ``mergekit-yaml`` runs per tensor group) on toy models and a tiny GPT-2.

Recipe-level parity (YAML → files) is ``test_mergekit_recipes.py``'s."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mergekit")
sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make the shared helpers importable
from parity_kit import max_abs_diff, ours, state, tiny_gpt2, toy_models  # noqa: E402

PEER = "mergekit"
TOL = 1e-5


def _mergekit(method: str, base, models, parameters: dict, per_model: dict | None = None) -> dict:
    from mergekit.merge_methods.api import merge_state_dicts

    inputs = {f"m{i}": state(m) for i, m in enumerate(models)}
    if base is not None:
        inputs = {"base": state(base), **inputs}
    params = dict(parameters)
    for key, values in (per_model or {}).items():
        params[key] = {f"m{i}": v for i, v in enumerate(values)}
    with torch.no_grad():
        return merge_state_dicts(inputs, method, parameters=params, base="base" if base is not None else None)


def _compare(parity_row, mk_method, method, config, parameters, per_model=None, *, n=3, with_base=True, convention="mergekit", note=""):
    worst = 0.0
    for make in (toy_models, tiny_gpt2):
        base, experts = make(n)
        expected = _mergekit(mk_method, base if with_base else None, experts, parameters, per_model)
        got = ours(method, config, base if with_base else None, experts)
        worst = max(worst, max_abs_diff(expected, got))
    label = mk_method if mk_method == method else f"{method} ({mk_method})"
    parity_row(label, PEER, convention, worst, note or f"merge_state_dicts(method={mk_method!r}) on toy and tiny GPT-2 (N={n})")
    assert worst <= TOL


WEIGHTS = [1.0, 0.6, 0.3]


def test_linear(parity_row):
    _compare(parity_row, "linear", "weighted_average", {"weights": WEIGHTS}, {}, {"weight": WEIGHTS}, with_base=False)


def test_task_arithmetic(parity_row):
    _compare(parity_row, "task_arithmetic", "task_arithmetic", {"convention": "mergekit", "weights": WEIGHTS}, {}, {"weight": WEIGHTS})


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_per_model_density(parity_row, normalize):
    densities = [0.3, 0.5, 0.7]
    config = {"convention": "mergekit", "weights": WEIGHTS, "density": densities, "divisor": "weights" if normalize else "none"}
    worst = 0.0
    for make in (toy_models, tiny_gpt2):
        base, experts = make(3)
        expected = _mergekit("ties", base, experts, {"normalize": normalize}, {"weight": WEIGHTS, "density": densities})
        got = ours("ties", config, base, experts)
        worst = max(worst, max_abs_diff(expected, got))
    parity_row("ties", PEER, f"mergekit (normalize {str(normalize).lower()}, per-model density)", worst,
               "merge_state_dicts(method='ties'), per-model weight and density, toy and tiny GPT-2")
    assert worst <= TOL


@pytest.mark.parametrize("mk_method,variant", [("breadcrumbs", "linear"), ("breadcrumbs_ties", "ties")])
def test_breadcrumbs(parity_row, mk_method, variant):
    config = {"variant": variant, "density": [0.8, 0.9, 0.7], "gamma": 0.05, "weights": WEIGHTS}
    if variant == "ties":
        config.update(sign_election="weighted_sum", divisor="none")
    _compare(parity_row, mk_method, "breadcrumbs", config, {}, {"weight": WEIGHTS, "density": [0.8, 0.9, 0.7], "gamma": [0.05] * 3})


@pytest.mark.parametrize("mk_method,variant", [("dare_linear", "linear"), ("dare_ties", "ties")])
def test_dare_keep_all_is_exact_and_drops_match_in_distribution(parity_row, mk_method, variant):
    """Random masks cannot be shared (mergekit draws from torch's global generator): at density 1 the
    methods are deterministic and must agree exactly; at density 0.3 the kept fraction and the L1
    rescale (‖masked τ‖₁ = ‖τ‖₁) must agree in distribution."""
    config = {"convention": "mergekit", "variant": variant, "weights": WEIGHTS, "density": 1.0}
    base, experts = toy_models(3)
    exact = max_abs_diff(_mergekit(mk_method, base, experts, {}, {"weight": WEIGHTS, "density": [1.0] * 3}), ours("dare", config, base, experts))
    # statistics at density 0.3 on one model: keep fraction and preserved L1 norm of the update
    torch.manual_seed(0)
    base, experts = toy_models(1)
    mk = _mergekit("dare_linear", base, experts, {}, {"weight": [1.0], "density": [0.3]})
    us = ours("dare", {"convention": "mergekit", "variant": "linear", "density": 0.3}, base, experts)
    key = "fc1.weight"
    b = state(base)[key]
    frac_mk = float(((mk[key] - b) != 0).double().mean())
    frac_us = float(((us[key] - b) != 0).double().mean())
    l1 = float((state(experts[0])[key] - b).abs().sum())
    l1_mk, l1_us = float((mk[key] - b).abs().sum()), float((us[key] - b).abs().sum())
    note = (f"density 1: exact; density 0.3 on fc1.weight (384 entries): kept {frac_us:.3f} (mergekit {frac_mk:.3f}), "
            f"L1 ratio {l1_us / l1:.5f} (mergekit {l1_mk / l1:.5f}); masks differ (mergekit: torch global RNG)")
    parity_row(mk_method, PEER, "mergekit (density 1 exact + statistics)", exact, note)
    assert exact <= TOL
    assert abs(frac_us - 0.3) < 0.08 and abs(frac_mk - 0.3) < 0.08
    assert abs(l1_us / l1 - 1) < 1e-5 and abs(l1_mk / l1 - 1) < 1e-5


@pytest.mark.parametrize("mk_method,variant", [("della", "ties"), ("della_linear", "linear")])
def test_della_deterministic_limit(parity_row, mk_method, variant):
    """DELLA at density 1, epsilon 0 keeps everything (deterministic): exact agreement, rescale included."""
    config = {"variant": variant, "density": 1.0, "epsilon": 0.0, "rescale": "l1", "weights": WEIGHTS}
    if variant == "ties":
        config.update(sign_election="weighted_sum", divisor="weights")
    _compare(parity_row, mk_method, "della", config, {"epsilon": 0.0}, {"weight": WEIGHTS, "density": [1.0] * 3},
             note="density 1, epsilon 0 (the deterministic limit; masks are random elsewhere)")


def test_slerp(parity_row):
    """Tensors where one end is the zero vector (a zero-initialised bias) are compared separately:
    mergekit treats 0 as orthogonal to b and returns sin(tπ/2)·b; fusion returns t·b (0 has no direction)."""
    worst, zero_worst, zero_names = 0.0, 0.0, []
    for make in (toy_models, tiny_gpt2):
        base, experts = make(1)
        expected = _mergekit("slerp", base, experts, {"t": 0.3})
        got = ours("slerp", {"t": 0.3}, None, [base, experts[0]])
        a, b = state(base), state(experts[0])
        zero = [k for k in a if a[k].is_floating_point() and min(a[k].norm(), b[k].norm()) <= 1e-8]
        rest = [k for k in a if a[k].is_floating_point() and k not in zero]
        worst = max(worst, max_abs_diff(expected, got, rest))
        if zero:
            zero_worst = max(zero_worst, max_abs_diff(expected, got, zero))
            zero_names += zero
    parity_row("slerp", PEER, "mergekit", worst, "merge_state_dicts(method='slerp', t=0.3): base → model, tensors of non-zero norm")
    parity_row("slerp", PEER, "mergekit (an end of norm 0)", None,
               f"peer defect: a zero tensor (e.g. {zero_names[0]}) has no direction; mergekit returns sin(tπ/2)·b "
               f"(max diff {zero_worst:.2g} from fusion's t·b, the limit of slerp as ‖a‖ → 0)")
    assert worst <= TOL and zero_names


def test_nuslerp_flattened(parity_row):
    worst = 0.0
    for make in (toy_models, tiny_gpt2):
        base, experts = make(2)
        expected = _mergekit("nuslerp", base, experts, {}, {"weight": [0.4, 0.6]})
        got = ours("nuslerp", {"weights": [0.4, 0.6]}, base, experts)
        worst = max(worst, max_abs_diff(expected, got))
    parity_row("nuslerp", PEER, "mergekit (flatten, with base)", worst, "merge_state_dicts(method='nuslerp'), row_wise is the mergekit helper's")
    assert worst <= TOL


def test_multislerp(parity_row):
    _compare(parity_row, "multislerp", "multislerp", {"weights": WEIGHTS}, {}, {"weight": WEIGHTS}, with_base=False)


def test_multislerp_with_a_base_and_a_tensor_no_model_changed(parity_row):
    """Issue item 10: a tensor no expert changed must come out as the base; mergekit raises there (N ≥ 3)."""
    base, experts = toy_models(3)
    with pytest.raises(ValueError, match="weighted sum of the input tensors is zero"):
        _mergekit("multislerp", base, experts, {}, {"weight": WEIGHTS})
    got = ours("multislerp", {"weights": WEIGHTS}, base, experts)
    assert all(torch.equal(got[k], v) for k, v in state(base).items() if k.startswith("frozen"))
    parity_row("multislerp", PEER, "mergekit (with base, a frozen tensor)", None,
               "peer crashes: 'The weighted sum of the input tensors is zero' on a tensor no model changed (3+ models); fusion returns the base")
    worst = 0.0
    for make in (tiny_gpt2,):
        base, experts = make(3)
        worst = max(worst, max_abs_diff(_mergekit("multislerp", base, experts, {}, {"weight": WEIGHTS}), ours("multislerp", {"weights": WEIGHTS}, base, experts)))
    parity_row("multislerp", PEER, "mergekit (with base)", worst, "merge_state_dicts(method='multislerp') with a base, tiny GPT-2 (every tensor changed)")
    assert worst <= TOL


def test_karcher(parity_row):
    _compare(parity_row, "karcher", "karcher", {}, {}, with_base=False)


def test_model_stock(parity_row):
    _compare(parity_row, "model_stock", "model_stock", {"convention": "mergekit"} if _has_field("model_stock", "convention") else {}, {})


def test_sce(parity_row):
    _compare(parity_row, "sce", "sce", {"select_topk": 0.5, "scaling_factor": 1.0}, {"select_topk": 0.5})


def _has_field(method: str, field: str) -> bool:
    import attrs

    from fusion_core.plugins import get_plugin_manager
    from fusion_core.registry import build_registry

    cls = build_registry(get_plugin_manager()).get("method", method).cls
    return field in {f.name for f in attrs.fields(cls.Config)}
