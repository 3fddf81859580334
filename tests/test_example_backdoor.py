"""examples/backdoor_safe_merging runs as its README says, on a tiny build (so it cannot rot)."""

from __future__ import annotations

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "backdoor_safe_merging"
TINY = dict(tasks="[chatter_topic, language_id]", backdoor_tasks="[chatter_topic]", n_train=120, n_val=40, n_test=80, max_tokens=16,
            layers=1, epochs=2, lr=5e-4, poison_rate=0.3, progress="false")


def test_the_example_config_merges_and_reports_accuracy_and_asr(tmp_path):
    pytest.importorskip("fusion_minibench", reason="the example runs on the mini benchmark (plugins/fusion-minibench)")
    pytest.importorskip("fusion_adaptive", reason="the example's method is in plugins/fusion-adaptive")
    import yaml

    import fusion_core

    config = yaml.safe_load((EXAMPLE / "config.yaml").read_text(encoding="utf-8"))
    assert config["benchmark"] == "mini-backdoor" and config["method"]["name"] == "safe_concrete_adamerging"
    fields = {"name": "minibench-backdoor", **TINY, "cache_dir": tmp_path}  # the benchmark's pools, built tiny
    overrides = [f"{pool}.{k}={v}" for pool in ("modelpool", "taskpool") for k, v in fields.items()]
    report = fusion_core.run(str(EXAMPLE / "config.yaml"), overrides=[*overrides, "method.steps=2", "method.adamerging_steps=2"],
                             write=False)
    results = report["results"]
    for row in ("merged", "pretrained", "individual"):
        assert set(results[row]) == {"chatter_topic", "language_id"}
        assert all({"accuracy", "asr"} <= set(metrics) for metrics in results[row].values())
    assert results["individual"]["chatter_topic"]["asr"] > results["pretrained"]["chatter_topic"]["asr"] + 0.2  # the backdoored expert
    extras = report["method_extras"]["safe_concrete_adamerging"]
    assert extras["steps"] == 2 and extras["perturb_site"] == "embeddings" and len(extras["perturbation_l2"]) == 2


def test_the_readme_commands_name_the_shipped_config():
    text = (EXAMPLE / "README.md").read_text(encoding="utf-8")
    assert "fuse run examples/backdoor_safe_merging/config.yaml" in text
    assert "fuse bench mini-backdoor" in text and "--metric asr" in text


def test_the_methods_file_plans_on_the_mini_backdoor_benchmark():
    pytest.importorskip("fusion_minibench", reason="the example runs on the mini benchmark (plugins/fusion-minibench)")
    pytest.importorskip("fusion_adaptive", reason="the example's methods are in plugins/fusion-adaptive")
    from fusion_lab.cli.bench import load_methods_file, plan_bench

    from fusion_core.plugins import get_plugin_manager
    from fusion_core.registry import build_registry

    specs = load_methods_file(str(EXAMPLE / "methods.yaml"))
    plan = plan_bench(build_registry(get_plugin_manager()), "mini-backdoor", specs, (0,))
    names = [cell.config_dict["method"]["name"] for cell in plan.cells]
    assert names[:2] == ["task_arithmetic", "ties"] and names.count("safe_concrete_adamerging") == 2 and len(names) == 8
    from fusion_minibench.plugin import BACKDOOR_METHODS

    assert specs == BACKDOOR_METHODS  # the file is the benchmark's own list


def test_the_objective_ablation_file_plans_and_sets_the_consistency_objective():
    pytest.importorskip("fusion_minibench", reason="the example runs on the mini benchmark (plugins/fusion-minibench)")
    pytest.importorskip("fusion_adaptive", reason="the example's methods are in plugins/fusion-adaptive")
    from fusion_lab.cli.bench import load_methods_file, plan_bench

    from fusion_core.plugins import get_plugin_manager
    from fusion_core.registry import build_registry

    specs = load_methods_file(str(EXAMPLE / "objective_ablation.yaml"))
    plan = plan_bench(build_registry(get_plugin_manager()), "mini-backdoor", specs, (0,))
    methods = [cell.config_dict["method"] for cell in plan.cells]
    assert len(methods) == 6 and all(m["adv_objective"] == "consistency" for m in methods)
    assert all(m["adamerging_steps"] == 0 for m in methods if m["name"] == "safe_concrete_adamerging")


def test_the_vision_recipe_seed_file_plans_the_image_benchmarks_own_settings():
    pytest.importorskip("fusion_minibench", reason="the example runs on the mini benchmark (plugins/fusion-minibench)")
    pytest.importorskip("fusion_adaptive", reason="the example's methods are in plugins/fusion-adaptive")
    from fusion_lab.cli.bench import load_methods_file, plan_bench
    from fusion_minibench.plugin import VISION_METHODS

    from fusion_core.plugins import get_plugin_manager
    from fusion_core.registry import build_registry

    specs = load_methods_file(str(EXAMPLE / "vision_recipe_seeds.yaml"))
    assert all(spec in VISION_METHODS for spec in specs)  # the benchmark's settings, a subset of its list
    plan = plan_bench(build_registry(get_plugin_manager()), "mini-vision-backdoor", specs, (0, 1, 2))
    assert [cell.config_dict["method"]["name"] for cell in plan.cells[:4]] == ["task_arithmetic", "adamerging",
                                                                             "concrete_adamerging", "safe_concrete_adamerging"]
    assert len(plan.cells) == 12 and plan.cells[0].config_dict["modelpool"]["name"] == "minibench-vision-backdoor"
