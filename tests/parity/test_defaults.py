"""Our defaults against FusionBench 0.2.33's: each method's ``fusion_bench_config/method/*.yaml``.

The outputs are compared by the other parity tests; this one checks the *settings* a user gets
without giving any: for every method of ours that FusionBench has, each mapped field of our
default config (``convention: fusionbench`` where a method has conventions) must equal the value
in FusionBench's installed method YAML (or, where FusionBench hard-codes it, in its code), after
the unit conversion the row names (TIES ``threshold 20`` ↔ ``density 0.2``).  Where we differ on
purpose the row says why and the test asserts both documented values, so a change on either side
fails here.  One PARITY.md row per method: the largest |ours − theirs| over its numeric fields
(0 when every field agrees) and the fields compared.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest


def _package_dir(name: str) -> Path | None:
    """Where package ``name`` is installed, without importing it (FusionBench's lazy module has no ``__spec__`` once
    imported, so ``find_spec`` then fails: read ``__path__``)."""
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__path__", None):
        return Path(list(module.__path__)[0])
    spec = importlib.util.find_spec(name)
    return Path(list(spec.submodule_search_locations)[0]) if spec is not None and spec.submodule_search_locations else None


if _package_dir("fusion_bench") is None or _package_dir("fusion_bench_config") is None:
    pytest.skip("FusionBench is not installed (tox -e parity installs it)", allow_module_level=True)

PEER = "fusionbench"
CONFIGS = _package_dir("fusion_bench_config") / "method"
SOURCES = _package_dir("fusion_bench")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


@attrs.frozen
class Code:
    """A value FusionBench hard-codes: group 1 of ``pattern`` in ``fusion_bench/<path>`` (group 0 if it has none)."""

    path: str
    pattern: str

    def value(self) -> Any:
        text = (SOURCES / self.path).read_text(encoding="utf-8")
        found = re.search(self.pattern, text)
        assert found, f"FusionBench's {self.path} no longer matches {self.pattern!r}: re-check this default"
        return _plain(found.group(1) if found.re.groups else found.group(0))

    def __str__(self) -> str:
        return f"code ({self.path})"


@attrs.frozen
class Yaml:
    """A value of another FusionBench method YAML than the row's: ``key`` of ``fusion_bench_config/method/<path>``."""

    path: str
    key: str

    def value(self) -> Any:
        return load_yaml(self.path, remember=False)[self.key]

    def __str__(self) -> str:
        return f"{self.path} {self.key}"


@attrs.frozen
class Same:
    """Our field ``ours`` equals FusionBench's ``theirs`` (a YAML key path, or :class:`Code`) after ``convert``."""

    ours: str
    theirs: str | Code | Yaml
    convert: Callable[[Any], Any] | None = None
    unit: str = ""


@attrs.frozen
class Differs:
    """A documented difference: ours is ``our_value``, FusionBench's is ``their_value``, because ``why``."""

    ours: str | None
    theirs: str | Code | Yaml | None
    our_value: Any
    their_value: Any
    why: str


@attrs.frozen
class Defaults:
    method: str
    yaml: str
    fields: tuple = ()
    config: dict = attrs.field(factory=dict)
    """the fields we set to select FusionBench's variant (e.g. ``variant: ties``)."""
    label: str = ""


def pct(value):
    return value / 100


def one_minus(value):
    return 1 - value


def mapping(table: dict) -> Callable[[Any], Any]:
    def convert(value):
        return table[value]

    convert.__name__ = "{" + ", ".join(f"{k!r}: {v!r}" for k, v in table.items()) + "}"
    return convert


MERGE_FUNC = mapping({"sum": "none", "mean": "count", "max": "max"})
CLAMP = mapping({False: "none", True: "forward"})
RESCALE = mapping({True: "inverse_p", False: "none"})
ROUTER = mapping({2: None, 1: 0})  # FusionBench Depth_2_Gate: one hidden layer of the input's width; Depth_1_Gate: linear


def per_batch(batch_key: str) -> Callable[[Any], Any]:
    """Examples ÷ the row's ``batch_key`` → batches (ours counts batches of the pool's data)."""

    def convert(examples):
        return examples // _yaml_cache[batch_key]

    convert.__name__ = f"÷ {batch_key}"
    return convert


CONTINUAL = (Same("shuffle", "shuffle_order"), Same("order_seed", "seed"), Same("evaluate_every_step", "evaluate_on_every_step"))
CONCRETE = (Same("initial_logits", "initial_logits"), Same("temperature", "temperature"), Same("eval_mask", "eval_mask_type"),
            Same("clamp_weights", "clamp_weights"), Same("batch_size", "batch_size"), Same("lr", "lr"))
CONCRETE_ADAMERGING = CONCRETE + (Same("init", "scaling_factor"), Same("steps", "max_steps"), Same("base_lr", "base_lr"),
                                  Same("adamerging_steps", "max_adamerging_steps"), Same("adamerging_lr", "adamerging_lr"))
DEFENSE = CONCRETE + (Same("scaling_factor", "scaling_factor"), Same("steps", "max_steps"), Same("adv_lr", "adv_lr"),
                      Same("adv_weight", "adv_weight"))
UNUSED_TRIGGER_NORM = Differs(None, "trigger_norm", None, 1000,
                              "FusionBench never reads trigger_norm (its use is commented out in clip_post_defense.py / clip_safe_concrete_adamerging.py); no field")
PRUNE = (Same("prune_type", "prune_type"), Same("sparsity_ratio", "sparsity_ratio"), Same("n", "n"), Same("m", "m"))
CALIBRATION = Differs("num_batches", "nsamples", 8, 128,
                      "FusionBench draws 128 C4 sequences (online); fuse reads num_batches batches of the model pool's own data, offline")
WEMOE = (Same("init_lambda", "init_lambda"), Same("router_hidden", "router_hidden_layers", ROUTER, "hidden layers → width"),
         Same("batch_reduce", "batch_reduce"), Same("lr", "lr"), Same("steps", "max_steps"), Same("batch_size", "batch_size"))

TABLE: tuple[Defaults, ...] = (
    Defaults("task_arithmetic", "task_arithmetic.yaml", (Same("scaling_factor", "scaling_factor"),)),
    Defaults("ties", "ties_merging.yaml", (
        Same("scaling_factor", "scaling_factor"), Same("density", "threshold", pct, "% kept"),
        Same("divisor", "merge_func", MERGE_FUNC))),
    Defaults("dare", "dare/task_arithmetic.yaml", (
        Same("density", "sparsity_ratio", one_minus), Same("scaling_factor", "scaling_factor"), Same("rescale", "rescale", RESCALE),
        Differs("variant", None, "linear", None, "our default is dare/task_arithmetic.yaml; variant: ties is dare/ties_merging.yaml (next row)"))),
    Defaults("dare", "dare/ties_merging.yaml", (
        Same("density", "sparsity_ratio", one_minus), Same("scaling_factor", "scaling_factor"), Same("rescale", "rescale", RESCALE),
        Same("ties_trim", "threshold", pct, "% kept"), Same("divisor", "merge_func", MERGE_FUNC)), {"variant": "ties"}, "variant ties"),
    Defaults("fisher_merging", "fisher_merging/clip_fisher_merging.yaml", (
        Same("num_examples", "num_fisher_examples"), Same("min_fisher", "minimal_fisher_weight"),
        Same("normalize", "normalize_fisher_weight", mapping({True: "fusionbench", False: "none"})))),
    Defaults("regmean", "regmean/clip_regmean.yaml", (
        Same("reduce_non_diagonal_ratio", "reduce_non_diagonal_ratio"),
        Same("num_batches", "num_regmean_examples", per_batch("dataloader_kwargs.batch_size"), "examples ÷ batch_size 32"),
        Differs("reduce_non_diagonal_ratio", Yaml("regmean/regmean.yaml", "reduce_non_diagonal_ratio"),
                0.95, 0.1, "FusionBench's generic regmean.yaml says 0.1 (and gpt2_regmean.yaml 0.6); fuse follows clip_regmean.yaml, "
                "the setting of FusionBench's CLIP table"))),
    Defaults("regmean_plusplus", "regmean_plusplus/clip_regmean_plusplus.yaml", (
        Same("reduce_non_diagonal_ratio", "reduce_non_diagonal_ratio"),
        Same("num_batches", "num_regmean_examples", per_batch("dataloader_kwargs.batch_size"), "examples ÷ batch_size 32"))),
    Defaults("adamerging", "adamerging/clip.yaml", (
        Same("init", "init_values"), Same("lr", "lr"), Same("steps", "max_steps"), Same("batch_size", "batch_size"),
        Same("clamp", "clamp_weights", CLAMP), Same("granularity", "name", mapping({"clip_layer_wise_adamerging": "layer"})))),
    Defaults("wemoe", "wemoe/weight_ensembling_moe.yaml", WEMOE),
    Defaults("e_wemoe", "wemoe/sparse_weight_ensembling_moe.yaml", WEMOE + (
        Same("sparsity", "tv_prune_ratio"), Same("shared_router", "shared_gate"))),
    Defaults("rankone_moe", "rankone_moe/rankone_moe.yaml", WEMOE + (Same("rank_k", "rank_k"), Same("select_k", "select_k"))),
    Defaults("concrete_task_arithmetic", "concrete_subspace/clip_concrete_task_arithmetic.yaml",
             CONCRETE + (Same("scaling_factor", "scaling_factor"), Same("steps", "max_steps"))),
    Defaults("concrete_adamerging", "concrete_subspace/clip_concrete_layer_wise_adamerging.yaml", CONCRETE_ADAMERGING + (
        Same("granularity", "name", mapping({"clip_concrete_layer_wise_adamerging": "layer"})),)),
    Defaults("concrete_adamerging", "concrete_subspace/clip_concrete_task_wise_adamerging.yaml", CONCRETE_ADAMERGING,
             {"granularity": "task"}, "granularity task"),
    Defaults("safe_concrete_adamerging", "concrete_subspace/clip_safe_concrete_layer_wise_adamerging.yaml", CONCRETE_ADAMERGING + (
        Same("adv_lr", "adv_lr"), Same("adv_weight", "adv_weight"), UNUSED_TRIGGER_NORM)),
    Defaults("awm", "concrete_subspace/clip_post_defense_AWM.yaml", DEFENSE + (UNUSED_TRIGGER_NORM,)),
    Defaults("sau", "concrete_subspace/clip_post_defense_SAU.yaml", DEFENSE + (
        Same("shared_weight", "shared_weight"), Same("beta1", "beta1"), Same("beta2", "beta2"), UNUSED_TRIGGER_NORM)),
    Defaults("surgery", "surgery/adamerging_surgery.yaml", (
        Same("surgery_steps", "surgery_steps"), Same("base", "name", mapping({"clip_layer_wise_adamerging_surgery": "adamerging"})),
        Same("lr", Code("method/surgery/clip_layer_wise_adamerging_surgery.py", r"lr=([\d.e-]+),")),
        Same("rank", Code("models/surgery/surgerymodelwrapper.py", r"hidden_dim: int = (\d+)")))),
    Defaults("emr_merging", "emr_merging/emr_merging.yaml"),
    Defaults("wudi", "wudi/wudi.yaml", (
        Same("iter_num", "iter_num"), Same("exclude_keys", "exclude_keys"),
        Same("lr", Code("method/wudi/wudi.py", r"torch\.optim\.Adam\(\[new_vector\[key\]\], lr=([\d.e-]+)")))),
    Defaults("fw_merging", "fw_merging/fw_hard.yaml", (
        Same("max_iters", "max_iters"), Same("step_size", "step_size"), Same("dataset_size", "dataset_size"),
        Same("scaling_factor", "scaling_factor"), Same("granularity", "granularity"), Same("merge_fn", "merge_fn"),
        Same("init", "init_weight", mapping({None: "merge_fn", "base": "base"}), "empty → the merge_fn start"))),
    Defaults("fw_soft", "fw_merging/fw_soft.yaml", (
        Same("max_iters", "max_iters"), Same("dataset_size", "dataset_size"), Same("ada_iters", "ada_iters"),
        Same("ada_coeff", "ada_coeff"), Same("granularity", "granularity"),
        Same("lr", Code("method/fw_merging/fw_soft.py", r"torch\.optim\.Adam\(\[module\.merge_weight\], lr=([\d.e-]+)\)")),
        Same("merge_fn", "merge_fn"), Same("step_size", "step_size"),
        Same("scaling_factor", Code("method/fw_merging/fw_soft.py", r"models_dict_to_merge, ([\d.]+) \* step")))),
    Defaults("svc", "singular_value_calibration/task_arithmetic.yaml", (
        Same("alpha", "alpha"),
        Same("base", "_target_", mapping({
            "fusion_bench.method.singular_value_calibration.task_arithmetic.SingularValueCalibrationArithmeticTask": "task_arithmetic"})))),
    Defaults("trust_region_ta", "trust_region/clip_task_arithmetic.yaml", (
        Same("scaling_factor", "scaling_factor"), Same("threshold_quantile", "threshold_quantile"), Same("max_samples", "max_samples"),
        Same("zero_shot", "zero_shot"))),
    Defaults("dop", "dop/dop.yaml", CONTINUAL + (
        Same("lr", "lr"), Same("num_steps", "num_steps"), Same("mgda", "mgda"), Same("alpha", "alpha"), Same("ema", "ema"),
        Same("ema_beta", "ema_beta"), Same("svd_epsilon", "svd_epsilon"), Same("svd_proj_space", "svd_proj_space"))),
    Defaults("opcm", "opcm/opcm.yaml", CONTINUAL + (Same("alpha", "alpha"),)),
    Defaults("continual_task_arithmetic", "opcm/task_arithmetic.yaml", CONTINUAL + (Same("scaling_factor", "scaling_factor"),)),
    Defaults("continual_ties", "opcm/ties_merging.yaml", CONTINUAL + (
        Same("scaling_factor", "scaling_factor"), Same("density", "threshold", pct, "% kept"), Same("merge_func", "merge_func"))),
    Defaults("continual_weight_average", "opcm/weight_average.yaml", CONTINUAL),
    Defaults("smile", "smile_upscaling/smile_upscaling.yaml", (
        Same("rank", "k"), Same("gate_k", "gate_k"), Same("top_k", "top_k"))),
    Defaults("iso_c", "isotropic_merging/iso_c.yaml", (Same("scaling_factor", "scaling_factor"),)),
    Defaults("iso_cts", "isotropic_merging/iso_cts.yaml", (
        Same("scaling_factor", "scaling_factor"), Same("common_space_fraction", "common_space_fraction"))),
    Defaults("tsv_m", "task_singular_vector/TaskSingularVectorMerging.yaml", (Same("scaling_factor", "alpha"),)),
    Defaults("tall_masks", "tall_mask/task_arithmetic.yaml", (Same("tall_mask_lambda", "tall_mask_lambda"),)),
    Defaults("consensus_ta", "tall_mask/task_arithmetic.yaml", (
        Same("tall_mask_lambda", "tall_mask_lambda"),
        Differs("scaling_factor", None, 0.3, None, "FusionBench has no consensus merge; λ is task_arithmetic.yaml's 0.3"))),
    Defaults("magnitude_pruning", "pruning/llama_magnitude_pruning.yaml", PRUNE),
    Defaults("random_pruning", "pruning/llama_random_pruning.yaml", PRUNE),
    Defaults("wanda_pruning", "pruning/llama_wanda_pruning.yaml", PRUNE + (CALIBRATION,)),
    Defaults("sparsegpt_pruning", "pruning/llama_sparsegpt_pruning.yaml", PRUNE + (
        CALIBRATION,
        Same("blocksize", Code("method/pruning/llama_sparsegpt_prune.py", r"blocksize=(\d+)")),
        Same("percdamp", Code("method/pruning/llama_sparsegpt_prune.py", r"percdamp=([\d.]+)")),
        Differs("exact_count", Code("method/pruning/sparsegpt_utils/sparsegpt.py", r"mask1 = tmp <= thresh"), True,
                "mask1 = tmp <= thresh", "FusionBench's rule prunes every score ≤ the one at rank ⌊B·s⌋ (one more per block, ties "
                "too); fuse prunes exactly ⌊B·s⌋ by default (exact_count: false is FusionBench's rule, matched in its parity row)"))),
    Defaults("mixtral_upcycling", "mixtral_moe_upscaling.yaml", (
        Same("num_experts", "num_experts"), Same("experts_per_token", "experts_per_token"))),
    Defaults("mixtral_merging", "mixtral_moe_merging.yaml", (Same("experts_per_token", "experts_per_token"),)),
    Defaults("doge", "doge_ta/doge_ta.yaml", (
        Same("subspace", "subspace"), Same("keep", "K"), Same("lamda", "lamda"),
        Same("steps", Code("method/doge_ta/doge_ta.py", r"for _ in range\((\d+)\)")),
        Same("lr", Code("method/doge_ta/doge_ta.py", r"torch\.optim\.Adam\(self\.delta\.values\(\), lr=([\d.e-]+)\)")))),
    Defaults("magmax", "magmax/magmax.yaml", (Same("scaling_factor", "scaling_factor"),)),
    Defaults("expo", "linear/expo.yaml", (Same("alpha", "extrapolation_factor"),)),
    Defaults("linear_interpolation", "linear/linear_interpolation.yaml", (Same("t", "t"),)),
    Defaults("slerp", "slerp/slerp.yaml", (Same("t", "t"),)),
    Defaults("weighted_average", "linear/weighted_average.yaml", (
        Same("normalize", "normalize"),
        Differs("weights", "weights", None, [0.5, 0.5], "FusionBench's example weights are for 2 models; fuse's null = equal weights "
                "for any pool size (the same for 2)"))),
    Defaults("simple_average", "simple_average.yaml"),
    Defaults("weighted_ensemble", "ensemble/weighted_ensemble.yaml", (Same("normalize", "normalize"), Same("weights", "weights"))),
    Defaults("simple_ensemble", "ensemble/simple_ensemble.yaml"),
    Defaults("max_model_predictor", "ensemble/max_model_predictor.yaml"),
    Defaults("model_stock", "model_stock/model_stock.yaml", (
        Differs("average", None, "angle", None, "not a FusionBench option: its ModelStock averages the pairwise angles (fuse's "
                "convention: fusionbench; mergekit averages cosines)"),)),
)

_yaml_cache: dict[str, Any] = {}


def _plain(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string: numbers as numbers."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() and re.match(r"^[-+]?\d+$", value.strip()) else number
    return value


def load_yaml(name: str, remember: bool = True) -> dict:
    import yaml

    data = yaml.safe_load((CONFIGS / name).read_text(encoding="utf-8")) or {}
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}" if not prefix else f"{prefix}.{key}", value)
        flat[prefix] = _plain(node) if prefix else None

    walk("", data)
    if remember:  # the row's own yaml, for conversions that read a second key (per_batch)
        _yaml_cache.clear()
        _yaml_cache.update(flat)
    return flat


def their_value(spec: str | Code | None, yaml_values: dict) -> Any:
    if spec is None:
        return None
    if isinstance(spec, (Code, Yaml)):
        return spec.value()
    assert spec in yaml_values, f"FusionBench's yaml has no key {spec!r} (keys: {sorted(k for k in yaml_values if k)})"
    return yaml_values[spec]


def our_defaults(method: str, config: dict) -> dict:
    from fusion_core.config import make_config
    from fusion_core.plugins import get_plugin_manager
    from fusion_core.registry import build_registry

    cls = build_registry(get_plugin_manager()).get("method", method).cls
    return attrs.asdict(cls(make_config(cls.Config, dict(config), where=f"method {method}")).config)


def _diff(a: Any, b: Any) -> float | None:
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return abs(float(a) - float(b))
    return None


def _same(a: Any, b: Any) -> bool:
    diff = _diff(a, b)
    if diff is not None:
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


@pytest.mark.parametrize("row", TABLE, ids=lambda r: f"{r.method}[{r.yaml}]")
def test_defaults_are_fusionbench(parity_row, row: Defaults):
    theirs_all = load_yaml(row.yaml)
    ours_all = our_defaults(row.method, row.config)
    compared, documented, problems, worst = [], [], [], 0.0
    for field in row.fields:
        theirs = their_value(field.theirs, theirs_all)
        ours = ours_all[field.ours] if field.ours is not None else None
        if isinstance(field, Differs):
            assert field.ours is None or field.ours in ours_all, f"{row.method} has no field {field.ours!r}"
            if not (_same(ours, field.our_value) and _same(theirs, field.their_value)):
                problems.append(f"documented difference changed: {field.ours}={ours!r} (documented {field.our_value!r}) ↔ "
                                f"{field.theirs}={theirs!r} (documented {field.their_value!r})")
            mine = f"{field.ours}={field.our_value!r}" if field.ours else "no field"
            peer = f"{field.theirs}={field.their_value!r}" if field.theirs else "no key"
            documented.append(f"{mine} vs {peer}: {field.why}")
            continue
        expected = field.convert(theirs) if field.convert is not None else theirs
        if not _same(ours, expected):
            problems.append(f"{field.ours}={ours!r} but FusionBench {field.theirs}={theirs!r} → {expected!r}")
        diff = _diff(ours, expected)
        worst = max(worst, diff if diff is not None else 0.0 if _same(ours, expected) else math.inf)
        unit = f" ({field.unit})" if field.unit else ""
        where = field.theirs
        compared.append(f"{field.ours}={ours!r}↔{where}{unit}")
    note = (f"{len(compared)} field(s) equal: " + ", ".join(compared)) if compared else "no settings on either side"
    if documented:
        note += "; documented differences: " + "; ".join(documented)
    parity_row(row.method, PEER, f"defaults ({row.yaml}{', ' + row.label if row.label else ''})",
               None if problems else worst, note if not problems else "MISMATCH: " + "; ".join(problems))
    assert not problems, f"{row.method} vs FusionBench {row.yaml}: " + "; ".join(problems)


def test_each_method_names_the_config_of_its_defaults():
    """``fusionbench_config`` (what ``fuse show`` prints) is the yaml of the method's row without overrides."""
    from fusion_core.plugins import get_plugin_manager
    from fusion_core.registry import build_registry

    registry = build_registry(get_plugin_manager())
    default_rows = {row.method: row.yaml for row in TABLE if not row.config}
    assert len(default_rows) == len({row.method for row in TABLE}), "every method needs a row without overrides"
    for name in registry.names("method"):
        declared = registry.get("method", name).cls.fusionbench_config
        assert declared == default_rows.get(name), f"{name}: fusionbench_config {declared!r}, its defaults row {default_rows.get(name)!r}"


def test_every_fusionbench_method_of_ours_is_in_the_table():
    """A method we have from FusionBench (its help or reference names FusionBench) must have a row here."""
    from fusion_core.plugins import get_plugin_manager
    from fusion_core.registry import build_registry

    registry = build_registry(get_plugin_manager())
    covered = {row.method for row in TABLE}
    not_fusionbench = {  # fusion's or mergekit's own methods, with no FusionBench counterpart
        "breadcrumbs", "della", "karcher", "layer_stack", "magnitude_prune", "multislerp", "nuslerp", "sce", "dummy",
        "example_median",
    }
    missing = sorted(set(registry.names("method")) - covered - not_fusionbench)
    assert not missing, f"methods with neither a defaults row nor a reason to have none: {missing}"
    for row in TABLE:
        assert (CONFIGS / row.yaml).is_file(), f"FusionBench 0.2.33 has no {row.yaml}"
