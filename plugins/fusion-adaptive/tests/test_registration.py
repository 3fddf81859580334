"""The plugin registers every method, imports no torch to do so, and declares honest capabilities."""

from __future__ import annotations

import subprocess
import sys

import attrs
from fusion_adaptive.plugin import all_methods

EXPECTED = {"fisher_merging", "regmean", "regmean_plusplus", "adamerging", "wemoe", "e_wemoe", "smile", "simple_ensemble",
            "weighted_ensemble", "max_model_predictor", "opcm", "doge", "wanda_pruning",
            "continual_task_arithmetic", "continual_ties", "continual_weight_average", "dop", "sparsegpt_pruning", "rankone_moe",
            "trust_region_ta", "fw_merging", "fw_soft", "surgery", "concrete_task_arithmetic",
            "concrete_adamerging", "safe_concrete_adamerging", "awm", "sau"}
CONCRETE = {"concrete_task_arithmetic", "concrete_adamerging", "safe_concrete_adamerging", "awm", "sau"}


def test_every_method_is_registered_with_documented_options():
    methods = {cls.name: cls for cls in all_methods()}
    assert set(methods) == EXPECTED
    for cls in methods.values():
        assert cls.summary and cls.reference_url and cls.reference_url.startswith("https://")
        for field in attrs.fields(cls.Config):
            assert field.metadata.get("help"), (cls.name, field.name)
    transductive = {n for n, c in methods.items() if c.capabilities.transductive}
    assert transductive == {"adamerging", "wemoe", "e_wemoe", "rankone_moe", "surgery", "fw_soft"} | CONCRETE
    assert {n for n, c in methods.items() if c.capabilities.needs_labels} == set()  # fisher's empirical estimator checks at run time
    assert {n for n, c in methods.items() if c.capabilities.output == "ensemble"} == {"simple_ensemble", "weighted_ensemble", "max_model_predictor"}


def test_registering_imports_no_torch():
    code = "import sys, fusion_adaptive.plugin as p; p.all_methods(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
