"""The plugin as installed: listed by `fuse plugins`, cheap to import, and the FusionBench config validates offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "clip-vit-b32-tall8.yaml"
POOLS = ["hf", "hf_causal_lm", "hf_clip_vision", "hf_seq2seq", "hf_seq_classification"]
TASK_POOLS = ["causal_lm_perplexity", "clip_backdoor", "clip_zero_shot", "text_classification"]


def test_fuse_plugins_json_lists_hf(capsys):
    from fusion_core.cli.main import main

    assert main(["plugins", "--json"]) == 0
    plugins = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    hf = plugins["hf"]
    assert (hf["distribution"], hf["status"], hf["module"]) == ("fusion-hf", "ok", "fusion_hf.plugin")
    registered = set(hf["registered"])
    assert {f"model-pool:{n}" for n in POOLS} | {f"task-pool:{n}" for n in TASK_POOLS} | {"benchmark:clip-vit-b32-tall8"} <= registered


def test_listing_does_not_import_torch_transformers_or_datasets():
    code = ("import sys\nfrom fusion_core.cli.main import main\n"
            "codes = [main(['list']), main(['show', 'hf_clip_vision']), main(['show', 'clip_zero_shot'])]\n"
            "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
            "print(codes, heavy, file=sys.stderr)\nassert codes == [0, 0, 0] and heavy == [], heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_config_file_and_registered_benchmark_describe_the_same_pools():
    from fusion_hf import fusionbench

    data = yaml.safe_load(CONFIG.read_text())
    assert data["modelpool"] == fusionbench.modelpool()
    assert data["taskpool"] == fusionbench.taskpool()
    assert set(data["modelpool"]["models"]) == set(data["taskpool"]["tasks"]) == set(fusionbench.TASKS)
    assert data["modelpool"]["models"]["svhn"]["path"] == "tanganke/clip-vit-base-patch32_svhn"


def test_fusionbench_task_sets_use_fusionbenchs_class_names_and_templates_cited_per_dataset():
    from fusion_hf import fusionbench

    data = fusionbench.clip_tasks()["datasets"]
    assert set(data) == set(fusionbench.TASKS_20) and len(fusionbench.TASKS_14) == 14 and fusionbench.TASKS_14[:8] == fusionbench.TASKS
    for task, entry in data.items():
        assert entry["source"].startswith("FusionBench 0.2.33 fusion_bench/tasks/clip_classification/"), task
        assert entry["templates"] and all(t.count("{}") == 1 for t in entry["templates"]), task
    assert len(data["sun397"]["class_names"]) == 397 and len(data["stanford-cars"]["class_names"]) == 196
    assert len(data["cifar100"]["class_names"]) == 100 and len(data["gtsrb"]["class_names"]) == 43
    assert data["mnist"]["templates"] == ['a photo of the number: "{}".'] and data["dtd"]["templates"][0] == "a photo of a {} texture."
    spec = fusionbench.task_spec("fer2013")
    assert (spec["dataset"], spec["image_column"], spec["label_column"]) == ("clip-benchmark/wds_fer2013", "jpg", "cls")
    assert fusionbench.task_spec("svhn")["config"] == "cropped_digits"


def test_a_fusionbench_preset_task_expands_and_given_fields_override():
    import pytest
    from fusion_hf.task_pools.clip_zero_shot import ClipZeroShot, ClipZeroShotConfig

    from fusion_core.config import make_config
    from fusion_core.errors import ConfigError

    config = make_config(ClipZeroShotConfig, {"clip_model": "x", "tasks": {"dtd": {"fusionbench": "dtd", "split": "train"}}})
    spec = ClipZeroShot(config).specs["dtd"]
    assert (spec.dataset, spec.split, len(spec.class_names), spec.templates[0]) == ("tanganke/dtd", "train", 47, "a photo of a {} texture.")
    with pytest.raises(ConfigError, match="unknown FusionBench dataset 'dtdd'"):
        ClipZeroShot(make_config(ClipZeroShotConfig, {"clip_model": "x", "tasks": {"t": {"fusionbench": "dtdd"}}}))


def test_fusionbench_config_dry_run_validates_offline_and_lists_downloads(capsys, monkeypatch):
    from fusion_core.cli.main import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["run", str(CONFIG), "--dry-run"]) == 0
    captured = capsys.readouterr()
    plan = yaml.safe_load(captured.out)
    assert plan["modelpool"]["base"] == "would fetch openai/clip-vit-base-patch32@main"
    assert len(plan["modelpool"]["would_fetch"]) == 9
    assert plan["taskpool"]["tasks"]["mnist"] == "would fetch dataset mnist@main [test]"  # FusionBench's test config: hub 'mnist'
    assert plan["taskpool"]["tasks"]["svhn"] == "would fetch dataset svhn/cropped_digits@main [test]"
    assert "nothing was loaded" in captured.err
    assert main(["run", "benchmark=clip-vit-b32-tall8", "--dry-run"]) == 0
